"""What keeps `CustomShiftPipeline` a working diffusers pipeline at run time, and its reference-guidance loop.

* `RuntimeMixin`: the branch's own LoRA and shift parameters follow ``to()`` and both CPU offloads (the base
  layers it shares with the transformer move with the transformer, see ``ReferenceBranch._apply``); user LoRA
  calls keep the CustomShift generation adapter; ``fuse_lora`` makes older subject embeddings stale;
  processors that would drop the subject are put back to CADS or refused.
* `ReferenceGuidanceMixin`: the one pass the parent's ``__call__`` cannot run, v(0, 0) without the reference
  (docs/method.md, "Cross-Guidance Branch"); the two-pass path is the parent's own ``__call__``.
"""

from __future__ import annotations

import math
import types
from collections.abc import Sequence
from typing import Any

import torch
from diffusers.models.attention_processor import FusedJointAttnProcessor2_0, JointAttnProcessor2_0
from diffusers.pipelines.stable_diffusion_3.pipeline_output import StableDiffusion3PipelineOutput
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps
from torch import Tensor

from .attention import CADSAttnProcessor, ReferenceSet, processor_names
from .errors import PromptError
from .loaders import GENERATION_ADAPTER
from .reference import tensors_fingerprint

__all__ = ["ReferenceGuidanceMixin", "RuntimeMixin", "unwrap"]


def unwrap(module: Any) -> Any:
    """The module itself under ``torch.compile`` (an OptimizedModule keeps it as ``_orig_mod``)."""
    return getattr(module, "_orig_mod", module)


class RuntimeMixin:
    """Devices, offload, user LoRAs and attention processors of a pipeline with a reference branch."""

    def to(self, *args: Any, **kwargs: Any) -> Any:
        """diffusers' ``to``; the branch's own LoRA and shift parameters follow (they are not a pipeline component,
        which would put them into model_index.json)."""
        super().to(*args, **kwargs)
        dtype = kwargs.get("dtype") or next((a for a in args if isinstance(a, torch.dtype)), None)
        device = kwargs.get("device") or next((a for a in args if not isinstance(a, torch.dtype)), None)
        self.reference_branch.to(device=device, dtype=dtype)
        return self

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        super().enable_model_cpu_offload(gpu_id=gpu_id, device=device)
        self.reference_branch.to(self._offload_device)  # small: it stays on the accelerator

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None, device: Any = None) -> None:
        super().enable_sequential_cpu_offload(gpu_id=gpu_id, device=device)
        self.reference_branch.to(self._offload_device)

    # ------------------------------------------------------------------------------------------------------
    # User LoRAs beside the CustomShift generation adapter (diffusers' calls would switch it off or delete it)

    def _generation_adapter(self) -> bool:
        return GENERATION_ADAPTER in (getattr(unwrap(self.transformer), "peft_config", None) or {})

    def load_lora_weights(self, *args: Any, **kwargs: Any) -> None:
        super().load_lora_weights(*args, **kwargs)
        if self._generation_adapter():
            transformer = unwrap(self.transformer)
            transformer.set_adapters([*transformer.active_adapters(), GENERATION_ADAPTER])

    def set_adapters(self, adapter_names: str | list[str], adapter_weights: Any = None) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if self._generation_adapter() and GENERATION_ADAPTER not in names:
            if adapter_weights is not None:  # None: every adapter at 1.0
                weights = adapter_weights if isinstance(adapter_weights, list) else [adapter_weights] * len(names)
                adapter_weights = [*weights, 1.0]
            names = [*names, GENERATION_ADAPTER]
        super().set_adapters(names, adapter_weights)

    def unload_lora_weights(self, *args: Any, **kwargs: Any) -> None:
        """Removes the user's LoRAs; the CustomShift generation adapter (trained weights) is kept."""
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

        kept = get_peft_model_state_dict(unwrap(self.transformer), adapter_name=GENERATION_ADAPTER) \
            if self._generation_adapter() else None
        super().unload_lora_weights(*args, **kwargs)
        if kept is not None:
            self.add_generation_lora()
            set_peft_model_state_dict(unwrap(self.transformer), kept, adapter_name=GENERATION_ADAPTER)

    def fuse_lora(self, components: Sequence[str] = ("transformer", "text_encoder", "text_encoder_2"),
                  lora_scale: float = 1.0, safe_fusing: bool = False, adapter_names: list[str] | None = None,
                  **kwargs: Any) -> None:
        """diffusers' ``fuse_lora``, never the CustomShift generation adapter (the reference branch shares the base
        layers). Fusing changes the base layers the branch reads, so subject embeddings made before are stale."""
        from peft.utils import get_peft_model_state_dict

        transformer = unwrap(self.transformer)
        if adapter_names is None and self._generation_adapter():
            adapter_names = [a for a in transformer.active_adapters() if a != GENERATION_ADAPTER]
        super().fuse_lora(components=list(components), lora_scale=lora_scale, safe_fusing=safe_fusing,
                          adapter_names=adapter_names, **kwargs)
        fused = {f"{name}.{key}": tensor for name in (adapter_names or transformer.active_adapters())
                 for key, tensor in get_peft_model_state_dict(transformer, adapter_name=name).items()}
        self._fused_loras = getattr(self, "_fused_loras", "") + "+fused-lora-" + tensors_fingerprint(
            {**fused, "scale": torch.tensor(float(lora_scale))})[:8]

    def unfuse_lora(self, *args: Any, **kwargs: Any) -> None:
        super().unfuse_lora(*args, **kwargs)
        self._fused_loras = ""

    def ensure_cads_processors(self) -> None:
        """Make sure a subject reaches attention: CADS must be the processor of every attention module.

        diffusers' own joint processors (``set_attn_processor(JointAttnProcessor2_0())``, or the fused one of
        ``fuse_qkv_projections``) are put back to CADS, which computes the same without a subject and reads
        fused projections. Any other processor (IP-Adapter, a custom one) would silently drop the subject,
        so it is an error.
        """
        transformer = unwrap(self.transformer)
        for name in processor_names(transformer):
            module = transformer.get_submodule(name)
            if isinstance(module.processor, CADSAttnProcessor):
                continue
            if type(module.processor) not in (JointAttnProcessor2_0, FusedJointAttnProcessor2_0):
                raise PromptError(
                    f"{name} has the attention processor {type(module.processor).__name__} (IP-Adapter or "
                    "set_attn_processor?), which would ignore the subject; a subject needs CustomShift's "
                    "CADSAttnProcessor there. Unload that adapter or processor, or generate without a subject."
                )
            module.set_processor(CADSAttnProcessor(name))


class ReferenceGuidanceMixin:
    """Generation with reference guidance (``reference_guidance_scale > 0``): three passes per step."""

    def _reference_guided_call(self, call: dict[str, Any], references: list[ReferenceSet], w_ref: float):
        """The parent's loop with one more pass, without the reference, at every step:

            v = v(0, R) + w_ref * (v(0, R) - v(0, 0)) + w_txt * (v(T, R) - v(0, R))

        The passes follow the guidance in force at each step, so callbacks that change it (SD3CFGCutoffCallback,
        a replaced ``prompt_embeds``) act on them; without text guidance it is v(T, R) + w_ref (v(T, R) - v(T, 0)).
        """
        c = types.SimpleNamespace(**call)
        height = c.height or self.default_sample_size * self.vae_scale_factor
        width = c.width or self.default_sample_size * self.vae_scale_factor
        tensor_inputs = c.callback_on_step_end_tensor_inputs
        if hasattr(c.callback_on_step_end, "tensor_inputs"):
            tensor_inputs = c.callback_on_step_end.tensor_inputs
        self.check_inputs(
            c.prompt, c.prompt_2, c.prompt_3, height, width, negative_prompt=c.negative_prompt,
            negative_prompt_2=c.negative_prompt_2, negative_prompt_3=c.negative_prompt_3,
            prompt_embeds=c.prompt_embeds, negative_prompt_embeds=c.negative_prompt_embeds,
            pooled_prompt_embeds=c.pooled_prompt_embeds, negative_pooled_prompt_embeds=c.negative_pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=tensor_inputs, max_sequence_length=c.max_sequence_length,
        )
        self._guidance_scale, self._skip_layer_guidance_scale = c.guidance_scale, c.skip_layer_guidance_scale
        self._clip_skip, self._joint_attention_kwargs, self._interrupt = c.clip_skip, c.joint_attention_kwargs, False
        device = self._execution_device
        embeds, negative, pooled, negative_pooled = self.encode_prompt(
            prompt=c.prompt, prompt_2=c.prompt_2, prompt_3=c.prompt_3, negative_prompt=c.negative_prompt,
            negative_prompt_2=c.negative_prompt_2, negative_prompt_3=c.negative_prompt_3,
            do_classifier_free_guidance=self.do_classifier_free_guidance, prompt_embeds=c.prompt_embeds,
            negative_prompt_embeds=c.negative_prompt_embeds, pooled_prompt_embeds=c.pooled_prompt_embeds,
            negative_pooled_prompt_embeds=c.negative_pooled_prompt_embeds, device=device, clip_skip=c.clip_skip,
            num_images_per_prompt=c.num_images_per_prompt, max_sequence_length=c.max_sequence_length,
            lora_scale=(c.joint_attention_kwargs or {}).get("scale"),
        )
        rows = embeds.shape[0]
        if self.do_classifier_free_guidance:
            embeds, pooled = torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])
        latents = self.prepare_latents(rows, self.transformer.config.in_channels, height, width, embeds.dtype,
                                       device, c.generator, c.latents)
        timesteps, steps = self._timesteps(latents, c.num_inference_steps, c.sigmas, c.mu, device)
        kwargs = dict(c.joint_attention_kwargs or {})
        # One state per layout of the batch: [negative without R; negative with R; positive with R] with text
        # guidance, [positive without R; positive with R] without; the skip-layer pass is the positive one.
        off = torch.full((rows,), -math.inf)
        guided = self._cads_state([
            ReferenceSet(r.keys, r.values, torch.cat([off, r.log_scale, r.log_scale]),
                         torch.cat([torch.zeros_like(r.subject_weights)] * 2 + [r.subject_weights]))
            for r in references])
        unguided = self._cads_state([
            ReferenceSet(r.keys, r.values, torch.cat([off, r.log_scale]), r.subject_weights.repeat(2, 1))
            for r in references])
        positive = {**kwargs, "customshift": self._cads_state(references)}
        with self.progress_bar(total=steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                cfg = self.do_classifier_free_guidance
                step_embeds = torch.cat([embeds[:rows], embeds]) if cfg else torch.cat([embeds, embeds])
                step_pooled = torch.cat([pooled[:rows], pooled]) if cfg else torch.cat([pooled, pooled])
                passes = 3 if cfg else 2
                preds = self.transformer(
                    hidden_states=torch.cat([latents] * passes), timestep=t.expand(passes * rows),
                    encoder_hidden_states=step_embeds, pooled_projections=step_pooled,
                    joint_attention_kwargs={**kwargs, "customshift": guided if cfg else unguided}, return_dict=False,
                )[0].chunk(passes)
                if cfg:
                    free, uncond, text = preds
                    noise_pred = uncond + self.guidance_scale * (text - uncond) + w_ref * (uncond - free)
                    if c.skip_guidance_layers is not None and (
                            steps * c.skip_layer_guidance_start < i < steps * c.skip_layer_guidance_stop):
                        skip = self.transformer(
                            hidden_states=latents, timestep=t.expand(rows), encoder_hidden_states=embeds[-rows:],
                            pooled_projections=pooled[-rows:], joint_attention_kwargs=positive, return_dict=False,
                            skip_layers=c.skip_guidance_layers,
                        )[0]
                        noise_pred = noise_pred + (text - skip) * self._skip_layer_guidance_scale
                else:
                    free, text = preds
                    noise_pred = text + w_ref * (text - free)
                latents_dtype = latents.dtype
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0].to(latents_dtype)
                if c.callback_on_step_end is not None:
                    scope = {"latents": latents, "prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
                    outputs = c.callback_on_step_end(self, i, t, {k: scope[k] for k in tensor_inputs})
                    latents = outputs.pop("latents", latents)
                    embeds = outputs.pop("prompt_embeds", embeds)
                    pooled = outputs.pop("pooled_prompt_embeds", pooled)
                progress_bar.update()
        return self._finish(latents, c.output_type, c.return_dict)

    def _timesteps(self, latents: Tensor, steps: int, sigmas: Any, mu: float | None, device: Any) -> tuple[Tensor, int]:
        """The parent's schedule (dynamic shifting from the image size where the scheduler uses it)."""
        config = self.scheduler.config
        if config.get("use_dynamic_shifting", None) and mu is None:
            patch = self.transformer.config.patch_size
            mu = calculate_shift((latents.shape[2] // patch) * (latents.shape[3] // patch),
                                 config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                 config.get("base_shift", 0.5), config.get("max_shift", 1.16))
        extra = {} if mu is None else {"mu": mu}
        timesteps, steps = retrieve_timesteps(self.scheduler, steps, device, sigmas=sigmas, **extra)
        self._num_timesteps = len(timesteps)
        return timesteps, steps

    def _finish(self, latents: Tensor, output_type: str, return_dict: bool) -> Any:
        if output_type == "latent":
            image = latents
        else:
            latents = (latents / self.vae.config.scaling_factor) + (self.vae.config.shift_factor or 0.0)
            image = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        return StableDiffusion3PipelineOutput(images=image) if return_dict else (image,)
