"""DVC locks the whole repository; skulens serialises its own DVC calls so concurrent runs queue instead of failing."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from skulens.data.dvc import DvcRepo, git_revision

BIN = Path(sys.executable).parent


def test_concurrent_dvc_calls_queue_behind_the_lock(tmp_path):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.txt").write_text("hello")
    repo = DvcRepo(tmp_path)
    errors, spans = [], []

    def work(i):
        try:
            t0 = time.monotonic()
            repo.run("add", "data/x.txt")
            repo.run("status")
            spans.append((t0, time.monotonic()))
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert len(spans) == 4
    assert (tmp_path / "data" / "x.txt.dvc").exists()


def test_git_revision_reports_dirty_tree(tmp_path):
    assert git_revision(tmp_path)["git_rev"] == "unknown"
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "f").write_text("1")
    subprocess.run(["git", "add", "f"], cwd=tmp_path, check=True)
    subprocess.run(["git", "-c", "user.email=a@b", "-c", "user.name=n", "commit", "-qm", "x"], cwd=tmp_path, check=True)
    rev = git_revision(tmp_path)
    assert len(rev["git_rev"]) == 40 and rev["git_dirty"] is False
    (tmp_path / "f").write_text("2")
    assert git_revision(tmp_path)["git_dirty"] is True
