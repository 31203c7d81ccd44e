"""Great Expectations (1.x) suite over the cleaning stage's tables, with optional HTML Data Docs.

GX is imported inside ``validate_catalog`` only (about 2.5-7 s and a few hundred MB on first import),
so importing this module is free. Analytics are switched off (``GX_ANALYTICS_ENABLED=false``) before
the import.

Tables validated (each its own pandas dataframe asset and expectation suite):

* ``products``      -- sku not null (blank counts as null), sku unique.
* ``images``        -- the per-image table (kept + dropped, ``status`` column): mean of ``dropped``
                       (= share of dropped files) <= ``max_dropped_share``.
* ``kept_images``   -- rows with status "kept": sku in products, width/height in
                       [min_side, max_pixels // min_side], format in the allowed set, sha256 not null.
* ``kept_per_sku``  -- kept images per kept SKU: min >= ``min_index_images`` (index-only SKUs are kept).
"""

from __future__ import annotations

import datetime
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd

from skulens.data.clean import CleanConfig

DATASOURCE = "skulens"
BATCH_DEFINITION = "whole"
_SAMPLE = 20  # unexpected values kept per expectation


@dataclass
class ExpectationOutcome:
    table: str
    name: str  # GX expectation type, e.g. "expect_column_values_to_be_unique"
    column: str | None
    success: bool
    observed: Any  # observed_value, or "N unexpected of M" for column-map expectations
    unexpected: list = field(default_factory=list)  # sample of offending values
    kwargs: dict = field(default_factory=dict)


@dataclass
class QualityReport:
    success: bool
    results: list[ExpectationOutcome]
    docs_path: Path | None = None  # Data Docs index.html (when docs_dir was given)
    seconds: float = 0.0
    import_seconds: float = 0.0  # time spent importing great_expectations in this call (0 if already loaded)

    def failed(self) -> list[ExpectationOutcome]:
        return [r for r in self.results if not r.success]

    def to_html(self, title: str = "skulens data quality") -> str:
        """A self-contained validation report (inline CSS, no script, nothing from the network): readable
        offline, unlike GX Data Docs, which load their styles and scripts from CDNs."""
        from html import escape

        def cell(v: Any) -> str:
            return escape(str(v if v is not None else ""))[:300]

        rows = "".join(
            f"<tr class='{'ok' if r.success else 'bad'}'><td>{cell(r.table)}</td><td>{cell(r.name)}</td>"
            f"<td>{cell(r.column)}</td><td>{'passed' if r.success else 'FAILED'}</td><td>{cell(r.observed)}</td>"
            f"<td>{cell(', '.join(map(str, r.unexpected[:10])))}</td></tr>" for r in self.results)
        verdict = "all expectations passed" if self.success else f"{len(self.failed())} expectation(s) failed"
        return ("<!doctype html><html><head><meta charset='utf-8'><title>" + escape(title) + "</title><style>"
                "body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse}"
                "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;font-size:14px}"
                "th{background:#f2f2f2}tr.bad td{background:#fde2e1}tr.ok td:nth-child(4){color:#176f2c}"
                "</style></head><body><h1>" + escape(title) + "</h1><p><b>" + verdict + f"</b> ({len(self.results)} "
                f"evaluated in {self.seconds:.1f}s)</p><table><tr><th>table</th><th>expectation</th><th>column</th>"
                "<th>result</th><th>observed</th><th>unexpected (sample)</th></tr>" + rows + "</table></body></html>")

    def to_metadata(self) -> dict[str, Any]:
        """JSON-serialisable summary (Dagster metadata, logs)."""
        return {
            "success": self.success,
            "evaluated": len(self.results),
            "failed": [f"{r.table}.{r.name}({r.column or ''})" for r in self.failed()],
            "results": [
                {"table": r.table, "expectation": r.name, "column": r.column, "success": r.success,
                 "observed": r.observed, "unexpected": r.unexpected}
                for r in self.results
            ],
            "docs_path": str(self.docs_path) if self.docs_path else None,
            "seconds": round(self.seconds, 3),
        }


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return None if math.isnan(f) else f
    if isinstance(v, np.bool_):
        return bool(v)
    if v is None or v is pd.NA or v is pd.NaT:
        return None
    if isinstance(v, (str, int, bool)):
        return v
    return str(v)


def _tables(images: pd.DataFrame, products: pd.DataFrame) -> dict[str, pd.DataFrame]:
    prod = pd.DataFrame(index=products.index)
    if "sku" in products.columns:
        ids = products["sku"].astype("string").str.strip()
        prod["sku"] = ids.mask(ids == "")
    else:
        prod["sku"] = pd.Series(pd.NA, index=products.index, dtype="string")
    img = images.copy()
    if "status" not in img.columns:
        raise ValueError("images needs a 'status' column ('kept' / 'dropped'), e.g. CleanResult.images")
    img["dropped"] = (img["status"] != "kept").astype("float64")
    cols = ["sku", "width", "height", "format", "sha256"]
    kept = img.loc[img["status"] == "kept", [c for c in cols if c in img.columns]].reset_index(drop=True)
    kept["sku"] = kept["sku"].astype("string")
    for c in ("width", "height"):
        if c in kept.columns:
            kept[c] = pd.to_numeric(kept[c], errors="coerce").astype("float64")
    if "format" in kept.columns:
        kept["format"] = kept["format"].astype("object")
    per_sku = kept.groupby("sku").size().rename("kept_images").reset_index()
    per_sku["kept_images"] = per_sku["kept_images"].astype("int64")
    return {
        "products": prod,
        "images": img[["sku", "key", "status", "dropped"]].copy() if "key" in img.columns else img[["sku", "status", "dropped"]],
        "kept_images": kept,
        "kept_per_sku": per_sku,
    }


def _suites(gx, products_skus: list[str], cfg: CleanConfig, max_dropped_share: float) -> dict[str, list]:
    E = gx.expectations
    max_side = max(cfg.min_side, cfg.max_pixels // cfg.min_side)
    return {
        "products": [
            E.ExpectColumnToExist(column="sku"),
            E.ExpectColumnValuesToNotBeNull(column="sku"),
            E.ExpectColumnValuesToBeUnique(column="sku"),
        ],
        "images": [
            E.ExpectColumnMeanToBeBetween(column="dropped", min_value=0.0, max_value=float(max_dropped_share)),
        ],
        "kept_images": [
            E.ExpectColumnValuesToBeInSet(column="sku", value_set=products_skus or ["<no products>"]),
            E.ExpectColumnValuesToBeBetween(column="width", min_value=cfg.min_side, max_value=max_side),
            E.ExpectColumnValuesToBeBetween(column="height", min_value=cfg.min_side, max_value=max_side),
            E.ExpectColumnValuesToBeInSet(column="format", value_set=list(cfg.allowed_formats)),
            E.ExpectColumnValuesToNotBeNull(column="sha256"),
        ],
        "kept_per_sku": [
            E.ExpectTableRowCountToBeBetween(min_value=1),
            E.ExpectColumnMinToBeBetween(column="kept_images", min_value=cfg.min_index_images),
        ],
    }


def _get_or_add_asset(ds, name: str):
    try:
        asset = ds.get_asset(name)
    except LookupError:
        asset = ds.add_dataframe_asset(name=name)
    try:
        return asset.get_batch_definition(BATCH_DEFINITION)
    except (KeyError, LookupError):
        return asset.add_batch_definition_whole_dataframe(BATCH_DEFINITION)


def _outcome(table: str, r: Any) -> ExpectationOutcome:
    cfg = r.expectation_config
    res = dict(r.result or {})
    if "observed_value" in res:
        observed = _jsonable(res["observed_value"])
    elif "unexpected_count" in res:
        observed = f"{res.get('unexpected_count')} unexpected of {res.get('element_count')}"
    else:
        observed = None
    if r.exception_info and r.exception_info.get("raised_exception"):
        observed = f"exception: {r.exception_info.get('exception_message')}"
    kwargs = {k: v for k, v in dict(cfg.kwargs).items() if k not in ("batch_id", "value_set")}
    return ExpectationOutcome(
        table=table, name=cfg.type, column=cfg.kwargs.get("column"), success=bool(r.success), observed=observed,
        unexpected=_jsonable(list(res.get("partial_unexpected_list") or [])[:_SAMPLE]), kwargs=_jsonable(kwargs),
    )


def validate_catalog(images: pd.DataFrame, products: pd.DataFrame, cfg: CleanConfig | None = None,
                     docs_dir: str | os.PathLike | None = None, max_dropped_share: float | None = None,
                     run_name: str | None = None) -> QualityReport:
    """Run the suite. ``images`` is ``CleanResult.images`` (needs sku, status; kept rows need width,
    height, format, sha256). With ``docs_dir`` a file-backed GX project is kept under ``docs_dir/gx``
    (results accumulate across runs) and Data Docs are rebuilt; ``docs_path`` is their index.html.
    Without it an ephemeral context is used and nothing is written. The four validations share one GX
    run id (``run_name``, e.g. a Dagster run id; default "skulens-clean")."""
    t0 = time.perf_counter()
    cfg = cfg or CleanConfig()
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import sys

    already = "great_expectations" in sys.modules
    t_imp = time.perf_counter()
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.base import ProgressBarsConfig

    import_seconds = 0.0 if already else time.perf_counter() - t_imp

    if docs_dir is not None:
        root = Path(docs_dir)
        root.mkdir(parents=True, exist_ok=True)
        context = gx.get_context(mode="file", project_root_dir=str(root))
    else:
        context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)

    tables = _tables(images, products)
    product_skus = sorted(tables["products"]["sku"].dropna().unique().tolist())
    if max_dropped_share is None:  # the threshold the catalog was cleaned with
        max_dropped_share = cfg.max_dropped_share
    suites = _suites(gx, product_skus, cfg, max_dropped_share)
    ds = context.data_sources.add_or_update_pandas(name=DATASOURCE)

    run_id = RunIdentifier(run_name=run_name or "skulens-clean", run_time=datetime.datetime.now(datetime.timezone.utc))
    outcomes: list[ExpectationOutcome] = []
    for table, expectations in suites.items():
        batch_def = _get_or_add_asset(ds, table)
        suite = context.suites.add_or_update(gx.ExpectationSuite(name=f"skulens_{table}", expectations=expectations))
        vd = context.validation_definitions.add_or_update(
            gx.ValidationDefinition(name=f"skulens_{table}", data=batch_def, suite=suite)
        )
        res = vd.run(batch_parameters={"dataframe": tables[table]}, result_format="SUMMARY",
                     run_id=run_id)
        outcomes.extend(_outcome(table, r) for r in res.results)

    docs_path = None
    if docs_dir is not None:
        urls = context.build_data_docs()
        url = urls.get("local_site") or next(iter(urls.values()), None)
        if url:
            docs_path = Path(unquote(urlparse(url).path))
    return QualityReport(
        success=all(o.success for o in outcomes), results=outcomes, docs_path=docs_path,
        seconds=time.perf_counter() - t0, import_seconds=import_seconds,
    )
