"""Upload notes: a small object per catalog upload naming the SKUs it touched, so a watcher (the warm
index worker, :mod:`skulens.index.worker`) learns of a change without listing the whole catalog (a full
listing of 30k keys takes seconds on SeaweedFS). ``events/catalog/<UTC time>-<id>.json`` =
``{"skus": [...], "source": ..., "at": ...}``; keys sort by time, so a watcher lists only the last
moments (``StartAfter``). Notes are a hint, never the truth: the catalog itself is (a watcher re-lists
the noted SKUs, and the whole catalog now and then, for uploads made without a note)."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone

NOTES_PREFIX = "events/catalog/"


def _stamp(t: datetime) -> str:
    return f"{t:%Y%m%dT%H%M%S%fZ}"


def note_change(client, bucket: str, skus, source: str = "import") -> str | None:
    """Write one note naming ``skus`` (nothing when empty); returns its key."""
    skus = sorted({str(s) for s in skus})
    if not skus:
        return None
    now = datetime.now(timezone.utc)
    key = f"{NOTES_PREFIX}{_stamp(now)}-{uuid.uuid4().hex[:8]}.json"
    client.put_object(Bucket=bucket, Key=key, ContentType="application/json",
                      Body=json.dumps({"skus": skus, "source": source, "at": now.isoformat()}).encode())
    return key


def recent_notes(client, bucket: str, window_s: float = 120.0) -> list[str]:
    """Keys of the notes written in the last ``window_s`` seconds (by their names), oldest first."""
    after = NOTES_PREFIX + _stamp(datetime.now(timezone.utc) - timedelta(seconds=window_s))
    keys, token = [], None
    while True:
        kw = {"ContinuationToken": token} if token else {"StartAfter": after}
        page = client.list_objects_v2(Bucket=bucket, Prefix=NOTES_PREFIX, **kw)
        keys += [o["Key"] for o in page.get("Contents", []) or []]
        if not page.get("IsTruncated"):
            return keys
        token = page.get("NextContinuationToken")


def read_note(client, bucket: str, key: str) -> list[str]:
    """The SKUs a note names ([] for an unreadable one)."""
    try:
        doc = json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())
        return [str(s) for s in doc.get("skus") or []]
    except Exception:  # noqa: BLE001 - a hint only: the periodic full listing covers it
        return []
