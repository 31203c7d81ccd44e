"""Software-defined assets, one module per domain. Each asset is a short call into skulens plus metadata."""
