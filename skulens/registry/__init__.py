"""MLflow: logging and registering encoders, the promotion decision, and the model store that fetches, verifies
and caches an encoder by reference."""
