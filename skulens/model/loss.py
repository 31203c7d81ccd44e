"""ArcFace loss (pytorch-metric-learning) with its own optimizer param group, and an optional pair-based
metric loss on the tower's own features (:func:`create_metric_loss`).

The ArcFace class-centre matrix ``W`` starts random and must move much faster than the pretrained
tower, so it gets its own (higher) learning rate and no weight decay (it is L2-normalised inside
the loss anyway). ``margin`` is in degrees, as in pytorch-metric-learning (28.6 deg = 0.5 rad).
"""

from __future__ import annotations

__all__ = ["METRIC_LOSSES", "arcface_param_group", "create_arcface", "create_metric_loss", "init_from_prototypes"]


def create_arcface(num_classes: int, embed_dim: int, margin: float = 28.6, scale: float = 64.0,
                   sub_centers: int = 1):
    """``pytorch_metric_learning.losses.ArcFaceLoss`` for ``num_classes`` SKUs on ``embed_dim``
    features, or ``SubCenterArcFaceLoss`` with ``sub_centers`` > 1 (each SKU may have several centres:
    front and side views, old and new packaging). Call it as ``loss(embeddings, labels)`` (it normalises
    the embeddings itself)."""
    from pytorch_metric_learning.losses import ArcFaceLoss, SubCenterArcFaceLoss

    if num_classes < 2:
        raise ValueError("ArcFace needs at least 2 classes (SKUs)")
    if int(sub_centers) < 1:
        raise ValueError("sub_centers must be >= 1")
    if int(sub_centers) > 1:
        return SubCenterArcFaceLoss(num_classes=int(num_classes), embedding_size=int(embed_dim), margin=margin,
                                    scale=scale, sub_centers=int(sub_centers))
    return ArcFaceLoss(
        num_classes=int(num_classes), embedding_size=int(embed_dim), margin=margin, scale=scale
    )


def arcface_param_group(loss, lr: float, weight_decay: float = 0.0) -> dict:
    """Param group for the loss's own parameters (``W``), named ``"arcface"``."""
    from skulens.model.lr import module_param_group

    return module_param_group(loss, "arcface", lr, weight_decay)


def init_from_prototypes(loss, embeddings, labels) -> None:
    """Set the ArcFace class centres to the L2-normalised mean embedding of each class (computed with
    the not yet fine-tuned tower). The loss then starts from the pretrained nearest-class-mean
    classifier instead of random centres, so the first steps do not push random-centre gradients into
    the pretrained tower. ``embeddings``: ``(N, D)`` array/tensor, ``labels``: ``(N,)`` ints in
    ``[0, num_classes)``; classes without an embedding keep their random centre."""
    import torch

    emb = torch.as_tensor(embeddings, dtype=torch.float32)
    lab = torch.as_tensor(labels, dtype=torch.long)
    emb = torch.nn.functional.normalize(emb, dim=1)
    d, c = loss.W.shape  # pytorch-metric-learning stores W as (embedding_size, num_classes x sub_centers)
    sub = int(getattr(loss, "sub_centers", 1) or 1)  # SubCenterArcFace: columns c*sub .. c*sub+sub-1
    c //= sub
    if emb.shape[1] != d:
        raise ValueError(f"embedding dim {emb.shape[1]} != ArcFace embedding size {d}")
    sums = torch.zeros(c, d).index_add_(0, lab, emb)
    counts = torch.bincount(lab, minlength=c)
    with torch.no_grad():
        has = counts > 0
        centres = torch.nn.functional.normalize(sums[has] / counts[has, None], dim=1)
        w = loss.W.detach().clone().view(d, c, sub)
        # sub-centres start at the prototype plus a little of their random init, so they can separate
        jitter = 0.0 if sub == 1 else 0.1
        fresh = torch.nn.functional.normalize(w[:, has.to(w.device)], dim=0)
        w[:, has.to(w.device)] = centres.T.to(w.device, w.dtype)[:, :, None] + jitter * fresh
        loss.W.copy_(w.view(d, c * sub))


#: pair-based losses that may be added to ArcFace on the tower's own features (``TrainConfig.metric_loss``)
METRIC_LOSSES = ("none", "multi_similarity", "triplet")


def create_metric_loss(kind: str):
    """A pair-based loss with its miner, ``fn(embeddings, labels) -> loss``, or None for ``"none"``.

    It is meant for the tower's features *before* a training-only projector, with ArcFace after it: the
    "BNNeck" recipe of person re-identification (Luo et al., 2019: triplet loss before the BatchNorm neck,
    the classification loss after it), where the test identities are never trained on, like new SKUs.
    Batches need several images per SKU (``m_per_class``) for the miner to find positive pairs.

    * ``"multi_similarity"``: ``MultiSimilarityLoss(alpha=2, beta=50, base=0.5)`` with
      ``MultiSimilarityMiner(epsilon=0.1)`` (Wang et al., CVPR 2019; pytorch-metric-learning's defaults);
    * ``"triplet"``: ``TripletMarginLoss(margin=0.1)`` on the batch-hard triplets (``BatchHardMiner``),
      cosine geometry (unit-norm features), as in the re-identification recipe.
    """
    if kind not in METRIC_LOSSES:
        raise ValueError(f"metric_loss {kind!r}: one of {', '.join(METRIC_LOSSES)}")
    if kind == "none":
        return None
    from pytorch_metric_learning import losses, miners

    if kind == "multi_similarity":
        loss, miner = losses.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5), miners.MultiSimilarityMiner(0.1)
    else:
        loss, miner = losses.TripletMarginLoss(margin=0.1), miners.BatchHardMiner()

    def metric_loss(embeddings, labels):
        return loss(embeddings, labels, miner(embeddings, labels))

    return metric_loss
