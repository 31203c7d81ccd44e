"""The Dagster code location: composes Definitions, jobs, schedules and sensors (definitions.py, automation.py);
console.py is how `skulens run` executes a job and prints its console."""
