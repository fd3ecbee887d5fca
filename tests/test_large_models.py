"""Large-model setups: Hugging Face activation checkpointing, and models dispatched or offloaded with
accelerate (``dispatch_model``, ``cpu_offload``, ``disk_offload``). Each gives the relevance of the
plain model, at both levels, and is left as it was."""

import copy
import warnings

import accelerate
import lrpcpp
import pytest
import torch
from models import build, inputs

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # gradient_checkpointing_enable's new name


def _first_attention(model):
    layer = model.model.layers[0] if hasattr(model, "model") else model.bert.encoder.layer[0]
    return layer.self_attn if hasattr(layer, "self_attn") else layer.attention


def _training_flags(model):
    return {n: m.training for n, m in model.named_modules()}


# ----------------------------------------------------------------------------- activation checkpointing
@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("level", ["registry", "operations"])
@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_recomputes_with_the_rules(family, level, method, reentrant):
    model, x = build(family), inputs(family)
    if family == "llama":  # checkpointing turns the cache off; so that the coverages compare, so does the plain call
        x["use_cache"] = False
    plain = lrpcpp.attribute(model, **x, level=level, method=method)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    checkpoint = model.model.layers[0]._gradient_checkpointing_func if family == "llama" else None
    flags = _training_flags(model)
    calls = []
    hook = _first_attention(model).register_forward_pre_hook(lambda m, a: calls.append(torch.is_grad_enabled()))
    result = lrpcpp.attribute(model, **x, level=level, method=method)
    hook.remove()
    # the layer ran twice: in the forward pass and, recomputed, in the backward pass
    assert len(calls) == 2
    assert torch.equal(result.relevance, plain.relevance)
    assert torch.equal(result.output, plain.output)
    if level == "operations":
        assert result.coverage == plain.coverage  # the recomputed calls are not counted again
    assert _training_flags(model) == flags
    assert all(p.requires_grad for p in model.parameters())
    if checkpoint is not None:
        assert model.model.layers[0]._gradient_checkpointing_func is checkpoint


def test_the_patch_names_the_modules_that_checkpoint_in_the_rules():
    """``handle.patched`` lists each module that checkpoints with "activation checkpointing in the rules",
    where nothing else was done to it; where something was, that stays its entry."""
    model = build("llama")
    model.gradient_checkpointing_enable()
    checkpointing = {n for n, m in model.named_modules() if callable(m.__dict__.get("_gradient_checkpointing_func"))}
    assert "model.layers.0" in checkpointing
    act = model.model.layers[0].mlp.act_fn  # an identity-rule unit, given a checkpoint function as well
    act._gradient_checkpointing_func = torch.utils.checkpoint.checkpoint
    try:
        for level in ("registry", "operations"):
            with lrpcpp.patch(model, level=level) as handle:
                noted = {n for n, w in handle.patched.items() if w == "activation checkpointing in the rules"}
                assert noted == checkpointing
                assert handle.patched["model.layers.0.mlp.act_fn"] == "identity rule"
    finally:
        del act._gradient_checkpointing_func


def test_checkpointing_explicit_mode():
    model, x = build("llama"), inputs("llama")
    plain = lrpcpp.attribute(model, **x, mode="explicit")
    model.gradient_checkpointing_enable()
    calls = []
    _first_attention(model).register_forward_pre_hook(lambda m, a: calls.append(1))
    result = lrpcpp.attribute(model, **x, mode="explicit")
    assert len(calls) == 2
    torch.testing.assert_close(result.relevance, plain.relevance, rtol=1e-10, atol=0)


def test_checkpointing_in_training_mode_stays_as_set():
    """The layers that checkpoint keep their training flag during the call; the rest is in eval mode
    (dropout off: two calls give the same relevance), and afterwards the flags are as they were."""
    model, x = build("bert", hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5), inputs("bert")
    plain = lrpcpp.attribute(model, **x)
    model.gradient_checkpointing_enable()
    model.train()
    assert torch.equal(lrpcpp.attribute(model, **x).relevance, plain.relevance)
    assert all(m.training for m in model.modules())


# ----------------------------------------------------------------------------- accelerate
def _device_map(model, tmp_path):
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    device_map = accelerate.infer_auto_device_map(
        model, max_memory={"cpu": size // 2}, no_split_module_classes=["LlamaDecoderLayer"]
    )
    assert set(device_map.values()) == {"cpu", "disk"}
    return accelerate.dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path), main_device="cpu")


DISPATCH = {
    "dispatch_model": _device_map,
    "cpu_offload": lambda model, tmp_path: accelerate.cpu_offload(model, execution_device="cpu"),
    "disk_offload": lambda model, tmp_path: accelerate.disk_offload(model, str(tmp_path), execution_device="cpu"),
}


def _hooks(model):
    """Every accelerate hook of the model and the forward it wraps."""
    return {
        n: (m._hf_hook, m.__dict__["forward"], m.__dict__["_old_forward"])
        for n, m in model.named_modules()
        if hasattr(m, "_hf_hook")
    }


@pytest.mark.parametrize("dispatch", sorted(DISPATCH))
@pytest.mark.parametrize("level", ["registry", "operations"])
def test_accelerate_dispatch_same_relevance(dispatch, level, tmp_path):
    model, x = build("llama"), inputs("llama")
    plain = lrpcpp.attribute(model, **x, level=level)
    dispatched = DISPATCH[dispatch](copy.deepcopy(model), tmp_path)
    hooks = _hooks(dispatched)
    assert hooks
    with torch.no_grad():
        before = dispatched(**x).logits
    grads = {n: p.requires_grad for n, p in dispatched.named_parameters()}
    result = lrpcpp.attribute(dispatched, **x, level=level)
    assert torch.equal(result.relevance, plain.relevance)
    # accelerate's hooks are in place, lrpcpp's patch is gone
    assert _hooks(dispatched) == hooks
    assert {n: p.requires_grad for n, p in dispatched.named_parameters()} == grads
    with torch.no_grad():
        assert torch.equal(dispatched(**x).logits, before)


def test_accelerate_patch_context_manager(tmp_path):
    model, x = build("llama"), inputs("llama")
    embeds = model.get_input_embeddings()(x["input_ids"]).detach()

    def relevance(m):
        leaf = embeds.clone().requires_grad_()
        with lrpcpp.patch(m):
            m(inputs_embeds=leaf).logits[:, -1].max(dim=-1).values.sum().backward()
        return leaf * leaf.grad

    plain = relevance(model)
    dispatched = accelerate.cpu_offload(copy.deepcopy(model), execution_device="cpu")
    hooks = _hooks(dispatched)
    assert torch.equal(relevance(dispatched), plain)
    assert _hooks(dispatched) == hooks


def test_accelerate_with_checkpointing(tmp_path):
    model, x = build("llama"), inputs("llama")
    plain = lrpcpp.attribute(model, **x, level="operations")
    dispatched = accelerate.disk_offload(copy.deepcopy(model), str(tmp_path), execution_device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        dispatched.gradient_checkpointing_enable()
    assert torch.equal(lrpcpp.attribute(dispatched, **x, level="operations").relevance, plain.relevance)
