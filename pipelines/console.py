"""How `skulens run` launches a job: Dagster's supported in-process API (`execute_in_process` on the
instance in DAGSTER_HOME, so the run shows in the UI like any other), with a console that prints one
line per asset as it finishes (duration and its key figure), one per asset check, a progress line for
long steps, and one line naming the failed asset and the cause.

Console lines carry a marker (``MARK``) so that `skulens run` shows them and sends everything else
(Dagster's own event log, library warnings, tracebacks) only to the log file.

Run: ``python -m pipelines.console --job main`` (what `skulens run` does).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable

from skulens.ops.cli import ERROR_MARK, MARK, PROGRESS, SKIPPED_EXIT  # the console protocol `skulens run` reads


def _v(meta: dict, key: str, default=None):
    """A metadata entry's plain value."""
    if key not in meta:
        return default
    value = meta[key]
    return getattr(value, "value", value)


def _pct(x) -> str:
    return "n/a" if x is None else f"{float(x):.1%}"


# The key figure of each asset, from its materialization metadata. Anything else: its first scalars.
FIGURES: dict[str, Callable[[dict], str]] = {
    "catalog_products": lambda m: f"{_v(m, 'skus')} SKUs, {_v(m, 'categories')} categories",
    "catalog_images": lambda m: (f"{_v(m, 'objects')} images of {_v(m, 'skus')} SKUs (+{_v(m, 'added')} "
                                 f"~{_v(m, 'changed')} -{_v(m, 'removed')}, {_v(m, 'rejected')} rejected)"),
    "shelf_crops": lambda m: f"{_v(m, 'objects')} shelf crops of {_v(m, 'skus')} SKUs",
    "cleaned_catalog": lambda m: (f"kept {_v(m, 'files_kept')}/{_v(m, 'files_in')} files, {_v(m, 'skus_kept')} SKUs "
                                  f"({_v(m, 'skus_train')} to train, {_v(m, 'skus_index_only')} index-only)"),
    "balanced_dataset": lambda m: (f"{_v(m, 'skus')} SKUs x depth {_v(m, 'depth')} = {_v(m, 'train_rows')} rows, "
                                   f"{_v(m, 'val_images')} held out"),
    "dataset_version": lambda m: f"clean {str(_v(m, 'clean_md5', ''))[:12]}, balanced {str(_v(m, 'balanced_md5', ''))[:12]}",
    "trained_encoder": lambda m: (f"skipped: {_v(m, 'reason')}" if _v(m, "skipped") else
                                  f"{_v(m, 'steps')} steps on {_v(m, 'device')}, val top-1 {_pct(_v(m, 'val_acc_before'))}"
                                  f" -> {_pct(_v(m, 'val_acc'))}, {_v(m, 'train_images_per_s')} images/s"),
    "model_evaluation": lambda m: (f"top-1 challenger {_pct(_v(m, 'challenger_catalog_top1'))}, champion "
                                   f"{_pct(_v(m, 'champion_catalog_top1'))}, base {_pct(_v(m, 'base_catalog_top1'))} "
                                   f"on {_v(m, 'crops')} crops"),
    "registered_model": lambda m: (f"v{_v(m, 'version')} {'PROMOTED' if _v(m, 'promoted') else 'not promoted'}; "
                                   f"champion v{_v(m, 'champion_version')}" if _v(m, "version") not in (None, "none")
                                   else f"nothing registered, champion v{_v(m, 'champion_version')} kept: "
                                        f"{str(_v(m, 'reason', '')).removeprefix('nothing registered: ')[:90]}"),
    "onnx_export": lambda m: f"champion v{_v(m, 'model_version')}, max |diff| vs PyTorch {_v(m, 'max_abs_diff'):.1e}",
    "sku_index": lambda m: (f"{_v(m, 'count')} vectors, {_v(m, 'skus')} SKUs, version {_v(m, 'version')}"
                            f"{'' if _v(m, 'published', True) else ' (unchanged)'}"),
}


def key_figure(asset: str, meta: dict) -> str:
    fmt = FIGURES.get(asset)
    if fmt is not None:
        try:
            return fmt(meta)
        except (TypeError, ValueError):
            pass
    scalars = [f"{k}={_v(meta, k)}" for k in meta if isinstance(_v(meta, k), (int, float, str))
               and len(str(_v(meta, k))) < 40]
    return ", ".join(scalars[:3])


def _duration(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 60 else f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def _failure_cause(data) -> str:
    """The one-line cause of a STEP_FAILURE: a skulens error if there is one, else the innermost message."""
    texts = []
    user = getattr(data, "user_failure_data", None)
    if user is not None and getattr(user, "description", None):
        texts.append(user.description)
    err = getattr(data, "error", None)
    while err is not None:
        texts.append(err.message or "")
        err = err.cause
    for t in texts:
        i = t.find(ERROR_MARK)
        if i >= 0:
            return t[i:].strip().splitlines()[0]
    last = next((t for t in reversed(texts) if t.strip()), "unknown error")
    return last.strip().splitlines()[0]


class RunConsole:
    """Follows one run's event log (polling the instance) and emits console lines."""

    def __init__(self, instance, run_id: str, emit: Callable[[str], None], progress_every_s: float = 20.0,
                 poll_s: float = 0.5, progress: Callable[[str], None] | None = None):
        self.instance, self.run_id, self.emit = instance, run_id, emit
        self.progress = progress or _print_progress
        self.progress_every_s, self.poll_s = progress_every_s, poll_s
        self.seen = 0
        self.started: dict[str, float] = {}
        self.meta: dict[str, dict] = {}
        self.last_log: dict[str, str] = {}
        self.checks: dict[str, list[str]] = {}
        self.last_progress = time.monotonic()
        self.failed: list[tuple[str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="skulens-console", daemon=True)

    def start(self) -> "RunConsole":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.poll()  # what came in after the last tick

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
                self._progress()
            except Exception as exc:  # the console must never break the run  # noqa: BLE001
                self.emit(f"(console: {type(exc).__name__}: {exc})")

    def _progress(self) -> None:
        now = time.monotonic()
        if not self.started or now - self.last_progress < self.progress_every_s:
            return
        self.last_progress = now
        for step, t0 in self.started.items():
            note = self.last_log.get(step, "")
            self.progress(f"{step:<18} running {_duration(time.time() - t0)}{'  ' + note[:90] if note else ''}")

    def poll(self) -> None:
        from dagster import DagsterEventType

        entries = self.instance.all_logs(self.run_id)
        for entry in entries[self.seen:]:
            self._on(entry, DagsterEventType)
        self.seen = len(entries)

    def _on(self, entry, T) -> None:
        ev = entry.dagster_event
        step = entry.step_key
        if ev is None:  # a context.log message (INFO and above: not the IO manager's DEBUG lines)
            if step and entry.user_message and entry.level >= 20:
                self.last_log[step] = entry.user_message.strip().splitlines()[0]
            return
        kind = ev.event_type
        if kind == T.STEP_START:
            self.started[step] = entry.timestamp
        elif kind == T.ASSET_MATERIALIZATION:
            mat = ev.event_specific_data.materialization
            self.meta[step] = dict(mat.metadata)
        elif kind == T.ASSET_CHECK_EVALUATION:
            ce = ev.event_specific_data
            sev = getattr(getattr(ce, "severity", None), "value", "ERROR")
            verdict = "passed" if ce.passed else ("FAILED" if sev == "ERROR" else "warned")
            self.checks.setdefault(step, []).append(f"{ce.check_name} {verdict}")
        elif kind == T.STEP_SUCCESS:
            took = _duration(entry.timestamp - self.started.pop(step, entry.timestamp))
            checks = self.checks.pop(step, [])
            if step in self.meta or not checks:
                self.emit(f"{step:<18} {took:>7}  {key_figure(step, self.meta.get(step, {}))}")
                for c in checks:  # checks evaluated inside the asset's own step
                    self.emit(f"  check {c}")
            else:  # a step of its own that only evaluates checks
                for c in checks:
                    name, verdict = c.rsplit(" ", 1)
                    self.emit(f"  check {name:<34} {verdict:<7} {took:>7}")
        elif kind == T.STEP_FAILURE:
            self.started.pop(step, None)
            cause = _failure_cause(ev.event_specific_data)
            self.failed.append((step, cause))
            self.emit(f"{step:<18}  FAILED  {cause}")
        elif kind == T.STEP_SKIPPED:
            self.emit(f"{step:<18} skipped (an upstream step failed)")


def _unchanged() -> str | None:
    """The nightly retrain policy, with the code location's own resources (EnvVars resolved)."""
    import dagster as dg

    from pipelines.automation import unchanged_since_champion
    from pipelines.definitions import defs

    with dg.build_resources({k: defs.resources[k] for k in ("s3", "mlflow")}) as res:
        return unchanged_since_champion(res.s3, res.mlflow)


def _print(line: str) -> None:
    sys.stdout.write(MARK + line + "\n")
    sys.stdout.flush()


def _print_progress(line: str) -> None:
    sys.stdout.write(PROGRESS + line + "\n")
    sys.stdout.flush()


def run_job(job_name: str, instance=None, defs=None, emit: Callable[[str], None] | None = None,
            progress_every_s: float = 20.0) -> tuple[bool, str, list[tuple[str, str]]]:
    """Execute ``job_name`` in process on ``instance`` (default: DAGSTER_HOME's), printing the console.
    Returns ``(success, run_id, [(failed step, cause)])``."""
    import dagster as dg

    emit = emit or _print
    if defs is None:
        from pipelines.definitions import defs
    instance = instance or dg.DagsterInstance.get()
    job = defs.resolve_job_def(job_name)
    run_id = str(uuid.uuid4())
    console = RunConsole(instance, run_id, emit, progress_every_s=progress_every_s).start()
    try:
        result = job.execute_in_process(instance=instance, run_id=run_id, raise_on_error=False)
    finally:
        console.stop()
    return result.success, run_id, console.failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.console",
                                     description="Execute a skulens job with a one-line-per-asset console.")
    parser.add_argument("--job", default="main", help="job name (default: main)")
    parser.add_argument("--force", action="store_true",
                        help="run `main` even when the nightly retrain policy would skip it")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", DeprecationWarning)
    if args.job == "main" and not args.force:
        why = _unchanged()
        if why:
            _print(f"skipped: {why} (`skulens run --force` retrains anyway)")
            return SKIPPED_EXIT
    ok, run_id, failed = run_job(args.job)
    if ok:
        _print(f"run {run_id} succeeded")
        return 0
    step, cause = failed[0] if failed else ("?", f"run {run_id} failed")
    _print(f"run {run_id} failed")
    _print(f"{ERROR_MARK}{step}: {cause.removeprefix(ERROR_MARK)}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
