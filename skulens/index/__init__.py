"""The SKU embedding index: search, building it from the catalog, publishing behind an atomic pointer, and
incremental updates."""
