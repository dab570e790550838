"""Images per second of batched generation against one image at a time, interleaved in one process.

Three ways to make the same N images of one subject (N prompts, N seeds) on the default model:

* ``one at a time``: one pipeline call per image, as ``customshift generate --batch`` did before batching;
* ``batched``: ``customshift.batching.generate_batch`` (what ``--batch-size N`` runs): one call for the N
  images, the batch-size-sensitive operators per sample, so the files equal one-at-a-time ones bit for bit;
* ``batched, not invariant``: the same call without that (what identical files cost).

``--held-out``: instead, N held-out pairs of the clean track, each its own subject, through
``customshift.sprites.evaluate.generate_pairs`` (what ``customshift evaluate synthetic --batch-size N`` runs)
one at a time and N per call (per-prompt subjects), subject encoding included in both.

Rounds rotate the order of the methods; the table gives the median seconds per round, images per second,
and the speed-up over one at a time (ratio of medians and median of the per-round ratios).

    python benchmarks/batch_throughput.py --images 8 --rounds 3 --threads 2 \
        --out docs/results/speed/batch-throughput.json --markdown docs/results/speed/batch-throughput.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="pipeline folder (default: the packaged default model)")
    parser.add_argument("--images", type=int, default=8, help="images per round (the batch size)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance-scale", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--held-out", action="store_true", help="N held-out pairs, each its own subject")
    args = parser.parse_args(argv)

    from customshift.batching import BatchInvariant, generate_batch
    from customshift.generate import load_pipeline
    from customshift.sprites import synthetic

    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, None, "cpu")
    pipe.set_progress_bar_config(disable=True)
    size = pipe.default_sample_size * pipe.vae_scale_factor
    pair = synthetic.evaluation_split(n=1, track="clean")[0]
    subject = pipe.encode_subject(pair.reference, pair.subject_name, size, size)
    backgrounds = ["black", "white", "gray", "brown"]
    prompts = [f"a {pair.subject_name} on a {backgrounds[i % 4]} background" for i in range(args.images)]
    seeds = list(range(args.images))
    call = dict(num_inference_steps=args.steps, guidance_scale=args.guidance_scale, height=size, width=size)

    def one_at_a_time() -> None:
        for prompt, seed in zip(prompts, seeds, strict=True):
            pipe(prompt=prompt, subject=subject, generator=torch.Generator("cpu").manual_seed(seed), **call)

    def batched() -> None:
        generate_batch(pipe, subject, prompts, seeds, **call)

    def batched_plain() -> None:
        pipe(prompt=prompts, subject=subject, generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], **call)

    methods = {"one at a time": one_at_a_time, "batched": batched, "batched, not invariant": batched_plain}
    if args.held_out:
        from customshift.sprites.evaluate import generate_pairs

        pairs = synthetic.evaluation_split(n=args.images, track="clean")
        methods = {name: (lambda size=size: generate_pairs(pipe, pairs, steps=args.steps, seed=0, batch_size=size,
                                                           guidance_scale=args.guidance_scale))
                   for name, size in (("one at a time", 1), ("batched", args.images))}
    with BatchInvariant():  # warm-up, both code paths
        pipe(prompt=prompts[:2], subject=subject, generator=[torch.Generator().manual_seed(0)] * 2,
             **{**call, "num_inference_steps": 2})
    pipe(prompt=prompts[0], subject=subject, **{**call, "num_inference_steps": 2})
    samples: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for index in range(args.rounds):
        for name in names[index % len(names):] + names[: index % len(names)]:
            start = time.perf_counter()
            methods[name]()
            samples[name].append(time.perf_counter() - start)
            print(f"round {index + 1} {name}: {samples[name][-1]:.1f} s", file=sys.stderr, flush=True)

    base = samples["one at a time"]
    rows = {}
    for name, values in samples.items():
        median = statistics.median(values)
        rows[name] = {"median_s": median, "images_per_s": args.images / median,
                      "speedup": statistics.median(base) / median,
                      "speedup_paired": statistics.median([b / v for b, v in zip(base, values, strict=True)])}
    command = " ".join(argv if argv is not None else sys.argv[1:])
    result = {"command": f"python benchmarks/batch_throughput.py {command}",
              "model": str(args.model or "default model"), "held_out": args.held_out, "images": args.images,
              "rounds": args.rounds,
              "steps": args.steps, "size": size, "threads": args.threads, "cpu": _cpu_name(),
              "torch": torch.__version__, "samples": samples, "rows": rows}
    table = markdown(result)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    return 0


def markdown(result: dict) -> str:
    what = "held-out pairs, each its own subject," if result.get("held_out") else "images of one subject"
    lines = [f"{result['images']} {what} per round, {result['steps']} steps at {result['size']}², "
             f"{result['rounds']} rounds interleaved; {result['cpu']}, {result['threads']} torch threads, "
             f"torch {result['torch']}.  ",
             f"Command: `{result['command']}`", "",
             "| method | median s / round | images / s | speed-up (ratio of medians) | speed-up (paired) |",
             "|---|---|---|---|---|"]
    for name, row in result["rows"].items():
        lines.append(f"| {name} | {row['median_s']:.1f} | {row['images_per_s']:.3f} | {row['speedup']:.2f}x | "
                     f"{row['speedup_paired']:.2f}x |")
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    raise SystemExit(main())
