"""The nightly retrain policy, pure (no services): retrain only when enough trainable SKUs are new or changed
since the champion was trained, or the training config changed; otherwise skip and say why."""

from __future__ import annotations

from skulens.catalog.state import (
    changed_trainable_skus,
    fingerprint,
    retrain_decision,
    retrain_threshold,
    sku_hashes,
    training_record,
)

P = "catalog/images/"


def _catalog(**skus: int) -> dict:
    """{key: etag}: ``skus`` maps a SKU to its number of images."""
    return {f"{P}{s}/{i}.jpg": f"e-{s}-{i}" for s, n in skus.items() for i in range(n)}


def _decide(images, record, tags=None, **kw):
    fp = fingerprint(images.items())
    tags = {"catalog.fingerprint": "then", "train.config_hash": "cfg"} if tags is None else tags
    return retrain_decision(images, fp, "cfg", "3", champion_tags=tags, record=record, **kw)


def test_sku_hashes_follow_keys_and_etags():
    a = sku_hashes(_catalog(A=3, B=1))
    assert a["A"][1] == 3 and a["B"][1] == 1
    b = sku_hashes({**_catalog(A=3, B=1), f"{P}A/0.jpg": "other"})
    assert b["A"][0] != a["A"][0] and b["B"] == a["B"]


def test_counts_only_trainable_new_or_changed_skus():
    then = _catalog(A=4, B=3, C=5, D=2)
    record = training_record(then, {"A", "B", "C", "D"}, ["A", "B", "C"], "then")
    now = {**_catalog(A=4, B=3, D=2, E=3, F=2, G=6), f"{P}B/0.jpg": "redesigned"}  # C deleted
    new, changed = changed_trainable_skus(now, record, listed={"A", "B", "D", "E", "F"}, min_images_per_sku=3)
    # E: new with 3 images; B: changed; F (2 images) never counts; G is not in products.csv; C removed
    assert new == ["E"] and changed == ["B"]
    # D grew to 3 images: a new training class
    new, changed = changed_trainable_skus({**now, f"{P}D/9.jpg": "x"}, record, None, 3)
    assert new == ["E", "G"] and changed == ["B", "D"]
    # a SKU that was unlisted at training time and is listed now counts as new, its images unchanged
    rec2 = training_record(then, {"A", "B", "D"}, ["A", "B"], "then")
    assert changed_trainable_skus(then, rec2, {"A", "B", "C", "D"}, 3) == (["C"], [])
    # seen with the same images and listed but not trained on (too few usable images): does not count
    rec3 = training_record(then, None, ["A", "B"], "then")
    assert changed_trainable_skus(then, rec3, None, 3) == ([], [])


def test_threshold_absolute_and_relative():
    assert retrain_threshold(100) == 1
    assert retrain_threshold(100, 5) == 5
    assert retrain_threshold(100, 1, 0.1) == 10 and retrain_threshold(101, 1, 0.1) == 11
    assert retrain_threshold(10, 5, 0.1) == 5 and retrain_threshold(0, 0, 0.0) == 1


def test_decisions_and_their_reasons():
    then = _catalog(A=4, B=3, C=3)
    record = training_record(then, None, ["A", "B", "C"], "then")
    now = {**_catalog(A=4, B=3, C=3, NEW1=3, NEW2=4, PACK=1)}

    d = retrain_decision(now, "fp", "cfg", None)
    assert d.retrain and "no champion" in d.reason
    d = _decide(now, record, tags={"catalog.fingerprint": "then", "train.config_hash": "old"})
    assert d.retrain and "training config changed" in d.reason
    d = _decide(then, record, tags={"catalog.fingerprint": fingerprint(then.items()), "train.config_hash": "cfg"})
    assert not d.retrain and d.reason.startswith("catalog (") and "unchanged since champion v3" in d.reason

    # two trainable SKUs new, the packshot-only one never counts
    d = _decide(now, record, min_changed_skus=5)
    assert not d.retrain and d.new_skus == ("NEW1", "NEW2") and d.threshold == 5
    assert d.reason == ("2 trainable SKUs new or changed since champion v3 (retrain threshold 5): "
                        "index_update keeps them recognizable; nothing to retrain")
    d = _decide(now, record)  # the default threshold: 1
    assert d.retrain and d.reason.startswith("2 trainable SKUs new or changed since champion v3 (retrain threshold 1)")
    d = _decide(now, record, min_changed_share=0.5)  # 5 trainable SKUs now: half of them is 3
    assert not d.retrain and d.threshold == 3

    # only a packshot-only launch and a deletion: nothing trainable changed
    d = _decide({**_catalog(A=4, B=3, PACK=1)}, record)
    assert not d.retrain and d.reason.startswith("0 trainable SKUs new or changed since champion v3")

    # enough changed, but a challenger trained on exactly this catalog and config was not promoted
    tie = {"run_id": "abcdef1234567890", "reason": "tie", "fingerprint": fingerprint(now.items())}
    d = _decide(now, record, rejected=tie)
    assert not d.retrain and "challenger run abcdef123456, not promoted (tie)" in d.reason
    assert d.reason.endswith("was trained on this same catalog and config: retraining would repeat it")
    # ... or on nearly this catalog: fewer than the threshold changed since that attempt
    earlier = {**tie, "fingerprint": "older", "record": training_record(_catalog(A=4, B=3, C=3, NEW1=3), None, [])}
    d = _decide(now, record, rejected=earlier, min_changed_skus=2)
    assert not d.retrain and "but only 1 since challenger run" in d.reason and "nearly repeat" in d.reason
    d = _decide(now, record, rejected=earlier)  # threshold 1: NEW2 is new since the attempt, it may pay now
    assert d.retrain

    # a champion trained before the record existed: any catalog change retrains (the old rule)
    d = _decide(now, None)
    assert d.retrain and "no per-SKU record" in d.reason
