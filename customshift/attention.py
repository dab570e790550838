"""Conditional Attention Distribution Shift (CADS), as a diffusers attention processor.

Softmax attention is the maximum-entropy distribution over keys under a score constraint. Joining the
reference keys R to the base keys B = image + text turns each image query's output into a convex mix

    out_i = (1 - lam_i) * out_i^B + lam_i * out_i^R,   lam_i = sigmoid(LSE_R(i) - LSE_B(i) + beta_i)

where beta_i is the Lagrange multiplier of one more constraint, the attention mass on the reference.
CADS makes it depend on the query:

    beta_i = beta_l + gamma_l * m_i + log(shift_scale)

with m_i in [0, 1] the relevance of image query i to the subject-name tokens of the prompt. Two ways
of reading beta_i (``CADSState.mass``):

* logit (``mass=False``): beta_i is added to the reference logits, as above; the reference's mass
  still follows the scores, so training can close the path by pushing reference scores down;
* mass (``mass=True``): beta_i is the log-odds of the constrained mass itself, rho_i = sigmoid(beta_i),
  and the multiplier that meets the constraint is beta_i - (LSE_R - LSE_B); then
  out_i = (1 - rho_i) * out_i^B + rho_i * out_i^R whatever the scores' magnitudes.

See docs/method.md for the derivation. Two equivalent forms are implemented:

* ``split``: one attention over the base keys and one over the reference keys, combined with the
  formula above (keeps fused SDPA kernels, no N x (N + R) mask);
* ``mask``: one attention over [base; reference] keys with beta_i added to the reference columns.

The same processor, in capture mode, records the reference tokens' keys/values in the
Reference-Alignment Branch (``customshift_capture``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CADSAttnProcessor",
    "CADSState",
    "ShiftParameters",
    "attention_with_lse",
    "cads_attention",
    "install_processors",
    "subject_relevance",
]


class ShiftParameters(nn.Module):
    """The per-layer scalars beta_l and gamma_l, one pair per CADS processor (attn, and SD3.5's attn2)."""

    def __init__(self, names: list[str], beta_init: float = 0.0, gamma_init: float = 1.0) -> None:
        super().__init__()
        self.names = list(names)
        self.index = {name: i for i, name in enumerate(self.names)}
        self.beta = nn.Parameter(torch.full((len(names),), float(beta_init)))
        self.gamma = nn.Parameter(torch.full((len(names),), float(gamma_init)))


@dataclass
class CADSState:
    """Everything the processors need for one transformer forward with a subject.

    Built once per generation (outside the denoising loop) and passed as
    ``joint_attention_kwargs={"customshift": state}``; each processor picks its own layer's entries.

    Attributes:
        keys / values: processor name -> reference K/V, shape (1 or B, heads, R, head_dim).
        beta / gamma: processor name -> 0-d tensors (the shift parameters of that layer).
        log_scale: (B,) log(shift_scale) per sample; -inf switches the reference off for that sample
            (the "no reference" pass of reference guidance).
        subject_weights: (B, text_len) weights of the subject-name tokens in each sample's text
            sequence (rows sum to 1), or all zeros where the prompt has no subject tokens.
        conditional: use m_i (False: the shift is the same for every query).
        mass: image queries' shift is the log-odds of their reference mass (False: a logit shift).
        form: "split" or "mask".
        text_queries_attend_reference: whether text queries see the reference keys.
    """

    keys: dict[str, Tensor]
    values: dict[str, Tensor]
    beta: dict[str, Tensor]
    gamma: dict[str, Tensor]
    log_scale: Tensor
    subject_weights: Tensor | None = None
    conditional: bool = True
    mass: bool = False
    form: str = "split"
    text_queries_attend_reference: bool = False
    has_subject: Tensor | None = field(default=None, init=False)
    active: bool = field(default=True, init=False)
    base_shift: dict[str, Tensor] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        # Work done once per generation here, not in the per-step hot path. With shift_scale == 0 no
        # sample attends to the reference and every processor computes plain SD3 exactly.
        self.active = not bool(torch.isneginf(self.log_scale).all())
        log_scale = self.log_scale.float().view(-1, 1)
        self.base_shift = {name: beta.float() + log_scale for name, beta in self.beta.items()}  # (B, 1)
        if self.subject_weights is not None:
            self.has_subject = (self.subject_weights.sum(-1) > 0).view(-1, 1)
            self.subject_weights = self.subject_weights[:, None, None, :]  # (B, 1, 1, T) for one matmul


# ----------------------------------------------------------------------------------------------------------
# Attention with log-sum-exp


def attention_with_lse(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax attention that also returns the log-partition LSE_j(q_i . k_j / sqrt(d)) per query.

    Uses a fused kernel's log-sum-exp where PyTorch exposes one and no gradient is needed; otherwise
    (training, or unsupported dtype/device) an explicit, differentiable computation.
    """
    scale = 1.0 / math.sqrt(query.shape[-1])
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    if not needs_grad:
        fused = _fused_attention_with_lse(query, key, value)
        if fused is not None:
            return fused
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scale
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1)).to(value.dtype)
    return torch.matmul(probs, value), lse


def _fused_attention_with_lse(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor] | None:
    try:
        if query.device.type == "cpu":
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, False)
            return out, lse.float()
        if query.device.type == "cuda":
            if query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] <= 256:
                result = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, False, False)
                return result[0], result[1].float()
            result = torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, None, True)
            return result[0], result[1][..., : query.shape[-2]].float()
    except (RuntimeError, AttributeError, NotImplementedError):
        return None
    return None


# ----------------------------------------------------------------------------------------------------------
# CADS


def subject_relevance(image_query: Tensor, text_key: Tensor, subject_weights: Tensor) -> Tensor:
    """m_i in [0, 1]: how strongly image query i attends to the prompt's subject-name tokens.

    The score of query i against the (weighted) mean subject key is, per head, normalised over the
    image tokens (exp(s_i - max_i s_i): the most subject-like query gets 1) and averaged over heads.
    ``subject_weights`` is (B, T) or already (B, 1, 1, T). Returns (B, N_image).
    """
    weights = subject_weights if subject_weights.dim() == 4 else subject_weights[:, None, None, :]
    subject_key = torch.matmul(weights.to(text_key.dtype), text_key)  # (B, H, 1, d)
    scores = torch.matmul(image_query, subject_key.transpose(-1, -2)).squeeze(-1).float()
    scores = scores / math.sqrt(image_query.shape[-1])
    relevance = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    return relevance.mean(dim=1)


def _shift_logits(state: CADSState, name: str, image_query: Tensor, text_key: Tensor | None) -> Tensor:
    """beta_i for every image query: (B, N_image), float32."""
    beta = state.base_shift[name]  # beta_l + log(shift_scale), (B, 1)
    if not state.conditional:
        return beta.expand(-1, image_query.shape[2])
    if text_key is None or state.subject_weights is None:
        # No prompt tokens here (SD3.5's image-only attn2): the subject relevance is not defined,
        # so the shift is unconditional with m_i = 1 (documented fallback).
        return beta + state.gamma[name].float()
    relevance = subject_relevance(image_query, text_key, state.subject_weights)
    relevance = torch.where(state.has_subject, relevance, torch.ones_like(relevance))
    return beta + state.gamma[name].float() * relevance


def cads_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    ref_key: Tensor,
    ref_value: Tensor,
    shift: Tensor,
    num_image_tokens: int,
    form: str = "split",
    text_queries_attend_reference: bool = False,
    mass: bool = False,
) -> Tensor:
    """Attention of [image; text] queries over base keys plus reference keys with the CADS shift.

    Args:
        query, key, value: (B, H, N, d) for the joint [image; text] sequence (or image only).
        ref_key, ref_value: (1 or B, H, R, d); expanded, never copied, to the batch. When they are stored in
            a lower precision than the queries (a bf16 cache on a float32 model), the attention over them
            is computed in theirs.
        shift: (B, N_image) shift beta_i of each image query (float32; -inf = no reference).
        num_image_tokens: the image queries come first in the sequence.
        text_queries_attend_reference: text queries get logit shift 0 (plain union) instead of -inf.
        mass: ``shift`` is the log-odds of the image queries' reference mass, not a logit shift.
    """
    batch, heads = query.shape[:2]
    ref_key = ref_key.expand(batch, heads, -1, -1)
    ref_value = ref_value.expand(batch, heads, -1, -1)
    num_text = query.shape[2] - num_image_tokens
    if text_queries_attend_reference and num_text:
        shift = torch.cat([shift, shift.new_zeros(batch, num_text)], dim=1)
    if form == "mask":
        ref_key, ref_value = ref_key.to(query.dtype), ref_value.to(query.dtype)
        return _cads_masked(query, key, value, ref_key, ref_value, shift, num_image_tokens if mass else 0)
    if form != "split":
        raise ValueError(f"unknown CADS form {form!r}; use 'split' or 'mask'")
    attending = shift.shape[1]  # queries that see the reference (image, or image + text)
    if mass and attending == num_image_tokens:
        # The mass is sigmoid(beta_i) itself: no log-sum-exp needed, two plain fused attentions.
        base_out = F.scaled_dot_product_attention(query, key, value)
        ref_query = query[:, :, :attending].to(ref_key.dtype)
        ref_out = F.scaled_dot_product_attention(ref_query, ref_key, ref_value).to(query.dtype)
        logits = shift[:, None, :]
    else:
        base_out, base_lse = attention_with_lse(query, key, value)
        ref_out, ref_lse = attention_with_lse(query[:, :, :attending].to(ref_key.dtype), ref_key, ref_value)
        ref_out = ref_out.to(query.dtype)
        logits = ref_lse - base_lse[:, :, :attending] + shift[:, None, :]
        if mass:  # the image queries' mass is sigmoid(beta_i) itself; text queries keep the plain union
            logits = torch.cat([shift[:, None, :num_image_tokens].expand(-1, heads, -1),
                                logits[:, :, num_image_tokens:]], dim=2)
    mix = torch.sigmoid(logits).to(query.dtype).unsqueeze(-1)
    if not torch.is_grad_enabled():
        # Inference: mix in place, no temporaries and no re-concatenation of the whole output.
        base_out[:, :, :attending].lerp_(ref_out, mix)
        return base_out
    mixed = base_out[:, :, :attending] + mix * (ref_out - base_out[:, :, :attending])
    if attending == query.shape[2]:
        return mixed
    return torch.cat([mixed, base_out[:, :, attending:]], dim=2)


def _cads_masked(query: Tensor, key: Tensor, value: Tensor, ref_key: Tensor, ref_value: Tensor, shift: Tensor,
                 num_mass_queries: int = 0):
    batch, heads, num_queries, _ = query.shape
    num_ref = ref_key.shape[2]
    padded = torch.full((batch, 1, num_queries), float("-inf"), device=query.device)
    padded[:, 0, : shift.shape[1]] = shift
    if num_mass_queries:
        # The multiplier that gives mass sigmoid(beta_i): beta_i - (LSE_R - LSE_B), per head.
        scale = 1.0 / math.sqrt(query.shape[-1])
        mass_query = query[:, :, :num_mass_queries]
        gap = (torch.logsumexp(torch.matmul(mass_query, ref_key.transpose(-1, -2)).float() * scale, dim=-1)
               - torch.logsumexp(torch.matmul(mass_query, key.transpose(-1, -2)).float() * scale, dim=-1))
        padded = padded.expand(-1, heads, -1).clone()
        padded[:, :, :num_mass_queries] = padded[:, :, :num_mass_queries] - gap
    mask = query.new_zeros(batch, padded.shape[1], num_queries, key.shape[2] + num_ref, dtype=torch.float32)
    mask[:, :, :, key.shape[2] :] = padded[:, :, :, None]
    return F.scaled_dot_product_attention(
        query, torch.cat([key, ref_key], dim=2), torch.cat([value, ref_value], dim=2), attn_mask=mask.to(query.dtype)
    )


# ----------------------------------------------------------------------------------------------------------
# The processor


class CADSAttnProcessor:
    """Joint-attention processor for SD3 blocks with CADS and reference key/value capture.

    With neither ``customshift`` nor ``customshift_capture`` it computes exactly what diffusers'
    ``JointAttnProcessor2_0`` does. The keyword arguments are named in the signature because
    diffusers' ``Attention.forward`` drops any that are not.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        customshift: CADSState | None = None,
        customshift_capture: dict[str, tuple[Tensor, Tensor]] | None = None,
        customshift_text_mask: Tensor | None = None,
    ):
        batch = hidden_states.shape[0]
        num_image = hidden_states.shape[1]
        query, key, value = _project(attn, hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
        text_key = None
        if encoder_hidden_states is not None:
            text_q, text_key, text_v = _project(
                attn,
                encoder_hidden_states,
                attn.add_q_proj,
                attn.add_k_proj,
                attn.add_v_proj,
                attn.norm_added_q,
                attn.norm_added_k,
            )
            query = torch.cat([query, text_q], dim=2)
            key = torch.cat([key, text_key], dim=2)
            value = torch.cat([value, text_v], dim=2)

        if customshift_capture is not None:
            customshift_capture[self.name] = (key[:, :, :num_image], value[:, :, :num_image])

        if customshift is not None and customshift.active and self.name in customshift.keys:
            shift = _shift_logits(customshift, self.name, query[:, :, :num_image], text_key)
            out = cads_attention(
                query,
                key,
                value,
                customshift.keys[self.name],
                customshift.values[self.name],
                shift,
                num_image,
                form=customshift.form,
                text_queries_attend_reference=customshift.text_queries_attend_reference,
                mass=customshift.mass,
            )
        else:
            mask = None
            if customshift_text_mask is not None and encoder_hidden_states is not None:
                # Padding of variable-length subject phrases (reference branch batches) is masked out.
                keep = torch.cat([customshift_text_mask.new_ones(batch, num_image), customshift_text_mask], dim=1)
                mask = keep.bool()[:, None, None, :]
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * out.shape[-1]).to(query.dtype)
        if encoder_hidden_states is not None:
            out, text_out = out[:, :num_image], out[:, num_image:]
            if not attn.context_pre_only:
                text_out = attn.to_add_out(text_out)
        out = attn.to_out[1](attn.to_out[0](out))
        if encoder_hidden_states is not None:
            return out, text_out
        return out


def _project(attn, states: Tensor, to_q, to_k, to_v, norm_q, norm_k) -> tuple[Tensor, Tensor, Tensor]:
    batch = states.shape[0]
    query, key, value = to_q(states), to_k(states), to_v(states)
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
    if norm_q is not None:
        query = norm_q(query)
    if norm_k is not None:
        key = norm_k(key)
    return query, key, value


def processor_names(transformer: nn.Module) -> list[str]:
    """The attention modules that get CADS: every block's ``attn`` and, on SD3.5, ``attn2``."""
    names = []
    for index, block in enumerate(transformer.transformer_blocks):
        names.append(f"transformer_blocks.{index}.attn")
        if getattr(block, "attn2", None) is not None:
            names.append(f"transformer_blocks.{index}.attn2")
    return names


def install_processors(transformer: nn.Module) -> list[str]:
    """Put a CADS processor on every attention module of an SD3 transformer; returns their names."""
    names = processor_names(transformer)
    for name in names:
        transformer.get_submodule(name).set_processor(CADSAttnProcessor(name))
    return names
