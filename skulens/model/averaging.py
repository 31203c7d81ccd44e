"""Weight averaging and model selection for fine-tuning: an exponential moving average of the weights
(:class:`WeightEMA`) and the best epoch's weights by validation accuracy (:class:`BestWeights`).

Both hold plain state dicts (CPU tensors for the best copy), save into the training checkpoint and load
from it, so a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib

__all__ = ["BestWeights", "WeightEMA"]


class WeightEMA:
    """``shadow = d * shadow + (1 - d) * weights`` after every optimiser step, with the usual warm-up
    ``d = min(decay, (1 + n) / (10 + n))`` so that the first steps do not freeze the average at the start
    weights. Integer buffers (``num_batches_tracked``) are copied, not averaged."""

    def __init__(self, model, decay: float):
        if not 0.0 < float(decay) < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._float = [k for k, v in self.shadow.items() if v.is_floating_point()]

    def update(self, model) -> None:
        import torch

        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        sd = model.state_dict()
        with torch.no_grad():
            torch._foreach_lerp_([self.shadow[k] for k in self._float], [sd[k].detach() for k in self._float], 1.0 - d)
            for k, v in sd.items():
                if not v.is_floating_point():
                    self.shadow[k].copy_(v)

    @contextlib.contextmanager
    def applied(self, model):
        """The model holds the averaged weights inside the ``with`` block, its own ones afterwards."""
        backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        try:
            yield model
        finally:
            model.load_state_dict(backup)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, st: dict) -> None:
        self.updates = int(st["updates"])
        for k, v in st["shadow"].items():
            self.shadow[k].copy_(v)


class BestWeights:
    """The weights of the epoch with the best validation accuracy; the later epoch wins a tie (a saturated
    validation set then keeps the most trained weights, not the first epoch that reached the ceiling)."""

    def __init__(self):
        self.epoch: int | None = None
        self.acc: float | None = None
        self.state: dict | None = None
        self.improved: int | None = None  # the last epoch that beat every earlier one (early stopping)

    def offer(self, epoch: int, acc: float | None, state: dict | None) -> bool:
        """Keep ``state`` (copied to the CPU) if ``acc`` is at least the best so far; True if kept.
        ``state`` None tracks the best epoch and accuracy only (early stopping without ``keep_best``)."""
        if acc is None or acc != acc:  # no validation set, or NaN
            return False
        if self.acc is not None and acc < self.acc:
            return False
        if self.acc is None or acc > self.acc:
            self.improved = int(epoch)
        self.epoch, self.acc = int(epoch), float(acc)
        self.state = None if state is None else {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
        return True

    def epochs_since(self, epoch: int) -> int:
        """Epochs since the validation accuracy last improved (a tie is not an improvement)."""
        return int(epoch) - self.improved if self.improved is not None else 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "acc": self.acc, "state": self.state, "improved": self.improved}

    def load_state_dict(self, st: dict | None) -> None:
        st = st or {}
        self.epoch, self.acc, self.state = st.get("epoch"), st.get("acc"), st.get("state")
        self.improved = st.get("improved")
