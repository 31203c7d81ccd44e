"""Screenshots of the Dagster UI in headless Chromium (Debian package `chromium`), for the README.

After `make run` and `make ui`:

    .venv/bin/python bench/screenshots.py --url http://127.0.0.1:3000 --out docs/screenshots

It drives Chromium over the DevTools protocol (the `websockets` package, already installed with
uvicorn): opens each page at 1600x1000, dismisses Dagster's first-visit dialog (its "Skip" button),
waits for the page to settle, and writes PNGs: the asset graph (lineage of `registered_model`),
the latest `main` run, the `model_evaluation` asset with its per-SKU and confusion plots, and in MLflow
the champion's model-version page and its training run. Prints each file and its size.
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
DISMISS = """(() => { let n = 0; for (const b of document.querySelectorAll('button')) {
  if (['Skip', 'Dismiss', 'Close', 'Got it'].includes(b.textContent.trim())) { b.click(); n++; } } return n; })()"""


SCROLL = """(() => { const want = %s; for (const el of document.querySelectorAll('td, div, span')) {
  if (el.children.length === 0 && el.textContent.trim() === want) {
    el.scrollIntoView({block: 'start'});
    const row = el.closest('tr');  // a Markdown metadata value (our plots) opens on click
    const show = row && [...row.querySelectorAll('*')].find(b => b.children.length === 0 &&
      b.textContent.includes('Show Markdown'));
    if (show) show.click();
    return true; } }
  return false; })()"""


CLICK = """(() => { const want = %s; for (const el of document.querySelectorAll('button, label, span, div')) {
  if (el.children.length === 0 && el.textContent.trim() === want) { el.click(); return true; } } return false; })()"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gql(url: str, query: str) -> dict:
    req = urllib.request.Request(f"{url}/graphql", data=json.dumps({"query": query}).encode(),
                                 headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=60).read())["data"]


class Page:
    def __init__(self, ws):
        self.ws = ws
        self.n = 0

    def call(self, method: str, **params) -> dict:
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=120))
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def shot(self, url: str, out: Path, settle_s: float, scroll_to: str | None = None,
             click: str | None = None) -> Path:
        self.call("Page.navigate", url=url)
        time.sleep(settle_s)
        if click:  # e.g. MLflow's "Model training" view (a fresh browser opens its GenAI view)
            if self.call("Runtime.evaluate", expression=CLICK % json.dumps(click), returnByValue=True)["result"].get("value"):
                time.sleep(settle_s / 2)
        for _ in range(3):  # the first-visit dialog may appear after the page renders
            if not self.call("Runtime.evaluate", expression=DISMISS, returnByValue=True)["result"].get("value"):
                break
            time.sleep(1.5)
        if scroll_to:  # bring the element whose text is exactly `scroll_to` to the top
            self.call("Runtime.evaluate", expression=SCROLL % json.dumps(scroll_to))
        time.sleep(2.0)
        data = self.call("Page.captureScreenshot", format="png")["data"]
        out.write_bytes(base64.b64decode(data))
        return out


def _mlflow_get(base: str, path: str) -> dict:
    return json.loads(urllib.request.urlopen(f"{base}/api/2.0/mlflow/{path}", timeout=30).read())


def _mlflow_pages(base: str, model: str) -> list[tuple[str, str, None]]:  # noqa: D401
    """The champion's model-version page and its source run (the training run) in the MLflow UI."""
    from urllib.parse import quote

    try:
        mv = _mlflow_get(base, f"registered-models/alias?name={quote(model)}&alias=champion")["model_version"]
    except OSError as exc:
        print(f"no MLflow champion at {base} ({exc}): MLflow pages skipped")
        return []
    run = _mlflow_get(base, f"runs/get?run_id={mv['run_id']}")["run"]
    exp = run["info"]["experiment_id"]
    return [("mlflow-model-version.png", f"{base}/#/models/{quote(model)}/versions/{mv['version']}", None),
            ("mlflow-training-run.png", f"{base}/#/experiments/{exp}/runs/{mv['run_id']}", None)]


MLFLOW_VIEW = "Model training"  # MLflow 3's toggle between its GenAI and model-training views


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:3000", help="Dagster webserver (make ui)")
    ap.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    ap.add_argument("--settle", type=float, default=8.0, help="seconds to let each page render")
    ap.add_argument("--mlflow", default="http://127.0.0.1:5000", help="MLflow server ('' to skip its pages)")
    ap.add_argument("--model", default="skulens-encoder", help="registered model whose champion is shown")
    args = ap.parse_args(argv)
    if not Path(args.chromium).exists():
        print(f"no Chromium at {args.chromium}: install Debian's `chromium` (apt-get install -y chromium)")
        return 2
    runs = _gql(args.url, '{ runsOrError(filter: {pipelineName: "main"}, limit: 1) '
                          '{ ... on Runs { results { runId status } } } }')["runsOrError"]["results"]
    if not runs:
        print("no `main` run in this Dagster instance yet: run `make run` first")
        return 2
    run_id = runs[0]["runId"]
    args.out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    profile = tempfile.mkdtemp(prefix="skulens-chromium-")
    proc = subprocess.Popen([args.chromium, *FLAGS, f"--remote-debugging-port={port}", f"--user-data-dir={profile}",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2).read())
                pages = [t for t in targets if t.get("type") == "page"]
                if pages:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("Chromium's DevTools endpoint did not come up")
            time.sleep(0.3)
        from websockets.sync.client import connect

        with connect(pages[0]["webSocketDebuggerUrl"], max_size=64 * 1024 * 1024, open_timeout=30) as ws:
            page = Page(ws)
            page.call("Page.enable")
            page.call("Emulation.setDeviceMetricsOverride", width=1600, height=1000, deviceScaleFactor=1,
                      mobile=False)
            shots = [("asset-graph.png", f"{args.url}/assets/registered_model?view=lineage&lineageDepth=5", None),
                     ("main-run.png", f"{args.url}/runs/{run_id}", None),
                     ("model-evaluation.png", f"{args.url}/assets/model_evaluation", None),
                     ("per-sku-plot.png", f"{args.url}/assets/model_evaluation", "per_sku_plot"),
                     ("confusions-plot.png", f"{args.url}/assets/model_evaluation", "confusions_plot")]
            shots += _mlflow_pages(args.mlflow, args.model) if args.mlflow else []
            for name, url, scroll in shots:
                out = page.shot(url, args.out / name, args.settle, scroll_to=scroll,
                                click=MLFLOW_VIEW if name.startswith("mlflow-") else None)
                print(f"{out}  {out.stat().st_size / 1024:.0f} KiB  <- {url}{'  (at ' + scroll + ')' if scroll else ''}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
