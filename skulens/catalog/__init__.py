"""The catalog in S3: its contract (keys, SKU ids, products.csv), S3 access, import, incremental pull, catalog
state, and the synthetic demo catalog."""
