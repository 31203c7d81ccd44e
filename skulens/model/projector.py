"""A training-only projection head between the tower's features and the ArcFace loss.

The loss sees ``projector(features)``; the index, evaluation and serving use the tower's own features,
and the head is dropped when training ends (it is never saved with the encoder). A classifier head trained
on few classes pulls the features it is trained on towards those classes' directions; a head in between
absorbs much of that, so the tower's features keep more of what tells products apart in general, the
products never trained on included (Wang et al., "Revisiting the transferability of supervised
pretraining: an MLP projector is all you need", CVPR 2022; SimCLR's finding that the features before its
projection head transfer better; the BNNeck of person re-identification, Luo et al. 2019).

Kinds:

* ``"none"``: the loss sees the tower's features (the behaviour before this module);
* ``"bn"``: BatchNorm1d without the shift (a BNNeck): the loss sees centred, per-channel scaled features;
* ``"mlp"``: Linear - BatchNorm - ReLU - Linear (``hidden`` = the feature size, ``out_dim`` outputs).
"""

from __future__ import annotations

__all__ = ["PROJECTORS", "create_projector", "project_prototypes", "projector_out_dim"]

PROJECTORS = ("none", "bn", "mlp")


def create_projector(kind: str, dim: int, out_dim: int | None = None, seed: int = 0):
    """The head for ``kind`` on ``dim`` features, or ``None`` for ``"none"``. Its output size is
    ``out_dim`` (``"mlp"``; default ``dim``) or ``dim`` (``"bn"``). Initialised from ``seed`` alone, so a
    resumed run and an uninterrupted one build the same head."""
    import torch
    from torch import nn

    if kind not in PROJECTORS:
        raise ValueError(f"unknown projector {kind!r}: one of {', '.join(PROJECTORS)}")
    if kind == "none":
        return None
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(int(seed) + 7919)
    try:
        if kind == "bn":
            head = nn.BatchNorm1d(dim)
            head.bias.requires_grad_(False)  # BNNeck: no shift, so the loss's directions stay centred
            return head
        out = int(out_dim or dim)
        return nn.Sequential(nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
                             nn.Linear(dim, out))
    finally:
        torch.random.set_rng_state(gen_state)


def projector_out_dim(head, dim: int) -> int:
    """The size of what ``head`` hands the loss (``dim`` when there is no head)."""
    if head is None:
        return int(dim)
    last = list(head.modules())[-1]
    return int(getattr(last, "out_features", None) or getattr(last, "num_features", None) or dim)


def project_prototypes(head, features):
    """``head(features)`` for the ArcFace prototypes, with no gradient. BatchNorm layers use (and keep as
    running statistics) the statistics of these features, which are the training images themselves: a
    fresh head's running statistics (mean 0, variance 1) describe nothing."""
    import torch

    x = torch.as_tensor(features, dtype=torch.float32)
    if head is None:
        return x
    was = head.training
    momentum = {}
    for m in head.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            momentum[m] = m.momentum
            m.momentum = None  # cumulative average: one pass sets the running statistics to the batch's
            m.reset_running_stats()
    try:
        head.train()
        with torch.no_grad():
            return head(x.to(next(head.parameters()).device)).cpu()
    finally:
        for m, v in momentum.items():
            m.momentum = v
        head.train(was)
