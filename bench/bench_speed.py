"""Every speed figure of issue 10 in one run: each path next to its model-only figure.

    .venv/bin/python bench/bench_speed.py                 # embed, train, index (100k + 800k), serve
    .venv/bin/python bench/bench_speed.py --new-sku       # + upload->recognizable with the real daemon
    .venv/bin/python bench/bench_speed.py --only embed index --sizes 100000

Runs the focused benchmarks one after the other (never two at once: they would share the cores), each in
its own process so one's memory and threads do not disturb the next, streams their output, keeps it in
``--out`` (one log and one JSON per part) and ends with a summary table:

- embed:  model-only forward images/s (PyTorch eager, channels_last, onnxruntime, OpenVINO) and the full
          ``embed_images`` path (decode + preprocess + engine) on real JPEGs (bench/bench_embed.py), for
          the model the defaults embed with (224 px + a 128 px view; ``--single-scale``: 224 px only)
- train:  model-only forward+backward images/s (eager, channels_last) vs the training loop on real images
          (bench/bench_train.py)
- index:  build time, single-query p50/p99, recall@1 against exact search and memory at 100k and 800k
          vectors (bench/bench_index.py)
- serve:  requests/s and p50/p99 at 50 concurrent clients, unbatched vs batched (bench/bench_serve.py)
- new-sku (opt-in, starts S3, MLflow, the Dagster daemon and the index worker): seconds from a new SKU's
          upload to ``recognize`` returning it (bench/bench_new_sku.py)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PARTS = ("embed", "train", "index", "serve", "new-sku")


def commands(a, out: Path) -> dict[str, list[str]]:
    py = [sys.executable]
    return {
        "embed": py + [str(BENCH / "bench_embed.py"), "--n", str(a.embed_images), "--repeats", "3",
                       "--json", str(out / "embed.json")] + (["--scales"] if a.single_scale else []),
        "train": py + [str(BENCH / "bench_train.py"), "--images", str(a.train_images), "--epochs", "2",
                       "--json", str(out / "train.json")],
        "index": py + [str(BENCH / "bench_index.py"), "--sizes", *map(str, a.sizes), "--json", str(out / "index.json")]
        + (["--model", a.index_model] if a.index_model else []),
        "serve": py + [str(BENCH / "bench_serve.py"), "--max-batch", "1,32", "--concurrency", "50",
                       "--json", str(out / "serve.json")] + (["--scales"] if a.single_scale else []),
        "new-sku": py + [str(BENCH / "bench_new_sku.py"), "--skus", str(a.new_sku_catalog), "--images-per-sku", "3",
                         "--new-skus", "5", "--model", "tiny-test", "--embed-dim", "1280",
                         "--json", str(out / "new-sku.json")],
    }


def run_part(name: str, cmd: list[str], out: Path) -> dict:
    print(f"\n{'=' * 100}\n== {name}: {' '.join(cmd[1:])}\n{'=' * 100}", flush=True)
    t0 = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        rc = proc.wait()
    secs = time.perf_counter() - t0
    figures = {}
    js = out / f"{name}.json"
    if js.exists():
        try:
            figures = json.loads(js.read_text())
        except ValueError:
            pass
    print(f"-- {name}: exit {rc}, {secs:.0f} s", flush=True)
    return {"rc": rc, "seconds": round(secs, 1), "figures": figures}


def _get(d, *path, default=None):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d


def summary(results: dict) -> list[str]:
    """The headline figures each part wrote to its JSON, one line per figure (what is missing says so)."""
    lines = []
    emb = _get(results, "embed", "figures") or {}
    if emb:
        mo = emb.get("model_only", {})
        sc = emb.get("scales")
        model = f"224 px + {', '.join(map(str, sc))} px (the default model)" if sc else "224 px single-scale"
        lines.append(f"embed model-only images/s, {model}: " + ", ".join(f"{k} {v:.1f}" for k, v in mo.items()))
        for row in emb.get("full_path", []):
            lines.append(f"embed full path ({row.get('set')}, {row.get('mode')}): {row.get('images_per_s', 0):.1f} "
                         f"images/s = {row.get('ratio', 0):.0%} of {emb.get('backend')} model-only, "
                         f"{row.get('ratio_u8', 0):.0%} of its uint8-input model-only")
    tr = _get(results, "train", "figures") or {}
    if tr:
        lines.append(f"train model-only fwd+bwd @ {tr.get('image_size')} px, batch {tr.get('batch')}: "
                     f"eager {tr.get('model_only_eager', 0):.1f}, channels_last {tr.get('model_only_channels_last', 0):.1f} images/s")
        for r in tr.get("loops", []):
            lines.append(f"train {r.get('name')}: {r.get('images_per_s', 0):.1f} images/s = {r.get('ratio', 0):.0%} of "
                         f"channels_last model-only ({r.get('model_only_channels_last', 0):.1f}) measured around it")
    ix = _get(results, "index", "figures") or {}
    for size, rows in (ix.get("scale") or {}).items():
        for r in rows:
            knobs = ", ".join(f"{k} {r[k]}" for k in ("storage", "ef_search", "nprobe", "nlist", "pq_m", "pq_nprobe",
                                                      "search_threads") if r.get(k))
            lines.append(f"index {size} rows, {r.get('kind')}{' (' + knobs + ')' if knobs else ''}: build "
                         f"{r.get('build_s', '-')} s, single query p50 {r.get('p50_ms')} ms, p99 {r.get('p99_ms')} ms, "
                         f"recall@1 {r.get('recall1')} (real-in-scale {r.get('real_in_scale_recall1', '-')}), memory "
                         f"{r.get('total_mb', r.get('vectors_mb'))} MB")
    sv = _get(results, "serve", "figures") or []
    for r in sv if isinstance(sv, list) else []:
        lines.append(f"serve max_batch {r.get('max_batch')}, {r.get('concurrency')} clients: {r.get('rps', 0):.1f} "
                     f"requests/s, p50 {r.get('p50_ms', 0):.0f} ms, p99 {r.get('p99_ms', 0):.0f} ms, "
                     f"mean batch {r.get('mean_batch', 0):.1f}, errors {r.get('errors', 0)}")
    ns = _get(results, "new-sku", "figures") or {}
    if ns:
        lines.append(f"new SKU upload->recognizable: p50 {ns.get('p50_s')} s, p95 {ns.get('p95_s')} s, "
                     f"max {ns.get('max_s')} s over {ns.get('n')} new SKUs ({ns.get('skus')} SKUs, "
                     f"{ns.get('index_rows')} rows x {ns.get('embed_dim')}, model {ns.get('model')})")
    for name, r in results.items():
        if r["rc"] != 0:
            lines.append(f"{name}: FAILED (exit {r['rc']}), see {name}.log")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=PARTS, help="run only these parts")
    ap.add_argument("--new-sku", action="store_true", help="also the upload->recognizable part (starts services)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 800_000], help="index sizes (vectors)")
    ap.add_argument("--embed-images", type=int, default=640, help="GroZi JPEGs for the full embedding path")
    ap.add_argument("--single-scale", action="store_true",
                    help="embed and serve with the 224 px tower alone (default: the default model, 224 + 128 px)")
    ap.add_argument("--train-images", type=int, default=320, help="rows of the balanced training frame")
    ap.add_argument("--new-sku-catalog", type=int, default=10_000, help="SKUs in the catalog for --new-sku")
    ap.add_argument("--index-model", default=None,
                    help="encoder.pt whose GroZi embeddings calibrate the index vectors (bench_index.py --model; "
                         "default: the un-fine-tuned tower's). A fine-tuned model gives the vectors an index holds")
    ap.add_argument("--out", type=Path, default=ROOT / ".skulens" / "bench-speed")
    a = ap.parse_args(argv)
    parts = list(a.only or [p for p in PARTS if p != "new-sku" or a.new_sku])
    a.out.mkdir(parents=True, exist_ok=True)
    cmds = commands(a, a.out)
    print(f"bench_speed: {', '.join(parts)}; {os.cpu_count()} cores, load avg {os.getloadavg()[0]:.1f}; "
          f"logs and JSON in {a.out}", flush=True)
    results = {}
    for p in parts:
        results[p] = run_part(p, cmds[p], a.out)
    lines = summary(results)
    print(f"\n{'=' * 100}\nsummary\n{'=' * 100}")
    for line in lines:
        print("  " + line)
    (a.out / "summary.json").write_text(json.dumps({"results": results, "summary": lines}, indent=1, default=str))
    return 0 if all(r["rc"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
