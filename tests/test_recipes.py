"""The epsilon rule of a layer keeps an element-wise explicit op's output by its recipe (lrpcpp/_recipes.py).

The relevance is bitwise that of the same forward with every input kept (saved-tensor hooks turn the
recipes off); the memory the forward keeps drops by exactly the recomputed tensors; nothing is
recomputed from values written in place.
"""

import gc

import lrpcpp.functional as lf
import lrpcpp.modules as lm
import pytest
import torch
from torch._C._profiler import _EventType
from torch.autograd.graph import saved_tensors_hooks
from torch.profiler import ProfilerActivity, profile

f64 = torch.float64
T, H, M, NH = 12, 16, 24, 4


def params(dtype=f64):
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) / shape[-1] ** 0.5).to(dtype)

    return {
        "ln1": 1 + r(H) / 4,
        "ln2": 1 + r(H) / 4,
        "q": r(H, H),
        "k": r(H, H),
        "v": r(H, H),
        "o": r(H, H),
        "gate": r(M, H),
        "up": r(M, H),
        "down": r(H, M),
    }


def heads(t):
    return t.view(1, T, NH, H // NH).transpose(1, 2)


def block(x, p):
    """A LLaMA-style block written with lrpcpp.functional ops."""
    h = lf.rms_norm_identity(x, [H], p["ln1"], 1e-6)
    q, k, v = (heads(lf.linear_epsilon(h, p[n])) for n in "qkv")
    a = lf.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(1, T, H)
    x = lf.add2(x, lf.linear_epsilon(a, p["o"]))
    h = lf.rms_norm_identity(x, [H], p["ln2"], 1e-6)
    gated = lf.mul2(lf.silu(lf.linear_epsilon(h, p["gate"])), lf.linear_epsilon(h, p["up"]))
    return lf.add2(x, lf.linear_epsilon(gated, p["down"]))


def mlp(x, p):
    """A BERT-style MLP: LayerNorm (epsilon rule), linear, GELU, linear."""
    h = lf.layer_norm(x, [H], p["ln1"], None, 1e-5)
    return lf.linear_epsilon(lf.gelu(lf.linear_epsilon(h, p["gate"])), p["down"])


def kept_bytes(fn, *inputs):
    """(output, bytes the forward leaves allocated beyond its output): what it keeps for the backward."""
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn(*inputs)
    total, nodes = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while nodes:
        node = nodes.pop()
        if node.tag == _EventType.Allocation:
            total += node.extra_fields.alloc_size
        nodes += node.children
    return out, total - out.untyped_storage().nbytes()


def recipes_save(fn, *inputs):
    """Bytes the forward of ``fn`` keeps without recipes (under saved-tensor hooks) minus with them."""
    _, with_recipes = kept_bytes(fn, *inputs)
    with saved_tensors_hooks(lambda t: t, lambda t: t):
        _, without = kept_bytes(fn, *inputs)
    return without - with_recipes


def relevance(fn, x, p, recipes=True):
    x = x.detach().clone().requires_grad_()
    if recipes:
        y = fn(x, p)
    else:
        with saved_tensors_hooks(lambda t: t, lambda t: t):  # any saved-tensor hooks turn recipes off
            y = fn(x, p)
    y.backward(y.detach())
    return x.grad


@pytest.mark.parametrize("fn", [block, mlp], ids=["llama_block", "bert_mlp"])
@pytest.mark.parametrize("dtype", [f64, torch.float32])
def test_relevance_bitwise_that_of_the_kept_inputs(fn, dtype):
    p = params(dtype)
    x = torch.randn(1, T, H, dtype=dtype)
    with_recipes, without = relevance(fn, x, p), relevance(fn, x, p, recipes=False)
    assert torch.equal(with_recipes, without)
    assert with_recipes.abs().sum() > 0


def test_block_keeps_neither_normalised_inputs_nor_the_gated_product():
    p = params()
    x = torch.randn(1, T, H, dtype=f64, requires_grad=True)
    # the two RMSNorm outputs [T, H] and the gated product [T, M]: recomputed from the block's input, the
    # residual stream after the attention (kept by the second add2) and the gate and up outputs (kept by
    # their layers)
    assert recipes_save(block, x, p) == (2 * T * H + T * M) * 8


def test_mlp_keeps_neither_the_layer_norm_output_nor_the_activation():
    p = params()
    x = torch.randn(1, T, H, dtype=f64, requires_grad=True)
    assert recipes_save(mlp, x, p) == (T * H + T * M) * 8  # lf.layer_norm keeps its input; the gate its output


def test_product_of_two_unkept_tensors_is_kept_itself():
    # mul2 of two normalised tensors: its recipe would hold two [T, H] tensors in place of one
    x1, x2 = (torch.randn(T, H, dtype=f64, requires_grad=True) for _ in range(2))
    w = torch.randn(H, H, dtype=f64)

    def fn(a, b):
        a2, b2 = a * 2, b * 2  # alive when the layer runs: the recipe would hold both
        return lf.linear_epsilon(lf.mul2(lf.rms_norm_identity(a2, [H]), lf.rms_norm_identity(b2, [H])), w)

    assert recipes_save(fn, x1, x2) == 0


def test_module_layers_use_recipes():
    # trainable parameters (a module holds them) as the modules come
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        lm.RMSNormIdentity(H), lm.LinearEpsilon(H, M), lm.GELUIdentity(), lm.LinearEpsilon(M, H)
    ).double()
    assert all(p.requires_grad for p in net.parameters())
    x = torch.randn(T, H, dtype=f64, requires_grad=True)
    assert recipes_save(net, x) == (T * H + T * M) * 8
    assert torch.equal(relevance(lambda t, _: net(t), x, None), relevance(lambda t, _: net(t), x, None, recipes=False))


def test_source_written_in_place_after_the_forward_is_an_error():
    x = torch.randn(T, H, dtype=f64, requires_grad=True)
    w = torch.randn(H, H, dtype=f64)
    source = x * 2
    y = lf.linear_epsilon(lf.rms_norm_identity(source, [H]), w)
    source.mul_(3)  # nothing else keeps it: only the recipe can tell
    with pytest.raises(RuntimeError, match=r"input of lrpcpp\.rms_norm_identity .* modified by an in-place"):
        y.backward(y.detach())


def test_input_written_in_place_before_the_layer_keeps_its_own_values():
    x = torch.randn(T, H, dtype=f64)
    w = torch.randn(H, H, dtype=f64)

    def fn(t, _):
        h = lf.rms_norm_identity(t, [H])
        h.mul_(2)  # the recipe would compute h before this
        return lf.linear_epsilon(h, w)

    assert torch.equal(relevance(fn, x, None), relevance(fn, x, None, recipes=False))


def test_source_written_in_place_before_the_layer_keeps_its_input():
    x = torch.randn(T, H, dtype=f64)
    w = torch.randn(H, H, dtype=f64)

    def fn(t, _):
        source = t * 2
        h = lf.rms_norm_identity(source, [H])
        source.add_(1)  # h stays what it is; a recipe would compute it from the new values
        return lf.linear_epsilon(h, w)

    assert torch.equal(relevance(fn, x, None), relevance(fn, x, None, recipes=False))


def test_source_freed_before_the_layer_keeps_its_input():
    x = torch.randn(T, H, dtype=f64)
    w = torch.randn(H, H, dtype=f64)
    r = relevance(lambda t, _: lf.linear_epsilon(lf.silu(t * 2), w), x, None)  # t * 2 is gone when the layer runs
    assert torch.equal(r, relevance(lambda t, _: lf.linear_epsilon(lf.silu(t * 2), w), x, None, recipes=False))


def test_backward_twice_and_with_checkpointing():
    p = params()
    x = torch.randn(1, T, H, dtype=f64, requires_grad=True)
    y = block(x, p)
    (first,) = torch.autograd.grad(y, x, y.detach(), retain_graph=True)
    (second,) = torch.autograd.grad(y, x, y.detach())
    assert torch.equal(first, second)
    leaf = x.detach().clone().requires_grad_()
    y = torch.utils.checkpoint.checkpoint(block, leaf, p, use_reentrant=False)
    y.backward(y.detach())
    assert torch.equal(leaf.grad, first)


def test_no_recipe_without_grad_or_while_scripting():
    x = torch.randn(T, H, dtype=f64, requires_grad=True)
    with torch.no_grad():
        assert not hasattr(lf.silu(x), "_lrpcpp_recipe")
    assert hasattr(lf.silu(x), "_lrpcpp_recipe")
    scripted = torch.jit.script(lm.SiLUIdentity())
    assert not hasattr(scripted(x), "_lrpcpp_recipe")


def test_one_recomputation_per_recipe():
    # q, k and v read one normalised input, gate and up another: each is computed once in the backward
    p = params()
    x = torch.randn(1, T, H, dtype=f64, requires_grad=True)
    y = block(x, p)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        y.backward(y.detach())
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls["lrpcpp::rms_norm_identity"] == 2
    # (the product into silu's output, computed just now: lrpcpp.mul2 is torch.mul)
    assert calls["lrpcpp::silu_identity"] == 1 and "lrpcpp::mul2" not in calls


def test_gated_product_broadcast_from_a_narrower_gate():
    # silu(gate) of one column times up: the product is wider than its first factor, so it is computed
    # into a new tensor, not into the first factor
    x = torch.randn(T, H, dtype=f64)
    w1, w2, w3 = (torch.randn(n, H if n != H else M, dtype=f64) for n in (1, M, H))

    def fn(t, _):
        return lf.linear_epsilon(lf.mul2(lf.silu(lf.linear_epsilon(t, w1)), lf.linear_epsilon(t, w2)), w3)

    assert torch.equal(relevance(fn, x, None), relevance(fn, x, None, recipes=False))
    assert recipes_save(fn, x.requires_grad_(), None) == T * M * 8
