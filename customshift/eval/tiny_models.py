"""Tiny random metric models (a CLIP and a DINO-like ViT), saved as ordinary checkpoint folders.

They exist so that the metric code can be run and tested offline, through the same load-by-folder path
a user takes with the real models (``--dino-model DIR --clip-model DIR``). Their scores mean nothing.
They take the same 224 px inputs as the real ones, so the protocol transforms are exercised unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from customshift.eval.metrics import CLIP_MEAN, CLIP_STD

#: Words the tiny CLIP tokenizer knows as whole tokens (anything else falls back to byte tokens).
_WORDS = ("a", "an", "the", "of", "in", "on", "with", "photo", "dog", "cat", "toy", "backpack", "red",
          "jungle", "snow", "beach", "top", "background")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def write_clip_vocab(folder: str | Path) -> dict[str, int]:
    """Write a small byte-level BPE vocabulary (``vocab.json`` + ``merges.txt``) in CLIP's format."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            if pair not in merges:
                merges.append(pair)
            merged = parts[0] + parts[1]
            vocab.setdefault(merged, len(vocab))
            parts = [merged] + parts[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
    return vocab


def build_tiny_clip(folder: str | Path, seed: int = 0, projection_dim: int = 16) -> Path:
    """A tiny random ``CLIPModel`` + tokenizer + preprocessor config in ``folder`` (made once; reused)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    folder = Path(folder)
    if (folder / "config.json").is_file() and (folder / "vocab.json").is_file():
        return folder
    vocab = write_clip_vocab(folder)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 77, "bos_token_id": bos,
                     "eos_token_id": eos, "pad_token_id": eos},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 224, "patch_size": 32},
        projection_dim=projection_dim,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    preprocessor = {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 224},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
        "do_convert_rgb": True,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2), encoding="utf-8")
    return folder


def build_tiny_dino(folder: str | Path, seed: int = 0) -> Path:
    """A tiny random ``ViTModel`` (patch 16, 224 px, like DINO ViT-S/16 in shape only) in ``folder``."""
    from transformers import ViTConfig, ViTModel

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    config = ViTConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                       image_size=224, patch_size=16, qkv_bias=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTModel(config, add_pooling_layer=False).eval()
    model.save_pretrained(str(folder))
    return folder


def build_tiny_metric_models(root: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Both tiny metric models under ``root``: returns (dino folder, clip folder)."""
    root = Path(root)
    return build_tiny_dino(root / "dino", seed=seed), build_tiny_clip(root / "clip", seed=seed)


# ------------------------------------------------------------------------------ tiny benchmark folders
#: DreamBench's prompt templates, verbatim (``prompts_and_classes.txt`` of google/dreambooth).
DREAMBENCH_OBJECT_TEMPLATES = (
    "a {0} {1} in the jungle", "a {0} {1} in the snow", "a {0} {1} on the beach",
    "a {0} {1} on a cobblestone street", "a {0} {1} on top of pink fabric", "a {0} {1} on top of a wooden floor",
    "a {0} {1} with a city in the background", "a {0} {1} with a mountain in the background",
    "a {0} {1} with a blue house in the background", "a {0} {1} on top of a purple rug in a forest",
    "a {0} {1} with a wheat field in the background", "a {0} {1} with a tree and autumn leaves in the background",
    "a {0} {1} with the Eiffel Tower in the background", "a {0} {1} floating on top of water",
    "a {0} {1} floating in an ocean of milk", "a {0} {1} on top of green grass with sunflowers around it",
    "a {0} {1} on top of a mirror", "a {0} {1} on top of the sidewalk in a crowded street",
    "a {0} {1} on top of a dirt road", "a {0} {1} on top of a white rug", "a red {0} {1}", "a purple {0} {1}",
    "a shiny {0} {1}", "a wet {0} {1}", "a cube shaped {0} {1}",
)
DREAMBENCH_LIVE_TEMPLATES = (
    "a {0} {1} in the jungle", "a {0} {1} in the snow", "a {0} {1} on the beach",
    "a {0} {1} on a cobblestone street", "a {0} {1} on top of pink fabric", "a {0} {1} on top of a wooden floor",
    "a {0} {1} with a city in the background", "a {0} {1} with a mountain in the background",
    "a {0} {1} with a blue house in the background", "a {0} {1} on top of a purple rug in a forest",
    "a {0} {1} wearing a red hat", "a {0} {1} wearing a santa hat", "a {0} {1} wearing a rainbow scarf",
    "a {0} {1} wearing a black top hat and a monocle", "a {0} {1} in a chef outfit",
    "a {0} {1} in a firefighter outfit", "a {0} {1} in a police outfit", "a {0} {1} wearing pink glasses",
    "a {0} {1} wearing a yellow shirt", "a {0} {1} in a purple wizard outfit", "a red {0} {1}",
    "a purple {0} {1}", "a shiny {0} {1}", "a wet {0} {1}", "a cube shaped {0} {1}",
)


def dreambench_prompts_text(classes: dict[str, str]) -> str:
    """A ``prompts_and_classes.txt`` in the dataset's own layout, for the given subject -> class table."""
    def block(templates: tuple[str, ...]) -> str:
        lines = [f"'{t}'.format(unique_token, class_token)," for t in templates]
        lines[-1] = lines[-1].rstrip(",")
        return "prompt_list = [\n" + "\n".join(lines) + "\n]\n"

    table = "".join(f"{s},{c}\n" for s, c in classes.items())
    return (f"Classes\n\nsubject_name,class\n{table}\nPrompts\n\nObject Prompts\n\n"
            f"{block(DREAMBENCH_OBJECT_TEMPLATES)}\nLive Subject Prompts\n\n{block(DREAMBENCH_LIVE_TEMPLATES)}")


def _photo(path: Path, seed: int, size: tuple[int, int]) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, 3)
    arr = np.clip(base + rng.integers(-40, 40, (size[1], size[0], 3)), 0, 255).astype("uint8")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, quality=90)


def make_dreambench_fixture(root: str | Path, classes: dict[str, str] | None = None, photos: int = 3,
                            size: tuple[int, int] = (48, 40)) -> Path:
    """A tiny DreamBench folder (google/dreambooth layout) with random photos: for tests and smoke runs."""
    root = Path(root)
    classes = classes or {"dog": "dog", "backpack": "backpack"}
    root.mkdir(parents=True, exist_ok=True)
    (root / "prompts_and_classes.txt").write_text(dreambench_prompts_text(classes), encoding="utf-8")
    for si, subject in enumerate(classes):
        for k in range(photos):
            _photo(root / subject / f"{k:02d}.jpg", 1000 * si + k, size)
    return root


def make_customconcept101_fixture(root: str | Path, photos: int = 3, size: tuple[int, int] = (48, 40)) -> Path:
    """A tiny CustomConcept101 folder: dataset.json, prompts/ and benchmark_dataset/ with random photos."""
    root = Path(root)
    concepts = [
        ("photo of a <new1> dog", "dog", "./benchmark_dataset/pet_dog1", "prompts/dog.txt"),
        ("photo of <new1> sunglasses", "sunglasses", "./benchmark_dataset/wearable_sunglasses2",
         "prompts/sunglasses.txt"),
    ]
    prompts = {
        "prompts/dog.txt": ["Photo of a {}.", "{} swimming in a pool.", "a sleeping {}."],
        "prompts/sunglasses.txt": ["photo of a {}.", "{} lying on a study table.", "a {} on the beach."],
    }
    entries = []
    for i, (inst, cls, folder, pfile) in enumerate(concepts):
        entries.append({"instance_prompt": inst, "class_prompt": cls, "instance_data_dir": folder,
                        "class_data_dir": folder.replace("benchmark_dataset", "regularization"),
                        "prompt_filename": pfile})
        for k in range(photos):
            _photo(root / folder / f"{k}.jpg", 500 * i + k, size)
    for pfile, lines in prompts.items():
        (root / pfile).parent.mkdir(parents=True, exist_ok=True)
        (root / pfile).write_text("\n".join(lines), encoding="utf-8")  # no final newline, like the originals
    (root / "dataset.json").write_text(json.dumps(entries, indent=4), encoding="utf-8")
    return root
