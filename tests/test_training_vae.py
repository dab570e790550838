"""Stage-1 VAE training: runs, calibrates its latent scale, and resumes from its checkpoint."""

from __future__ import annotations

import json

from diffusers import AutoencoderKL

from customshift.sprites.vae import train_vae


def test_vae_trains_calibrates_and_resumes(tmp_path):
    folder = train_vae(tmp_path, minutes=5, max_steps=2, batch_size=2, latent_std=0.5, calibration_samples=4)
    vae = AutoencoderKL.from_pretrained(folder)
    stats = json.loads((tmp_path / "vae_stats.json").read_text())
    assert vae.config.scaling_factor == stats["scaling_factor"] > 0
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 4  # 64 px -> 16 x 16 latents
    train_vae(tmp_path, minutes=5, max_steps=3, batch_size=2, calibration_samples=4)
    import torch

    assert torch.load(tmp_path / "state.pt", weights_only=True)["step"] == 3
    assert not list(tmp_path.glob("*.tmp"))
