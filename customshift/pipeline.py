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

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_output import StableDiffusion3PipelineOutput
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps
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

from .attention import CADSState, install_processors
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

logger = logging.getLogger(__name__)


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


class CustomShiftPipeline(CustomShiftLoaderMixin, StableDiffusion3Pipeline):
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
        self.reference_branch = ReferenceBranch(self.transformer, config).to(self.transformer.device)
        self._weights_fingerprint = TRAINING_FREE if config.lora_rank == 0 else None
        return self.reference_branch

    @property
    def base_fingerprint(self) -> str:
        if self._base_fingerprint is None:
            self._base_fingerprint = base_fingerprint(self.transformer)
        return self._base_fingerprint

    @property
    def weights_fingerprint(self) -> str:
        if self._weights_fingerprint is None:
            self._weights_fingerprint = tensors_fingerprint(self.customshift_state_dict())
        return self._weights_fingerprint

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
        latents = self.prepare_reference_latents(pil, height, width).to(self.transformer.dtype)
        embeds, pooled = self.subject_tokens(subject)
        inputs = {
            "reference_latents": latents,
            "subject_embeds": embeds.to(self.transformer.dtype).expand(len(pil), -1, -1),
            "subject_pooled": pooled.to(self.transformer.dtype).expand(len(pil), -1),
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
        self.reference_branch.to(self.transformer.device)
        kv = self.reference_branch(**inputs)
        # Several references of one subject: their tokens are joined into one key set.
        keys = {n: k.transpose(0, 1).reshape(1, k.shape[1], -1, k.shape[-1]) for n, (k, _) in kv.items()}
        values = {n: v.transpose(0, 1).reshape(1, v.shape[1], -1, v.shape[-1]) for n, (_, v) in kv.items()}
        return keys, values

    def check_subject(self, subject: SubjectEmbedding) -> None:
        """Refuse an embedding made with another base model or other CustomShift weights."""
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
        missing = set(self.reference_branch.processor_names) - set(subject.keys)
        if missing:
            raise IncompatibleWeightsError(f"subject embedding lacks layers {sorted(missing)[:3]}")

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
            for tokenizer, offset, max_length in encoders:
                ids = tokenizer(prompt, truncation=True, max_length=max_length).input_ids
                pattern = tokenizer(subject, add_special_tokens=False).input_ids
                for position in find_token_positions(ids, pattern):
                    weights[row, offset + position] = 1.0
            if weights[row].sum() == 0 and prompt.strip():
                logger.warning(
                    "subject name %r does not appear in the prompt %r: the reference is applied with an "
                    "unconditional shift (m_i = 1). Put the subject's name in the prompt.", subject, prompt
                )
        return weights / weights.sum(-1, keepdim=True).clamp(min=1.0)

    def cads_state(
        self,
        keys: dict[str, Tensor],
        values: dict[str, Tensor],
        log_scale: Tensor,
        subject_weights: Tensor,
        trainable: bool = False,
    ) -> CADSState:
        """The per-forward CADS inputs; ``trainable=True`` keeps the graph to beta/gamma (training)."""
        config, shift = self.customshift_config, self.reference_branch.shift
        device, dtype = self.transformer.device, self.transformer.dtype
        # A cache stored in lower precision than the model's stays in it (``encode_subject(dtype=...)``).
        kv_dtype = next(iter(keys.values())).dtype if keys else dtype
        if kv_dtype.itemsize >= dtype.itemsize:
            kv_dtype = dtype
        beta = shift.beta if trainable else shift.beta.detach()
        gamma = shift.gamma if trainable else shift.gamma.detach()
        return CADSState(
            keys={n: k.to(device, kv_dtype) for n, k in keys.items()},
            values={n: v.to(device, kv_dtype) for n, v in values.items()},
            beta={n: beta[i].to(device) for n, i in shift.index.items()},
            gamma={n: gamma[i].to(device) for n, i in shift.index.items()},
            log_scale=log_scale.to(device),
            subject_weights=subject_weights.to(device),
            conditional=config.conditional_shift,
            mass=config.cads_shift == "mass",
            form=config.cads_form,
            text_queries_attend_reference=config.text_queries_attend_reference,
        )

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
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: Tensor | None = None,
        prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        pooled_prompt_embeds: Tensor | None = None,
        negative_pooled_prompt_embeds: Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        max_sequence_length: int | None = None,
        skip_guidance_layers: list[int] | None = None,
        skip_layer_guidance_scale: float = 2.8,
        skip_layer_guidance_stop: float = 0.2,
        skip_layer_guidance_start: float = 0.01,
        mu: float | None = None,
        subject: SubjectEmbedding | None = None,
        shift_scale: float = 1.0,
        reference_guidance_scale: float = 0.0,
        recompute_subject: bool = False,
    ):
        """Generate images; everything `StableDiffusion3Pipeline.__call__` accepts, plus:

        Args:
            subject: a `SubjectEmbedding` from `encode_subject` (or `SubjectEmbedding.load`); None gives
                plain SD3.
            shift_scale: multiplies the reference's attention weight (log(shift_scale) is added to the
                shift). 0 gives plain SD3 exactly; larger values keep more identity.
            reference_guidance_scale: w_ref in the guidance formula of the module docstring (0 = two
                passes, ordinary CFG with the reference in both).
            recompute_subject: run the Reference-Alignment Branch again at every step instead of using
                the cached keys/values (same image, slower: for tests and cost comparisons).
        """
        max_sequence_length = max_sequence_length or self.customshift_config.max_sequence_length or 256
        if shift_scale < 0 or not math.isfinite(shift_scale):
            raise PromptError(f"shift_scale must be a finite number >= 0, got {shift_scale}")
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
            if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
                raise PromptError("the prompt is empty; describe the image to generate (e.g. 'a dog on the beach')")
        else:
            prompts = None
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        callback_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        if hasattr(callback_on_step_end, "tensor_inputs"):
            callback_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(
            prompt, prompt_2, prompt_3, height, width,
            negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2,
            negative_prompt_3=negative_prompt_3, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=callback_inputs, max_sequence_length=max_sequence_length,
        )
        if subject is not None:
            self.check_subject(subject)
        self._guidance_scale = guidance_scale
        self._skip_layer_guidance_scale = skip_layer_guidance_scale
        self._clip_skip = clip_skip
        self._joint_attention_kwargs = joint_attention_kwargs
        self._interrupt = False
        batch_size = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        device = self._execution_device
        lora_scale = (joint_attention_kwargs or {}).get("scale")

        (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds) = (
            self.encode_prompt(
                prompt=prompt, prompt_2=prompt_2, prompt_3=prompt_3, negative_prompt=negative_prompt,
                negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3,
                do_classifier_free_guidance=self.do_classifier_free_guidance, prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, device=device,
                clip_skip=self.clip_skip, num_images_per_prompt=num_images_per_prompt,
                max_sequence_length=max_sequence_length, lora_scale=lora_scale,
            )
        )
        per_pass = batch_size * num_images_per_prompt

        # The passes of one step, each (text embeddings, pooled, reference on?). Decided once, here.
        with_reference = subject is not None and shift_scale > 0
        passes: list[tuple[Tensor, Tensor, bool]] = []
        if self.do_classifier_free_guidance:
            if with_reference and reference_guidance_scale != 0:
                passes.append((negative_prompt_embeds, negative_pooled_prompt_embeds, False))
            passes.append((negative_prompt_embeds, negative_pooled_prompt_embeds, with_reference))
        elif with_reference and reference_guidance_scale != 0:
            passes.append((prompt_embeds, pooled_prompt_embeds, False))
        passes.append((prompt_embeds, pooled_prompt_embeds, with_reference))
        step_embeds = torch.cat([p[0] for p in passes])
        step_pooled = torch.cat([p[1] for p in passes])

        kwargs = dict(joint_attention_kwargs or {})
        slg_kwargs = dict(kwargs)
        if with_reference:
            text_len = prompt_embeds.shape[1]
            positive = [p for p in prompts for _ in range(num_images_per_prompt)] if prompts else []
            positive_weights = (
                self.subject_token_weights(positive, subject.subject, text_len) if positive
                else torch.zeros(per_pass, text_len)
            )
            weights, log_scales = [], []
            for embeds, _, reference_on in passes:
                weights.append(positive_weights if embeds is prompt_embeds else torch.zeros(per_pass, text_len))
                log_scales.append(torch.full((per_pass,), math.log(shift_scale) if reference_on else -math.inf))
            state = self.cads_state(subject.keys, subject.values, torch.cat(log_scales), torch.cat(weights))
            kwargs["customshift"] = state
            slg_kwargs["customshift"] = self.cads_state(
                subject.keys, subject.values, torch.full((per_pass,), math.log(shift_scale)), positive_weights
            )

        num_channels_latents = self.transformer.config.in_channels
        latents = self.prepare_latents(
            per_pass, num_channels_latents, height, width, prompt_embeds.dtype, device, generator, latents
        )
        scheduler_kwargs = {}
        if self.scheduler.config.get("use_dynamic_shifting", None) and mu is None:
            image_seq_len = (latents.shape[2] // self.transformer.config.patch_size) * (
                latents.shape[3] // self.transformer.config.patch_size
            )
            mu = calculate_shift(
                image_seq_len,
                self.scheduler.config.get("base_image_seq_len", 256),
                self.scheduler.config.get("max_image_seq_len", 4096),
                self.scheduler.config.get("base_shift", 0.5),
                self.scheduler.config.get("max_shift", 1.16),
            )
        if mu is not None:
            scheduler_kwargs["mu"] = mu
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, sigmas=sigmas, **scheduler_kwargs
        )
        num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)
        self._num_timesteps = len(timesteps)

        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                if with_reference and recompute_subject:
                    self._refresh_state(subject, kwargs["customshift"], slg_kwargs["customshift"])
                model_input = torch.cat([latents] * len(passes))
                noise_pred = self.transformer(
                    hidden_states=model_input,
                    timestep=t.expand(model_input.shape[0]),
                    encoder_hidden_states=step_embeds,
                    pooled_projections=step_pooled,
                    joint_attention_kwargs=kwargs,
                    return_dict=False,
                )[0]
                preds = noise_pred.chunk(len(passes))
                noise_pred = self._combine(preds, reference_guidance_scale)
                if self.do_classifier_free_guidance:
                    text_pred = preds[-1]
                    in_slg_window = (num_inference_steps * skip_layer_guidance_start < i
                                     < num_inference_steps * skip_layer_guidance_stop)
                    if skip_guidance_layers is not None and in_slg_window:
                        skip_pred = self.transformer(
                            hidden_states=latents,
                            timestep=t.expand(latents.shape[0]),
                            encoder_hidden_states=prompt_embeds,
                            pooled_projections=pooled_prompt_embeds,
                            joint_attention_kwargs=slg_kwargs,
                            return_dict=False,
                            skip_layers=skip_guidance_layers,
                        )[0]
                        noise_pred = noise_pred + (text_pred - skip_pred) * self._skip_layer_guidance_scale

                latents_dtype = latents.dtype
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                if latents.dtype != latents_dtype:
                    latents = latents.to(latents_dtype)
                if callback_on_step_end is not None:
                    scope = {"latents": latents, "prompt_embeds": prompt_embeds,
                             "pooled_prompt_embeds": pooled_prompt_embeds}
                    callback_kwargs = {k: scope[k] for k in callback_inputs if k in scope}
                    outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = outputs.pop("latents", latents)
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()

        if output_type == "latent":
            image = latents
        else:
            latents = (latents / self.vae.config.scaling_factor) + (self.vae.config.shift_factor or 0.0)
            image = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return StableDiffusion3PipelineOutput(images=image)

    def _combine(self, preds: Sequence[Tensor], reference_scale: float) -> Tensor:
        """The cross-guidance formula over the passes built in ``__call__``.

        With text guidance, preds are [v(0,0)], v(0,R), v(T,R); without it, [v(T,0)], v(T,R). The
        optional first pass (no reference) exists only when reference guidance is on.
        """
        if self.do_classifier_free_guidance:
            uncond, text = preds[-2], preds[-1]
            guided = uncond + self.guidance_scale * (text - uncond)
            if len(preds) == 3:
                guided = guided + reference_scale * (uncond - preds[0])
            return guided
        if len(preds) == 2:
            return preds[1] + reference_scale * (preds[1] - preds[0])
        return preds[0]

    def _refresh_state(self, subject: SubjectEmbedding, *states: CADSState) -> None:
        if subject.inputs is None:
            raise PromptError("recompute_subject needs an embedding from encode_subject (not one loaded from disk)")
        keys, values = self._run_reference_branch(subject.inputs)
        for state in states:
            state.keys = {n: k.to(self.transformer.dtype) for n, k in keys.items()}
            state.values = {n: v.to(self.transformer.dtype) for n, v in values.items()}

