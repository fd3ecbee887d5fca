"""The fused attention op (lrpcpp.scaled_dot_product_attention): its forward against torch's SDPA, its
relevance against the unfused explicit composition (lf.matmul -> mask -> lf.softmax -> lf.matmul, what
the explicit rules build for F.scaled_dot_product_attention) and against a float64 transcription of
RULES.md section 1, the cases of masks, GQA, tile boundaries and batch dimensions, what the backward
keeps, conservation where it holds, errors, and compile / export round trips."""

import math

import lrpcpp.functional as lf
import pytest
import reference as ref
import torch
import torch.nn.functional as F
from conftest import assert_relevance_close

f64 = torch.float64
ops = torch.ops.lrpcpp

NO_CUDA = "" if torch.cuda.is_available() and ops.cuda_version() > 0 else "no CUDA device or no CUDA build"


def inputs(lead, hq, hk, tq, tk, e, ev, dtype=f64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*lead, hq, tq, e, generator=g, dtype=f64)
    k = torch.randn(*lead, hk, tk, e, generator=g, dtype=f64)
    v = torch.randn(*lead, hk, tk, ev, generator=g, dtype=f64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def bool_mask(tq, tk, seed=1):
    m = torch.rand(tq, tk, generator=torch.Generator().manual_seed(seed)) > 0.4
    m[0] = False  # a row with no attended position: output 0, relevance 0
    return m


def float_mask(hq, tq, tk, seed=2):
    m = torch.randn(hq, tq, tk, generator=torch.Generator().manual_seed(seed), dtype=f64)
    m[:, 1, ::2] = float("-inf")
    m[0, 0] = float("-inf")  # one row fully masked
    return m


def composition(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, epsilon=1e-8):
    """The explicit rules' decomposition of F.scaled_dot_product_attention (models/explicit/handlers.py)."""
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    if enable_gqa and k.size(-3) != q.size(-3):
        k = k.repeat_interleave(q.size(-3) // k.size(-3), dim=-3)
        v = v.repeat_interleave(q.size(-3) // v.size(-3), dim=-3)
    scores = lf.matmul(q, k.transpose(-2, -1), epsilon)
    if is_causal:
        attn_mask = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool).tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(attn_mask.logical_not(), float("-inf"))
        else:
            scores = lf.add2(scores, attn_mask / scale, epsilon)
        fully = torch.isneginf(scores).all(-1, keepdim=True)
        scores = scores.masked_fill(fully, 0.0)
    p = lf.softmax(scores, -1, 1.0 / scale)
    if attn_mask is not None:
        p = p.masked_fill(fully, 0.0)
    return lf.matmul(p, v, epsilon)


def reference(q, k, v, R, attn_mask=None, is_causal=False, scale=None, epsilon=1e-8, method="attnlrp", carry="qkv"):
    """RULES.md section 1 on the composition, in float64 (tests/reference.py): the output and the
    relevance of q, k, v (None for those that take none)."""
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    groups = q.size(-3) // k.size(-3) if q.dim() >= 3 else 1
    kr, vr = k.repeat_interleave(groups, -3), v.repeat_interleave(groups, -3)
    s = q @ kr.mT
    if is_causal:
        attn_mask = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool).tril()
    bias = None
    if attn_mask is None:
        x = s
    elif attn_mask.dtype == torch.bool:
        x = s.masked_fill(~attn_mask, float("-inf"))
    else:
        bias = attn_mask / scale
        x = s + bias
    fully = torch.isneginf(x).all(-1, keepdim=True)
    x0 = x.masked_fill(fully, 0.0)
    p = torch.softmax(x0 * scale, -1).masked_fill(fully, 0.0)
    o = p @ vr
    qk = method == "attnlrp" and ("q" in carry or "k" in carry)
    rp, rvr = ref.matmul(p, vr, R, epsilon, a_relevant=qk, b_relevant="v" in carry)
    rv = ref.sum_to(rvr.unflatten(-3, (k.size(-3), groups)).sum(-3), v.shape) if "v" in carry else None
    if not qk:
        return o, None, None, rv
    rx = ref.softmax(x0, rp.masked_fill(fully, 0.0), -1, 1.0 / scale, s=p)
    rs = rx if bias is None else ref.add2(s, bias.expand_as(s), rx, epsilon)[0]
    rq, rkr = ref.matmul(q, kr.mT, rs, epsilon, a_relevant="q" in carry, b_relevant="k" in carry)
    rk = rkr.mT.unflatten(-3, (k.size(-3), groups)).sum(-3) if "k" in carry else None
    return o, rq, rk, rv


def explain(fn, q, k, v, carry="qkv", **kwargs):
    """fn's output and the relevance of q, k, v (seeded with the output)."""
    q, k, v = (t.detach().clone().requires_grad_(n in carry) for t, n in zip((q, k, v), "qkv"))
    out = fn(q, k, v, **kwargs)
    out.backward(out.detach())
    return out.detach(), q.grad, k.grad, v.grad


def fused(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, epsilon=1e-8, method="attnlrp"):
    return lf.scaled_dot_product_attention(
        q, k, v, attn_mask, 0.0, is_causal, scale, enable_gqa, method=method, epsilon=epsilon
    )


def assert_close64(actual, expected):
    if expected is None:
        assert actual is None or not actual.any()
        return
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10 * max(scale, 1e-30))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# name -> (shape arguments of `inputs`, keyword arguments of the attention)
CASES = {
    "plain": (((2,), 3, 3, 7, 9, 5, 4), {}),
    "causal": (((2,), 2, 2, 9, 9, 4, 4), {"is_causal": True}),
    "causal_rectangular": (((1,), 2, 2, 5, 8, 4, 3), {"is_causal": True}),
    "bool_mask": (((2,), 2, 2, 6, 7, 4, 4), {"attn_mask": bool_mask(6, 7)}),
    "float_mask": (((2,), 3, 3, 5, 6, 4, 4), {"attn_mask": float_mask(3, 5, 6)}),
    "gqa": (((2,), 6, 2, 5, 7, 4, 3), {"enable_gqa": True}),
    "gqa_causal_scale": (((1,), 4, 1, 6, 6, 3, 5), {"enable_gqa": True, "is_causal": True, "scale": 0.7}),
    "one_query": (((1,), 2, 2, 1, 1, 3, 2), {}),
    "tiles": (((1,), 1, 1, 65, 70, 3, 3), {"is_causal": True}),
    "tiles_mask": (((1,), 2, 2, 129, 65, 3, 2), {"attn_mask": torch.rand(129, 65, generator=_gen(3)) > 0.3}),
    "batch_dims": (((2, 3), 2, 2, 4, 5, 3, 3), {"attn_mask": torch.randn(3, 1, 4, 5, generator=_gen(4), dtype=f64)}),
    "no_heads": (((), 1, 1, 4, 6, 3, 3), {}),
    "eps": (((1,), 2, 2, 5, 5, 4, 4), {"epsilon": 0.3}),
    # more keys than one key tile of the CPU relevance kernel (512): partial last tiles, masks at offsets
    "key_tiles": (((1,), 1, 1, 3, 1100, 3, 3), {}),
    "key_tiles_causal": (((1,), 1, 1, 600, 600, 2, 2), {"is_causal": True}),
    "key_tiles_bool_mask": (((1,), 1, 1, 4, 600, 3, 3), {"attn_mask": bool_mask(4, 600)}),
    "key_tiles_float_mask": (((1,), 2, 2, 4, 600, 3, 3), {"attn_mask": float_mask(2, 4, 600)}),
    # a head's keys and values over 2 MiB (float64, 256 dims): the CPU kernels' taller query tiles (256
    # rows in the forward, 128 in the relevance), crossing query and key tiles
    "tall_tiles_causal": (((1,), 1, 1, 600, 600, 256, 256), {"is_causal": True}),
    "tall_tiles_float_mask": (((1,), 1, 1, 300, 600, 256, 256), {"attn_mask": float_mask(1, 300, 600)}),
}


def case_inputs(name, dtype=f64):
    (lead, hq, hk, tq, tk, e, ev), kwargs = CASES[name]
    q, k, v = inputs(lead, hq, hk, tq, tk, e, ev, dtype)
    if name == "no_heads":  # [T, E] tensors, no head dimension
        q, k, v = q[0], k[0], v[0]
    return q, k, v, dict(kwargs)


@pytest.mark.parametrize("name", sorted(CASES))
def test_relevance_equals_the_unfused_composition(name):
    q, k, v, kwargs = case_inputs(name)
    got = explain(fused, q, k, v, **kwargs)
    want = explain(composition, q, k, v, **kwargs)
    for a, b in zip(got, want):
        assert_close64(a, b)
    assert torch.isfinite(torch.cat([r.flatten() for r in got])).all()


@pytest.mark.parametrize("carry", ["qkv", "q", "k", "v", "qv"])
@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("name", ["float_mask", "gqa"])
def test_relevance_equals_the_rules_reference(name, method, carry):
    q, k, v, kwargs = case_inputs(name)
    got = explain(fused, q, k, v, carry=carry, method=method, **kwargs)
    kwargs.pop("enable_gqa", None)
    want = reference(q, k, v, got[0], method=method, carry=carry, **kwargs)
    for a, b in zip(got, want):
        assert_close64(a, b)


def test_cp_lrp_is_the_composition_with_constant_weights():
    q, k, v, kwargs = case_inputs("causal")
    got = explain(fused, q, k, v, method="cp-lrp", **kwargs)
    want = explain(composition, q.detach(), k.detach(), v, carry="v", **kwargs)
    assert got[1] is None and got[2] is None
    assert_close64(got[3], want[3])


@pytest.mark.parametrize("dtype", [f64, torch.float32], ids=str)
@pytest.mark.parametrize(
    "name", ["plain", "causal_rectangular", "bool_mask", "gqa", "tiles_mask", "batch_dims", "tall_tiles_causal"]
)
def test_forward_equals_torch(name, dtype):
    q, k, v, kwargs = case_inputs(name, dtype)
    if "attn_mask" in kwargs and kwargs["attn_mask"].is_floating_point():
        kwargs["attn_mask"] = kwargs["attn_mask"].to(dtype)
    if name == "bool_mask":
        kwargs["attn_mask"] = kwargs["attn_mask"].clone()
        kwargs["attn_mask"][0] = True  # torch's SDPA gives NaN in rows with no attended position
    tol = 1e-12 if dtype == f64 else 1e-5
    torch.testing.assert_close(
        fused(q, k, v, **kwargs), F.scaled_dot_product_attention(q, k, v, **kwargs), rtol=tol, atol=tol
    )


@pytest.mark.parametrize("device", ["cpu", "meta"] + ([] if NO_CUDA else ["cuda"]))
def test_merging_the_heads_of_the_output_is_a_view(device):
    # the output is laid out [..., T, H, E] in memory (as torch's SDPA on the CPU), on every backend alike
    for lead in [(2,), (2, 3), ()]:
        q, k, v = (t.to(device) for t in inputs(lead, 4, 2, 5, 6, 3, 7, torch.float32))
        out = fused(q, k, v, enable_gqa=True)
        merged = out.transpose(-3, -2).reshape(*lead, 5, 4 * 7)
        assert out.shape == (*lead, 4, 5, 7)
        assert out.transpose(-3, -2).is_contiguous()
        assert merged.data_ptr() == out.data_ptr() and merged._base is not None
    no_heads = fused(*(t.to(device)[0] for t in inputs((), 1, 1, 4, 6, 3, 3, torch.float32)))
    assert no_heads.shape == (4, 3) and no_heads.is_contiguous()


def layout(t):
    """The strides of t's dimensions of size above one (those of size one address nothing)."""
    return [s for s, n in zip(t.stride(), t.shape) if n > 1]


@pytest.mark.parametrize("dtype", [f64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", ["cpu", "meta"] + ([] if NO_CUDA else ["cuda"]))
def test_relevance_is_laid_out_as_its_input(device, dtype):
    # heads split from a projection by view and transpose ([..., T, H, E] in memory) get their relevance
    # laid out so (the view's backward then passes it on without a copy); dense heads get dense
    # relevance; GQA key heads and batch dimensions alike; on every backend
    for lead, hq, hk in [((2,), 4, 4), ((2, 3), 4, 2), ((), 2, 1)]:
        by_position = [
            torch.randn(*lead, 5, h, e, dtype=dtype).to(device).transpose(-3, -2)
            for h, e in [(hq, 3), (hk, 3), (hk, 7)]
        ]
        dense = [t.contiguous() for t in by_position]
        for q, k, v in (by_position, dense):
            out, lse = ops.scaled_dot_product_attention_forward(q, k, v, None, True, None, True)
            rel = ops.scaled_dot_product_attention_relevance(
                out, q, k, v, None, out, lse, True, None, True, 1e-8, [True, True, True]
            )
            assert [layout(r) for r in rel] == [layout(t) for t in (q, k, v)]


@pytest.mark.parametrize("dtype", [f64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["causal", "bool_mask", "float_mask"])
def test_inputs_laid_out_by_position_give_the_same_results(name, dtype):
    # q, k, v as views of [B, T, H, E] tensors (as a model's heads are): no copy of the whole tensors, a
    # dense copy of one head at a time inside the kernels
    q, k, v, kwargs = case_inputs(name, dtype)
    if "attn_mask" in kwargs and kwargs["attn_mask"].is_floating_point():
        kwargs["attn_mask"] = kwargs["attn_mask"].to(dtype)
    by_position = [t.transpose(-3, -2).contiguous().transpose(-3, -2) for t in (q, k, v)]
    assert not by_position[0].is_contiguous()
    tol = {f64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    for a, b in zip(explain(fused, *by_position, **kwargs), explain(fused, q, k, v, **kwargs)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()))


def test_rows_without_attended_positions_give_zero_output_and_relevance():
    q, k, v = inputs((1,), 2, 2, 3, 4, 3, 3)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1] = False
    out, rq, rk, rv = explain(fused, q, k, v, attn_mask=mask)
    assert (out[:, :, 1] == 0).all() and (rq[:, :, 1] == 0).all()
    _, lse = ops.scaled_dot_product_attention_forward(q, k, v, mask)
    assert torch.isneginf(lse[:, :, 1]).all() and torch.isfinite(lse[:, :, [0, 2]]).all()


@pytest.mark.parametrize("is_causal", [False, True])
def test_scores_below_the_float_range_carry_no_relevance(is_causal):
    # q . k below float32's range is -inf: weight 0, and the softmax rule's x' is 0 there (not -inf * 0)
    q, k, v = inputs((1,), 1, 1, 6, 6, 4, 4, dtype=torch.float32)
    q[..., 4, :] = 1e30
    k[..., 1, :] = -1e30  # attended by query 4
    k[..., 5, :] = -1e30  # after query 4: masked under is_causal
    for t in explain(fused, q, k, v, is_causal=is_causal):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("is_causal", [False, True])
def test_float32_weights_over_the_whole_exponent_range(is_causal):
    # scores whose differences from their row's maximum run from 0 to below -100: the CPU kernels' own
    # float exp (the forward's weights, the relevance's P) meets every range of its argument, including
    # where exp underflows. With v the identity the output is the weights themselves: each against
    # float64 (relative to itself; the argument x / T - max alone is rounded to about 1e-5 at such
    # scores), the log-sum-exp, and the relevance of v, which is P^T times the output's normalised
    # relevance (q's and k's pass through the softmax rule's differences, which float32 resolves less
    # well at such scores, whichever the exp)
    t = 300
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, t, 8, generator=g, dtype=f64)
    k = torch.randn(1, 2, t, 8, generator=g, dtype=f64)
    q = q * torch.linspace(0.0, 12.0, t, dtype=f64).view(1, 1, t, 1)
    v = torch.eye(t, dtype=f64).expand(1, 2, t, t)
    x = (q @ k.mT) / math.sqrt(8)
    if is_causal:
        x = x.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    assert (x.amax(-1) - x.masked_fill(x.isinf(), 0.0).amin(-1)).max().item() > 100
    out, _, _, rv = explain(fused, q.float(), k.float(), v.float(), is_causal=is_causal)
    _, lse = ops.scaled_dot_product_attention_forward(q.float(), k.float(), v.float(), None, is_causal)
    _, _, _, want_rv = reference(q, k, v, out.double(), is_causal=is_causal)
    torch.testing.assert_close(out.double(), x.softmax(-1), rtol=3e-5, atol=1e-37)
    torch.testing.assert_close(lse.double(), x.logsumexp(-1), rtol=1e-6, atol=1e-6)
    assert_relevance_close(rv, want_rv, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_reduced_precision_against_float64(dtype):
    q, k, v, kwargs = case_inputs("causal", dtype)
    out, *rel = explain(fused, q, k, v, **kwargs)
    assert out.dtype == dtype and all(r.dtype == dtype for r in rel)
    _, *want = reference(q.double(), k.double(), v.double(), out.double(), **kwargs)
    for r, w in zip(rel, want):
        assert_relevance_close(r, w, dtype)


def test_conservation():
    # the matmul rules conserve up to eps: P v gives half of R to v (and all of it under cp-lrp); the
    # softmax rule does not conserve (its bias term), so nothing is claimed for q and k
    q, k, v, _ = case_inputs("plain")
    out, _, _, rv = explain(fused, q, k, v)
    torch.testing.assert_close(rv.sum(), out.sum() / 2, rtol=1e-6, atol=0)
    out, _, _, rv = explain(fused, q, k, v, method="cp-lrp")
    torch.testing.assert_close(rv.sum(), out.sum(), rtol=1e-6, atol=0)


def test_the_backward_keeps_no_score_matrix():
    # what autograd saves: q, k, v, the output and the row statistics; nothing of size T_q x T_k
    tq = tk = 96
    q, k, v = (t.requires_grad_() for t in inputs((1,), 2, 2, tq, tk, 8, 8, torch.float32))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = fused(q, k, v, is_causal=True)
    assert saved and all(math.prod(s) <= 2 * 96 * 8 for s in saved), saved
    out.backward(out.detach())
    assert torch.isfinite(q.grad).all()


def test_empty_inputs():
    q, k, v = inputs((1,), 2, 2, 0, 3, 4, 4)
    out, rq, rk, rv = explain(fused, q, k, v)
    assert out.shape == (1, 2, 0, 4) and rq.shape == q.shape and (rk == 0).all() and (rv == 0).all()
    q, k, v = inputs((1,), 2, 2, 3, 0, 4, 4)
    out, rq, _, _ = explain(fused, q, k, v)
    assert out.shape == (1, 2, 3, 4) and (out == 0).all() and (rq == 0).all()


def test_double_backward_is_an_error():
    q, k, v = (t.requires_grad_() for t in inputs((1,), 2, 2, 3, 3, 2, 2))
    out = fused(q, k, v)
    (rq,) = torch.autograd.grad(out, q, out.detach(), create_graph=True)
    with pytest.raises(RuntimeError, match="scaled_dot_product_attention_relevance"):
        rq.sum().backward()


ERRORS = [
    (lambda q, k, v: fused(q[0, 0, 0], k, v), "same number"),
    (lambda q, k, v: fused(q, k[:, :1], v[:, :1]), "same number of heads.*enable_gqa"),
    (lambda q, k, v: fused(torch.cat([q, q[:, :1]], 1), k, v, enable_gqa=True), "multiple of the number of key"),
    # no key heads: an error, not a division by zero (0 % 0) while checking
    (lambda q, k, v: fused(q, k[:, :0], v[:, :0], enable_gqa=True), "multiple of the number of key"),
    (lambda q, k, v: fused(q[:, :0], k[:, :0], v[:, :0], enable_gqa=True), "multiple of the number of key"),
    (lambda q, k, v: fused(q, k[..., :2], v), "same embedding size"),
    (lambda q, k, v: fused(q, k, v[..., :2, :]), "same sequence length"),
    (lambda q, k, v: fused(q, k.float(), v), "key to have the dtype of query"),
    (lambda q, k, v: fused(q, k, v, attn_mask=torch.ones(3, 3, dtype=torch.bool), is_causal=True), "attn_mask or is_c"),
    (lambda q, k, v: fused(q, k, v, attn_mask=torch.ones(3, 3, dtype=torch.float32)), "attn_mask to be a bool"),
    (lambda q, k, v: fused(q, k, v, attn_mask=torch.ones(2, 3, dtype=torch.bool)), "attn_mask to broadcast"),
    (lambda q, k, v: fused(q, k, v, scale=-1.0), "scale to be a finite number > 0"),
    (lambda q, k, v: fused(q, k, v, method="lrp"), 'method to be "attnlrp" or "cp-lrp"'),
    (lambda q, k, v: fused(q, k, v, epsilon=-1.0), "epsilon"),
    (lambda q, k, v: lf.scaled_dot_product_attention(q, k, v, dropout_p=0.1), "dropout_p=0.0"),
]


@pytest.mark.parametrize("i", range(len(ERRORS)))
def test_errors_name_the_op_and_the_argument(i):
    fn, match = ERRORS[i]
    q, k, v = inputs((1,), 2, 2, 3, 3, 4, 4)
    with pytest.raises((RuntimeError, ValueError), match=match) as info:
        fn(q, k, v)
    assert "scaled_dot_product_attention" in str(info.value)


def test_relevance_op_checks_its_statistics():
    q, k, v = inputs((1,), 2, 2, 3, 3, 4, 4)
    out, lse = ops.scaled_dot_product_attention_forward(q, k, v)
    with pytest.raises(RuntimeError, match="logsumexp to be Double"):
        ops.scaled_dot_product_attention_relevance(
            out, q, k, v, None, out, lse.float(), False, None, False, 1e-8, [True, True, True]
        )
    with pytest.raises(RuntimeError, match="logsumexp to have the shape"):
        ops.scaled_dot_product_attention_relevance(
            out, q, k, v, None, out, lse[..., :2], False, None, False, 1e-8, [True, True, True]
        )


def test_autocast_runs_the_attention_in_the_lower_precision():
    q, k, v = (t.float().requires_grad_() for t in inputs((1,), 2, 2, 5, 5, 4, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused(q, k, v, is_causal=True)
    assert out.dtype == torch.bfloat16
    out.float().backward(out.float().detach())
    _, *want = reference(
        q.detach().double(), k.detach().double(), v.detach().double(), out.detach().double(), is_causal=True
    )
    for t, w in zip((q, k, v), want):
        assert_relevance_close(t.grad, w, torch.bfloat16)


class _Attention(torch.nn.Module):
    def forward(self, q, k, v):
        return fused(q, k, v, is_causal=True)


def _relevance(model, q, k, v):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = model(q, k, v)
    out.backward(out.detach())
    return q.grad, k.grad, v.grad


@pytest.mark.slow
@pytest.mark.compile
def test_compile_fullgraph_and_export():
    q, k, v = inputs((1,), 2, 2, 5, 5, 4, 4, torch.float32)
    model = _Attention()
    expected = _relevance(model, q, k, v)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for got, want in zip(_relevance(compiled, q, k, v), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    q2, k2, v2 = inputs((1,), 2, 2, 7, 7, 4, 4, torch.float32, seed=3)
    for got, want in zip(_relevance(compiled, q2, k2, v2), _relevance(model, q2, k2, v2)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    program = torch.export.export(model, (q, k, v))
    for got, want in zip(_relevance(program.module(), q, k, v), expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(bool(NO_CUDA), reason=NO_CUDA or "-")
@pytest.mark.parametrize("carry", ["qkv", "k", "v"])
@pytest.mark.parametrize("dtype", [f64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["plain", "causal", "float_mask", "bool_mask", "gqa", "tiles_mask", "batch_dims"])
def test_cuda_equals_the_reference(name, dtype, carry):
    q, k, v, kwargs = case_inputs(name, dtype)
    mask = kwargs.get("attn_mask")
    if mask is not None:
        kwargs["attn_mask"] = (mask if mask.dtype == torch.bool else mask.to(dtype)).cuda()
    out, *got = explain(fused, q.cuda(), k.cuda(), v.cuda(), carry=carry, **kwargs)
    kwargs.pop("enable_gqa", None)
    if mask is not None:
        kwargs["attn_mask"] = mask if mask.dtype == torch.bool else mask.to(dtype).double()
    want_out, *want = reference(q.double(), k.double(), v.double(), out.double().cpu(), carry=carry, **kwargs)
    assert_relevance_close(out.cpu(), want_out, dtype)
    for g, w in zip(got, want):
        if w is None:
            assert g is None
        else:
            assert_relevance_close(g.cpu(), w, dtype)
