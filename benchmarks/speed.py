#!/usr/bin/env python
"""What a customized image costs: CustomShift beside plain SD3, naive concatenation and LoRA tuning.

Why: a tuning-free method is chosen for speed. The Reference-Alignment Branch runs once per subject
and its keys/values are reused at every step, so the only per-step extra should be attention over the
reference keys. This script measures that claim, one configuration at a time, with every method
interleaved round by round in one process so that ratios hold on a noisy machine:

(a) ``plain``: stock ``StableDiffusion3Pipeline`` (diffusers' own attention processors);
(b) ``customshift``: CustomShift with a cached ``SubjectEmbedding``;
(c) ``concat``: naive (OminiControl-style) joint concatenation: the reference tokens are full tokens of
    every block at every step of every guidance pass, so attention is quadratic in the joint length;
(c') ``recompute``: CustomShift without its cache (``recompute_subject=True``): the branch reruns over
    the reference tokens at every step (once per step, not per guidance pass);
(d) ``lora``: per-subject test-time fine-tuning: a rank-4 LoRA on the attention fitted with the SD3
    flow loss until a fixed loss is reached (tiny model), and one LoRA training step timed on the
    full-size architecture.

Two levels:

* ``pipeline`` (``--size tiny``, CPU): whole images through the real pipeline (text encoders, 28
  denoising steps with guidance, VAE decode), ``encode_subject`` end to end, and (d) to a threshold.
* ``transformer`` (every size; the only one for ``sd3-medium`` / ``sd35-medium`` / ``sd35-large``): the
  published architectures with random weights (no download), one transformer forward over the CFG
  batch per step, with or without the CADS state; ``encode_subject`` is one branch forward. Seconds
  per image are extrapolated as ``--steps`` x the median step; text encoders and the VAE are the same
  for every method and left out, which makes the ratios conservative.

Examples:

    python benchmarks/speed.py --size tiny --threads 1 --out docs/speed-cpu.json \
        --markdown docs/speed.md --section cpu
    python benchmarks/speed.py --size sd3-medium --pairs 512:512,1024:512,1024:1024 --dtype bf16 \
        --warmup 2 --runs 5 --out /tmp/sd3.json
    python benchmarks/speed.py --merge /tmp/sd3.json /tmp/sd35.json --out docs/speed-gpu.json \
        --markdown docs/speed.md --section gpu
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import json
import math
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flops import (  # noqa: E402
    ARCHS,
    SD3_TEXT_TOKENS,
    Arch,
    config_flops,
    image_tokens,
    lora_step_flops,
    transformer_flops,
)

PROMPT = "a photo of a robot on the beach"
SUBJECT = "robot"
METHODS = ("plain", "customshift", "concat", "recompute")
# The attention projections diffusers' DreamBooth-LoRA SD3 example adapts.
FINETUNE_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Options:
    """Knobs of one benchmark run (the CLI flags)."""

    runs: int = 5
    warmup: int = 1
    step_runs: int | None = None
    step_warmup: int | None = None
    steps: int = 28
    guidance_scale: float = 7.0
    device: str = "auto"
    dtype: str = "auto"
    reference_dtype: str = "auto"  # precision of (b)'s cached reference K/V ("auto": the model's)
    threads: int | None = None
    compile: bool = False
    seed: int = 0
    branch_lora_rank: int = 16
    lora_rank: int = 4
    finetune_threshold: float = 0.5
    finetune_lr: float = 1e-3
    finetune_max_steps: int = 300
    finetune_eval_every: int = 10
    finetune_steps_assumed: int = 500
    finetune: bool = True
    memory_warmup: bool = True  # one untimed call before each peak-memory call

    @property
    def n_step_runs(self) -> int:
        return self.step_runs if self.step_runs is not None else self.runs

    @property
    def n_step_warmup(self) -> int:
        return self.step_warmup if self.step_warmup is not None else self.warmup


# ----------------------------------------------------------------------------------------------------------
# Measuring


def summarize(samples: list[float]) -> dict[str, Any]:
    """Median and spread of timings; ``spread`` is the inter-quartile range over the median."""
    ordered = sorted(samples)
    if not ordered:
        return {"n": 0}
    median = statistics.median(ordered)
    if len(ordered) >= 4:
        q1, _, q3 = statistics.quantiles(ordered, n=4)
    else:
        q1, q3 = ordered[0], ordered[-1]
    return {
        "median": median,
        "min": ordered[0],
        "max": ordered[-1],
        "iqr": q3 - q1,
        "spread": (q3 - q1) / median if median else 0.0,
        "n": len(ordered),
        "samples": samples,
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _read_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _rss() -> int:
    value = _read_status_kb("VmRSS")
    if value is not None:
        return value
    import psutil

    return psutil.Process().memory_info().rss


class PeakMemory:
    """Peak memory of the code inside ``with``: CUDA peak allocated on GPU, peak RSS on CPU.

    On Linux the RSS high-water mark is reset through /proc/self/clear_refs, so the peak is exact;
    elsewhere a thread samples the RSS every millisecond.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self.base = 0
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        self.base = _rss()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._hwm = True
        except OSError:
            self._hwm = False
            self._stop = threading.Event()
            self.peak = self.base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while self._stop is not None and not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self._hwm:
            self.peak = _read_status_kb("VmHWM") or _rss()
        else:
            assert self._stop is not None and self._thread is not None
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss())

    def as_dict(self) -> dict[str, Any]:
        kind = "cuda_max_memory_allocated" if self.device.type == "cuda" else "peak_rss"
        return {"kind": kind, "peak_bytes": self.peak, "base_bytes": self.base, "delta_bytes": self.peak - self.base}


def interleaved(
    methods: dict[str, Callable[[], dict[str, float]]], warmup: int, runs: int
) -> dict[str, dict[str, list[float]]]:
    """Run every method once per round, rotating the order, so load drift hits all of them alike.

    Each method returns the quantities it measured (seconds); warm-up rounds are discarded.
    """
    names = list(methods)
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    for round_index in range(warmup + runs):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            measured = methods[name]()
            if round_index >= warmup:
                for key, value in measured.items():
                    samples[name].setdefault(key, []).append(value)
    return samples


def paired_ratio(numerator: list[float], denominator: list[float]) -> float | None:
    """Median of per-round ratios: each pair ran under the same load."""
    pairs = [n / d for n, d in zip(numerator, denominator, strict=False) if d > 0]
    return statistics.median(pairs) if pairs else None


def machine_info(device: torch.device) -> dict[str, Any]:
    """The card or CPU the numbers come from."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:  # pragma: no cover - diffusers is a dependency
        pass
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info["cpu"] = f"{cpu}, {cores} cores"
    with contextlib.suppress(OSError):
        info["load_average"] = list(os.getloadavg())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
        info["device_name"] = info["gpu"]
    else:
        info["device_name"] = info["cpu"]
    return info


# ----------------------------------------------------------------------------------------------------------
# The methods' building blocks


class ProcessorTables:
    """Diffusers' stock processors and the CADS processors of one transformer, built once.

    Swapping between the two fixed sets keeps object identities stable (no recompilation under
    ``torch.compile``) and happens outside the timed region.
    """

    def __init__(self, transformer: torch.nn.Module) -> None:
        from diffusers.models.attention_processor import JointAttnProcessor2_0

        from customshift.attention import install_processors

        install_processors(transformer)
        self.transformer = transformer
        self.cads = dict(transformer.attn_processors)
        stock = JointAttnProcessor2_0()
        self.stock = {name: stock for name in self.cads}

    def use(self, which: str) -> None:
        self.transformer.set_attn_processor(dict(self.stock if which == "stock" else self.cads))

    @contextlib.contextmanager
    def stock_processors(self) -> Iterator[None]:
        self.use("stock")
        try:
            yield
        finally:
            self.use("cads")


def concat_forward(
    transformer: torch.nn.Module,
    reference_latents: torch.Tensor,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    pooled_projections: torch.Tensor,
    timestep: torch.Tensor,
    joint_attention_kwargs: dict[str, Any] | None = None,
    return_dict: bool = False,
    **unused: Any,
) -> tuple[torch.Tensor]:
    """``SD3Transformer2DModel.forward`` with the reference tokens joined to the image tokens.

    The naive-concatenation cost model: reference tokens (with their own sin-cos positions) pass
    through every block of every guidance pass at every step; only the target tokens are decoded.
    """
    if any(value is not None for value in unused.values()):
        raise ValueError(f"concat_forward does not support {sorted(unused)}")
    height, width = hidden_states.shape[-2:]
    batch = hidden_states.shape[0]
    tokens = transformer.pos_embed(hidden_states)
    reference = transformer.pos_embed(reference_latents.to(tokens.dtype))
    num_image = tokens.shape[1]
    hidden = torch.cat([tokens, reference.expand(batch, -1, -1)], dim=1)
    temb = transformer.time_text_embed(timestep, pooled_projections)
    context = transformer.context_embedder(encoder_hidden_states)
    for block in transformer.transformer_blocks:
        context, hidden = block(
            hidden_states=hidden, encoder_hidden_states=context, temb=temb,
            joint_attention_kwargs=joint_attention_kwargs,
        )
    hidden = transformer.proj_out(transformer.norm_out(hidden[:, :num_image], temb))
    patch, channels = transformer.config.patch_size, transformer.out_channels
    hidden = hidden.reshape(batch, height // patch, width // patch, patch, patch, channels)
    hidden = torch.einsum("nhwpqc->nchpwq", hidden)
    return (hidden.reshape(batch, channels, height, width),)


@contextlib.contextmanager
def concatenated_reference(transformer: torch.nn.Module, reference_latents: torch.Tensor) -> Iterator[None]:
    """Make ``transformer(...)`` the naive-concatenation forward while inside ``with``."""
    transformer.forward = functools.partial(concat_forward, transformer, reference_latents)
    try:
        yield
    finally:
        del transformer.forward


def subject_weights(batch_per_pass: int, text_len: int) -> torch.Tensor:
    """Rows for [negative pass; positive pass]: the subject name at one CLIP and one T5 position."""
    weights = torch.zeros(2 * batch_per_pass, text_len)
    positions = [5, 77 + 5] if text_len > 82 else [min(5, text_len - 1)]
    weights[batch_per_pass:, positions] = 1.0 / len(positions)
    return weights


class LoraTuner:
    """Per-subject test-time fine-tuning: a LoRA on the attention fitted with the SD3 flow loss.

    x_t = (1 - s) x_0 + s e, the model predicts e - x_0, s logit-normal; the base weights are frozen.
    ``eval_loss`` uses a fixed set of (s, e) so that "the loss reached the threshold" is not noise.
    """

    def __init__(
        self,
        transformer: torch.nn.Module,
        latents: torch.Tensor,
        embeds: torch.Tensor,
        pooled: torch.Tensor,
        rank: int,
        lr: float,
        seed: int = 0,
        eval_samples: int = 8,
    ) -> None:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer

        param = next(transformer.parameters())
        self.device, self.dtype = param.device, param.dtype
        transformer.requires_grad_(False)
        lora = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True, target_modules=list(FINETUNE_TARGETS))
        inject_adapter_in_model(lora, transformer, adapter_name="subject")
        for module in transformer.modules():
            if isinstance(module, LoraLayer):
                module.to(self.device, self.dtype)
        self.params = [p for n, p in transformer.named_parameters() if "lora_" in n]
        for p in self.params:
            p.requires_grad_(True)
        self.transformer = transformer
        self.latents, self.embeds, self.pooled = latents, embeds, pooled
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        fixed = torch.Generator(device="cpu").manual_seed(seed + 1)
        self.eval_sigmas = torch.sigmoid(torch.randn(eval_samples, generator=fixed))
        self.eval_noise = torch.randn((eval_samples, *latents.shape[1:]), generator=fixed)

    def _loss(self, sigmas: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        sigmas = sigmas.to(self.device, self.dtype)
        noise = noise.to(self.device, self.dtype)
        count = sigmas.shape[0]
        x0 = self.latents.expand(count, -1, -1, -1)
        s = sigmas.view(-1, 1, 1, 1)
        pred = self.transformer(
            hidden_states=(1 - s) * x0 + s * noise,
            timestep=sigmas * 1000,
            encoder_hidden_states=self.embeds.expand(count, -1, -1),
            pooled_projections=self.pooled.expand(count, -1),
            return_dict=False,
        )[0]
        return torch.nn.functional.mse_loss(pred.float(), (noise - x0).float())

    def step(self) -> float:
        sigma = torch.sigmoid(torch.randn(1, generator=self.generator))
        noise = torch.randn((1, *self.latents.shape[1:]), generator=self.generator)
        with torch.enable_grad():
            loss = self._loss(sigma, noise)
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    @torch.no_grad()
    def eval_loss(self) -> float:
        return float(self._loss(self.eval_sigmas, self.eval_noise))


def finetune_to_threshold(tuner: LoraTuner, opts: Options) -> dict[str, Any]:
    """Train until the fixed-set loss is ``threshold`` x its initial value; evaluation time is excluded."""
    initial = tuner.eval_loss()
    target = opts.finetune_threshold * initial
    step_times: list[float] = []
    curve = [(0, initial)]
    reached = None
    for step in range(1, opts.finetune_max_steps + 1):
        start = time.perf_counter()
        tuner.step()
        synchronize(tuner.device)
        step_times.append(time.perf_counter() - start)
        if step % opts.finetune_eval_every == 0 or step == opts.finetune_max_steps:
            loss = tuner.eval_loss()
            curve.append((step, loss))
            if loss <= target:
                reached = step
                break
    return {
        "lora_rank": opts.lora_rank,
        "targets": list(FINETUNE_TARGETS),
        "learning_rate": opts.finetune_lr,
        "threshold": f"{opts.finetune_threshold} x initial fixed-set flow loss",
        "initial_loss": initial,
        "target_loss": target,
        "reached": reached is not None,
        "steps": reached if reached is not None else len(step_times),
        "train_seconds": sum(step_times),
        "seconds_per_step": summarize(step_times[1:] or step_times),
        "loss_curve": curve,
    }


# ----------------------------------------------------------------------------------------------------------
# Transformer level: the published architectures with random weights


def reference_dtype(opts: Options, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype (b) and (c') keep the reference K/V in."""
    return model_dtype if opts.reference_dtype == "auto" else DTYPES[opts.reference_dtype]


def resolve_device(opts: Options) -> tuple[torch.device, torch.dtype]:
    device = torch.device("cuda" if opts.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if opts.device == "auto" else opts.device))
    if opts.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = DTYPES[opts.dtype]
    return device, dtype


def build_transformer(arch: Arch, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """An ``SD3Transformer2DModel`` of ``arch`` with random weights, made directly on the device in
    ``dtype`` (no fp32 copy of an 8B model on the way)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = SD3Transformer2DModel(**arch.diffusers_config())
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def arch_of(transformer: torch.nn.Module, name: str, vae_scale: int, text_tokens: int) -> Arch:
    """The ``Arch`` of a loaded transformer, for the FLOP counts."""
    cfg = transformer.config
    return Arch(
        name=name, num_layers=cfg.num_layers, heads=cfg.num_attention_heads, head_dim=cfg.attention_head_dim,
        patch_size=cfg.patch_size, in_channels=cfg.in_channels, joint_attention_dim=cfg.joint_attention_dim,
        caption_projection_dim=cfg.caption_projection_dim, pooled_projection_dim=cfg.pooled_projection_dim,
        pos_embed_max_size=cfg.pos_embed_max_size, sample_size=cfg.sample_size,
        dual_attention_layers=tuple(cfg.dual_attention_layers or ()), qk_norm=cfg.qk_norm,
        vae_scale=vae_scale, text_tokens=text_tokens,
    )


def fused_kernel_check(transformer: torch.nn.Module, state: Any, n_image: int) -> dict[str, bool]:
    """Whether the split CADS form gets a fused attention-with-LSE kernel for the base keys and for the
    expanded (never copied) reference keys, or silently falls back to the explicit softmax."""
    from customshift.attention import _fused_attention_with_lse

    param = next(transformer.parameters())
    reference = state.references[0]
    name = next(iter(reference.keys))
    ref_key = reference.keys[name]
    heads, head_dim = ref_key.shape[1], ref_key.shape[-1]
    query = torch.randn(2, heads, n_image, head_dim, device=param.device, dtype=param.dtype)
    expanded = ref_key.expand(2, heads, -1, -1)
    with torch.no_grad():
        return {
            "base": _fused_attention_with_lse(query, query, query) is not None,
            "reference_expanded": _fused_attention_with_lse(query, expanded,
                                                            reference.values[name].expand_as(expanded)) is not None,
        }


def bench_transformer(
    arch: Arch,
    pairs: list[tuple[int, int]],
    opts: Options,
    transformer: torch.nn.Module | None = None,
) -> list[dict[str, Any]]:
    """Per-step costs of (a) (b) (c) (c') and one LoRA step (d), for each (target, reference) size."""
    from customshift.config import CustomShiftConfig
    from customshift.reference import ReferenceBranch

    device, dtype = resolve_device(opts)
    if transformer is None:
        transformer = build_transformer(arch, device, dtype, opts.seed)
    tables = ProcessorTables(transformer)
    config = CustomShiftConfig(lora_rank=opts.branch_lora_rank)
    branch = ReferenceBranch(transformer, config).to(device=device, dtype=dtype).eval()
    if opts.compile:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        for block in transformer.transformer_blocks:
            block.compile()
        for block in branch.tree.transformer_blocks:
            block.compile()

    results = [
        _bench_transformer_config(transformer, tables, branch, arch, resolution, reference, opts)
        for resolution, reference in pairs
    ]

    if opts.finetune and pairs:
        lora = bench_lora_step(transformer, tables, arch, pairs, opts, device, dtype)
        for result in results:
            result["finetune"] = lora.get(result["resolution"])
    for result in results:
        finish(result, arch)
    return results


def _bench_transformer_config(
    transformer: torch.nn.Module,
    tables: ProcessorTables,
    branch: torch.nn.Module,
    arch: Arch,
    resolution: int,
    reference: int,
    opts: Options,
) -> dict[str, Any]:
    """One (target, reference) configuration of ``bench_transformer``; all methods interleaved."""
    from customshift.attention import ReferenceSet, build_cads_state

    device, dtype = resolve_device(opts)
    generator = torch.Generator(device="cpu").manual_seed(opts.seed)

    def rand(*shape: int, g: torch.Generator = generator) -> torch.Tensor:
        return torch.randn(shape, generator=g).to(device=device, dtype=dtype)

    latent, ref_latent = resolution // arch.vae_scale, reference // arch.vae_scale
    channels, text = arch.in_channels, arch.text_tokens
    latents = rand(2, channels, latent, latent)
    embeds, pooled = rand(2, text, arch.joint_attention_dim), rand(2, arch.pooled_projection_dim)
    timestep = torch.full((2,), 500.0, device=device)
    inputs = {
        "reference_latents": rand(1, channels, ref_latent, ref_latent),
        "subject_embeds": rand(1, 5, arch.joint_attention_dim),
        "subject_pooled": rand(1, arch.pooled_projection_dim),
    }
    log_scale = torch.zeros(2)  # shift_scale 1, the reference on in both guidance passes (w_ref = 0)
    weights = subject_weights(1, text)

    def forward(kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        return transformer(
            hidden_states=latents, timestep=timestep, encoder_hidden_states=embeds,
            pooled_projections=pooled, joint_attention_kwargs=kwargs, return_dict=False,
        )[0]

    kv_dtype = reference_dtype(opts, dtype)

    def encode() -> Any:
        keys, values = branch.encode(inputs)
        keys = {name: key.to(kv_dtype) for name, key in keys.items()}
        values = {name: value.to(kv_dtype) for name, value in values.items()}
        reference = ReferenceSet(keys, values, log_scale, weights)
        return build_cads_state(branch.config, branch.shift, [reference], device=device, dtype=dtype)

    def timed(body: Callable[[], Any]) -> float:
        synchronize(device)
        start = time.perf_counter()
        body()
        synchronize(device)
        return time.perf_counter() - start

    holder: dict[str, Any] = {}

    def run_plain() -> dict[str, float]:
        tables.use("stock")
        return {"seconds_per_step": timed(forward)}

    def run_customshift() -> dict[str, float]:
        tables.use("cads")
        return {"seconds_per_step": timed(lambda: forward({"customshift": holder["state"]}))}

    def run_concat() -> dict[str, float]:
        tables.use("stock")
        ref = inputs["reference_latents"]
        return {"seconds_per_step": timed(lambda: concat_forward(
            transformer, ref, latents, embeds, pooled, timestep))}

    def run_recompute() -> dict[str, float]:
        tables.use("cads")
        return {"seconds_per_step": timed(lambda: forward({"customshift": encode()}))}

    def run_encode() -> dict[str, float]:
        tables.use("cads")
        return {"seconds": timed(encode)}

    methods = {"plain": run_plain, "customshift": run_customshift, "concat": run_concat,
               "recompute": run_recompute, "encode_subject": run_encode}
    memory: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    with torch.no_grad():
        # Peak memory first, one warm call each; (a) before any reference K/V exist.
        if opts.memory_warmup:
            run_plain()
        with PeakMemory(device) as peak:
            run_plain()
        memory["plain"] = peak.as_dict()
        holder["state"] = encode()
        kernels = fused_kernel_check(transformer, holder["state"], image_tokens(arch, resolution))
        for name in ("customshift", "recompute", "encode_subject"):
            if opts.memory_warmup:
                methods[name]()
            with PeakMemory(device) as peak:
                methods[name]()
            memory[name] = peak.as_dict()
        cached = holder["state"].references[0]
        cache_bytes = sum(t.numel() * t.element_size() for d in (cached.keys, cached.values)
                          for t in d.values())
        samples = interleaved(methods, opts.n_step_warmup, opts.n_step_runs)
        state = holder.pop("state")
        del state
        try:
            if opts.memory_warmup:
                run_concat()
            with PeakMemory(device) as peak:
                run_concat()
            memory["concat"] = peak.as_dict()
        except torch.OutOfMemoryError as error:  # pragma: no cover - large GPU configurations
            errors["concat_memory"] = str(error).splitlines()[0]
    tables.use("cads")
    result = {
        "level": "transformer",
        "size": arch.name,
        "arch": {k: v for k, v in asdict(arch).items() if k != "extra"},
        "resolution": resolution,
        "reference": reference,
        "image_tokens": image_tokens(arch, resolution),
        "reference_tokens": image_tokens(arch, reference),
        "text_tokens": text,
        "cfg_batch": 2,
        "steps_per_image": opts.steps,
        "seconds_per_image_is": f"extrapolated: {opts.steps} x median seconds per step (transformer only)",
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "reference_dtype": str(kv_dtype).replace("torch.", ""),
        "compile": opts.compile,
        "branch_lora_rank": opts.branch_lora_rank,
        "reference_cache_bytes": cache_bytes,
        "fused_lse_kernels": kernels,
        "methods": {},
        "errors": errors,
    }
    for name in METHODS:
        per_step = samples[name]["seconds_per_step"]
        result["methods"][name] = {
            "seconds_per_step": summarize(per_step),
            "seconds_per_image": summarize([opts.steps * s for s in per_step]),
            "peak_memory": memory.get(name),
        }
    result["encode_subject"] = {"seconds": summarize(samples["encode_subject"]["seconds"]),
                                "peak_memory": memory.get("encode_subject")}
    result["paired"] = {
        "overhead_ratio": paired_ratio(samples["customshift"]["seconds_per_step"],
                                       samples["plain"]["seconds_per_step"]),
        "concat_ratio": paired_ratio(samples["concat"]["seconds_per_step"],
                                     samples["customshift"]["seconds_per_step"]),
    }
    return result


def bench_lora_step(
    transformer: torch.nn.Module,
    tables: ProcessorTables,
    arch: Arch,
    pairs: list[tuple[int, int]],
    opts: Options,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[int, dict[str, Any]]:
    """(d) on the full architecture: seconds and peak memory of one LoRA training step (batch 1).

    Done last: the LoRA is injected into this transformer.
    """
    tables.use("stock")
    out: dict[int, dict[str, Any]] = {}
    generator = torch.Generator(device="cpu").manual_seed(opts.seed + 7)
    tuner = None
    for resolution in sorted({r for r, _ in pairs}):
        latent = resolution // arch.vae_scale
        latents = torch.randn((1, arch.in_channels, latent, latent), generator=generator).to(device, dtype)
        embeds = torch.randn((1, arch.text_tokens, arch.joint_attention_dim), generator=generator).to(device, dtype)
        pooled = torch.randn((1, arch.pooled_projection_dim), generator=generator).to(device, dtype)
        try:
            if tuner is None:
                tuner = LoraTuner(transformer, latents, embeds, pooled, opts.lora_rank, opts.finetune_lr, opts.seed)
            else:
                tuner.latents, tuner.embeds, tuner.pooled = latents, embeds, pooled
            for _ in range(opts.n_step_warmup):
                tuner.step()
            times = []
            with PeakMemory(device) as peak:
                for _ in range(opts.n_step_runs):
                    synchronize(device)
                    start = time.perf_counter()
                    tuner.step()
                    synchronize(device)
                    times.append(time.perf_counter() - start)
            stats = summarize(times)
            out[resolution] = {
                "lora_rank": opts.lora_rank,
                "targets": list(FINETUNE_TARGETS),
                "seconds_per_step": stats,
                "peak_memory": peak.as_dict(),
                "flops_per_step": lora_step_flops(arch, image_tokens(arch, resolution)),
                "assumed_steps": opts.finetune_steps_assumed,
                "extrapolated_seconds": opts.finetune_steps_assumed * stats["median"],
            }
        except torch.OutOfMemoryError as error:  # pragma: no cover - large GPU configurations
            out[resolution] = {"error": str(error).splitlines()[0]}
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------------------------------------
# Pipeline level: whole images through the real pipeline (tiny model, CPU)


def tiny_pipeline(model: str | None = None) -> tuple[Any, str]:
    """The default model if installed (or ``model``), else a random tiny SD3 of its planned shape."""
    from customshift.default_model import DEFAULT_MODEL_DIR, load_default_pipeline

    if model:
        from customshift.pipeline import CustomShiftPipeline

        return CustomShiftPipeline.from_pretrained(model), model
    if (DEFAULT_MODEL_DIR / "model_index.json").is_file():
        return load_default_pipeline(), str(DEFAULT_MODEL_DIR)
    from customshift.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(
        "sd3", seed=0, sample_size=16, num_layers=6, heads=3, head_dim=64, vae_channels=(32, 32, 64), patch_size=1
    )
    return pipe, "random tiny SD3 of the default model's planned shape (64 px, VAE 4x, patch 1, 6 x 3 x 64)"


class StepClock:
    """``callback_on_step_end`` that timestamps every denoising step (synchronised on GPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []

    def __call__(self, pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        synchronize(self.device)
        self.times.append(time.perf_counter())
        return kwargs

    def per_step(self) -> float:
        """Mean step time after the first step (which also carries the loop's set-up)."""
        if len(self.times) < 2:
            return float("nan")
        return (self.times[-1] - self.times[0]) / (len(self.times) - 1)


def bench_pipeline(
    pipe: Any,
    resolution: int,
    reference: int,
    opts: Options,
    source: str = "",
) -> dict[str, Any]:
    """Seconds per image / per step and peak memory of (a) (b) (c) (c'), ``encode_subject``, and (d)."""
    import numpy as np
    from diffusers import StableDiffusion3Pipeline
    from PIL import Image

    device = pipe._execution_device
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer
    tables = ProcessorTables(transformer)
    plain_pipe = StableDiffusion3Pipeline(**{k: v for k, v in pipe.components.items()})
    plain_pipe.set_progress_bar_config(disable=True)
    rng = np.random.RandomState(opts.seed)
    image = Image.fromarray((rng.rand(reference, reference, 3) * 255).astype("uint8"))
    clock = StepClock(device)
    # Same text length for every method: CustomShift weights may record the T5 length they were trained
    # with (the default model: 16), which the plain SD3 pipeline would not know.
    text_length = pipe.customshift_config.max_sequence_length or 256

    def generate(target: Any, **kwargs: Any) -> dict[str, float]:
        clock.times = []
        synchronize(device)
        start = time.perf_counter()
        target(
            PROMPT, height=resolution, width=resolution, num_inference_steps=opts.steps,
            guidance_scale=opts.guidance_scale, generator=torch.Generator("cpu").manual_seed(opts.seed),
            callback_on_step_end=clock, max_sequence_length=text_length, **kwargs,
        )
        synchronize(device)
        return {"seconds_per_image": time.perf_counter() - start, "seconds_per_step": clock.per_step()}

    holder: dict[str, Any] = {}

    def run_plain() -> dict[str, float]:
        with tables.stock_processors():
            return generate(plain_pipe)

    def run_customshift() -> dict[str, float]:
        return generate(pipe, subject=holder["subject"])

    def run_concat() -> dict[str, float]:
        ref = holder["subject"].inputs["reference_latents"]
        with tables.stock_processors(), concatenated_reference(transformer, ref):
            return generate(plain_pipe)

    def run_recompute() -> dict[str, float]:
        return generate(pipe, subject=holder["subject"], recompute_subject=True)

    def run_encode() -> dict[str, float]:
        synchronize(device)
        start = time.perf_counter()
        holder["subject"] = pipe.encode_subject(image, SUBJECT, height=reference, width=reference,
                                                dtype=reference_dtype(opts, transformer.dtype))
        synchronize(device)
        return {"seconds": time.perf_counter() - start}

    methods = {"plain": run_plain, "customshift": run_customshift, "concat": run_concat,
               "recompute": run_recompute, "encode_subject": run_encode}
    memory: dict[str, dict[str, Any]] = {}
    if opts.memory_warmup:
        run_plain()
    with PeakMemory(device) as peak:  # (a) first: before any reference K/V exist
        run_plain()
    memory["plain"] = peak.as_dict()
    with PeakMemory(device) as peak:
        run_encode()
    memory["encode_subject"] = peak.as_dict()
    for name in ("customshift", "recompute", "concat"):
        if opts.memory_warmup:
            methods[name]()
        with PeakMemory(device) as peak:
            methods[name]()
        memory[name] = peak.as_dict()
    samples = interleaved(methods, opts.warmup, opts.runs)

    name = "default-model" if source.endswith("default-model") else "tiny"
    arch = arch_of(transformer, name, pipe.vae_scale_factor, SD3_TEXT_TOKENS)
    result: dict[str, Any] = {
        "level": "pipeline",
        "size": arch.name,
        "model": source,
        "arch": {k: v for k, v in asdict(arch).items() if k != "extra"},
        "resolution": resolution,
        "reference": reference,
        "image_tokens": image_tokens(arch, resolution),
        "reference_tokens": holder["subject"].num_tokens,
        "text_tokens": arch.text_tokens,
        "cfg_batch": 2 if opts.guidance_scale > 1 else 1,
        "steps_per_image": opts.steps,
        "seconds_per_image_is": "measured: the whole pipeline call (text encoders, denoising loop, VAE decode, PIL)",
        "device": str(device),
        "dtype": str(transformer.dtype).replace("torch.", ""),
        "reference_dtype": str(next(iter(holder["subject"].keys.values())).dtype).replace("torch.", ""),
        "compile": False,
        "branch_lora_rank": pipe.customshift_config.lora_rank,
        "reference_cache_bytes": sum(t.numel() * t.element_size() for d in (holder["subject"].keys,
                                     holder["subject"].values) for t in d.values()),
        "prompt": PROMPT,
        "subject": SUBJECT,
        "methods": {},
    }
    for name in METHODS:
        result["methods"][name] = {
            "seconds_per_image": summarize(samples[name]["seconds_per_image"]),
            "seconds_per_step": summarize(samples[name]["seconds_per_step"]),
            "peak_memory": memory[name],
        }
    result["encode_subject"] = {"seconds": summarize(samples["encode_subject"]["seconds"]),
                                "peak_memory": memory["encode_subject"]}
    result["paired"] = {
        "overhead_ratio": paired_ratio(samples["customshift"]["seconds_per_image"],
                                       samples["plain"]["seconds_per_image"]),
        "concat_ratio": paired_ratio(samples["concat"]["seconds_per_image"],
                                     samples["customshift"]["seconds_per_image"]),
    }
    if opts.finetune:
        result["finetune"] = finetune_pipeline(pipe, holder["subject"], tables, arch, result, opts)
    finish(result, arch)
    return result


def finetune_pipeline(
    pipe: Any, subject: Any, tables: ProcessorTables, arch: Arch, result: dict[str, Any], opts: Options
) -> dict[str, Any]:
    """(d) on the tiny model: LoRA steps to the threshold, and seconds to the first image against
    CustomShift's ``encode_subject`` + one image."""
    transformer = copy.deepcopy(pipe.transformer)
    stock = ProcessorTables(transformer)
    stock.use("stock")
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=f"a photo of a {SUBJECT}", prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
            device=pipe._execution_device,
        )
    latents = subject.inputs["reference_latents"][:1]
    tuner = LoraTuner(transformer, latents, embeds, pooled, opts.lora_rank, opts.finetune_lr, opts.seed)
    report = finetune_to_threshold(tuner, opts)
    plain_image = result["methods"]["plain"]["seconds_per_image"]["median"]
    custom_image = result["methods"]["customshift"]["seconds_per_image"]["median"]
    encode = result["encode_subject"]["seconds"]["median"]
    report["seconds_to_first_image"] = report["train_seconds"] + plain_image
    report["customshift_seconds_to_first_image"] = encode + custom_image
    full = ARCHS["sd3-medium"]
    n_full = image_tokens(full, 1024)
    image_flops = opts.steps * transformer_flops(full, n_full, batch=2)
    report["extrapolated_sd3_medium_1024"] = {
        "flops_per_step": lora_step_flops(full, n_full),
        "plain_images_per_step": lora_step_flops(full, n_full) / image_flops,
        "steps_assumed": opts.finetune_steps_assumed,
        "plain_images_for_assumed_steps": opts.finetune_steps_assumed * lora_step_flops(full, n_full) / image_flops,
    }
    del tuner, transformer
    return report


# ----------------------------------------------------------------------------------------------------------
# Ratios, FLOPs, targets


def _median(result: dict[str, Any], method: str, key: str) -> float | None:
    stats = (result["methods"].get(method) or {}).get(key) or {}
    return stats.get("median")


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or not denominator or math.isnan(numerator):
        return None
    return numerator / denominator


def finish(result: dict[str, Any], arch: Arch) -> None:
    """Add the measured ratios, the FLOP ratios of the same configuration, and the target checks."""
    a = _median(result, "plain", "seconds_per_image")
    b = _median(result, "customshift", "seconds_per_image")
    c = _median(result, "concat", "seconds_per_image")
    r = _median(result, "recompute", "seconds_per_image")
    step_a = _median(result, "plain", "seconds_per_step")
    step_b = _median(result, "customshift", "seconds_per_step")
    encode = result["encode_subject"]["seconds"].get("median")
    mem = {m: (result["methods"][m].get("peak_memory") or {}).get("peak_bytes") for m in METHODS}
    result["overhead_ratio"] = _ratio(b, a)
    result["overhead_ratio_per_step"] = _ratio(step_b, step_a)
    result["concat_ratio"] = _ratio(c, b)
    result["concat_vs_plain"] = _ratio(c, a)
    result["recompute_ratio"] = _ratio(r, b)
    result["memory_ratio"] = _ratio(mem["customshift"], mem["plain"])
    result["encode_vs_step"] = _ratio(encode, step_b)
    flops = config_flops(arch, result["resolution"], result["reference"], cfg_batch=result["cfg_batch"])
    result["flops"] = flops
    finetune = result.get("finetune") or {}
    if result["level"] == "pipeline" and "steps" in finetune and a:
        finetune["plain_images_of_tuning"] = finetune["train_seconds"] / a
    result["targets"] = targets_for(result)


def targets_for(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The issue's targets that apply to this configuration."""
    checks: dict[str, dict[str, Any]] = {}

    def check(name: str, value: float | None, limit: float, kind: str) -> None:
        met = None if value is None else (value <= limit if kind == "<=" else value >= limit)
        checks[name] = {"value": value, "limit": limit, "kind": kind, "met": met}

    on_gpu = result["device"].startswith("cuda")
    if result["level"] == "pipeline" and not on_gpu:
        check("overhead_ratio (tiny, CPU)", result["overhead_ratio"], 1.15, "<=")
    if on_gpu and result["size"] == "sd3-medium" and result["resolution"] == 1024:
        if result["reference"] == 512:
            check("overhead_ratio (sd3-medium 1024, 512 ref, GPU)", result["overhead_ratio"], 1.10, "<=")
        if result["reference"] == 1024:
            check("concat_ratio (sd3-medium 1024, 1024 ref, GPU)", result["concat_ratio"], 1.8, ">=")
    check("peak memory (b) / (a)", result["memory_ratio"], 1.10, "<=")
    check("encode_subject / one step of (b)", result["encode_vs_step"], 1.0, "<=")
    return checks


# ----------------------------------------------------------------------------------------------------------
# Output


def _fmt_time(stats: dict[str, Any] | None) -> str:
    if not stats or stats.get("median") is None:
        return "-"
    median = stats["median"]
    text = f"{median:.3f}" if median < 10 else f"{median:.1f}"
    return f"{text} ±{100 * stats.get('spread', 0.0):.0f}%"


def _fmt_ratio(value: float | None, flops: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" + (f" ({flops:.2f})" if flops is not None else "")


def _kv_note(result: dict[str, Any]) -> str:
    """``", K/V bfloat16"`` where the reference cache's precision differs from the model's, else ``""``."""
    kv = result.get("reference_dtype")
    return f", K/V {kv}" if kv and kv != result["dtype"] else ""


def _fmt_dtype(result: dict[str, Any]) -> str:
    return result["dtype"] + _kv_note(result)


def _fmt_bytes(value: int | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 2**30:
        return f"{value / 2**30:.2f} GiB"
    return f"{value / 2**20:.0f} MiB" if abs(value) >= 2**20 else f"{value / 2**10:.0f} KiB"


def render_markdown(document: dict[str, Any]) -> str:
    """The tables of one or several runs (a JSON document of this script)."""
    lines = []
    runs = document.get("runs") or [document]
    for run in runs:
        machine = run.get("machine", {})
        lines.append(f"Device: **{machine.get('device_name', '?')}**; torch {machine.get('torch')}, "
                     f"diffusers {machine.get('diffusers')}, {machine.get('torch_threads')} torch thread(s).  ")
        lines.append(f"Command: `{run.get('command', '?')}`")
        lines.append("")
    results = [r for run in runs for r in run["results"]]
    lines += [
        "Seconds per image (median ±IQR/median); ratios measured, with the FLOP ratio of the same configuration "
        "in brackets.",
        "",
        "| level | model | dtype | image | ref | (a) plain | (b) CustomShift | (c) concat | (c') recompute "
        "| b/a | c/b | c'/b | step (a) | step (b) | encode_subject |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m, f = r["methods"], r["flops"]
        lines.append(
            f"| {r['level']} | {r['size']} | {_fmt_dtype(r)}{' compiled' if r.get('compile') else ''} "
            f"| {r['resolution']}² | {r['reference']}² "
            f"| {_fmt_time(m['plain']['seconds_per_image'])} | {_fmt_time(m['customshift']['seconds_per_image'])} "
            f"| {_fmt_time(m['concat']['seconds_per_image'])} | {_fmt_time(m['recompute']['seconds_per_image'])} "
            f"| {_fmt_ratio(r['overhead_ratio'], f['overhead_ratio'])} "
            f"| {_fmt_ratio(r['concat_ratio'], f['concat_ratio'])} "
            f"| {_fmt_ratio(r['recompute_ratio'], f['recompute_ratio'])} "
            f"| {_fmt_time(m['plain']['seconds_per_step'])} | {_fmt_time(m['customshift']['seconds_per_step'])} "
            f"| {_fmt_time(r['encode_subject']['seconds'])} |"
        )
    lines += [
        "",
        "Peak memory (CUDA peak allocated on GPU; peak RSS of the process on CPU, and in brackets its rise "
        "during the call) and one-time / per-subject costs.",
        "",
        "| level | model | image | ref | (a) plain | (b) CustomShift | b/a | (c) concat | reference K/V "
        "| encode_subject / step (b) | (d) LoRA step | (d) LoRA to threshold |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        mem = {k: r["methods"][k].get("peak_memory") or {} for k in METHODS}

        def cell(entry: dict[str, Any]) -> str:
            if not entry:
                return "-"
            return f"{_fmt_bytes(entry.get('peak_bytes'))} (+{_fmt_bytes(entry.get('delta_bytes'))})"

        ft = r.get("finetune") or {}
        step = _fmt_time(ft.get("seconds_per_step")) if ft.get("seconds_per_step") else ft.get("error", "-")
        if "steps" in ft:
            reach = "" if ft["reached"] else " (not reached)"
            to_threshold = (f"{ft['steps']} steps{reach}, {ft['train_seconds']:.1f} s "
                            f"= {ft.get('plain_images_of_tuning', float('nan')):.0f} plain images")
        elif "extrapolated_seconds" in ft:
            to_threshold = f"{ft['assumed_steps']} steps assumed: {ft['extrapolated_seconds']:.0f} s"
        else:
            to_threshold = "-"
        cache = _fmt_bytes(r.get("reference_cache_bytes")) if r.get("reference_cache_bytes") else "-"
        cache += f" ({r['reference_dtype']})" if _kv_note(r) else ""
        lines.append(
            f"| {r['level']} | {r['size']} | {r['resolution']}² | {r['reference']}² | {cell(mem['plain'])} "
            f"| {cell(mem['customshift'])} | {_fmt_ratio(r['memory_ratio'])} | {cell(mem['concat'])} | {cache} "
            f"| {_fmt_ratio(r['encode_vs_step'], r['flops']['encode_vs_step'])} | {step} | {to_threshold} |"
        )
    lines += ["", "Targets:", ""]
    for r in results:
        for name, t in r["targets"].items():
            status = "n/a" if t["met"] is None else ("**met**" if t["met"] else "**NOT met**")
            value = "-" if t["value"] is None else f"{t['value']:.3f}"
            where = f"{r['level']} {r['size']} {r['resolution']}²/{r['reference']}²{_kv_note(r)}"
            lines.append(f"- {where}: {name} = {value} ({t['kind']} {t['limit']}): {status}")
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, section: str, text: str, tag: str = "speed", title: str = "Speed") -> None:
    """Replace the ``section`` block of ``path`` (between its markers), or write a new file."""
    begin, end = f"<!-- {tag}:{section}:begin -->", f"<!-- {tag}:{section}:end -->"
    block = f"{begin}\n{text}{end}"
    if path.is_file():
        current = path.read_text()
        if begin in current and end in current:
            head, rest = current.split(begin, 1)
            _, tail = rest.split(end, 1)
            path.write_text(head + block + tail)
            return
        path.write_text(current.rstrip("\n") + "\n\n" + block + "\n")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {title}\n\n{block}\n")


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=1, default=float) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------
# CLI


def parse_pairs(text: str) -> list[tuple[int, int]]:
    """``"1024:512,1024:1024"`` -> [(1024, 512), (1024, 1024)] (target : reference pixels)."""
    pairs = []
    for item in text.split(","):
        target, _, reference = item.strip().partition(":")
        pairs.append((int(target), int(reference or target)))
    return pairs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(ARCHS), default="tiny")
    parser.add_argument("--level", choices=["auto", "pipeline", "transformer", "both"], default="auto",
                        help="auto: both for tiny, transformer for the full-size architectures")
    parser.add_argument("--pairs", help="target:reference sizes in pixels, e.g. 1024:512,1024:1024 "
                        "(default: the model's native size with a same-size reference)")
    parser.add_argument("--model", help="pipeline folder for --size tiny (default: the installed default model, "
                        "else a random tiny SD3 of its planned shape)")
    parser.add_argument("--runs", type=int, default=5, help="timed rounds (images; steps at transformer level)")
    parser.add_argument("--warmup", type=int, default=1, help="discarded rounds before timing")
    parser.add_argument("--step-runs", type=int, help="timed steps at transformer level (default: --runs)")
    parser.add_argument("--step-warmup", type=int, help="warm-up steps at transformer level (default: --warmup)")
    parser.add_argument("--steps", type=int, default=28, help="denoising steps per image")
    parser.add_argument("--guidance-scale", type=float, default=7.0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto")
    parser.add_argument("--reference-dtype", choices=["auto", *DTYPES], default="auto",
                        help="precision of (b)'s cached reference K/V (auto: the model's; bf16 on a fp32 model "
                        "computes the reference attention in bf16)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--compile", action="store_true", help="torch.compile every transformer block")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--branch-lora-rank", type=int, default=16,
                        help="LoRA rank of the Reference-Alignment Branch at transformer level (trained default)")
    parser.add_argument("--lora-rank", type=int, default=4, help="(d) rank of the per-subject LoRA")
    parser.add_argument("--finetune-threshold", type=float, default=0.5,
                        help="(d) stop when the fixed-set flow loss is this fraction of its initial value")
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--finetune-max-steps", type=int, default=300)
    parser.add_argument("--finetune-eval-every", type=int, default=10)
    parser.add_argument("--finetune-steps-assumed", type=int, default=500,
                        help="(d) steps of a real per-subject LoRA run, for the full-size extrapolation")
    parser.add_argument("--no-finetune", action="store_true", help="skip (d)")
    parser.add_argument("--merge", nargs="+", help="JSON files of earlier runs to combine (no measuring)")
    parser.add_argument("--out", type=Path, help="JSON output")
    parser.add_argument("--markdown", type=Path, help="markdown file whose --section block gets the tables")
    parser.add_argument("--section", default="results", help="marker name of the markdown block")
    return parser


def options_from(args: argparse.Namespace) -> Options:
    return Options(
        runs=args.runs, warmup=args.warmup, step_runs=args.step_runs, step_warmup=args.step_warmup,
        steps=args.steps, guidance_scale=args.guidance_scale, device=args.device, dtype=args.dtype,
        reference_dtype=args.reference_dtype, threads=args.threads, compile=args.compile, seed=args.seed,
        branch_lora_rank=args.branch_lora_rank,
        lora_rank=args.lora_rank, finetune_threshold=args.finetune_threshold, finetune_lr=args.finetune_lr,
        finetune_max_steps=args.finetune_max_steps, finetune_eval_every=args.finetune_eval_every,
        finetune_steps_assumed=args.finetune_steps_assumed,
        finetune=not args.no_finetune,
    )


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Measure one model size over its configurations; returns the JSON document."""
    opts = options_from(args)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    arch = ARCHS[args.size]
    native = arch.sample_size * arch.vae_scale
    pairs = parse_pairs(args.pairs) if args.pairs else [(native, native)]
    level = args.level
    if level == "auto":
        level = "both" if args.size == "tiny" else "transformer"
    device, _ = resolve_device(opts)
    results: list[dict[str, Any]] = []
    if level in ("pipeline", "both"):
        if args.size != "tiny":
            raise SystemExit("the pipeline level needs --size tiny (the full-size models are timed without weights)")
        pipe, source = tiny_pipeline(args.model)
        pipe.to(device)
        if not args.pairs:  # the loaded model's own size (the default model may differ from the plan)
            native = pipe.default_sample_size * pipe.vae_scale_factor
            pairs = [(native, native)]
        for resolution, reference in pairs:
            results.append(bench_pipeline(pipe, resolution, reference, opts, source))
        arch = arch_of(pipe.transformer, arch.name, pipe.vae_scale_factor, arch.text_tokens)
        del pipe
    if level in ("transformer", "both"):
        results.extend(bench_transformer(arch, pairs, opts))
    return {
        "format": "customshift-speed/1",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(shlex.quote(a) for a in ["benchmarks/speed.py", *argv]),
        "machine": machine_info(device),
        "results": results,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.merge:
        document = {"format": "customshift-speed/1", "runs": [json.loads(Path(p).read_text()) for p in args.merge]}
    else:
        document = run(args, argv)
    text = render_markdown(document)
    if args.out:
        write_json(args.out, document)
    if args.markdown:
        write_markdown(args.markdown, args.section, text)
    print(text)
    return document


if __name__ == "__main__":
    main()
