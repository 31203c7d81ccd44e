
from pathlib import Path

import dagster as dg


class LocalStateResource(dg.ConfigurableResource):
    """Where runs keep their local working copies (image cache, reports, checkpoints)."""

    home: str

    def path(self, *parts: str) -> Path:
        p = Path(self.home).joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p
