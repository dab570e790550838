"""`CustomShiftPipeline`: Stable Diffusion 3 with a subject, through the Cross-Guidance Branch.

The generation branch is the stock SD3 transformer whose attention modules carry CADS processors.
A subject is first turned into a `SubjectEmbedding` by the Reference-Alignment Branch (once); at every
denoising step the image queries attend to its cached keys/values with the conditional shift. With
``subject=None`` or ``shift_scale=0`` the pipeline is exactly `StableDiffusion3Pipeline`.

Guidance combines the text and reference cues with separate scales (docs/method.md):

    v = v(0, R) + w_ref * (v(0, R) - v(0, 0)) + w_txt * (v(T, R) - v(0, R))

where 0 is the empty prompt / no reference, w_txt = ``guidance_scale`` and w_ref =
``reference_guidance_scale``; w_ref = 0 is ordinary classifier-free guidance with the reference in
both passes (two passes per step, as plain SD3).
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from PIL import Image
from torch import Tensor
from transformers import (
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    SiglipImageProcessor,
    SiglipVisionModel,
    T5EncoderModel,
    T5TokenizerFast,
)

from .attention import (
    CADSState,
    ReferenceSet,
    build_cads_state,
    install_processors,
)
from .checks import subject_missing_message, subject_spellings
from .config import CustomShiftConfig
from .errors import IncompatibleWeightsError, PromptError
from .loaders import (  # noqa: F401 - the names callers import from here
    GENERATION_ADAPTER,
    MANIFEST_NAME,
    TRAINING_FREE,
    WEIGHTS_FORMAT,
    WEIGHTS_NAME,
    CustomShiftLoaderMixin,
)
from .reference import ReferenceBranch, SubjectEmbedding, base_fingerprint, tensors_fingerprint
from .runtime import ReferenceGuidanceMixin, RuntimeMixin, unwrap

logger = logging.getLogger(__name__)
_PARENT_CALL = inspect.signature(StableDiffusion3Pipeline.__call__)


def find_token_positions(token_ids: Sequence[int], pattern: Sequence[int]) -> list[int]:
    """Positions of every occurrence of ``pattern`` as a contiguous run inside ``token_ids``."""
    pattern = list(pattern)
    if not pattern:
        return []
    ids = list(token_ids)
    positions: list[int] = []
    for start in range(len(ids) - len(pattern) + 1):
        if ids[start : start + len(pattern)] == pattern:
            positions.extend(range(start, start + len(pattern)))
    return positions


def _shift_scales(shift_scale: float | Sequence[float], count: int) -> list[float]:
    scales = [shift_scale] * count if isinstance(shift_scale, (int, float)) else list(shift_scale)
    if len(scales) != count:
        raise PromptError(f"shift_scale has {len(scales)} values for {count} subjects; give one per subject")
    for scale in scales:
        if not isinstance(scale, (int, float)) or scale < 0 or not math.isfinite(scale):
            raise PromptError(f"shift_scale must be a finite number >= 0, got {scale}")
    return [float(scale) for scale in scales]


def _prompts(prompt: str | list[str] | None, prompt_embeds: Tensor | None) -> list[str]:
    if prompt_embeds is not None:
        return []
    prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise PromptError("the prompt is empty; describe the image to generate (e.g. 'a dog on the beach')")
    return prompts


def _subjects(subject: Any, recompute: bool) -> tuple[list[list[SubjectEmbedding]] | None, list[Any], list[Any]]:
    """(one list per prompt or None, the subjects of one image, every embedding given) of ``__call__``'s
    ``subject``: one embedding, a list (several subjects in each image) or a list of lists (per prompt)."""
    if subject is None or isinstance(subject, SubjectEmbedding) or not len(subject) \
            or isinstance(subject[0], SubjectEmbedding):
        subjects = [] if subject is None else [subject] if isinstance(subject, SubjectEmbedding) else list(subject)
        return None, subjects, subjects
    lists = [[item] if isinstance(item, SubjectEmbedding) else list(item) for item in subject]
    if len({len(items) for items in lists}) != 1 or not lists[0]:
        raise PromptError("subjects per prompt: give every prompt the same number of subjects (at least one)")
    if recompute:
        raise PromptError("subjects per prompt use the cached keys/values: recompute_subject is not available")
    return lists, lists[0], [e for items in lists for e in items]


def _per_prompt_reference_sets(pipe: Any, lists: list[list[SubjectEmbedding]], scales: list[float],
                               prompts: list[str], per_prompt: int, text_len: int) -> list[ReferenceSet]:
    """One reference set per subject slot, each row holding its own prompt's subject (keys stacked by row)."""
    if len(lists) != len(prompts):  # prompt_embeds instead of prompts: no names to place the subjects by
        raise PromptError(f"{len(lists)} subject lists for {len(prompts)} prompts; give one list per text prompt")
    rows = [(prompt, items) for prompt, items in zip(prompts, lists, strict=True) for _ in range(per_prompt)]
    references = []
    for slot, scale in enumerate(scales):
        if scale <= 0:
            continue
        slot_items = [items[slot] for _, items in rows]
        if len({tuple(next(iter(e.keys.values())).shape) for e in slot_items}) != 1:
            raise PromptError("subjects per prompt: every prompt's subject in one slot needs references of the "
                              "same size and count (their keys are stacked)")
        references.append(ReferenceSet.from_rows(
            slot_items, torch.full((len(rows),), math.log(scale)),
            torch.cat([pipe.subject_token_weights([prompt], items[slot].subject, text_len)  # once per prompt
                       for prompt, items in zip(prompts, lists, strict=True)]).repeat_interleave(per_prompt, dim=0)))
    return references


class CustomShiftPipeline(CustomShiftLoaderMixin, RuntimeMixin, ReferenceGuidanceMixin, StableDiffusion3Pipeline):
    """Subject-driven generation on any SD3-family checkpoint, tuning-free.

    ``encode_subject(images, name)`` runs the Reference-Alignment Branch once; ``__call__(prompt,
    subject=...)`` generates with it. Trained CustomShift weights (the branch's LoRA and the
    per-layer shift parameters) come from ``load_customshift``; without them the pipeline runs
    training-free (no LoRA, CADS with the default shift).
    """

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer_2: CLIPTokenizer,
        text_encoder_3: T5EncoderModel,
        tokenizer_3: T5TokenizerFast,
        image_encoder: SiglipVisionModel = None,
        feature_extractor: SiglipImageProcessor = None,
    ) -> None:
        # Typed as the parent's: diffusers' from_pipe and from_single_file map components by these types.
        super().__init__(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        install_processors(self.transformer)
        self._base_fingerprint: str | None = None
        self._weights_fingerprint = TRAINING_FREE
        # Training-free: the reference keys join attention with a logit shift (beta = 0 is the plain union),
        # so an untrained model gives the reference only the mass its scores earn (docs/method.md).
        self.set_customshift_config(CustomShiftConfig(lora_rank=0, cads_shift="logit"))

    # ------------------------------------------------------------------------------------------------------
    # CustomShift weights

    def set_customshift_config(self, config: CustomShiftConfig) -> ReferenceBranch:
        """Rebuild the Reference-Alignment Branch (fresh LoRA, initial shift) for ``config``."""
        self.customshift_config = config
        self.reference_branch = ReferenceBranch(unwrap(self.transformer), config).to(self._execution_device)
        self._weights_fingerprint = TRAINING_FREE if config.lora_rank == 0 else None
        return self.reference_branch

    @property
    def base_fingerprint(self) -> str:
        if self._base_fingerprint is None:
            self._base_fingerprint = base_fingerprint(unwrap(self.transformer))  # the same under torch.compile
        return self._base_fingerprint

    @property
    def weights_fingerprint(self) -> str:
        if self._weights_fingerprint is None:
            self._weights_fingerprint = tensors_fingerprint(self.customshift_state_dict())
        return self._weights_fingerprint + getattr(self, "_fused_loras", "")  # fused LoRAs changed the base layers

    def customshift_weights_changed(self, base: bool = False) -> None:
        """Call after changing weights in place (the trainer does), so that subject embeddings made before
        are recognised as stale; ``base=True`` when the base transformer itself was trained."""
        self._weights_fingerprint = None
        if base:
            self._base_fingerprint = None

    # ------------------------------------------------------------------------------------------------------
    # Subjects

    def subject_tokens(self, subject: str) -> tuple[Tensor, Tensor]:
        """The subject phrase's text tokens, unpadded: (1, S, D) embeddings and (1, P) pooled."""
        embeds, _, pooled, _ = self.encode_prompt(
            prompt=subject, prompt_2=subject, prompt_3=subject, do_classifier_free_guidance=False,
            device=self._execution_device, max_sequence_length=77,
        )
        clip_len = len(self.tokenizer(subject, truncation=True, max_length=self.tokenizer_max_length).input_ids)
        rows = list(range(clip_len))
        if self.text_encoder_3 is not None and self.tokenizer_3 is not None:
            t5_len = len(self.tokenizer_3(subject, truncation=True, max_length=77).input_ids)
            rows += [self.tokenizer_max_length + i for i in range(t5_len)]
        return embeds[:, rows], pooled

    def prepare_reference_latents(self, images: Sequence[Image.Image], height: int, width: int) -> Tensor:
        """Clean, scaled VAE latents of reference images resized and centre-cropped to (height, width)."""
        from .images import prepare_reference

        pixels = self.image_processor.preprocess([prepare_reference(im, height, width) for im in images])
        pixels = pixels.to(device=self._execution_device, dtype=self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.mode()
        shift = self.vae.config.shift_factor or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_subject(
        self,
        images: Any,
        subject: str,
        height: int | None = None,
        width: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> SubjectEmbedding:
        """Run the Reference-Alignment Branch once for a subject.

        Args:
            images: one reference (path, PIL image, array) or a list of them; several references of the
                same subject contribute their keys side by side.
            subject: the subject's name as it appears in prompts ("dog", "red backpack").
            height, width: the size the references are resized to (default: the model's default size).
            dtype: precision of the cached keys/values (default: the transformer's). A lower one than the
                model's (``torch.bfloat16`` on a float32 model) halves the cache and computes the attention
                over the reference in that precision: about twice as fast on CPUs with bf16 matrix units.
        """
        from .images import load_image

        subject = (subject or "").strip()
        if not subject:
            raise PromptError("the subject name is empty; give the word the prompt uses for it (e.g. 'dog')")
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise PromptError("no reference image given")
        pil = [load_image(image) for image in images]
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        self.check_size(height, width)
        # Contiguous: the branch's result depends (~1e-6) on memory layout, and a compact embedding saves only values.
        latents = self.prepare_reference_latents(pil, height, width).to(self.transformer.dtype).contiguous()
        embeds, pooled = self.subject_tokens(subject)
        inputs = {
            "reference_latents": latents,
            "subject_embeds": embeds.to(self.transformer.dtype).expand(len(pil), -1, -1).contiguous(),
            "subject_pooled": pooled.to(self.transformer.dtype).expand(len(pil), -1).contiguous(),
        }
        keys, values = self._run_reference_branch(inputs)
        if dtype is not None:
            if not dtype.is_floating_point:
                raise ValueError(f"dtype must be a floating-point torch dtype, got {dtype}")
            keys = {name: key.to(dtype) for name, key in keys.items()}
            values = {name: value.to(dtype) for name, value in values.items()}
        return SubjectEmbedding(
            keys=keys,
            values=values,
            subject=subject,
            base_fingerprint=self.base_fingerprint,
            weights_fingerprint=self.weights_fingerprint,
            resolution=(height, width),
            num_references=len(pil),
            inputs=inputs,
        )

    def _run_reference_branch(self, inputs: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        # The branch runs the transformer's layers without calling its forward: under model CPU offload, load
        # the transformer first, as its forward hook would (diffusers' apply_forward_hook does the same for VAEs).
        hook = getattr(unwrap(self.transformer), "_hf_hook", None)
        if type(hook).__name__ == "CpuOffload":
            hook.pre_forward(unwrap(self.transformer))
        return self.reference_branch.encode(inputs)

    def check_subject(self, subject: SubjectEmbedding, fingerprints_only: bool = False) -> None:
        """Refuse an embedding made with another base model or other CustomShift weights, or whose layers
        and shapes are not this model's (``fingerprints_only``: a compact one, before it is expanded)."""
        if subject.base_fingerprint != self.base_fingerprint:
            raise IncompatibleWeightsError(
                f"subject embedding '{subject.subject}' was made for another base model "
                f"(fingerprint {subject.base_fingerprint}, this model is {self.base_fingerprint}); "
                "encode the subject again with this pipeline"
            )
        if subject.weights_fingerprint != self.weights_fingerprint:
            raise IncompatibleWeightsError(
                f"subject embedding '{subject.subject}' was made with other CustomShift weights "
                f"({subject.weights_fingerprint}, loaded: {self.weights_fingerprint}); encode the subject again"
            )
        if not fingerprints_only:
            modules = {n: self.reference_branch.tree.get_submodule(n) for n in self.reference_branch.processor_names}
            subject.check_fits({n: (m.heads, m.inner_dim // m.heads) for n, m in modules.items()})

    def subject_token_weights(self, prompts: Sequence[str], subject: str, length: int) -> Tensor:
        """(len(prompts), length): where the subject's tokens sit in each prompt's text sequence.

        Rows are normalised to sum to 1; a prompt without the subject gets a zero row, for which CADS
        falls back to an unconditional shift (m_i = 1) — with a warning for non-empty prompts.
        """
        weights = torch.zeros(len(prompts), length)
        encoders = [(self.tokenizer, 0, self.tokenizer_max_length)]
        if self.text_encoder_3 is not None and self.tokenizer_3 is not None:
            encoders.append((self.tokenizer_3, self.tokenizer_max_length, length - self.tokenizer_max_length))
        for row, prompt in enumerate(prompts):
            spellings = subject_spellings(prompt, subject)  # "Robot" for "robot": T5 is case-sensitive
            for tokenizer, offset, max_length in encoders:
                ids = tokenizer(prompt, truncation=True, max_length=max_length).input_ids
                for spelling in spellings:
                    pattern = tokenizer(spelling, add_special_tokens=False).input_ids
                    for position in find_token_positions(ids, pattern):
                        weights[row, offset + position] = 1.0
            if weights[row].sum() == 0 and prompt.strip():
                logger.warning("%s", subject_missing_message(subject, prompt))
        return weights / weights.sum(-1, keepdim=True).clamp(min=1.0)

    def _cads_state(self, references: Sequence[ReferenceSet]) -> CADSState:
        """The CADS state of this pipeline's config and shift parameters, on the execution device."""
        return build_cads_state(self.customshift_config, self.reference_branch.shift, references,
                                device=self._execution_device, dtype=self.transformer.dtype)

    def check_size(self, height: int, width: int) -> None:
        multiple = self.vae_scale_factor * self.transformer.config.patch_size
        if height % multiple or width % multiple:
            raise PromptError(f"height and width must be multiples of {multiple}, got {height}x{width}")

    # ------------------------------------------------------------------------------------------------------
    # Generation

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        *args: Any,
        subject: SubjectEmbedding | Sequence[SubjectEmbedding] | Sequence[Sequence[SubjectEmbedding]] | None = None,
        shift_scale: float | Sequence[float] = 1.0,
        reference_guidance_scale: float = 0.0,
        recompute_subject: bool = False,
        **kwargs: Any,
    ):
        """Generate images; every argument of `StableDiffusion3Pipeline.__call__`, plus:

        Args:
            subject: a `SubjectEmbedding` from `encode_subject` (or `SubjectEmbedding.load`), or a list of
                them for several subjects in one image, ``pipe(prompt, subject=[robot, tree])``: each
                subject's features go where the prompt's tokens of its own name (``embedding.subject``)
                attend; name every subject in the prompt ("a robot next to a tree"). None: plain SD3. Or one
                list per prompt, ``pipe([p1, p2], subject=[[robot], [tree]])``: each prompt its own subject(s)
                in one batched call (the same number per prompt, references of the same size).
            shift_scale: multiplies the reference's attention weight (log(shift_scale) is added to the
                shift): one float for every subject, or a list with one per subject. 0 turns that subject
                off exactly (all 0: plain SD3); larger values keep more identity.
            reference_guidance_scale: w_ref in the guidance formula of the module docstring (0 = two
                passes, ordinary CFG with the reference in both: the parent's own ``__call__``).
            recompute_subject: run the Reference-Alignment Branch again at every step instead of using
                the cached keys/values (same image, slower: for tests and cost comparisons).
        """
        bound = _PARENT_CALL.bind(self, prompt, *args, **kwargs)
        if "max_sequence_length" not in bound.arguments:
            bound.arguments["max_sequence_length"] = self.customshift_config.max_sequence_length or 256
        bound.apply_defaults()
        call = dict(bound.arguments)
        call.pop("self")
        lists, subjects, every = _subjects(subject, recompute_subject)
        scales = _shift_scales(shift_scale, len(subjects))
        prompts = _prompts(call["prompt"], call["prompt_embeds"])
        for item in every:
            self.check_subject(item)
        active = [(s, scale) for s, scale in zip(subjects, scales, strict=True) if scale > 0]
        if not active:
            return super().__call__(**call)
        if call["ip_adapter_image"] is not None or call["ip_adapter_image_embeds"] is not None:
            raise PromptError("IP-Adapter and a CustomShift subject cannot be combined (the IP-Adapter's attention "
                              "processors replace CADS); pass one or the other")
        self.ensure_cads_processors()
        per_prompt = call["num_images_per_prompt"] or 1
        positive = [p for p in prompts for _ in range(per_prompt)]
        rows = len(positive) if prompts else call["prompt_embeds"].shape[0] * per_prompt
        text_len = self.tokenizer_max_length + call["max_sequence_length"]
        references = [
            ReferenceSet(item.keys, item.values, torch.full((rows,), math.log(scale)),
                         self.subject_token_weights(positive, item.subject, text_len) if prompts
                         else torch.zeros(rows, text_len))
            for item, scale in active
        ] if lists is None else _per_prompt_reference_sets(self, lists, scales, prompts, per_prompt, text_len)
        hook = self._recompute_hook([s for s, _ in active]) if recompute_subject else None
        try:
            if reference_guidance_scale == 0:
                user_kwargs = call["joint_attention_kwargs"] or {}
                call["joint_attention_kwargs"] = {**user_kwargs, "customshift": self._cads_state(references)}
                return super().__call__(**call)
            return self._reference_guided_call(call, references, reference_guidance_scale)
        finally:
            if hook is not None:
                hook.remove()

    def _recompute_hook(self, subjects: list[SubjectEmbedding]) -> Any:
        """Before every transformer forward, recompute each subject's K/V into the states in use."""
        if any(s.inputs is None for s in subjects):
            raise PromptError("recompute_subject needs an embedding from encode_subject (not one loaded from disk)")

        def refresh(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            state = (kwargs.get("joint_attention_kwargs") or {}).get("customshift")
            if state is None:
                return
            for ref, item in zip(state.references, subjects, strict=True):
                keys, values = self._run_reference_branch(item.inputs)
                ref.keys = {n: k.to(ref.keys[n]) for n, k in keys.items()}
                ref.values = {n: v.to(ref.values[n]) for n, v in values.items()}

        return self.transformer.register_forward_pre_hook(refresh, with_kwargs=True)


