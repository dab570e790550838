"""Sizes of a saved subject embedding, full and compact, from the models' architecture configs (no download).

    python scripts/embedding_sizes.py          # the markdown table of docs/diffusers.md

The full form stores, for every CADS layer (each block's ``attn``, plus ``attn2`` of SD3.5's dual-attention
blocks), a key and a value of shape (1, heads, reference tokens, head_dim); the compact form stores what
the branch reads: the reference latent (C, H/8, W/8), the subject's text tokens (S, 4096) and the pooled
vector (2048). tests/test_subject_embedding.py checks these formulas against a real embedding file.
"""

from __future__ import annotations

from typing import Any

# From each model's transformer/config.json on the hub (stabilityai/stable-diffusion-3-medium-diffusers,
# stable-diffusion-3.5-medium, stable-diffusion-3.5-large); only the fields that set the sizes.
MODELS: dict[str, dict[str, Any]] = {
    "SD3-medium": {"num_layers": 24, "num_attention_heads": 24, "attention_head_dim": 64, "patch_size": 2,
                   "in_channels": 16, "joint_attention_dim": 4096, "pooled_projection_dim": 2048},
    "SD3.5-medium": {"num_layers": 24, "num_attention_heads": 24, "attention_head_dim": 64, "patch_size": 2,
                     "in_channels": 16, "joint_attention_dim": 4096, "pooled_projection_dim": 2048,
                     "dual_attention_layers": list(range(13))},
    "SD3.5-large": {"num_layers": 38, "num_attention_heads": 38, "attention_head_dim": 64, "patch_size": 2,
                    "in_channels": 16, "joint_attention_dim": 4096, "pooled_projection_dim": 2048},
}
VAE_SCALE = 8  # SD3's VAE: four blocks, three downsamplings
SUBJECT_TOKENS = 5  # a one-word subject: CLIP <start> word <end> (3) and T5 word </s> (2)


def full_bytes(config: dict[str, Any], height: int, width: int, itemsize: int = 2, vae_scale: int = VAE_SCALE,
               references: int = 1) -> int:
    """Bytes of the keys/values of one subject (``itemsize`` 2: fp16/bf16)."""
    layers = config["num_layers"] + len(config.get("dual_attention_layers") or [])
    tokens = references * (height // vae_scale // config["patch_size"]) * (width // vae_scale // config["patch_size"])
    return 2 * layers * config["num_attention_heads"] * config["attention_head_dim"] * tokens * itemsize


def compact_bytes(config: dict[str, Any], height: int, width: int, itemsize: int = 2, vae_scale: int = VAE_SCALE,
                  references: int = 1, subject_tokens: int = SUBJECT_TOKENS) -> int:
    """Bytes of the branch inputs of one subject, stored in the model's precision."""
    latent = config["in_channels"] * (height // vae_scale) * (width // vae_scale)
    text = subject_tokens * config["joint_attention_dim"] + config["pooled_projection_dim"]
    return references * (latent + text) * itemsize


def _human(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}".replace(".00 ", " ")
    return f"{size} B"


def table() -> str:
    rows = ["| Model | Reference | Full, fp16/bf16 | Full, fp32 | Compact, fp16 | Compact, fp32 |",
            "|---|---|---|---|---|---|"]
    for name, config in MODELS.items():
        for size in (512, 1024):
            cells = [_human(full_bytes(config, size, size, 2)), _human(full_bytes(config, size, size, 4)),
                     _human(compact_bytes(config, size, size, 2)), _human(compact_bytes(config, size, size, 4))]
            rows.append(f"| {name} | {size}² | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
