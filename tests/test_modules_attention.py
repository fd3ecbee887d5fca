"""lrpcpp.modules.MultiheadAttention: its forward against nn.MultiheadAttention's across the options,
its relevance against the same layer written with the unfused explicit ops (lf.linear_epsilon,
lf.matmul, lf.add2, lf.softmax: the decomposition of models/explicit/handlers._sdpa), from_module,
errors, TorchScript and torch.compile."""

import math

import lrpcpp.functional as lf
import lrpcpp.modules as lm
import pytest
import torch
from conftest import needs_redispatch
from torch import nn

f64 = torch.float64
E, H, L, S, N = 8, 2, 4, 5, 2


def make(dtype=f64, seed=0, **kwargs):
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(E, H, dtype=dtype, **kwargs).eval()
    with torch.no_grad():
        if mha.in_proj_bias is not None:  # torch initialises the biases to zero
            mha.in_proj_bias.normal_()
            mha.out_proj.bias.normal_()
    return mha


def case_inputs(name, dtype=f64):
    """(constructor options, query, key, value, call options) of a named case; seq-first unless
    batch_first. No row is fully masked (torch's need_weights path gives NaN there)."""
    g = torch.Generator().manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=f64).to(dtype)

    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[0, 3:] = True
    kpm[1, 1] = True
    causal = torch.ones(L, S, dtype=torch.bool).tril().logical_not()  # True: not attended
    opts, call = {}, {}
    q, k, v = randn(L, N, E), randn(S, N, E), randn(S, N, E)
    if name == "packed":
        pass
    elif name == "self-batch-first-bool-kpm":
        opts = {"batch_first": True}
        q = k = v = randn(N, S, E)
        call = {"key_padding_mask": kpm}
    elif name == "kvdim-float-masks":
        opts = {"kdim": 3, "vdim": 6}
        k, v = randn(S, N, 3), randn(S, N, 6)
        call = {"attn_mask": randn(L, S), "key_padding_mask": randn(N, S)}
    elif name == "nobias-3d-bool":
        opts = {"bias": False}
        mask = torch.rand(N * H, L, S, generator=g) > 0.6
        mask[..., 0] = False
        call = {"attn_mask": mask}
    elif name == "mixed-bool-float":
        call = {"attn_mask": randn(N * H, L, S), "key_padding_mask": kpm}
    elif name == "causal":
        q = k = v = randn(S, N, E)
        call = {"attn_mask": torch.ones(S, S, dtype=torch.bool).tril().logical_not(), "is_causal": True}
    elif name == "causal-kpm":
        q = k = v = randn(S, N, E)
        call = {"attn_mask": torch.ones(S, S, dtype=torch.bool).tril().logical_not(), "is_causal": True}
        call["key_padding_mask"] = kpm  # the first key stays attended in every row
    elif name == "bias-kv-zero-attn":
        opts = {"add_bias_kv": True, "add_zero_attn": True}
        call = {"attn_mask": randn(L, S), "key_padding_mask": kpm}
    elif name == "unbatched":
        q, k, v = randn(L, E), randn(S, E), randn(S, E)
        call = {"attn_mask": causal.unsqueeze(0).expand(H, L, S).clone(), "key_padding_mask": kpm[1]}
    else:
        raise AssertionError(name)
    return opts, q, k, v, call


CASES = [
    "packed",
    "self-batch-first-bool-kpm",
    "kvdim-float-masks",
    "nobias-3d-bool",
    "mixed-bool-float",
    "causal",
    "causal-kpm",
    "bias-kv-zero-attn",
    "unbatched",
]


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask and attn_mask is deprecated")
@pytest.mark.parametrize("dtype,tol", [(f64, 1e-12), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("name", CASES)
def test_forward_matches_torch(name, dtype, tol):
    opts, q, k, v, call = case_inputs(name, dtype)
    mha = make(dtype, **opts)
    ours = lm.MultiheadAttention.from_module(mha)
    for need_weights in (True, False):
        for average in (True, False):
            want, want_w = mha(q, k, v, need_weights=need_weights, average_attn_weights=average, **call)
            got, got_w = ours(q, k, v, need_weights=need_weights, average_attn_weights=average, **call)
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)
            if need_weights:
                torch.testing.assert_close(got_w, want_w, rtol=tol, atol=tol)
                assert not got_w.requires_grad
            else:
                assert got_w is None


def decomposition(mha, query, key, value, key_padding_mask=None, attn_mask=None, is_causal=False, method="attnlrp"):
    """The layer with the unfused explicit ops, float64, as the explicit rules decompose attention."""
    eps = 1e-6
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
    elif mha.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    tgt, bsz, src = query.size(0), query.size(1), key.size(0)
    d = E // H
    if mha.in_proj_weight is not None:
        ws = mha.in_proj_weight.split(E)
    else:
        ws = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
    bs = (None,) * 3 if mha.in_proj_bias is None else mha.in_proj_bias.split(E)
    heads = []
    for x, w, b, n in zip((query, key, value), ws, bs, (tgt, src, src)):
        heads.append(lf.linear_epsilon(x, w, b, eps).reshape(n, bsz, H, d).permute(1, 2, 0, 3))
    q, k, v = heads
    extra = 0
    if mha.bias_k is not None:
        k = torch.cat([k, mha.bias_k.detach().reshape(1, H, 1, d).expand(bsz, H, 1, d)], dim=2)
        v = torch.cat([v, mha.bias_v.detach().reshape(1, H, 1, d).expand(bsz, H, 1, d)], dim=2)
        extra += 1
    if mha.add_zero_attn:
        k = torch.cat([k, torch.zeros(bsz, H, 1, d, dtype=f64)], dim=2)
        v = torch.cat([v, torch.zeros(bsz, H, 1, d, dtype=f64)], dim=2)
        extra += 1
    if method == "cp-lrp":
        q, k = q.detach(), k.detach()
    scores = lf.matmul(q, k.transpose(-2, -1), eps)
    scale = 1.0 / math.sqrt(d)
    if is_causal:  # the is_causal hint, as torch takes it
        attn_mask = torch.ones(tgt, src, dtype=torch.bool).tril().logical_not()
    masks = []
    if attn_mask is not None:
        masks.append(attn_mask.reshape(bsz, H, tgt, src) if attn_mask.dim() == 3 else attn_mask)
    if key_padding_mask is not None:
        masks.append(key_padding_mask.reshape(bsz, 1, 1, src))
    masks = [torch.nn.functional.pad(m, [0, extra]) for m in masks]  # the appended keys are attended
    src += extra
    if all(m.dtype == torch.bool for m in masks):
        for m in masks:
            scores = scores.masked_fill(m, float("-inf"))
    else:
        mask = sum(
            torch.zeros(m.shape, dtype=f64).masked_fill(m, float("-inf")) if m.dtype == torch.bool else m for m in masks
        )
        scores = lf.add2(scores, mask / scale, eps)
    p = lf.softmax(scores, -1, 1.0 / scale)
    out = lf.matmul(p, v, eps).permute(2, 0, 1, 3).reshape(tgt, bsz, E)
    out = lf.linear_epsilon(out, mha.out_proj.weight, mha.out_proj.bias, eps)
    if not batched:
        return out.squeeze(1)
    return out.transpose(0, 1) if mha.batch_first else out


def relevance(fn, q, k, v):
    """Input relevance with the output seeded by itself; a shared tensor (self-attention) takes the sum."""
    inputs = {id(t): t.detach().clone().requires_grad_() for t in (q, k, v)}
    out = fn(inputs[id(q)], inputs[id(k)], inputs[id(v)])
    out.backward(out.detach())
    grads = [inputs[id(t)].grad for t in (q, k, v)]
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, (q, k, v))]  # None: no relevance


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask and attn_mask is deprecated")
@pytest.mark.parametrize("name", CASES)
def test_relevance_equals_unfused_decomposition(name):
    opts, q, k, v, call = case_inputs(name)
    mha = make(**opts)
    methods = ("attnlrp", "cp-lrp") if name in ("packed", "kvdim-float-masks") else ("attnlrp",)
    for method in methods:
        ours = lm.MultiheadAttention.from_module(mha, method=method)
        # need_weights=False: the only case where torch (and the layer) take the is_causal hint
        got = relevance(lambda a, b, c, m=ours: m(a, b, c, need_weights=False, **call)[0], q, k, v)
        hint = call.get("is_causal", False) and "key_padding_mask" not in call
        ref_call = dict(call, is_causal=hint)
        if hint:
            ref_call.pop("attn_mask")
        want = relevance(lambda a, b, c, kw=ref_call, m=method: decomposition(mha, a, b, c, method=m, **kw), q, k, v)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12 * float(w.abs().max()))
        if method == "cp-lrp" and q is not k:
            assert float(got[0].abs().max()) == 0.0 and float(got[1].abs().max()) == 0.0
    for p in mha.parameters():
        assert p.grad is None  # parameters take no relevance


def test_weights_do_not_change_relevance():
    _, q, k, v, call = case_inputs("mixed-bool-float")
    ours = lm.MultiheadAttention.from_module(make())
    with_weights = relevance(lambda a, b, c: ours(a, b, c, need_weights=True, **call)[0], q, k, v)
    without = relevance(lambda a, b, c, m=ours: m(a, b, c, need_weights=False, **call)[0], q, k, v)
    for a, b in zip(with_weights, without):
        assert torch.equal(a, b)


def test_from_module_and_constructor():
    for opts in ({}, {"kdim": 3, "vdim": 6, "bias": False, "batch_first": True, "add_bias_kv": True}):
        mha = make(**opts)
        ours = lm.MultiheadAttention.from_module(mha, epsilon=1e-4, method="cp-lrp")
        assert isinstance(ours, nn.MultiheadAttention)
        assert (ours.epsilon, ours.method) == (1e-4, "cp-lrp")
        for (n1, p1), (n2, p2) in zip(mha.named_parameters(), ours.named_parameters()):
            assert n1 == n2 and p1 is p2
        want, got = mha.state_dict(), ours.state_dict()
        assert list(got) == list(want) and all(torch.equal(got[n], want[n]) for n in want)
        torch.manual_seed(3)
        built = lm.MultiheadAttention(E, H, **opts)
        torch.manual_seed(3)
        ref = nn.MultiheadAttention(E, H, **opts)
        got, want = built.state_dict(), ref.state_dict()
        assert list(got) == list(want) and all(torch.equal(got[n], want[n]) for n in want)
        assert (built.epsilon, built.method) == (1e-6, "attnlrp")
        assert "method='attnlrp', epsilon=1e-06" in repr(built)
        ours.load_state_dict(ref.state_dict())  # checkpoints of the torch module load unchanged


def test_errors():
    with pytest.raises(ValueError, match="expected method 'attnlrp' or 'cp-lrp', got 'lrp'"):
        lm.MultiheadAttention(E, H, method="lrp")
    with pytest.raises(ValueError, match="expected epsilon >= 0"):
        lm.MultiheadAttention.from_module(nn.MultiheadAttention(E, H), epsilon=-1.0)
    with pytest.raises(TypeError, match="from_module expects a torch.nn.modules.activation.MultiheadAttention"):
        lm.MultiheadAttention.from_module(nn.Linear(E, E))
    with pytest.raises(TypeError, match=r"unknown options \['gamma'\]"):
        lm.MultiheadAttention.from_module(nn.MultiheadAttention(E, H), gamma=0.1)
    layer = lm.MultiheadAttention(E, H, dropout=0.1)
    x = torch.randn(L, N, E)
    with pytest.raises(RuntimeError, match=r"dropout is not supported .*call \.eval\(\)"):
        layer(x, x, x)
    layer.eval()
    assert layer(x, x, x)[0].shape == (L, N, E)  # dropout is off in eval mode, as in torch
    with pytest.raises(RuntimeError, match="is_causal is a hint .* expected attn_mask too"):
        layer(x, x, x, is_causal=True)
    with pytest.raises(ValueError, match=r"expected attn_mask of shape \[4, 4\] or \[4, 4, 4\], got \[4, 5\]"):
        layer(x, x, x, attn_mask=torch.zeros(L, S))
    with pytest.raises(ValueError, match=r"expected key_padding_mask of shape \[2, 4\], got \[4, 2\]"):
        layer(x, x, x, key_padding_mask=torch.zeros(L, N, dtype=torch.bool))
    with pytest.raises(TypeError, match="expected bool or floating-point masks, got torch.int64"):
        layer(x, x, x, attn_mask=torch.zeros(L, L, dtype=torch.long))
    with pytest.raises(ValueError, match="expected query, key and value all 3-D .* got 3-D, 2-D and 3-D"):
        layer(x, x[:, 0], x)


@pytest.mark.parametrize(
    "opts",
    [{}, {"kdim": 3, "vdim": 6, "bias": False, "add_bias_kv": True, "add_zero_attn": True}],
    ids=["packed", "separate-bias-kv"],
)
def test_script(opts):
    ours = lm.MultiheadAttention.from_module(make(**opts))
    scripted = torch.jit.script(ours)
    _, q, k, v, call = case_inputs("kvdim-float-masks" if opts else "mixed-bool-float")
    for need_weights in (True, False):
        want_out, want_w = ours(q, k, v, need_weights=need_weights, **call)
        got_out, got_w = scripted(q, k, v, need_weights=need_weights, **call)
        assert torch.equal(got_out, want_out)
        assert (got_w is None) == (want_w is None) and (got_w is None or torch.equal(got_w, want_w))
        want = relevance(lambda a, b, c, w=need_weights: ours(a, b, c, need_weights=w, **call)[0], q, k, v)
        got = relevance(lambda a, b, c, w=need_weights: scripted(a, b, c, need_weights=w, **call)[0], q, k, v)
        for g, w in zip(got, want):
            assert torch.equal(g, w)


@pytest.mark.slow
@pytest.mark.compile
def test_compile_fullgraph():
    _, q, k, v, call = case_inputs("self-batch-first-bool-kpm", torch.float32)
    ours = lm.MultiheadAttention.from_module(make(torch.float32, batch_first=True))
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True)
    for need_weights in (True, False):
        want = relevance(lambda a, b, c, w=need_weights: ours(a, b, c, need_weights=w, **call)[0], q, k, v)
        got = relevance(lambda a, b, c, w=need_weights: compiled(a, b, c, need_weights=w, **call)[0], q, k, v)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@needs_redispatch
def test_in_a_composite():
    """Opted in through module_map, the layer gives its own relevance; the default Composite (torch's
    layer under the explicit rules) gives the same up to rounding."""
    import lrpcpp
    from lrpcpp.models.composite import DEFAULT_MODULE_MAP

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = make(batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    model = Model().eval()
    x = torch.randn(N, S, E, dtype=f64)
    alone = relevance(
        lambda a, b, c: lm.MultiheadAttention.from_module(model.attn)(a, b, c, need_weights=False)[0], x, x, x
    )
    opted_in = lrpcpp.Composite(module_map={**DEFAULT_MODULE_MAP, nn.MultiheadAttention: lm.MultiheadAttention})
    for composite, exact in ((opted_in, True), (lrpcpp.Composite(), False)):
        with composite.context(model):
            got = relevance(lambda a, b, c: model(a), x, x, x)
        if exact:
            assert torch.equal(got[0], alone[0])
        else:
            torch.testing.assert_close(got[0], alone[0], rtol=1e-10, atol=1e-12)
