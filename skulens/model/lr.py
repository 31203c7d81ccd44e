"""Block-wise (layer-wise) learning-rate decay for image towers (RetailKLIP: top block 2e-4, each
earlier block x0.7).

Blocks, from the input (block 0) to the output (top block ``n``):

* open_clip ``VisionTransformer``: ``conv1, class_embedding, positional_embedding, ln_pre`` ->
  ``transformer.resblocks[i]`` -> ``ln_post, proj, attn_pool*`` (top).
* timm towers (open_clip ``TimmModel``) on EfficientNet/MobileNet-style trunks:
  ``trunk.conv_stem, trunk.bn1`` -> ``trunk.blocks[i]`` (stages) -> ``trunk.conv_head, trunk.bn2,
  trunk.classifier`` and the tower's ``head`` (projection) (top).
* other timm trunks: timm's own coarse ``group_matcher``; the tower's ``head`` joins the top block.
* open_clip ``ModifiedResNet``: stem -> ``layer1..4`` -> ``attnpool`` (top).

Block ``i`` of ``n`` gets ``base_lr * decay ** (n - i)``. 1-d parameters (biases, norm weights) and
embeddings get no weight decay. Each returned group carries ``name``, ``block``, ``lr_scale`` and
``param_names`` for inspection (torch optimizers keep extra keys in ``param_groups``).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable

__all__ = ["block_ids", "block_param_groups", "module_param_group"]

_NO_DECAY_NAMES = ("class_embedding", "positional_embedding", "pos_embed", "cls_token")


def _tower(encoder):
    return getattr(encoder, "model", encoder)


def _vit_ids(tower, names: Iterable[str]) -> tuple[dict[str, int], int]:
    n_blocks = len(tower.transformer.resblocks)
    top = n_blocks + 1
    ids = {}
    for name in names:
        m = re.match(r"^transformer\.resblocks\.(\d+)\.", name)
        if m:
            ids[name] = int(m.group(1)) + 1
        elif re.match(r"^(conv1|class_embedding|positional_embedding|ln_pre|patch_dropout)\b", name):
            ids[name] = 0
        else:  # ln_post, proj, attn_pool, attn_pool_contrastive, ...
            ids[name] = top
    return ids, top


def _effnet_ids(tower, names: Iterable[str]) -> tuple[dict[str, int], int]:
    n_stages = len(tower.trunk.blocks)
    top = n_stages + 1
    ids = {}
    for name in names:
        m = re.match(r"^trunk\.blocks\.(\d+)\.", name)
        if m:
            ids[name] = int(m.group(1)) + 1
        elif re.match(r"^trunk\.(conv_stem|bn1)\.", name):
            ids[name] = 0
        else:  # trunk.conv_head, trunk.bn2, trunk.classifier, head.proj
            ids[name] = top
    return ids, top


def _timm_matcher_ids(tower, names: Iterable[str]) -> tuple[dict[str, int], int]:
    from timm.models import group_parameters

    groups = group_parameters(tower.trunk, tower.trunk.group_matcher(coarse=True))
    trunk_ids = {f"trunk.{p}": int(g) for g, ps in groups.items() for p in ps}
    top = max(trunk_ids.values()) if trunk_ids else 0
    return {n: trunk_ids.get(n, top) for n in names}, top


def _resnet_ids(tower, names: Iterable[str]) -> tuple[dict[str, int], int]:
    ids = {}
    for name in names:
        m = re.match(r"^layer(\d+)\.", name)
        ids[name] = int(m.group(1)) if m else (5 if name.startswith("attnpool") else 0)
    return ids, 5


def block_ids(encoder) -> tuple[dict[str, int], int]:
    """``({param_name: block}, top_block)`` for the encoder's tower (names relative to the tower)."""
    tower = _tower(encoder)
    names = [n for n, _ in tower.named_parameters()]
    if hasattr(tower, "transformer") and hasattr(tower.transformer, "resblocks") and hasattr(tower, "conv1"):
        return _vit_ids(tower, names)
    trunk = getattr(tower, "trunk", None)
    if trunk is not None:
        if hasattr(trunk, "conv_stem") and hasattr(trunk, "blocks"):
            return _effnet_ids(tower, names)
        if hasattr(trunk, "group_matcher"):
            return _timm_matcher_ids(tower, names)
    if all(hasattr(tower, f"layer{i}") for i in range(1, 5)) and hasattr(tower, "attnpool"):
        return _resnet_ids(tower, names)
    warnings.warn(f"no block structure known for {type(tower).__name__}: one LR for the whole tower")
    return {n: 0 for n in names}, 0


def _no_decay(name: str, p) -> bool:
    return p.ndim <= 1 or name.endswith(".bias") or any(k in name for k in _NO_DECAY_NAMES)


def block_param_groups(
    encoder, base_lr: float = 2e-4, decay: float = 0.7, weight_decay: float = 0.05
) -> list[dict]:
    """Optimizer param groups for ``encoder`` (an Encoder or a bare tower) with block-wise LR decay.

    Top block: ``base_lr``; each earlier block: previous x ``decay``. Frozen parameters
    (``requires_grad=False``) are left out. Groups are ordered from block 0 to the top block,
    ``no_decay`` before ``decay`` within a block; empty groups are dropped.
    """
    if not 0 < decay <= 1:
        raise ValueError("decay must be in (0, 1]")
    tower = _tower(encoder)
    ids, top = block_ids(tower)
    buckets: dict[tuple[int, bool], tuple[list, list]] = {}
    for name, p in tower.named_parameters():
        if not p.requires_grad:
            continue
        key = (ids[name], not _no_decay(name, p))
        params, pnames = buckets.setdefault(key, ([], []))
        params.append(p)
        pnames.append(name)
    groups = []
    for (block, use_wd), (params, pnames) in sorted(buckets.items()):
        scale = decay ** (top - block)
        groups.append(
            {
                "name": f"block{block:02d}/{'decay' if use_wd else 'no_decay'}",
                "block": block,
                "top_block": top,
                "lr_scale": scale,
                "lr": base_lr * scale,
                "weight_decay": weight_decay if use_wd else 0.0,
                "params": params,
                "param_names": pnames,
            }
        )
    return groups


def module_param_group(module, name: str, lr: float, weight_decay: float = 0.0) -> dict:
    """One param group, named ``name``, for a module trained beside the tower at its own learning rate
    (ArcFace's centres, the projector): its trainable parameters, outside the block-wise decay."""
    names, params = zip(*[(n, p) for n, p in module.named_parameters() if p.requires_grad])
    return {
        "name": name,
        "block": None,
        "lr_scale": 1.0,
        "lr": lr,
        "weight_decay": weight_decay,
        "params": list(params),
        "param_names": [f"{name}.{n}" for n in names],
    }
