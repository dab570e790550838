"""Analytic FLOP counts of SD3-family transformers with and without a CustomShift subject.

Why: measured speed depends on the machine; the FLOP ratio of the same configuration is the physical
limit of what caching the reference keys/values can give, so the benchmark prints it beside every
measured ratio. One multiply-add counts as 2 FLOPs; only matrix products are counted (norms,
activations, softmax and the CADS gate are elementwise, O(tokens x width), and left out).

Per MM-DiT block, with N image tokens, T text tokens, L = N + T, width D, MLP ratio 4:

* projections: q, k, v, out for the image stream and add_q/k/v, to_add_out for the text stream,
  2 * 4 * (N + T) * D^2 (the last block has no text out-projection and no text MLP);
* joint attention: QK^T and PV over L keys, 2 * 2 * L^2 * D (summed over heads);
* MLPs: 2 * 2 * 4 * D^2 per token of each stream;
* SD3.5 dual-attention blocks: an image-only ``attn2``, 2 * 4 * N * D^2 + 4 * N^2 * D.

CustomShift with a cached subject adds, per CADS processor, only the image queries x reference keys
attention, 2 * N * R * d * 2 per head = 4 * N * R * D, plus the subject relevance (2 * N * D).
Naive (OminiControl-style) concatenation makes the R reference tokens full tokens of every block: the
image stream becomes N + R tokens, and the joint attention is quadratic in N + R + T.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ARCHS",
    "Arch",
    "cads_extra_flops",
    "concat_flops",
    "config_flops",
    "image_tokens",
    "lora_step_flops",
    "recompute_flops",
    "reference_branch_flops",
    "transformer_flops",
]

# CLIP-L/G (77) + T5 (max_sequence_length 256): the text sequence of every SD3 pipeline call.
SD3_TEXT_TOKENS = 333
# Subject-name tokens in the Reference-Alignment Branch: CLIP start, name, end + T5 name, end.
SUBJECT_TOKENS = 5


@dataclass(frozen=True)
class Arch:
    """An SD3-family transformer shape, as in its published ``config.json``."""

    name: str
    num_layers: int
    heads: int
    head_dim: int
    patch_size: int = 2
    in_channels: int = 16
    joint_attention_dim: int = 4096
    caption_projection_dim: int | None = None
    pooled_projection_dim: int = 2048
    pos_embed_max_size: int = 192
    sample_size: int = 128
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None
    vae_scale: int = 8  # pixels per latent pixel
    text_tokens: int = SD3_TEXT_TOKENS
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    def diffusers_config(self) -> dict[str, Any]:
        """Keyword arguments of ``SD3Transformer2DModel`` that build this architecture."""
        return {
            "sample_size": self.sample_size,
            "patch_size": self.patch_size,
            "in_channels": self.in_channels,
            "num_layers": self.num_layers,
            "attention_head_dim": self.head_dim,
            "num_attention_heads": self.heads,
            "joint_attention_dim": self.joint_attention_dim,
            "caption_projection_dim": self.caption_projection_dim or self.width,
            "pooled_projection_dim": self.pooled_projection_dim,
            "out_channels": self.in_channels,
            "pos_embed_max_size": self.pos_embed_max_size,
            "dual_attention_layers": tuple(self.dual_attention_layers),
            "qk_norm": self.qk_norm,
        }


ARCHS: dict[str, Arch] = {
    # stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json
    "sd3-medium": Arch("sd3-medium", num_layers=24, heads=24, head_dim=64, caption_projection_dim=1536),
    # stabilityai/stable-diffusion-3.5-medium: MMDiT-X, dual attention in blocks 0..12, qk rms-norm
    "sd35-medium": Arch(
        "sd35-medium", num_layers=24, heads=24, head_dim=64, caption_projection_dim=1536,
        pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
    ),
    # stabilityai/stable-diffusion-3.5-large
    "sd35-large": Arch(
        "sd35-large", num_layers=38, heads=38, head_dim=64, caption_projection_dim=2432, qk_norm="rms_norm",
    ),
    # The default model's planned shape (customshift.tiny): 64 px, VAE 4x down to 16 x 16 x 4, patch 1.
    "tiny": Arch(
        "tiny", num_layers=6, heads=3, head_dim=64, patch_size=1, in_channels=4, joint_attention_dim=64,
        pooled_projection_dim=64, pos_embed_max_size=64, sample_size=16, vae_scale=4,
    ),
    # A toy shape for tests: the same code paths in milliseconds.
    "toy": Arch(
        "toy", num_layers=2, heads=2, head_dim=16, patch_size=2, in_channels=4, joint_attention_dim=32,
        pooled_projection_dim=32, pos_embed_max_size=32, sample_size=8, vae_scale=4, text_tokens=24,
    ),
}


def image_tokens(arch: Arch, pixels: int | tuple[int, int]) -> int:
    """Tokens of a square (or (h, w)) image of ``pixels`` after the VAE and patchifying."""
    height, width = (pixels, pixels) if isinstance(pixels, int) else pixels
    step = arch.vae_scale * arch.patch_size
    return (height // step) * (width // step)


def _block_flops(arch: Arch, n_image: int, n_text: int, last: bool, dual: bool) -> float:
    d = arch.width
    length = n_image + n_text
    projections = 2 * 4 * n_image * d * d + 2 * (3 if last else 4) * n_text * d * d
    attention = 4 * length * length * d
    mlp = 16 * n_image * d * d + (0 if last else 16 * n_text * d * d)
    modulation = 2 * d * (9 if dual else 6) * d + 2 * d * (2 if last else 6) * d  # adaLN, once per sample
    flops = projections + attention + mlp + modulation
    if dual:
        flops += 2 * 4 * n_image * d * d + 4 * n_image * n_image * d
    return float(flops)


def _embed_flops(arch: Arch, n_image: int, n_text: int) -> float:
    d = arch.width
    patch = arch.in_channels * arch.patch_size**2
    flops = 2 * n_image * patch * d  # patch embedding
    flops += 2 * n_text * arch.joint_attention_dim * d  # context embedder
    flops += 2 * (256 * d + d * d + arch.pooled_projection_dim * d + d * d)  # timestep + pooled MLPs
    flops += 2 * d * 2 * d + 2 * n_image * d * patch  # final adaLN + proj_out
    return float(flops)


def transformer_flops(arch: Arch, n_image: int, n_text: int | None = None, batch: int = 1) -> float:
    """One forward pass of the plain transformer over ``batch`` samples."""
    n_text = arch.text_tokens if n_text is None else n_text
    total = _embed_flops(arch, n_image, n_text)
    dual = set(arch.dual_attention_layers)
    for index in range(arch.num_layers):
        total += _block_flops(arch, n_image, n_text, index == arch.num_layers - 1, index in dual)
    return batch * total


def _cads_processors(arch: Arch) -> int:
    return arch.num_layers + len(arch.dual_attention_layers)


def cads_extra_flops(arch: Arch, n_image: int, n_ref: int, batch: int = 1) -> float:
    """What a cached subject adds to one forward: image queries x R reference keys, at every CADS
    processor (``attn`` and SD3.5's ``attn2``), plus the subject relevance m_i."""
    d = arch.width
    per_processor = 4 * n_image * n_ref * d + 2 * n_image * d
    return float(batch * _cads_processors(arch) * per_processor)


def reference_branch_flops(arch: Arch, n_ref: int, n_subject: int = SUBJECT_TOKENS, references: int = 1) -> float:
    """One Reference-Alignment Branch pass (``encode_subject``): the blocks over [R ; S] at t = 0."""
    return transformer_flops(arch, n_ref, n_subject, batch=references)


def concat_flops(arch: Arch, n_image: int, n_ref: int, n_text: int | None = None, batch: int = 1) -> float:
    """Naive joint concatenation: the reference tokens are full tokens of every block at every step."""
    n_text = arch.text_tokens if n_text is None else n_text
    d = arch.width
    total = transformer_flops(arch, n_image + n_ref, n_text, batch=1)
    total -= 2 * n_ref * d * arch.in_channels * arch.patch_size**2  # reference outputs are not projected out
    return batch * total


def recompute_flops(arch: Arch, n_image: int, n_ref: int, batch: int = 1, n_subject: int = SUBJECT_TOKENS) -> float:
    """CustomShift without the cache (``recompute_subject=True``): the branch once per step, then CADS."""
    return (
        transformer_flops(arch, n_image, batch=batch)
        + cads_extra_flops(arch, n_image, n_ref, batch=batch)
        + reference_branch_flops(arch, n_ref, n_subject)
    )


def lora_step_flops(arch: Arch, n_image: int, batch: int = 1) -> float:
    """One LoRA fine-tuning step (forward + backward) of per-subject test-time tuning.

    The base weights are frozen, so the backward pass of a linear layer needs only its input gradient
    (1x the forward), while attention needs gradients for Q, K and V (2x). The rank-r LoRA products
    and the optimizer are negligible.
    """
    forward = transformer_flops(arch, n_image, batch=batch)
    d, length = arch.width, n_image + arch.text_tokens
    attention = batch * arch.num_layers * 4 * length * length * d
    return forward + (forward - attention) + 2 * attention


def config_flops(arch: Arch, resolution: int, reference: int, cfg_batch: int = 2) -> dict[str, float]:
    """FLOPs per denoising step (CFG batch) of every method for one configuration, and their ratios."""
    n_image, n_ref = image_tokens(arch, resolution), image_tokens(arch, reference)
    plain = transformer_flops(arch, n_image, batch=cfg_batch)
    cached = plain + cads_extra_flops(arch, n_image, n_ref, batch=cfg_batch)
    concat = concat_flops(arch, n_image, n_ref, batch=cfg_batch)
    recompute = recompute_flops(arch, n_image, n_ref, batch=cfg_batch)
    encode = reference_branch_flops(arch, n_ref)
    return {
        "image_tokens": n_image,
        "reference_tokens": n_ref,
        "text_tokens": arch.text_tokens,
        "plain": plain,
        "customshift": cached,
        "concat": concat,
        "recompute": recompute,
        "encode_subject": encode,
        "lora_step": lora_step_flops(arch, n_image),
        "overhead_ratio": cached / plain,
        "concat_vs_plain": concat / plain,
        "concat_ratio": concat / cached,
        "recompute_ratio": recompute / cached,
        "encode_vs_step": encode / cached,
    }


if __name__ == "__main__":
    for name in ("sd3-medium", "sd35-medium", "sd35-large", "tiny"):
        arch = ARCHS[name]
        native = arch.sample_size * arch.vae_scale
        for res, ref in sorted({(native // 2, native // 2), (native, native // 2), (native, native)}):
            r = config_flops(arch, res, ref)
            print(
                f"{name:12s} {res:5d}px ref {ref:5d}px  plain {r['plain'] / 1e12:8.2f} TFLOP/step  "
                f"cached x{r['overhead_ratio']:.3f}  concat x{r['concat_vs_plain']:.2f} of plain "
                f"(x{r['concat_ratio']:.2f} of cached)  recompute x{r['recompute_ratio']:.2f} of cached"
            )
