"""Software-defined assets, one module per domain. Each asset is a short call into skulens plus metadata."""

OWNERS = ["team:ml-platform"]  # shown in the Dagster UI; set to your team
