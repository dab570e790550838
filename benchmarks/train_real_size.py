"""CustomShift training steps at real size: the SD3-medium (or SD3.5-large) transformer and SD3's VAE, random init.

Measures what the trainer does per step at 512 x 512 (target and reference): seconds per step, peak memory,
whether the loss is finite, and that a checkpoint is saved and resumed (the resumed run continues at the
next step). The text encoders are small random ones with the real output widths (T5 4096, pooled CLIP 2048):
their cost is the frozen encoders' forward only, which the trainer caches per prompt (data.prompt_cache_size).

    python benchmarks/train_real_size.py --model sd3-medium --batch-size 1 --gradient-checkpointing 1 \
        --dtype bf16 --steps 3 --json out.jsonl

``--model tiny`` runs the same path at toy size (tests/test_benchmarks_train_real_size.py). On a CPU without
bf16 units use ``--dtype fp32`` (bf16 is emulated there, about 20x slower). scripts/device_session.sh
``realsize`` runs the GPU matrix.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]

# diffusers' transformer configs of the released checkpoints (transformer/config.json)
TRANSFORMERS: dict[str, dict[str, Any]] = {
    "sd3-medium": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                       num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                       pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192),
    "sd35-large": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                       num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                       pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm"),
    "tiny": dict(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                 num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16,
                 pooled_projection_dim=64, out_channels=4, pos_embed_max_size=32),
}
# SD3's VAE (vae/config.json): 8x down, 16 latent channels
VAES: dict[str, dict[str, Any]] = {
    "sd3": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, norm_num_groups=32,
                scaling_factor=1.5305, shift_factor=0.0609, sample_size=1024),
    "tiny": dict(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                 scaling_factor=1.0, shift_factor=0.0, sample_size=32),
}


def build_pipeline(model: str) -> Any:
    """A CustomShiftPipeline of random weights with the real transformer and VAE shapes of ``model``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from customshift.pipeline import CustomShiftPipeline
    from customshift.tiny import build_clip_tokenizer, build_t5_tokenizer

    shape = TRANSFORMERS[model]
    vae_shape = VAES["tiny" if model == "tiny" else "sd3"]
    clip_tokenizer, t5_tokenizer = build_clip_tokenizer(), build_t5_tokenizer()
    vocab = clip_tokenizer.get_vocab()
    pooled = shape["pooled_projection_dim"]

    def clip(seed: int, projection: int) -> Any:
        torch.manual_seed(seed)
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
            projection_dim=projection, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])).eval()

    torch.manual_seed(3)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=shape["joint_attention_dim"], d_kv=8, d_ff=37,
                                 num_layers=1, num_heads=4, relative_attention_num_buckets=8, pad_token_id=0,
                                 eos_token_id=1, decoder_start_token_id=0)).eval()
    torch.manual_seed(4)
    transformer = SD3Transformer2DModel(**shape)
    torch.manual_seed(5)
    n = len(vae_shape["block_out_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n, use_quant_conv=False, use_post_quant_conv=False,
                        **vae_shape)
    return CustomShiftPipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=clip(1, pooled // 2 - pooled // 8 if model != "tiny" else pooled // 2),
        text_encoder_2=clip(2, pooled // 2 + pooled // 8 if model != "tiny" else pooled // 2),
        tokenizer=clip_tokenizer, tokenizer_2=build_clip_tokenizer(), text_encoder_3=t5, tokenizer_3=t5_tokenizer)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: the process's peak RSS


def run(model: str, batch_size: int, gradient_checkpointing: bool, dtype: str, steps: int,
        resolution: int, output: Path) -> dict[str, Any]:
    """Train ``steps`` steps, checkpoint, resume in a new trainer, take one more step; the measurements."""
    from customshift.training.config import load_config
    from customshift.training.trainer import Trainer

    overrides = [
        f"output_dir={output}", "model.pretrained=tiny",
        f"model.gradient_checkpointing={str(gradient_checkpointing).lower()}",
        f"data.resolution={resolution}", f"data.batch_size={batch_size}", "data.targets_per_reference=1",
        "data.num_workers=0", "data.curriculum=[]", "data.max_sequence_length=77", "data.prompt_cache_size=256",
        f"train.max_steps={steps + 1}", f"train.mixed_precision={'no' if dtype == 'fp32' else dtype}",
        "checkpoint.every_steps=0", "train.log_every=1", "train.report_to=[csv]", "model.customshift={lora_rank: 16}",
    ]
    config = load_config(ROOT / "configs" / "tiny-smoke.yaml", overrides)
    trainer = Trainer(config, pipe=build_pipeline(model))
    device = trainer.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for _ in range(steps):
        started = time.perf_counter()
        stats = trainer.train_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
        losses.append(stats["loss"])
        print(f"step {len(times)}: {times[-1]:.1f} s, loss {stats['loss']:.4f}", file=sys.stderr, flush=True)
    peak = peak_memory_gb(device)
    checkpoint = trainer.save_checkpoint("benchmark")
    trainer.close()
    trained = sum(p.numel() for p in trainer.trainable.values())
    del trainer  # one model in memory at a time: SD3-medium in fp32 is 8 GB, the resumed trainer builds another
    gc.collect()
    resumed = Trainer(config, resume=True, pipe=build_pipeline(model))
    resumed_at = resumed.step
    loss_after = resumed.train_step()["loss"]
    resumed.close()
    timed = times[1:] or times  # the first step includes one-time setup (allocations, kernels, caches)
    return {
        "model": model, "batch_size": batch_size, "gradient_checkpointing": gradient_checkpointing, "dtype": dtype,
        "resolution": resolution, "device": str(device), "steps": steps,
        "seconds_per_step": round(sum(timed) / len(timed), 3), "first_step_s": round(times[0], 3),
        "peak_memory_gb": round(peak, 2), "trained_parameters_m": round(trained / 1e6, 2),
        "transformer_parameters_m": round(sum(p.numel() for p in resumed.pipe.transformer.parameters()) / 1e6, 2),
        "losses": [round(x, 5) for x in losses], "loss_finite": all(math.isfinite(x) for x in losses + [loss_after]),
        "checkpoint": checkpoint.name, "resumed_at_step": resumed_at, "step_after_resume": resumed.step,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(TRANSFORMERS), default="sd3-medium")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--gradient-checkpointing", type=int, choices=(0, 1), default=1)
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="bf16")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=None, help="default 512 (32 for --model tiny)")
    parser.add_argument("--json", type=Path, default=None, help="append the result as one JSON line")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: a temporary one)")
    args = parser.parse_args(argv)
    resolution = args.resolution or (32 if args.model == "tiny" else 512)
    with tempfile.TemporaryDirectory(prefix="customshift-realsize-") as tmp:
        result = run(args.model, args.batch_size, bool(args.gradient_checkpointing), args.dtype, args.steps,
                     resolution, args.out or Path(tmp) / "run")
    line = json.dumps(result)
    print(line)
    if args.json is not None:
        with open(args.json, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
    return 0 if result["loss_finite"] and result["step_after_resume"] == args.steps + 1 else 1


if __name__ == "__main__":
    sys.exit(main())
