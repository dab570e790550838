"""EMA of the trained parameters: diffusers' `EMAModel`, addressed by the trainer's stable parameter names."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["TrainedEMA"]


class TrainedEMA:
    """`diffusers.training_utils.EMAModel` over named parameters, readable as ``{name: averaged tensor}``.

    ``update_after_step=-1`` makes EMAModel's warmup decay ``min(decay, (1 + step) / (10 + step))`` at the
    optimiser step ``step`` (counted from 1), the schedule checkpoints of the first layout were written with.
    """

    def __init__(self, trainable: dict[str, nn.Parameter], decay: float) -> None:
        from diffusers.training_utils import EMAModel

        self.names = list(trainable)
        self.params = [trainable[n] for n in self.names]
        self.model = EMAModel(self.params, decay=decay, update_after_step=-1)

    # mapping view (exports, tests)
    def __getitem__(self, name: str) -> Tensor:
        return self.model.shadow_params[self.names.index(name)]

    def keys(self) -> list[str]:
        return list(self.names)

    def items(self) -> Iterator[tuple[str, Tensor]]:
        return iter(zip(self.names, self.model.shadow_params, strict=True))

    def step(self, optimization_step: int) -> None:
        """Average in the current weights after optimiser step ``optimization_step``."""
        self.model.optimization_step = optimization_step - 1  # EMAModel.step counts it up itself
        self.model.step(self.params)

    def load_named(self, tensors: dict[str, Tensor], optimization_step: int) -> None:
        with torch.no_grad():
            for shadow, name in zip(self.model.shadow_params, self.names, strict=True):
                shadow.copy_(tensors[name].to(shadow.device, shadow.dtype))
        self.model.optimization_step = optimization_step

    def named(self) -> dict[str, Tensor]:
        return {n: s.detach().float().cpu().contiguous() for n, s in self.items()}

    @contextlib.contextmanager
    def swapped_in(self, changed: Callable[[], Any] | None = None) -> Iterator[None]:
        """The averaged weights in place of the trained ones for the duration (validation, exports)."""
        self.model.store(self.params)
        self.model.copy_to(self.params)
        if changed is not None:
            changed()
        try:
            yield
        finally:
            self.model.restore(self.params)
            if changed is not None:
                changed()
