
from pathlib import Path

import dagster as dg


class LocalStateResource(dg.ConfigurableResource):
    """Where runs keep their local working copies (image cache, reports, checkpoints)."""

    home: str
    cache: str | None = None  # the machine's cache folder (SKULENS_CACHE_DIR); default <home>/cache

    def path(self, *parts: str) -> Path:
        p = Path(self.home).joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p

    def cache_path(self, *parts: str) -> Path:
        p = Path(self.cache or Path(self.home) / "cache").joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p
