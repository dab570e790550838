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

Several subjects (``CADSState.references``) get one reference set each, with its own shift and its own m_i;
the output mixes K + 1 attentions with weights softmax(0, l_1, ..., l_K) (docs/method.md, "Several subjects").

See docs/method.md for the derivation. Two equivalent forms are implemented:

* ``split``: one attention over the base keys and one over the reference keys, combined with the
  formula above (keeps fused SDPA kernels, no N x (N + R) mask);
* ``mask``: one attention over [base; reference] keys with beta_i added to the reference columns.

The same processor, in capture mode, records the reference tokens' keys/values in the
Reference-Alignment Branch (``customshift_capture``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import CustomShiftConfig

__all__ = [
    "CADSAttnProcessor",
    "CADSState",
    "ReferenceSet",
    "ShiftParameters",
    "build_cads_state",
    "attention_with_lse",
    "cads_attention",
    "compete",
    "install_processors",
    "subject_relevance",
    "subject_scores",
]


class ShiftParameters(nn.Module):
    """The per-layer scalars beta_l and gamma_l, one pair per CADS processor (attn, and SD3.5's attn2)."""

    def __init__(self, names: list[str], beta_init: float = 0.0, gamma_init: float = 1.0,
                 competition: bool = False) -> None:
        super().__init__()
        self.names = list(names)
        self.index = {name: i for i, name in enumerate(self.names)}
        self.beta = nn.Parameter(torch.full((len(names),), float(beta_init)))
        self.gamma = nn.Parameter(torch.full((len(names),), float(gamma_init)))
        # kappa_l: the gain of the subjects' competition (CustomShiftConfig.subject_competition), zero at the start.
        self.kappa = nn.Parameter(torch.zeros(len(names))) if competition else None


@dataclass
class ReferenceSet:
    """One subject's cached reference keys/values and, per sample, how strongly and where it applies.

    Attributes:
        keys / values: processor name -> reference K/V, shape (1 or P, heads, R, head_dim).
        log_scale: (P,) log(shift_scale) per sample; -inf switches this reference off for that sample
            (the "no reference" pass of reference guidance).
        subject_weights: (P, text_len) weights of this subject's name tokens in each sample's text sequence
            (rows sum to 1), or a zero row where the prompt does not name the subject (then m_i = 1).
    """

    keys: dict[str, Tensor]
    values: dict[str, Tensor]
    log_scale: Tensor
    subject_weights: Tensor | None = None

    @classmethod
    def from_rows(cls, subjects: Sequence[Any], log_scale: Tensor, subject_weights: Tensor | None) -> ReferenceSet:
        """One set whose row p is ``subjects[p]`` (embeddings with ``keys``/``values``, each (1, H, R, d))."""
        first = subjects[0]
        return cls({n: torch.cat([s.keys[n] for s in subjects]) for n in first.keys},
                   {n: torch.cat([s.values[n] for s in subjects]) for n in first.values}, log_scale, subject_weights)


@dataclass
class CADSState:
    """Everything the processors need for one transformer forward with one or several subjects.

    Built once per generation (outside the denoising loop) by `build_cads_state` and passed as
    ``joint_attention_kwargs={"customshift": state}``; each processor picks its own layer's entries.
    The rows of each `ReferenceSet` are the samples of the batch; a forward whose batch is k times
    larger is classifier-free guidance as diffusers batches it, [negative; positive]: the leading
    chunks are negative-prompt passes (same shift scale, no subject tokens, so m_i = 1).

    Attributes:
        references: the subjects, each with its own reference set and its own subject relevance m_i.
        beta / gamma: processor name -> 0-d tensors (the shift parameters of that layer).
        kappa: processor name -> 0-d tensor, the gain of the subjects' competition (None: no competition).
        conditional: use m_i (False: the shift is the same for every query).
        mass: image queries' shift is the log-odds of their reference mass (False: a logit shift).
        form: "split" or "mask".
        text_queries_attend_reference: whether text queries see the reference keys.
        shift_record: when a list, every processor appends its shifts beta_ik (one (B, N_image) tensor per
            reference set) in forward order; the trainer's routing loss reads them (customshift/training/objective.py).
    """

    references: list[ReferenceSet]
    beta: dict[str, Tensor]
    gamma: dict[str, Tensor]
    conditional: bool = True
    mass: bool = False
    form: str = "split"
    text_queries_attend_reference: bool = False
    shift_record: list[list[Tensor]] | None = None
    kappa: dict[str, Tensor] | None = None
    _rows: dict[tuple[int, int], tuple[Tensor, Tensor | None, Tensor | None]] = field(
        default_factory=dict, init=False, repr=False)

    @property
    def active(self) -> bool:
        return bool(self.references)

    def rows(self, index: int, batch: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Reference ``index``'s (log_scale (batch, 1), subject weights (batch, 1, 1, T), has_subject (batch, 1)).

        Computed once per batch size, not in every layer.
        """
        cached = self._rows.get((index, batch))
        if cached is None:
            ref = self.references[index]
            log_scale, weights = ref.log_scale.float(), ref.subject_weights
            rows = log_scale.shape[0]
            if batch != rows:
                if batch % rows:
                    raise ValueError(f"CADS state has {rows} rows per pass; a batch of {batch} is not a multiple")
                log_scale = log_scale.repeat(batch // rows)
                if weights is not None:
                    weights = torch.cat([weights.new_zeros((batch - rows, weights.shape[1])), weights])
            has_subject = None if weights is None else (weights.sum(-1) > 0).view(-1, 1)
            cached = (log_scale.view(-1, 1), None if weights is None else weights[:, None, None, :], has_subject)
            self._rows[(index, batch)] = cached
        return cached


def build_cads_state(
    config: CustomShiftConfig,
    shift: ShiftParameters,
    references: Sequence[ReferenceSet],
    device: torch.device | str,
    dtype: torch.dtype,
    trainable: bool = False,
) -> CADSState:
    """The per-forward CADS inputs from the config, the shift parameters and the reference sets.

    Used alike by the pipeline, the trainer, the probe and the benchmarks. ``dtype`` is the model's; a
    cache stored in lower precision stays in it (``encode_subject(dtype=...)``). A reference that is off
    for every sample (shift_scale 0) is left out, so it changes nothing, exactly. ``trainable=True`` keeps
    the graph to beta/gamma (training).
    """
    kept = []
    for ref in references:
        if bool(torch.isneginf(ref.log_scale).all()):
            continue
        kv_dtype = next(iter(ref.keys.values())).dtype if ref.keys else dtype
        kv_dtype = dtype if kv_dtype.itemsize >= dtype.itemsize else kv_dtype
        weights = None if ref.subject_weights is None else ref.subject_weights.to(device)
        kept.append(ReferenceSet(
            keys={n: k.to(device, kv_dtype) for n, k in ref.keys.items()},
            values={n: v.to(device, kv_dtype) for n, v in ref.values.items()},
            log_scale=ref.log_scale.to(device), subject_weights=weights,
        ))
    beta = shift.beta if trainable else shift.beta.detach()
    gamma = shift.gamma if trainable else shift.gamma.detach()
    kappa = None
    if shift.kappa is not None and len(kept) > 1 and config.conditional_shift:
        gain = shift.kappa if trainable else shift.kappa.detach()
        kappa = {n: gain[i].to(device) for n, i in shift.index.items()}
    return CADSState(
        references=kept,
        beta={n: beta[i].to(device) for n, i in shift.index.items()},
        gamma={n: gamma[i].to(device) for n, i in shift.index.items()},
        kappa=kappa,
        conditional=config.conditional_shift,
        mass=config.cads_shift == "mass",
        form=config.cads_form,
        text_queries_attend_reference=config.text_queries_attend_reference,
    )


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


def subject_scores(image_query: Tensor, text_key: Tensor, subject_weights: Tensor) -> Tensor:
    """(B, H, N_image) float32: each image query's score against the (weighted) mean key of the subject's name."""
    weights = subject_weights if subject_weights.dim() == 4 else subject_weights[:, None, None, :]
    subject_key = torch.matmul(weights.to(text_key.dtype), text_key)  # (B, H, 1, d)
    scores = torch.matmul(image_query, subject_key.transpose(-1, -2)).squeeze(-1).float()
    return scores / math.sqrt(image_query.shape[-1])


def subject_relevance(image_query: Tensor, text_key: Tensor, subject_weights: Tensor,
                      scores: Tensor | None = None) -> Tensor:
    """m_i in [0, 1]: how strongly image query i attends to the prompt's subject-name tokens.

    The score of query i against the (weighted) mean subject key is, per head, normalised over the
    image tokens (exp(s_i - max_i s_i): the most subject-like query gets 1) and averaged over heads.
    ``subject_weights`` is (B, T) or already (B, 1, 1, T). Returns (B, N_image).
    """
    scores = subject_scores(image_query, text_key, subject_weights) if scores is None else scores
    return torch.exp(scores - scores.amax(dim=-1, keepdim=True)).mean(dim=1)


def _shift_logits(state: CADSState, index: int, name: str, image_query: Tensor,
                  text_key: Tensor | None, with_scores: bool = False) -> tuple[Tensor, Tensor | None]:
    """beta_i of reference ``index`` for every image query, (B, N_image) float32, and, when ``with_scores``
    (the subjects' competition is on), the head-mean name scores (None where there is no relevance)."""
    log_scale, weights, has_subject = state.rows(index, image_query.shape[0])
    beta = state.beta[name].float() + log_scale  # beta_l + log(shift_scale), (B, 1)
    if not state.conditional:
        return beta.expand(-1, image_query.shape[2]), None
    if text_key is None or weights is None:
        # No prompt tokens here (SD3.5's image-only attn2): the subject relevance is not defined,
        # so the shift is unconditional with m_i = 1 (documented fallback).
        return beta + state.gamma[name].float(), None
    scores = subject_scores(image_query, text_key, weights)
    relevance = subject_relevance(image_query, text_key, weights, scores)
    relevance = torch.where(has_subject, relevance, torch.ones_like(relevance))
    return beta + state.gamma[name].float() * relevance, scores.mean(dim=1) if with_scores else None


def compete(shifts: list[Tensor], scores: list[Tensor], kappa: Tensor) -> list[Tensor]:
    """beta_ik + kappa_l (s_ik - mean_k' s_ik'): each query's mass moves to the subject whose name it matches best.

    ``scores``: head-mean name scores (B, N_image) per subject; a row without names scores 0 for all (no change).
    """
    mean = torch.stack(scores).mean(dim=0)
    return [shift + kappa.float() * (score - mean) for shift, score in zip(shifts, scores, strict=True)]


def cads_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    ref_key: Tensor | Sequence[Tensor],
    ref_value: Tensor | Sequence[Tensor],
    shift: Tensor | Sequence[Tensor],
    num_image_tokens: int,
    form: str = "split",
    text_queries_attend_reference: bool = False,
    mass: bool = False,
) -> Tensor:
    """Attention of [image; text] queries over base keys plus reference keys with the CADS shift.

    Args:
        query, key, value: (B, H, N, d) for the joint [image; text] sequence (or image only).
        ref_key, ref_value: (1, B / k or B, H, R, d): one row is expanded to the batch, one row per sample is
            repeated over the k guidance passes. When they are stored in a lower precision than the queries
            (a bf16 cache on a float32 model), the attention over them is computed in theirs. A list of them:
            several reference sets (subjects), each with its shift.
        shift: (B, N_image) shift beta_i of each image query (float32; -inf = no reference), or one per set.
        num_image_tokens: the image queries come first in the sequence.
        text_queries_attend_reference: text queries get logit shift 0 (plain union) instead of -inf.
        mass: ``shift`` is the log-odds of the image queries' reference mass, not a logit shift.
    """
    if isinstance(ref_key, Tensor):
        ref_key, ref_value, shift = [ref_key], [ref_value], [shift]
    batch, heads = query.shape[:2]
    # One row per sample (per-sample references) is repeated over the guidance passes, which diffusers stacks.
    ref_key = [k.expand(batch, heads, -1, -1) if k.shape[0] in (1, batch) else k.repeat(batch // k.shape[0], 1, 1, 1)
               for k in ref_key]
    ref_value = [v.expand(batch, heads, -1, -1) if v.shape[0] in (1, batch) else v.repeat(batch // v.shape[0], 1, 1, 1)
                 for v in ref_value]
    num_text = query.shape[2] - num_image_tokens
    if text_queries_attend_reference and num_text:
        shift = [torch.cat([s, s.new_zeros(batch, num_text)], dim=1) for s in shift]
    if form == "mask":
        ref_key, ref_value = [k.to(query.dtype) for k in ref_key], [v.to(query.dtype) for v in ref_value]
        return _cads_masked(query, key, value, ref_key, ref_value, shift, num_image_tokens if mass else 0)
    if form != "split":
        raise ValueError(f"unknown CADS form {form!r}; use 'split' or 'mask'")
    attending = shift[0].shape[1]  # queries that see the reference (image, or image + text)
    plain_mass = mass and attending == num_image_tokens  # the mass is sigmoid(beta_i): no log-sum-exp needed
    if plain_mass:
        base_out = F.scaled_dot_product_attention(query, key, value)
    else:
        base_out, base_lse = attention_with_lse(query, key, value)
    ref_outs, logits = [], []
    for k, v, s in zip(ref_key, ref_value, shift, strict=True):
        ref_query = query[:, :, :attending].to(k.dtype)
        if plain_mass:
            ref_outs.append(F.scaled_dot_product_attention(ref_query, k, v).to(query.dtype))
            logits.append(s[:, None, :])
            continue
        ref_out, ref_lse = attention_with_lse(ref_query, k, v)
        ref_outs.append(ref_out.to(query.dtype))
        logit = ref_lse - base_lse[:, :, :attending] + s[:, None, :]
        if mass:  # the image queries' mass is sigmoid(beta_i) itself; text queries keep the plain union
            logit = torch.cat([s[:, None, :num_image_tokens].expand(-1, heads, -1), logit[:, :, num_image_tokens:]],
                              dim=2)
        logits.append(logit)
    if len(ref_outs) > 1:
        return _mix_several(base_out, ref_outs, logits, attending)
    ref_out, mix = ref_outs[0], torch.sigmoid(logits[0]).to(query.dtype).unsqueeze(-1)
    if not torch.is_grad_enabled():
        # Inference: mix in place, no temporaries and no re-concatenation of the whole output.
        base_out[:, :, :attending].lerp_(ref_out, mix)
        return base_out
    mixed = base_out[:, :, :attending] + mix * (ref_out - base_out[:, :, :attending])
    if attending == query.shape[2]:
        return mixed
    return torch.cat([mixed, base_out[:, :, attending:]], dim=2)


def _mix_several(base_out: Tensor, ref_outs: list[Tensor], logits: list[Tensor], attending: int) -> Tensor:
    """out_i = w_0 out_i^B + sum_k w_k out_i^(R_k), w = softmax(0, logit_1, ..., logit_K) (docs/method.md)."""
    logits = torch.broadcast_tensors(*logits)
    weights = torch.softmax(torch.stack([torch.zeros_like(logits[0]), *logits]), dim=0).to(base_out.dtype)
    weights = weights.unsqueeze(-1)
    mixed = weights[0] * base_out[:, :, :attending]
    for weight, ref_out in zip(weights[1:], ref_outs, strict=True):
        mixed = mixed + weight * ref_out
    if attending == base_out.shape[2]:
        return mixed
    return torch.cat([mixed, base_out[:, :, attending:]], dim=2)


def _cads_masked(query: Tensor, key: Tensor, value: Tensor, ref_keys: list[Tensor], ref_values: list[Tensor],
                 shifts: list[Tensor], num_mass_queries: int = 0) -> Tensor:
    batch, heads, num_queries, _ = query.shape
    scale = 1.0 / math.sqrt(query.shape[-1])
    mask_heads = heads if num_mass_queries else 1  # the mass form's multiplier differs per head
    columns = []
    for ref_key, shift in zip(ref_keys, shifts, strict=True):
        padded = torch.full((batch, 1, num_queries), float("-inf"), device=query.device)
        padded[:, 0, : shift.shape[1]] = shift
        if num_mass_queries:
            # The multiplier that gives mass sigmoid(beta_i): beta_i - (LSE_R - LSE_B), per head.
            mass_query = query[:, :, :num_mass_queries]
            gap = (torch.logsumexp(torch.matmul(mass_query, ref_key.transpose(-1, -2)).float() * scale, dim=-1)
                   - torch.logsumexp(torch.matmul(mass_query, key.transpose(-1, -2)).float() * scale, dim=-1))
            padded = padded.expand(-1, heads, -1).clone()
            padded[:, :, :num_mass_queries] = padded[:, :, :num_mass_queries] - gap
        columns.append(padded[:, :, :, None].expand(-1, mask_heads, -1, ref_key.shape[2]))
    base = query.new_zeros(batch, mask_heads, num_queries, key.shape[2], dtype=torch.float32)
    mask = torch.cat([base, *columns], dim=3)
    keys, values = torch.cat([key, *ref_keys], dim=2), torch.cat([value, *ref_values], dim=2)
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask.to(query.dtype))


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
        fused = getattr(attn, "fused_projections", False)  # after fuse_qkv_projections: one matmul for q, k, v
        query, key, value = _project(attn, hidden_states, attn.to_qkv if fused else (attn.to_q, attn.to_k, attn.to_v),
                                     attn.norm_q, attn.norm_k)
        text_key = None
        if encoder_hidden_states is not None:
            text_q, text_key, text_v = _project(
                attn, encoder_hidden_states,
                attn.to_added_qkv if fused else (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
                attn.norm_added_q, attn.norm_added_k,
            )
            query = torch.cat([query, text_q], dim=2)
            key = torch.cat([key, text_key], dim=2)
            value = torch.cat([value, text_v], dim=2)

        if customshift_capture is not None:
            customshift_capture[self.name] = (key[:, :, :num_image], value[:, :, :num_image])

        if customshift is not None and customshift.active and self.name in customshift.beta:
            image_query = query[:, :, :num_image]
            refs = customshift.references
            competing = customshift.kappa is not None and self.name in customshift.kappa
            shifts, scores = zip(*[_shift_logits(customshift, i, self.name, image_query, text_key, competing)
                                   for i in range(len(refs))], strict=True)
            shifts = list(shifts)
            if competing and all(s is not None for s in scores):
                shifts = compete(shifts, list(scores), customshift.kappa[self.name])
            if customshift.shift_record is not None:
                customshift.shift_record.append(shifts)
            keys, values = [r.keys[self.name] for r in refs], [r.values[self.name] for r in refs]
            if len(refs) == 1:
                keys, values, shifts = keys[0], values[0], shifts[0]
            out = cads_attention(
                query, key, value, keys, values, shifts, num_image, form=customshift.form,
                text_queries_attend_reference=customshift.text_queries_attend_reference, mass=customshift.mass,
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


def _project(attn, states: Tensor, projections, norm_q, norm_k) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys, values (B, H, N, d) from three projections, or one fused one (``to_qkv``)."""
    batch = states.shape[0]
    if isinstance(projections, nn.Module):
        query, key, value = projections(states).chunk(3, dim=-1)
    else:
        query, key, value = (projection(states) for projection in projections)
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
