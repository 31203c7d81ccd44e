"""Held-out split and breadth/depth balancing (pure pandas, no torch)."""

import pandas as pd
import pytest

from skulens.data.balance import balance, choose_depth, label_map, split_validation, suggest_depth


def _catalog(counts: dict[str, int]) -> pd.DataFrame:
    rows = []
    for sku, n in counts.items():
        for i in range(n):
            rows.append(
                {
                    "sku": sku,
                    "clean_path": f"/imgs/{sku}/{i:03d}.jpg",
                    "key": f"{sku}-{i}",
                    "sha256": f"h{sku}{i}",
                }
            )
    return pd.DataFrame(rows)


COUNTS = {"A": 1, "B": 2, "C": 3, "D": 7, "E": 25}


def test_split_is_stratified_deterministic_and_keeps_two_for_training():
    df = _catalog(COUNTS)
    tr, va = split_validation(df, per_sku=2, seed=0)
    assert len(tr) + len(va) == len(df)
    assert set(tr["clean_path"]).isdisjoint(va["clean_path"])
    held = va.groupby("sku").size().to_dict()
    # A, B: too few (<= 2) -> nothing held out; C: 3 images -> 1 (keeps 2); D, E -> per_sku
    assert held == {"C": 1, "D": 2, "E": 2}
    assert tr.groupby("sku").size().min() >= 2 or tr.groupby("sku").size()["A"] == 1
    assert tr.groupby("sku").size().to_dict() == {"A": 1, "B": 2, "C": 2, "D": 5, "E": 23}
    assert list(tr.columns) == list(df.columns)
    # deterministic by seed, independent of input row order
    _, va2 = split_validation(df.sample(frac=1, random_state=3), per_sku=2, seed=0)
    assert sorted(va2["clean_path"]) == sorted(va["clean_path"])
    _, va3 = split_validation(df, per_sku=2, seed=1)
    assert sorted(va3["clean_path"]) != sorted(va["clean_path"])


def test_split_of_existing_skus_unchanged_when_a_sku_is_added():
    df = _catalog(COUNTS)
    _, va = split_validation(df, per_sku=1, seed=7)
    _, va_more = split_validation(pd.concat([df, _catalog({"Z": 9})]), per_sku=1, seed=7)
    assert set(va["clean_path"]) <= set(va_more["clean_path"])


@pytest.mark.parametrize("depth", [1, 4, 10])
def test_balance_exact_depth_keeps_every_sku(depth):
    df = _catalog(COUNTS)
    bal = balance(df, depth=depth, seed=0)
    assert list(bal.columns[:5]) == ["sku", "clean_path", "label", "augment", "copy"]
    assert {"key", "sha256"} <= set(bal.columns)
    sizes = bal.groupby("sku").size()
    assert set(sizes.index) == set(COUNTS)  # breadth: every SKU kept
    assert (sizes == depth).all()  # depth: exactly D each
    for sku, n in COUNTS.items():
        part = bal[bal["sku"] == sku]
        originals = part[~part["augment"]]
        assert (originals["copy"] == 0).all()
        if n >= depth:  # undersampled: distinct images, no augmented copies
            assert not part["augment"].any()
            assert part["clean_path"].is_unique
        else:  # oversampled: every original once + augmented copies numbered per image
            assert len(originals) == n and originals["clean_path"].is_unique
            copies = part[part["augment"]]
            assert len(copies) == depth - n and (copies["copy"] >= 1).all()
            for path, grp in copies.groupby("clean_path"):
                assert sorted(grp["copy"]) == list(range(1, len(grp) + 1))
            # copies spread evenly over the originals
            per_img = part.groupby("clean_path").size()
            assert per_img.max() - per_img.min() <= 1
    labels = label_map(COUNTS)
    assert (bal["sku"].map(labels) == bal["label"]).all()
    assert bal["label"].dtype.kind == "i" and bal["augment"].dtype == bool


def test_balance_is_deterministic_by_seed():
    df = _catalog(COUNTS)
    a = balance(df, 5, seed=0)
    assert a.equals(balance(df.sample(frac=1, random_state=1), 5, seed=0))
    assert not a["clean_path"].equals(balance(df, 5, seed=1)["clean_path"])
    with pytest.raises(ValueError):
        balance(df, 0)
    with pytest.raises(ValueError):
        balance(df.drop(columns=["clean_path"]), 3)


def test_choose_depth_and_suggest_depth():
    df = _catalog(COUNTS)
    calls = []

    def score(d):
        calls.append(d)
        return {4: 0.5, 8: 0.7, 16: 0.7}[d]

    best, scores = choose_depth(df, [16, 4, 8], score)
    assert best == 8 and scores == {4: 0.5, 8: 0.7, 16: 0.7} and calls == [4, 8, 16]
    assert suggest_depth(df, lo=2, hi=64) == 3  # median of 1, 2, 3, 7, 25
    assert suggest_depth(df) == 8  # clipped to lo
