"""CADS attention: the two forms agree with each other and with the max-entropy formula written out."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0

from customshift.attention import (
    CADSAttnProcessor,
    CADSState,
    ReferenceSet,
    attention_with_lse,
    cads_attention,
    subject_relevance,
)


def _qkv(batch=2, heads=3, n=10, d=8, r=6, seed=0, ref_batch=1):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, d, generator=g) for _ in range(3))
    rk, rv = (torch.randn(ref_batch, heads, r, d, generator=g) for _ in range(2))
    return q, k, v, rk, rv


def _reference_formula(q, k, v, rk, rv, shift, num_image, text_attends):
    """Softmax over [base; reference] keys with shift_i added to the reference logits, written out."""
    batch, heads = q.shape[:2]
    rk, rv = rk.expand(batch, heads, -1, -1), rv.expand(batch, heads, -1, -1)
    scores = torch.cat([q @ k.transpose(-1, -2), q @ rk.transpose(-1, -2)], -1) / math.sqrt(q.shape[-1])
    bias = torch.full((batch, q.shape[2]), -math.inf)
    bias[:, :num_image] = shift
    if text_attends:
        bias[:, num_image:] = 0.0
    scores[..., k.shape[2] :] += bias[:, None, :, None]
    return torch.softmax(scores, -1) @ torch.cat([v, rv], 2)


@pytest.mark.parametrize("text_attends", [False, True])
@pytest.mark.parametrize("form", ["split", "mask"])
def test_cads_matches_max_entropy_formula(form, text_attends):
    q, k, v, rk, rv = _qkv()
    num_image = 7
    shift = torch.randn(2, num_image) * 2
    out = cads_attention(q, k, v, rk, rv, shift, num_image, form=form, text_queries_attend_reference=text_attends)
    expected = _reference_formula(q, k, v, rk, rv, shift, num_image, text_attends)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_split_and_mask_forms_agree():
    q, k, v, rk, rv = _qkv(batch=3, n=40, r=25, seed=3)
    shift = torch.randn(3, 30)
    shift[1] = -math.inf  # one sample with the reference switched off
    split = cads_attention(q, k, v, rk, rv, shift, 30, form="split")
    mask = cads_attention(q, k, v, rk, rv, shift, 30, form="mask")
    assert (split - mask).abs().max() <= 1e-5


@pytest.mark.parametrize("text_attends", [False, True])
@pytest.mark.parametrize("form", ["split", "mask"])
def test_mass_shift_sets_the_reference_mass_exactly(form, text_attends):
    """cads_shift="mass": image query i puts mass sigmoid(beta_i) on the reference, whatever the scores."""
    q, k, v, rk, rv = _qkv(seed=5)
    k = 4.0 * q  # base keys that score far above the reference keys
    num_image = 7
    shift = torch.randn(2, num_image)
    shift[0, 0] = -math.inf
    out = cads_attention(q, k, v, rk, rv, shift, num_image, form=form, text_queries_attend_reference=text_attends,
                         mass=True)
    base, _ = attention_with_lse(q, k, v)
    ref, _ = attention_with_lse(q, rk.expand(2, -1, -1, -1), rv.expand(2, -1, -1, -1))
    rho = torch.sigmoid(shift)[:, None, :, None]
    torch.testing.assert_close(out[:, :, :num_image], (1 - rho) * base[:, :, :num_image] + rho * ref[:, :, :num_image],
                               atol=1e-5, rtol=1e-5)
    union = _reference_formula(q, k, v, rk, rv, shift, num_image, text_attends)  # text queries: as logit mode
    torch.testing.assert_close(out[:, :, num_image:], union[:, :, num_image:], atol=1e-5, rtol=1e-5)


def test_mass_shift_keeps_gradients_when_reference_scores_are_low():
    """The logit form's gradient to beta vanishes once training pushes reference scores down; mass keeps it."""
    q, k, v, rk, rv = _qkv(seed=6)
    k = 10.0 * q
    grads = {}
    for mass in (False, True):
        beta = torch.zeros((), requires_grad=True)
        out = cads_attention(q, k, v, rk, rv, beta.expand(2, 10), 10, mass=mass)
        out.square().mean().backward()
        grads[mass] = beta.grad.abs().item()
    assert grads[True] > 1e-3 and grads[False] < 1e-3 * grads[True]


def test_reference_off_is_plain_attention_exactly():
    q, k, v, rk, rv = _qkv()
    shift = torch.full((2, 10), -math.inf)
    out = cads_attention(q, k, v, rk, rv, shift, 10, form="split")
    plain, _ = attention_with_lse(q, k, v)
    assert torch.equal(out, plain)


def test_large_shift_attends_to_reference_only():
    q, k, v, rk, rv = _qkv()
    out = cads_attention(q, k, v, rk, rv, torch.full((2, 10), 60.0), 10)
    ref_only = torch.softmax(q @ rk.transpose(-1, -2) / math.sqrt(8), -1) @ rv
    torch.testing.assert_close(out, ref_only.expand_as(out), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mass", [False, True])
def test_low_precision_reference_cache_computes_its_attention_in_that_precision(mass):
    """A bf16 K/V cache on float32 queries: float32 out, equal to the float32 cache up to bf16 rounding,
    and equal to running the reference attention on bf16-rounded queries (the precision is the cache's)."""
    q, k, v, rk, rv = _qkv(n=40, r=25, seed=9)
    shift = torch.randn(2, 30)
    full = cads_attention(q, k, v, rk, rv, shift, 30, mass=mass)
    half = cads_attention(q, k, v, rk.bfloat16(), rv.bfloat16(), shift, 30, mass=mass)
    assert half.dtype == torch.float32
    assert not torch.equal(half, full)
    torch.testing.assert_close(half, full, atol=3e-2, rtol=0)
    # The base keys' part (text queries) is untouched by the cache's precision.
    assert torch.equal(half[:, :, 30:], full[:, :, 30:])


def test_attention_with_lse_fused_and_explicit_agree():
    q, k, v, _, _ = _qkv(n=33)
    out, lse = attention_with_lse(q, k, v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ v, atol=1e-5, rtol=1e-5)
    q.requires_grad_(True)  # the differentiable path
    out_grad, lse_grad = attention_with_lse(q, k, v)
    torch.testing.assert_close(lse_grad, lse, atol=1e-5, rtol=1e-5)
    lse_grad.sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_subject_relevance_is_in_unit_interval_and_peaks_on_matching_queries():
    torch.manual_seed(0)
    heads, d = 2, 8
    text_key = torch.randn(1, heads, 5, d)
    weights = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0]])
    query = torch.randn(1, heads, 12, d) * 0.1
    query[:, :, 4] = text_key[:, :, 1] * 3  # query 4 looks like the subject token
    relevance = subject_relevance(query, text_key, weights)
    assert relevance.shape == (1, 12)
    assert relevance.min() >= 0 and relevance.max() <= 1
    assert relevance.argmax().item() == 4


@pytest.mark.parametrize("form", ["split", "mask"])
def test_shift_parameters_receive_gradients(form):
    q, k, v, rk, rv = _qkv()
    beta = torch.zeros((), requires_grad=True)
    gamma = torch.ones((), requires_grad=True)
    text_key = k[:, :, 7:]
    rel = subject_relevance(q[:, :, :7], text_key, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))
    out = cads_attention(q, k, v, rk, rv, beta + gamma * rel, 7, form=form)
    out.square().mean().backward()
    assert beta.grad.abs() > 0 and gamma.grad.abs() > 0


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
@pytest.mark.parametrize("context_pre_only", [False, True])
def test_processor_without_subject_equals_diffusers_joint_processor(qk_norm, context_pre_only):
    torch.manual_seed(0)
    attn = Attention(
        query_dim=16, added_kv_proj_dim=16, dim_head=4, heads=4, out_dim=16, context_pre_only=context_pre_only,
        bias=True, processor=JointAttnProcessor2_0(), qk_norm=qk_norm,
    )
    x, c = torch.randn(2, 9, 16), torch.randn(2, 5, 16)
    expected = attn(x, encoder_hidden_states=c)
    attn.set_processor(CADSAttnProcessor("block"))
    got = attn(x, encoder_hidden_states=c)
    for e, g in zip(expected, got, strict=True):
        if e is not None:
            assert torch.equal(e, g)


def test_processor_applies_cads_and_expands_reference_batch():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, added_kv_proj_dim=16, dim_head=4, heads=4, out_dim=16, context_pre_only=False,
                     bias=True, processor=CADSAttnProcessor("block"))
    x, c = torch.randn(4, 9, 16), torch.randn(4, 5, 16)
    plain = attn(x, encoder_hidden_states=c)
    ref = torch.randn(1, 4, 6, 4)
    state = CADSState(
        references=[ReferenceSet(keys={"block": ref}, values={"block": ref.flip(-1)}, log_scale=torch.zeros(4),
                                 subject_weights=torch.tensor([[1.0, 0, 0, 0, 0]] * 4))],
        beta={"block": torch.tensor(0.0)}, gamma={"block": torch.tensor(1.0)},
    )
    shifted = attn(x, encoder_hidden_states=c, customshift=state)
    assert not torch.allclose(plain[0], shifted[0])
    # Text queries do not attend to the reference by default: text outputs are unchanged.
    torch.testing.assert_close(plain[1], shifted[1])
    capture = {}
    attn(x, encoder_hidden_states=c, customshift_capture=capture)
    assert capture["block"][0].shape == (4, 4, 9, 4)


# ----------------------------------------------------------------------------------------------------------
# Several reference sets (several subjects): docs/method.md, "Several subjects"


@pytest.mark.parametrize("text_attends", [False, True])
@pytest.mark.parametrize("form", ["split", "mask"])
def test_several_reference_sets_match_the_gibbs_form_with_one_shift_per_set(form, text_attends):
    q, k, v, rk, rv = _qkv(seed=5)
    _, _, _, rk2, rv2 = _qkv(seed=6, r=4)
    num_image, batch, heads = 7, 2, 3
    shifts = [torch.randn(batch, num_image) * 2, torch.randn(batch, num_image) * 2]
    out = cads_attention(q, k, v, [rk, rk2], [rv, rv2], shifts, num_image, form=form,
                         text_queries_attend_reference=text_attends)
    # p'(j) proportional to exp(s_ij + beta_ik [j in R_k]) over [base; R_1; R_2], written out.
    keys = torch.cat([k, rk.expand(batch, heads, -1, -1), rk2.expand(batch, heads, -1, -1)], 2)
    values = torch.cat([v, rv.expand(batch, heads, -1, -1), rv2.expand(batch, heads, -1, -1)], 2)
    scores = q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])
    start = k.shape[2]
    for shift, ref in zip(shifts, (rk, rk2), strict=True):
        bias = torch.full((batch, q.shape[2]), 0.0 if text_attends else -math.inf)
        bias[:, :num_image] = shift
        scores[..., start : start + ref.shape[2]] += bias[:, None, :, None]
        start += ref.shape[2]
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ values, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("form", ["split", "mask"])
def test_several_reference_sets_get_exactly_their_constrained_masses(form):
    q, k, v, rk, rv = _qkv(seed=7)
    _, _, _, rk2, _ = _qkv(seed=8)
    ones = torch.ones_like(rv)
    shifts = [torch.randn(2, 10), torch.randn(2, 10)]
    # Values 1 on one reference set, 0 elsewhere: the output is that set's attention mass.
    zero = torch.zeros_like(v)
    mass_1 = cads_attention(q, k, zero, [rk, rk2], [ones, 0 * ones], shifts, 10, form=form, mass=True)[..., 0]
    mass_2 = cads_attention(q, k, zero, [rk, rk2], [0 * ones, ones], shifts, 10, form=form, mass=True)[..., 0]
    denominator = 1 + shifts[0].exp() + shifts[1].exp()  # rho_k = e^beta_k / (1 + sum_m e^beta_m)
    torch.testing.assert_close(mass_1, (shifts[0].exp() / denominator)[:, None].expand_as(mass_1), atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(mass_2, (shifts[1].exp() / denominator)[:, None].expand_as(mass_2), atol=1e-5,
                               rtol=1e-5)


def test_a_reference_set_switched_off_leaves_the_other_exactly():
    q, k, v, rk, rv = _qkv(seed=9)
    _, _, _, rk2, rv2 = _qkv(seed=10)
    shift = torch.randn(2, 10)
    single = cads_attention(q, k, v, rk, rv, shift, 10, mass=True)
    off = torch.full((2, 10), -math.inf)
    both = cads_attention(q, k, v, [rk, rk2], [rv, rv2], [shift, off], 10, mass=True)
    torch.testing.assert_close(both, single, atol=1e-6, rtol=1e-6)
