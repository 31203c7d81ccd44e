"""The Dagster code location: composes Definitions, jobs, schedules and sensors only."""
