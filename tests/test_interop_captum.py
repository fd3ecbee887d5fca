"""lrpcpp.interop.captum.AttnLRP against lrpcpp.attribute and Captum's own InputXGradient run inside
lrpcpp.patch (captum==0.9.0, requirements-test.txt): the same relevance, bitwise, in float64."""

import subprocess
import sys

import lrpcpp
import models as M
import pytest
import torch
from captum.attr import GradientAttribution, InputXGradient, NoiseTunnel
from lrpcpp.interop.captum import AttnLRP

TARGET = {"llama": 5, "bert": 1}


def case(family):
    """A model, its input embeddings and a padded attention mask (left padding for the decoder,
    right padding for the encoder)."""
    model = M.build(family)
    ids = M.inputs(family)["input_ids"]
    mask = torch.ones_like(ids)
    if family == "llama":
        mask[0, :2] = 0
    else:
        mask[1, -2:] = 0
    embeds = model.get_input_embeddings()(ids).detach()
    return model, embeds, mask


def next_token_logits(model):
    """A forward function as Captum's LayerIntegratedGradients examples write it: the embeddings and
    the mask in, one row of logits per example out (a language model's last position)."""

    def forward_func(inputs_embeds, attention_mask):
        logits = model(inputs_embeds=inputs_embeds, attention_mask=attention_mask).logits
        return logits[:, -1] if logits.dim() == 3 else logits

    return forward_func


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_model_equals_attribute(family):
    model, embeds, mask = case(family)
    expected = lrpcpp.attribute(model, inputs_embeds=embeds, attention_mask=mask, target=TARGET[family]).relevance
    explainer = AttnLRP(model)
    assert isinstance(explainer, GradientAttribution)
    got = explainer.attribute(embeds, target=TARGET[family], additional_forward_args=mask)
    assert got.shape == embeds.shape
    assert torch.equal(got, expected)
    # a tensor of one target per example, and no mask
    targets = torch.tensor([2, TARGET[family] - 1])
    expected = lrpcpp.attribute(model, inputs_embeds=embeds, target=targets).relevance
    assert torch.equal(explainer.attribute(embeds, target=targets), expected)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_captum_input_x_gradient_inside_patch_equals_attribute(family):
    model, embeds, mask = case(family)
    if family == "llama":  # Captum's forward function sees the last position: no left padding here
        mask = torch.ones_like(mask)
    expected = lrpcpp.attribute(model, inputs_embeds=embeds, attention_mask=mask, target=TARGET[family]).relevance
    forward_func = next_token_logits(model)
    with lrpcpp.patch(model):
        got = InputXGradient(forward_func).attribute(
            embeds.clone().requires_grad_(), target=TARGET[family], additional_forward_args=(mask,)
        )
    assert torch.equal(got.detach(), expected)
    # and without the patch, Captum's InputXGradient is plain gradient x input: another value
    plain = InputXGradient(forward_func).attribute(
        embeds.clone().requires_grad_(), target=TARGET[family], additional_forward_args=(mask,)
    )
    assert not torch.allclose(plain.detach(), expected)


def test_forward_func_of_a_classifier():
    """BERT as Captum's LayerIntegratedGradients examples call it: a function of the embeddings and
    the mask, given with the module it runs."""
    model, embeds, mask = case("bert")
    explainer = AttnLRP(next_token_logits(model), model=model)
    for target in (1, [0, 2], torch.tensor([2, 1])):
        ids = (
            target if isinstance(target, torch.Tensor) else torch.tensor(target if isinstance(target, list) else [1, 1])
        )
        expected = lrpcpp.attribute(model, inputs_embeds=embeds, attention_mask=mask, target=ids).relevance
        assert torch.equal(explainer.attribute(embeds, target=target, additional_forward_args=(mask,)), expected)
    # a bound method names its module
    assert AttnLRP(model.forward).model is model


def test_state_restored_and_usable_in_captum_wrappers():
    model, embeds, mask = case("bert")
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    explainer = AttnLRP(next_token_logits(model), model=model)
    explainer.attribute(embeds, target=1, additional_forward_args=(mask,))
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert not any(hasattr(m, "_lrpcpp_patch") for m in model.modules())
    # NoiseTunnel averages the method over noisy copies; with no noise each copy is the input itself
    tunnel = NoiseTunnel(explainer).attribute(
        embeds, nt_samples=2, stdevs=0.0, target=1, additional_forward_args=(mask,)
    )
    expected = explainer.attribute(embeds, target=1, additional_forward_args=(mask,))
    torch.testing.assert_close(tunnel, expected, rtol=1e-12, atol=1e-12)


def test_tuple_inputs():
    """Several inputs give a tuple of relevances of their shapes; the input not used gets zeros."""
    model, embeds, mask = case("bert")

    def forward_func(a, b, unused, attention_mask):
        return model(inputs_embeds=a + b, attention_mask=attention_mask).logits

    half = embeds / 2
    got = AttnLRP(forward_func, model=model).attribute(
        (half, half, torch.ones(2, 3, dtype=embeds.dtype)), target=1, additional_forward_args=mask
    )
    assert isinstance(got, tuple) and [g.shape for g in got] == [embeds.shape, embeds.shape, (2, 3)]
    expected = lrpcpp.attribute(model, inputs_embeds=embeds, attention_mask=mask, target=1).relevance
    torch.testing.assert_close(got[0] + got[1], expected)
    assert torch.equal(got[2], torch.zeros(2, 3, dtype=embeds.dtype))


def test_errors():
    model, embeds, mask = case("bert")
    with pytest.raises(TypeError, match="model= must be the torch.nn.Module"):
        AttnLRP(lambda x: x)
    with pytest.raises(TypeError, match="forward_func must be"):
        AttnLRP(3)
    explainer = AttnLRP(model)
    with pytest.raises(ValueError, match="one value per example"):
        explainer.attribute(embeds)  # [batch, classes] without a target
    with pytest.raises(ValueError, match="one input tensor"):
        explainer.attribute((embeds, embeds), target=1)
    with pytest.raises(TypeError, match="integer indices"):
        explainer.attribute(embeds, target=torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="one index per example"):
        explainer.attribute(embeds, target=[1, 2, 0])
    with pytest.raises(TypeError, match="target must be"):
        explainer.attribute(embeds, target="1")
    with pytest.raises(TypeError, match="must be floating point"):
        explainer.attribute(torch.ones(2, 6, dtype=torch.long), target=1)


def test_without_captum():
    """lrpcpp does not import Captum, and the adapter works without it (a plain class then)."""
    code = (
        "import sys; sys.modules['captum'] = None\n"
        "import torch, lrpcpp\n"
        "from lrpcpp.interop.captum import AttnLRP\n"
        "m = torch.nn.Sequential(torch.nn.Linear(3, 2, dtype=torch.float64))\n"
        "x = torch.randn(4, 3, dtype=torch.float64)\n"
        "r = AttnLRP(m).attribute(x, target=1)\n"
        "assert type(AttnLRP).__mro__[1] is object\n"
        "assert torch.allclose(r, x * m[0].weight[1].detach())\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
    imported = subprocess.run(
        [sys.executable, "-c", "import sys, lrpcpp; print('captum' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert imported.stdout.strip() == "False", imported.stderr


def test_tuple_targets_index_the_dims_after_the_batch():
    """Captum's tuple targets: (position, token) of a language model's [batch, seq, vocab] logits."""
    model, embeds, _ = case("llama")
    explainer = AttnLRP(lambda e: model(inputs_embeds=e).logits, model=model)
    last = embeds.shape[1] - 1
    expected = lrpcpp.attribute(model, inputs_embeds=embeds, target=5).relevance
    assert torch.equal(explainer.attribute(embeds, target=(last, 5)), expected)
    expected = lrpcpp.attribute(model, inputs_embeds=embeds, target=torch.tensor([5, 2])).relevance
    assert torch.equal(explainer.attribute(embeds, target=[(last, 5), (last, 2)]), expected)
