"""Batched generation with the same images as one at a time, sharded across processes.

Jobs that share a subject (references + name) and the run's settings go through one pipeline call with a
list of prompts and one generator per image (``pipe(prompt=[...], subject=emb, generator=[...])``): the
initial noise of each image is then drawn from its own seed, as in a call of its own. The pipeline takes
one subject per call (several subjects there mean several subjects in one image), so jobs are grouped by
subject and only jobs of the same subject share a batch.

Same seeds must give the same files whatever the batch size or the number of processes. A batched call
alone does not: a few kernels pick another code path for another number of rows (CPU: the linear layers
over one row per sample - timestep, pooled text, AdaLN modulation, CLIP's projection - and convolutions),
which moves pixels by one level here and there. :class:`BatchInvariant` runs exactly those per sample
(cheap: they are one row per image), and the VAE decodes one image at a time (diffusers' VAE slicing), so a
batch of 8 computes what 8 calls of one compute, bit for bit; the token-wise layers and attention, where
the time goes, stay batched.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

T = TypeVar("T")

_PER_SAMPLE_CONV = {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose2d}


class BatchInvariant(TorchFunctionMode):
    """Run the batch-size-sensitive operators one sample at a time (see the module docstring).

    Linear layers over a 2-d input (one row per sample) and convolutions are split along the batch;
    everything else runs as called. Active inside ``with BatchInvariant():``.
    """

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        first = args[0] if args else None
        if isinstance(first, torch.Tensor) and first.dim() >= 2 and first.shape[0] > 1:
            if (func is F.linear and first.dim() == 2) or (func in _PER_SAMPLE_CONV and first.dim() >= 3):
                return torch.cat([func(first[i:i + 1], *args[1:], **kwargs) for i in range(first.shape[0])])
        return func(*args, **kwargs)


def group_batches(items: Iterable[T], key: Callable[[T], Hashable], batch_size: int) -> list[list[T]]:
    """Items grouped by ``key`` (first appearance order, plan order inside), cut into batches of at most
    ``batch_size``: each batch shares one subject embedding."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1 (got {batch_size})")
    groups: dict[Hashable, list[T]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return [group[i:i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


def shard(items: Sequence[T], process_index: int, num_processes: int) -> list[T]:
    """This process's share: every ``num_processes``-th item from ``process_index`` (balanced on resume,
    since callers shard the items still to make)."""
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process index {process_index} out of range for {num_processes} processes")
    return list(items)[process_index::num_processes]


def generate_batch(pipe: Any, subject: Any, prompts: Sequence[str], seeds: Sequence[int], **call: Any) -> list[Any]:
    """One pipeline call for ``prompts`` with one CPU generator per image (so the noise is the device's and
    the batch's business no more than the seed is), under :class:`BatchInvariant`; returns the images."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts for {len(seeds)} seeds")
    generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
    vae = getattr(pipe, "vae", None)
    slicing = getattr(vae, "use_slicing", None)
    if slicing is not None:
        vae.use_slicing = True  # diffusers' VAE slicing: the decoder sees one image at a time, as alone
    try:
        with BatchInvariant():
            out = pipe(prompt=list(prompts), subject=subject, generator=generators, num_images_per_prompt=1, **call)
    finally:
        if slicing is not None:
            vae.use_slicing = slicing
    return list(out.images)


class ProcessShare:
    """Process index / count of this run: accelerate's ``PartialState`` under ``accelerate launch`` or
    ``torchrun`` (gloo on CPU), one process otherwise; ``wait`` is a barrier across them. ``index``/``count``
    given explicitly (tests, a scheduler's own sharding) take the place of the launcher's."""

    def __init__(self, cpu: bool | None = None, index: int | None = None, count: int | None = None) -> None:
        import os

        self._state = None
        self.index, self.count = 0, 1
        if index is not None or count is not None:
            self.index, self.count = int(index or 0), int(count or 1)
            if not 0 <= self.index < self.count:
                raise ValueError(f"process index {self.index} out of range for {self.count} processes")
        elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            cpu = (not torch.cuda.is_available()) if cpu is None else cpu
            self._state = PartialState(cpu=cpu)
            self.index, self.count = self._state.process_index, self._state.num_processes

    @property
    def is_main(self) -> bool:
        return self.index == 0

    @property
    def device(self) -> torch.device | None:
        return self._state.device if self._state is not None else None

    def wait(self) -> None:
        if self._state is not None and self.count > 1:
            self._state.wait_for_everyone()
