"""Recognition of shelf crops with the published index and its model, and the HTTP API."""
