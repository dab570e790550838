"""The metrics of the subject-driven generation papers, computed the way those papers compute them.

* **DINO**: cosine similarity of the CLS embeddings of a self-supervised ViT-S/16 (``facebook/dino-vits16``)
  between a generated image and a real image of the subject, with the DINO evaluation transform
  (shorter side to 256 px bicubic, centre crop 224, ImageNet mean/std).
* **CLIP-I**: the same with CLIP image embeddings (``openai/clip-vit-base-patch32`` by default, ViT-L/14
  selectable) and the CLIP transform (shorter side to 224 px bicubic, centre crop 224, CLIP mean/std).
* **CLIP-T**: cosine similarity of the CLIP image embedding of a generated image and the CLIP text
  embedding of its prompt.
* **CLIPScore**: the text-alignment convention of CustomConcept101's ``evaluate.py`` (CLIPScore of
  Hessel et al.): ``2.5 * max(CLIP-T, 0)``.

DINO and CLIP-I of a subject are averaged over *all* generated x real pairs of that subject (DreamBooth,
Sec. 4.1; CustomConcept101 ``evaluate.py``); CLIP-T over its images. Benchmark numbers are the mean
over subjects of the subject averages.

The image transforms are written out here (no torchvision): they are part of the protocol, and the
processor configs shipped with the hub checkpoints do not match it for DINO (they resize to 224x224
without a crop).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from customshift.errors import CustomShiftError

logger = logging.getLogger(__name__)

DEFAULT_DINO_MODEL = "facebook/dino-vits16"
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
#: Short names accepted for ``--clip-model`` besides hub ids and local folders.
CLIP_MODEL_ALIASES = {
    "ViT-B/32": "openai/clip-vit-base-patch32",
    "ViT-B/16": "openai/clip-vit-base-patch16",
    "ViT-L/14": "openai/clip-vit-large-patch14",
    "ViT-L/14@336px": "openai/clip-vit-large-patch14-336",
}
DINO_MODEL_ALIASES = {"ViT-S/16": "facebook/dino-vits16"}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: The weight of CLIPScore (Hessel et al. 2021), as in CustomConcept101's evaluate.py.
CLIPSCORE_WEIGHT = 2.5

#: The metric names, in the order the reports show them.
METRICS = ("dino", "clip_i", "clip_t", "clipscore")
METRIC_LABELS = {
    "dino": "DINO",
    "clip_i": "CLIP-I",
    "clip_t": "CLIP-T",
    "clipscore": "CLIPScore (2.5·max(cos,0))",
}


# --------------------------------------------------------------------------------------------- images
def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` px, bicubic (``torchvision.Resize(size)`` on a PIL image)."""
    w, h = img.size
    if min(w, h) == size:
        return img
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    return img.resize((new_w, new_h), Image.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Centre crop to ``size`` x ``size`` with torchvision's rounding."""
    w, h = img.size
    if w < size or h < size:  # never happens after resize_shorter_side(size' >= size)
        img = img.resize((max(w, size), max(h, size)), Image.BICUBIC)
        w, h = img.size
    left = int(round((w - size) / 2.0))
    top = int(round((h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def to_normalized_tensor(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """PIL RGB -> float tensor (3, H, W) in [0, 1], then ``(x - mean) / std`` per channel."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    x = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s


def dino_transform(img: Image.Image) -> torch.Tensor:
    """The DINO evaluation transform: resize 256 bicubic, centre crop 224, ImageNet normalisation."""
    return to_normalized_tensor(center_crop(resize_shorter_side(img.convert("RGB"), 256), 224),
                                IMAGENET_MEAN, IMAGENET_STD)


def clip_transform(img: Image.Image, size: int = 224, mean: Sequence[float] = CLIP_MEAN,
                   std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """The CLIP transform: resize ``size`` bicubic, centre crop ``size``, CLIP normalisation."""
    return to_normalized_tensor(center_crop(resize_shorter_side(img.convert("RGB"), size), size), mean, std)


# ---------------------------------------------------------------------------------------------- maths
def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` scaled to unit L2 norm (float64 for stable averages)."""
    x = x.to(torch.float64)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(len(a), len(b))`` matrix of cosine similarities between the rows of ``a`` and ``b``."""
    return l2_normalize(torch.as_tensor(a)) @ l2_normalize(torch.as_tensor(b)).T


def clipscore_from_cosine(cos: float | torch.Tensor, weight: float = CLIPSCORE_WEIGHT):
    """CLIPScore: ``weight * max(cos, 0)`` (Hessel et al. 2021; CustomConcept101 evaluate.py)."""
    if isinstance(cos, torch.Tensor):
        return weight * cos.clamp_min(0.0)
    return weight * max(float(cos), 0.0)


@dataclass
class SubjectScores:
    """Scores of one subject: one value per generated image, and the subject averages.

    ``per_image[m][k]`` is the metric ``m`` of generated image ``k``: for DINO and CLIP-I the mean of
    its cosine with every real image, so that the subject average equals the mean over all
    generated x real pairs.
    """

    per_image: dict[str, list[float]]
    mean: dict[str, float]
    n_generated: int
    n_real: int
    real_vs_real: dict[str, float | None]


def _mean_offdiag(sim: torch.Tensor) -> float | None:
    n = sim.shape[0]
    if n < 2:
        return None
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


def score_embeddings(
    gen_dino: torch.Tensor,
    real_dino: torch.Tensor,
    gen_clip: torch.Tensor,
    real_clip: torch.Tensor,
    text_clip: torch.Tensor,
) -> SubjectScores:
    """Score one subject from its embeddings (rows are images; any scale: they are normalised here).

    ``text_clip[k]`` is the CLIP text embedding of the prompt of generated image ``k``.
    """
    n_gen, n_real = gen_dino.shape[0], real_dino.shape[0]
    if n_gen == 0 or n_real == 0:
        raise CustomShiftError("a subject needs at least one generated and one real image to be scored")
    if gen_clip.shape[0] != n_gen or text_clip.shape[0] != n_gen or real_clip.shape[0] != n_real:
        raise ValueError("embedding counts do not match")
    dino = cosine_matrix(gen_dino, real_dino).mean(dim=1)
    clip_i = cosine_matrix(gen_clip, real_clip).mean(dim=1)
    clip_t = (l2_normalize(gen_clip) * l2_normalize(text_clip)).sum(dim=1)
    clipscore = clipscore_from_cosine(clip_t)
    per_image = {
        "dino": dino.tolist(),
        "clip_i": clip_i.tolist(),
        "clip_t": clip_t.tolist(),
        "clipscore": clipscore.tolist(),
    }
    mean = {k: float(np.mean(v)) for k, v in per_image.items()}
    real_vs_real = {
        "dino": _mean_offdiag(cosine_matrix(real_dino, real_dino)),
        "clip_i": _mean_offdiag(cosine_matrix(real_clip, real_clip)),
    }
    return SubjectScores(per_image=per_image, mean=mean, n_generated=n_gen, n_real=n_real,
                         real_vs_real=real_vs_real)


# --------------------------------------------------------------------------------------------- models
def _offline_help(name: str, flag: str) -> str:
    local = "./" + name.rstrip("/").split("/")[-1]
    return (
        f"To use it without network access, download it on a connected machine "
        f"(`huggingface-cli download {name} --local-dir {local}`), copy the folder here and pass "
        f"`{flag} {local}`."
    )


def resolve_model_name(name_or_path: str, aliases: dict[str, str]) -> str:
    """A local folder as is; a short alias (``ViT-L/14``) as its hub id; anything else unchanged."""
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    return aliases.get(name_or_path, name_or_path)


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1


def _load_error(kind: str, name: str, flag: str, exc: Exception) -> CustomShiftError:
    reason = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
    if Path(name).is_dir():
        return CustomShiftError(
            f"could not load the {kind} metric model from the folder {name}: {reason}. The folder must "
            f"hold a transformers checkpoint (config.json and the weights), as `huggingface-cli download` "
            f"or save_pretrained writes it."
        )
    default = DEFAULT_DINO_MODEL if kind == "DINO" else DEFAULT_CLIP_MODEL
    if _looks_like_path(name):
        return CustomShiftError(f"the {kind} metric model folder {name} does not exist. {_offline_help(default, flag)}")
    return CustomShiftError(f"could not load the {kind} metric model '{name}': {reason}. {_offline_help(name, flag)}")


def pick_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class DinoEmbedder:
    """CLS embeddings of a DINO ViT (``transformers.ViTModel``), with the DINO transform."""

    def __init__(self, name_or_path: str = DEFAULT_DINO_MODEL, device: str | torch.device | None = None,
                 batch_size: int = 32):
        from transformers import ViTModel

        self.name = resolve_model_name(name_or_path, DINO_MODEL_ALIASES)
        self.device = pick_device(device)
        self.batch_size = batch_size
        try:
            model = ViTModel.from_pretrained(self.name, add_pooling_layer=False)
        except (OSError, ValueError, KeyError) as exc:
            raise _load_error("DINO", self.name, "--dino-model", exc) from exc
        self.model = model.to(self.device).eval()

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        out = []
        for i in range(0, len(images), self.batch_size):
            batch = torch.stack([dino_transform(im) for im in images[i:i + self.batch_size]]).to(self.device)
            hidden = self.model(pixel_values=batch).last_hidden_state  # post-LayerNorm, like DINO's forward
            out.append(hidden[:, 0].float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.config.hidden_size)


def _clip_preprocessing(folder_or_id: str) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """The crop size and normalisation of a CLIP checkpoint (its preprocessor_config.json when local)."""
    size, mean, std = 224, CLIP_MEAN, CLIP_STD
    cfg_path = None
    if Path(folder_or_id).is_dir():
        cfg_path = Path(folder_or_id) / "preprocessor_config.json"
    else:
        try:
            from huggingface_hub import hf_hub_download

            cfg_path = Path(hf_hub_download(folder_or_id, "preprocessor_config.json"))
        except Exception:  # noqa: BLE001 - optional: fall back to the model config's image size
            cfg_path = None
    if cfg_path is not None and cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        crop = cfg.get("crop_size", size)
        size = int(crop.get("height", size) if isinstance(crop, dict) else crop)
        mean = tuple(cfg.get("image_mean", mean))
        std = tuple(cfg.get("image_std", std))
    return size, mean, std


class ClipEmbedder:
    """CLIP image and text embeddings (projected, as ``model.encode_image`` / ``encode_text`` of OpenAI's CLIP)."""

    def __init__(self, name_or_path: str = DEFAULT_CLIP_MODEL, device: str | torch.device | None = None,
                 batch_size: int = 32):
        from transformers import CLIPModel, CLIPTokenizer

        self.name = resolve_model_name(name_or_path, CLIP_MODEL_ALIASES)
        self.device = pick_device(device)
        self.batch_size = batch_size
        try:
            model = CLIPModel.from_pretrained(self.name)
            self.tokenizer = CLIPTokenizer.from_pretrained(self.name)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise _load_error("CLIP", self.name, "--clip-model", exc) from exc
        self.model = model.to(self.device).eval()
        size, self.mean, self.std = _clip_preprocessing(self.name)
        self.image_size = int(getattr(model.config.vision_config, "image_size", size) or size)
        self.max_length = int(min(self.tokenizer.model_max_length or 77,
                                  model.config.text_config.max_position_embeddings))

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        out = []
        for i in range(0, len(images), self.batch_size):
            batch = torch.stack([clip_transform(im, self.image_size, self.mean, self.std)
                                 for im in images[i:i + self.batch_size]]).to(self.device)
            pooled = self.model.vision_model(pixel_values=batch).pooler_output
            out.append(self.model.visual_projection(pooled).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.config.projection_dim)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            pooled = self.model.text_model(input_ids=enc["input_ids"].to(self.device),
                                           attention_mask=enc["attention_mask"].to(self.device)).pooler_output
            out.append(self.model.text_projection(pooled).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.config.projection_dim)


class MetricSuite:
    """The DINO and CLIP embedders together; scores a subject from images and prompts."""

    def __init__(self, dino_model: str = DEFAULT_DINO_MODEL, clip_model: str = DEFAULT_CLIP_MODEL,
                 device: str | torch.device | None = None, batch_size: int = 32):
        self.dino = DinoEmbedder(dino_model, device=device, batch_size=batch_size)
        self.clip = ClipEmbedder(clip_model, device=device, batch_size=batch_size)

    def describe(self) -> dict[str, str]:
        return {"dino_model": self.dino.name, "clip_model": self.clip.name}

    def embed_real(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dino.embed_images(images), self.clip.embed_images(images)

    def score(self, generated: Sequence[Image.Image], prompts: Sequence[str],
              real: tuple[torch.Tensor, torch.Tensor]) -> SubjectScores:
        """Score generated images (with their prompts) against a subject's real-image embeddings."""
        real_dino, real_clip = real
        return score_embeddings(
            self.dino.embed_images(generated), real_dino,
            self.clip.embed_images(generated), real_clip,
            self.clip.embed_texts(prompts),
        )
