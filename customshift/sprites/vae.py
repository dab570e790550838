"""Stage 1 of the default model: a small `AutoencoderKL` trained from scratch on the sprite domain.

The VAE downsamples 4x (64 x 64 x 3 -> 16 x 16 x C), so every 4-px sprite cell is one latent pixel.
At the end, the latents' mean and spread set the VAE's ``shift_factor`` and ``scaling_factor`` so the
transformer sees latents with a chosen standard deviation (a lower scale puts the learning
signal where colours are decided). Resumable; checkpoints are written atomically.

    customshift train-vae --out runs/vae --minutes 15
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..io import atomic_path, atomic_write_json
from . import synthetic


def build_vae(channels: tuple[int, ...] = (32, 32, 64), latent_channels: int = 4):
    from ..tiny import build_vae as build

    return build(channels, latent_channels, synthetic.CANVAS)


def sprite_batch(rng: np.random.Generator, size: int) -> torch.Tensor:
    """A batch of random sprite images (targets and distractor-track references) in [-1, 1]."""
    images = []
    for _ in range(size):
        track = "distractor" if rng.random() < 0.3 else "clean"
        pair = synthetic.sample_pair(rng, track=track)
        images.append(pair.reference if rng.random() < 0.5 else pair.target)
    array = np.stack(images).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2)


def _save_folder(vae, folder: Path) -> None:
    """save_pretrained into a temporary folder, then rename: a crash never leaves half a model."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp)
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def train_vae(
    out: str | Path,
    *,
    minutes: float = 15.0,
    max_steps: int = 100_000,
    batch_size: int = 32,
    lr: float = 1e-3,
    kl_weight: float = 1e-6,
    latent_std: float = 1.0,
    seed: int = 0,
    threads: int | None = None,
    log_every: int = 25,
    calibration_samples: int = 256,
) -> Path:
    """Train (or resume) the sprite VAE for a time budget; returns the saved model folder."""
    from diffusers import AutoencoderKL

    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "state.pt"
    model_dir = out / "vae"
    step = 0
    if (model_dir / "config.json").is_file() and state_path.is_file():
        vae = AutoencoderKL.from_pretrained(model_dir)
        state = torch.load(state_path, weights_only=True)
        step = state["step"]
    else:
        vae, state = build_vae(), None
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    if state:
        optimizer.load_state_dict(state["optimizer"])
    rng = np.random.default_rng([seed, step])
    deadline = time.time() + minutes * 60
    log = open(out / "log.csv", "a")  # noqa: SIM115 - kept open for the run
    started = time.time()
    while step < max_steps and time.time() < deadline:
        x = sprite_batch(rng, batch_size)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample
        loss = (recon.float() - x).abs().mean() + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if step % log_every == 0:
            log.write(f"{step},{loss.item():.5f},{time.time() - started:.1f}\n")
            log.flush()
        if step % 200 == 0:
            _checkpoint(vae, optimizer, step, model_dir, state_path)
    _checkpoint(vae, optimizer, step, model_dir, state_path)
    _calibrate(vae, model_dir, latent_std, seed, calibration_samples)
    return model_dir


def _checkpoint(vae, optimizer, step: int, model_dir: Path, state_path: Path) -> None:
    _save_folder(vae, model_dir)
    with atomic_path(state_path) as tmp:
        torch.save({"step": step, "optimizer": optimizer.state_dict()}, tmp)


@torch.no_grad()
def _calibrate(vae, model_dir: Path, latent_std: float, seed: int, samples: int = 256) -> None:
    """Set shift/scaling factors from latent statistics; record reconstruction quality."""
    vae.eval()
    rng = np.random.default_rng([seed, 999])
    x = sprite_batch(rng, samples)
    z = vae.encode(x).latent_dist.mode()
    shift = z.mean().item()
    scale = latent_std / z.std().item()
    recon = vae.decode(z).sample.clamp(-1, 1)
    mse = ((recon - x) / 2).square().mean().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    _save_folder(vae, model_dir)
    atomic_write_json(model_dir.parent / "vae_stats.json",
                      {"shift_factor": shift, "scaling_factor": scale, "psnr": -10 * np.log10(mse)})


def main() -> None:
    """``python -m customshift.sprites.vae ...``: an alias of ``customshift train-vae ...``."""
    import sys

    from ..cli import app

    app(["train-vae", *sys.argv[1:]], prog_name="customshift")


if __name__ == "__main__":
    main()
