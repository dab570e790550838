"""Tiny SD3-family pipelines built entirely offline, with random weights.

Nothing here downloads anything: the transformer, VAE, both CLIP text encoders, T5 and all three
tokenizers (written from a generated vocabulary) are built in code. Tests save them with
``save_pretrained`` and load them back with ``from_pretrained``, so the real loading path is what
gets exercised.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Literal

import torch

# Words the tiny tokenizers know as whole tokens; anything else falls back to characters.
_WORDS = (
    "a an the of on in at with and to by for is it its this that photo picture image style "
    "small large big tiny red green blue yellow orange purple pink cyan brown white black gray grey "
    "background top middle bottom left center right robot creature vase tree dog cat backpack "
    "teapot sneaker bear plushie toy beach snow forest city street table floor grass water sky "
    "wearing sitting standing floating front next near inside under over painting sunset"
).split()
_CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789,.'!?-:;()/&")


def _bytes_to_unicode() -> list[str]:
    """CLIP's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write_clip_tokenizer(folder: str | Path) -> None:
    """vocab.json + merges.txt of a byte-level BPE that spells every word of ``_WORDS`` as one token."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges: list[str] = []
    for word in _WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            rule = f"{current} {piece}"
            current += piece
            if rule not in merges:
                merges.append(rule)
            vocab.setdefault(current, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def build_clip_tokenizer():
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder:
        write_clip_tokenizer(folder)
        return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def build_t5_tokenizer():
    """A unigram tokenizer with whole-word pieces and a character fallback, as a T5 fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [("▁" + w, -1.0) for w in _WORDS]
    pieces += [(c, -6.0) for c in _CHARS] + [("▁" + c, -5.0) for c in _CHARS]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0
    )


def build_vae(channels: tuple[int, ...], latent_channels: int, image_size: int):
    """A small SD3-style `AutoencoderKL` (no quant convs), downsampling 2 ** (len(channels) - 1) times."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=max(1, min(channels) // 2),
        sample_size=image_size,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def build_tiny_components(
    variant: Literal["sd3", "sd35"] = "sd3",
    seed: int = 0,
    *,
    sample_size: int = 16,
    num_layers: int = 2,
    heads: int = 4,
    head_dim: int = 8,
    vae_channels: tuple[int, ...] = (8, 8),
    latent_channels: int = 4,
    patch_size: int = 2,
    with_t5: bool = True,
) -> dict:
    """The components of a tiny SD3 ("sd3") or SD3.5 ("sd35": dual attention, qk rms-norm) pipeline.

    Images are ``sample_size * 2 ** (len(vae_channels) - 1)`` pixels square by default (32 px).
    """
    if variant not in ("sd3", "sd35"):
        raise ValueError(f"variant must be 'sd3' or 'sd35', not {variant!r}")
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip_tokenizer = build_clip_tokenizer()
    t5_tokenizer = build_t5_tokenizer()
    clip_hidden, t5_width = 32, 64
    vocab = clip_tokenizer.get_vocab()

    def clip(offset: int) -> CLIPTextModelWithProjection:
        torch.manual_seed(seed + offset)
        config = CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=clip_hidden,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            projection_dim=clip_hidden,
            max_position_embeddings=77,
            hidden_act="gelu",
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
        return CLIPTextModelWithProjection(config).eval()

    text_encoder, text_encoder_2 = clip(1), clip(2)
    text_encoder_3 = None
    if with_t5:
        torch.manual_seed(seed + 3)
        t5_config = T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=t5_width,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
        text_encoder_3 = T5EncoderModel(t5_config).eval()

    torch.manual_seed(seed + 4)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=patch_size,
        in_channels=latent_channels,
        num_layers=num_layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=t5_width,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=2 * clip_hidden,
        out_channels=latent_channels,
        pos_embed_max_size=4 * sample_size // patch_size,
        dual_attention_layers=tuple(range(num_layers - 1)) if variant == "sd35" else (),
        qk_norm="rms_norm" if variant == "sd35" else None,
    )
    torch.manual_seed(seed + 5)
    vae = build_vae(vae_channels, latent_channels, sample_size * 2 ** (len(vae_channels) - 1))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return {
        "transformer": transformer,
        "vae": vae,
        "scheduler": scheduler,
        "text_encoder": text_encoder,
        "tokenizer": clip_tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": build_clip_tokenizer(),
        "text_encoder_3": text_encoder_3,
        "tokenizer_3": t5_tokenizer if with_t5 else None,
    }


def build_tiny_pipeline(variant: Literal["sd3", "sd35"] = "sd3", seed: int = 0, **kwargs):
    """A `CustomShiftPipeline` with tiny random weights (training-free: no CustomShift weights loaded)."""
    from .pipeline import CustomShiftPipeline

    return CustomShiftPipeline(**build_tiny_components(variant, seed, **kwargs))
