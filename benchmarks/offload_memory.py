"""Peak GPU memory of a plain and a customized image on the full pipeline: on the GPU, with diffusers' model
offload and with its sequential offload (issue 17 item 5).

The transformer and the VAE are the published architectures with random weights (no download:
``benchmarks/speed.py``'s ``build_transformer``, SD3's VAE config); the three text encoders have their
real widths (CLIP-L 768, CLIP-G 1280, T5-XXL 4096, so the transformer sees the shapes it expects) but one
layer each, with the tiny tokenizers of ``customshift.tiny``: their weights are a small part of what
offloading moves, and that part is the same with or without a subject. For each mode: peak allocated
memory of a plain image, of ``encode_subject`` and of a customized image, a few steps each (memory does
not depend on the step count), and the size of the reference K/V cache.

    python benchmarks/offload_memory.py --arch sd3-medium --size 1024 --reference 512 \
        --out docs/results/speed/offload-memory.json
    python benchmarks/offload_memory.py --dry-run    # CPU, tiny pipeline: checks the script, measures nothing
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flops import ARCHS, Arch  # noqa: E402

MODES = ("gpu", "model", "sequential")
PROMPT, SUBJECT = "a photo of a robot on the beach", "robot"


# --dry-run: the same code on a small transformer whose text widths follow from its config.
DRY_ARCH = Arch("dry-run", num_layers=2, heads=2, head_dim=32, caption_projection_dim=64, joint_attention_dim=64,
                pooled_projection_dim=64)


def build_pipeline(arch: Arch, dtype: torch.dtype) -> Any:
    """A CustomShiftPipeline of ``arch`` with random weights, on the CPU (see the module docstring): CLIP-L
    and CLIP-G split the pooled width 3:5 (768 + 1280 = 2048), T5's width is the joint attention width."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from speed import build_transformer
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from customshift.pipeline import CustomShiftPipeline
    from customshift.tiny import build_clip_tokenizer, build_t5_tokenizer

    clip_l = arch.pooled_projection_dim * 3 // 8
    t5_width = arch.joint_attention_dim
    clip_tok, t5_tok = build_clip_tokenizer(), build_t5_tokenizer()
    vocab = clip_tok.get_vocab()
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        def clip(width: int, heads: int) -> Any:
            return CLIPTextModelWithProjection(CLIPTextConfig(
                vocab_size=len(vocab), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=1,
                num_attention_heads=heads, projection_dim=width, max_position_embeddings=77, hidden_act="gelu",
                bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"])).eval()

        t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=t5_width, d_kv=t5_width // 64,
                                     d_ff=t5_width * 5 // 2, num_layers=1, num_heads=64, pad_token_id=0, eos_token_id=1,
                                     decoder_start_token_id=0)).eval()
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, scaling_factor=1.5305,
                            shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False).eval()
        text_encoder, text_encoder_2 = clip(clip_l, 12), clip(arch.pooled_projection_dim - clip_l, 20)
    finally:
        torch.set_default_dtype(previous)
    transformer = build_transformer(arch, torch.device("cpu"), dtype)
    return CustomShiftPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                               text_encoder=text_encoder, tokenizer=clip_tok, text_encoder_2=text_encoder_2,
                               tokenizer_2=build_clip_tokenizer(), text_encoder_3=t5, tokenizer_3=t5_tok)


def measure(pipe: Any, device: torch.device, size: int, reference: int, steps: int) -> dict[str, Any]:
    """Peak allocated bytes (CUDA) of a plain image, encode_subject and a customized image, in that order."""
    from PIL import Image

    cuda = device.type == "cuda"
    image = Image.fromarray((np.random.RandomState(0).rand(reference, reference, 3) * 255).astype("uint8"))
    call = dict(height=size, width=size, num_inference_steps=steps, guidance_scale=7.0, output_type="np",
                max_sequence_length=77)
    out: dict[str, Any] = {}

    def phase(name: str, fn) -> Any:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = fn()
        if cuda:
            torch.cuda.synchronize()
        out[name] = {"seconds": time.perf_counter() - start,
                     "peak_allocated": torch.cuda.max_memory_allocated() if cuda else None}
        return result

    phase("plain", lambda: pipe(PROMPT, generator=torch.Generator().manual_seed(0), **call))
    subject = phase("encode_subject", lambda: pipe.encode_subject(image, SUBJECT, reference, reference))
    phase("customshift", lambda: pipe(PROMPT, subject=subject, generator=torch.Generator().manual_seed(0), **call))
    out["reference_kv_bytes"] = sum(t.numel() * t.element_size() for d in (subject.keys, subject.values)
                                    for t in d.values())
    if cuda and out["plain"]["peak_allocated"]:
        out["customshift_over_plain"] = out["customshift"]["peak_allocated"] / out["plain"]["peak_allocated"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), default="sd3-medium")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--reference", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--dry-run", action="store_true", help="a small transformer on the CPU at 64 px, mode gpu only")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown modes {sorted(unknown)}")
    if args.dry_run:
        device, dtype, modes, size, reference = torch.device("cpu"), torch.float32, ["gpu"], 64, 64
        pipe = build_pipeline(DRY_ARCH, dtype)
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA device (or --dry-run)")
        device, dtype, size, reference = torch.device("cuda"), torch.bfloat16, args.size, args.reference
        pipe = build_pipeline(ARCHS[args.arch], dtype)
    pipe.set_progress_bar_config(disable=True)
    result: dict[str, Any] = {
        "command": "python benchmarks/offload_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "arch": DRY_ARCH.name if args.dry_run else args.arch, "size": size, "reference": reference, "steps": args.steps,
        "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (dry run)", "modes": {},
    }
    for mode in modes:  # gpu first, sequential last: sequential offload leaves the modules on the meta device
        start = time.perf_counter()
        if mode == "gpu":
            pipe.to(device)
        else:
            pipe.to("cpu")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            (pipe.enable_model_cpu_offload if mode == "model" else pipe.enable_sequential_cpu_offload)()
        result["modes"][mode] = measure(pipe, device, size, reference, args.steps)
        result["modes"][mode]["wall_s"] = time.perf_counter() - start
        print(mode, json.dumps(result["modes"][mode]), flush=True)
        if mode == "model":
            pipe.remove_all_hooks()
        if args.out:  # after every mode: a lease that ends early keeps what was measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
