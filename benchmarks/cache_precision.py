"""Plain SD3 against CustomShift with a float32 and a bf16 reference K/V cache, interleaved in one process.

``benchmarks/speed.py`` measures one cache precision per run; on a noisy shared CPU the ratio of two runs
moves by more than the difference being measured. This script times the three side by side, round by round
(the order rotates), on the default model's pipeline (28 steps, text guidance 7, reference in both guidance
passes, one torch thread), and reports three estimates of each overhead: ratio of medians, median of
per-round ratios (paired) and ratio of the fastest images (the least disturbed by neighbours' load).

    python benchmarks/cache_precision.py --rounds 15 --out docs/results/speed/cache-precision.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import PROMPT, SUBJECT, ProcessorTables, machine_info, tiny_pipeline, write_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--model", help="pipeline folder (default: the installed default model)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--attention-only", action="store_true",
                        help="time only the reference attention (the default model's shape) in float32 and bf16")
    args = parser.parse_args(argv)
    if args.attention_only:
        return attention_only(args.rounds, args.out, argv)
    from diffusers import StableDiffusion3Pipeline
    from PIL import Image

    torch.set_num_threads(1)
    pipe, source = tiny_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    tables = ProcessorTables(pipe.transformer)
    plain = StableDiffusion3Pipeline(**pipe.components)
    plain.set_progress_bar_config(disable=True)
    size = pipe.default_sample_size * pipe.vae_scale_factor
    image = Image.fromarray((np.random.RandomState(0).rand(size, size, 3) * 255).astype("uint8"))
    subjects = {"float32": pipe.encode_subject(image, SUBJECT, size, size),
                "bfloat16": pipe.encode_subject(image, SUBJECT, size, size, dtype=torch.bfloat16)}
    length = pipe.customshift_config.max_sequence_length or 256

    def generate(target, **kwargs) -> float:
        start = time.perf_counter()
        target(PROMPT, height=size, width=size, num_inference_steps=28, guidance_scale=7.0,
               generator=torch.Generator().manual_seed(0), max_sequence_length=length, **kwargs)
        return time.perf_counter() - start

    def run_plain() -> float:
        with tables.stock_processors():
            return generate(plain)

    methods = {"plain": run_plain, **{k: (lambda s=s: generate(pipe, subject=s)) for k, s in subjects.items()}}
    for method in methods.values():  # warm-up
        method()
    samples: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for index in range(args.rounds):
        for name in names[index % len(names):] + names[: index % len(names)]:
            samples[name].append(methods[name]())
    plain_s = samples["plain"]
    result = {"model": source, "machine": machine_info(torch.device("cpu")), "rounds": args.rounds,
              "command": "python benchmarks/cache_precision.py " + " ".join(argv or sys.argv[1:]),
              "samples": samples, "overhead": {}}
    for name in subjects:
        ours = samples[name]
        result["overhead"][name] = {
            "median_ratio": statistics.median(ours) / statistics.median(plain_s),
            "paired": statistics.median([b / a for a, b in zip(plain_s, ours, strict=True)]),
            "fastest_ratio": min(ours) / min(plain_s),
        }
        print(name, {k: round(v, 3) for k, v in result["overhead"][name].items()})
    if args.out:
        write_json(args.out, result)
    return 0


def attention_only(rounds: int, out: Path | None, argv: list[str] | None) -> int:
    """The one per-step extra of the cached reference, alone: image queries (CFG batch 2, 3 heads x 64,
    256 tokens) over 256 reference keys through the fused kernel with its log-sum-exp, as
    customshift/attention.py calls it, float32 against a bf16 cache (queries cast down, output cast back).
    Says in seconds whether this CPU's bf16 units make the bf16 cache pay (docs/speed.md)."""
    from customshift.attention import attention_with_lse

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, 3, 256, 64, generator=gen) for _ in range(3))
    key16, value16 = key[:1].to(torch.bfloat16), value[:1].to(torch.bfloat16)

    def fp32() -> None:
        attention_with_lse(query, key[:1].expand(2, -1, -1, -1), value[:1].expand(2, -1, -1, -1))

    def bf16() -> None:
        out, _ = attention_with_lse(query.to(torch.bfloat16), key16.expand(2, -1, -1, -1),
                                    value16.expand(2, -1, -1, -1))
        out.float()

    calls = 200
    samples: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    for index in range(rounds + 1):  # the first round warms up
        for name, fn in list(zip(samples, (fp32, bf16), strict=True))[:: 1 if index % 2 else -1]:
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            if index:
                samples[name].append((time.perf_counter() - start) / calls * 1e3)
    result = {"machine": machine_info(torch.device("cpu")), "rounds": rounds, "calls_per_round": calls,
              "command": "python benchmarks/cache_precision.py " + " ".join(argv or sys.argv[1:]),
              "ms_per_call": {k: statistics.median(v) for k, v in samples.items()}, "samples_ms": samples}
    result["bf16_over_fp32"] = result["ms_per_call"]["bfloat16"] / result["ms_per_call"]["float32"]
    print({k: round(v, 3) for k, v in result["ms_per_call"].items()}, "bf16/fp32", round(result["bf16_over_fp32"], 2))
    if out:
        write_json(out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
