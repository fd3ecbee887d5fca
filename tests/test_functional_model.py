"""Explaining a plain-torch model (functional_model.py) given token ids: the hand-written AttnLRP
reference of that model checked on its own, lrpcpp.attribute against it, and the ``embedding=``
argument of lrpcpp.attribute (which module embeds ``input_ids``)."""

import lrpcpp
import models
import pytest
import torch
from functional_model import CLASSES, bias_free, build, inputs
from functional_reference import relevance
from lrpcpp.attribution import embedding_module
from torch import nn


@pytest.fixture(scope="module")
def model():
    return build()


def autograd_gradient_x_input(model, ids, mask, target):
    """Autograd's gradient of the target logit times the input embeddings (the model's own forward)."""
    leaf = model.tok(ids).detach().requires_grad_()
    hook = model.tok.register_forward_hook(lambda m, args, out: leaf)
    try:
        logit = model(ids, mask)[:, target]
    finally:
        hook.remove()
    (grad,) = torch.autograd.grad(logit.sum(), leaf)
    return grad * leaf.detach(), logit.detach()


# ----------------------------------------------------------------------------- the reference itself
@pytest.mark.parametrize("target", range(CLASSES))
def test_the_reference_with_plain_gradient_rules_is_autograds_gradient_x_input(model, target):
    ids, mask = inputs()
    got, logit = relevance(model, ids, mask, target, rules="gradient")
    want, want_logit = autograd_gradient_x_input(model, ids, mask, target)
    torch.testing.assert_close(logit, want_logit, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("target", range(CLASSES))
def test_the_reference_differs_from_the_gradient_where_the_rules_do(model, target):
    ids, mask = inputs()
    attnlrp, _ = relevance(model, ids, mask, target)
    plain, _ = relevance(model, ids, mask, target, rules="gradient")
    assert (attnlrp - plain).abs().max() > 1e-3 * plain.abs().max()


@pytest.mark.parametrize("target", range(CLASSES))
def test_the_reference_conserves_relevance_without_biases_under_cp_lrp(target):
    # CP-LRP keeps the softmax (the one non-conservative rule) out of the relevance flow; every
    # other rule conserves, so without biases the embeddings hold all of the logit
    ids, mask = inputs()
    got, logit = relevance(bias_free(build()), ids, mask, target, rules="cp")
    torch.testing.assert_close(got.sum(dim=(1, 2)), logit, rtol=1e-9, atol=1e-12)
    assert torch.all(got[mask == 0] == 0)  # padding takes no relevance


def test_the_reference_is_not_conservative_with_biases(model):
    ids, mask = inputs()
    got, logit = relevance(model, ids, mask, 0, rules="cp")
    assert (got.sum(dim=(1, 2)) - logit).abs().max() > 1e-3


# ----------------------------------------------------------------------------- lrpcpp against it
@pytest.mark.parametrize("method,rules", [("attnlrp", "attnlrp"), ("cp-lrp", "cp")])
@pytest.mark.parametrize("given", [True, False], ids=["embedding=model.tok", "found"])
@pytest.mark.parametrize("target", range(CLASSES))
def test_attribute_of_the_functional_model_is_the_reference(model, given, target, method, rules):
    """The operation level (the model has no family entry) against the hand-written rules. The
    identity rule's stabiliser sits where each side applies the rule (the library: on relu and on
    the square, one op at a time, and on F.rms_norm's output; the reference: on relu(x)^2 as one
    function, with the normaliser held constant), which moves the result by about eps/|x|; with
    eps = 1e-30 on both sides what is left is the rules themselves."""
    ids, mask = inputs()
    kw = {"embedding": model.tok} if given else {}
    got = lrpcpp.attribute(model, input_ids=ids, attention_mask=mask, target=target, method=method, epsilon=1e-30, **kw)
    assert got.coverage is not None and not got.coverage.unruled
    want, logit = relevance(model, ids, mask, target, rules=rules, identity_eps=1e-30)
    torch.testing.assert_close(got.output, logit, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.relevance, want, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- embedding=
def test_the_embedding_of_a_plain_model_is_found_as_the_first_embedding_called_with_the_ids(model):
    ids, mask = inputs()
    assert embedding_module(model, ids, None, {"attention_mask": mask}) is model.tok
    model.train()
    try:
        embedding_module(model, ids, None, {"attention_mask": mask})
        assert all(m.training for m in model.modules())  # the search runs in eval mode and puts it back
    finally:
        model.eval()


@pytest.fixture(scope="module")
def llama():
    return models.build("llama")


class IdsOnly(nn.Module):
    """A plain wrapper whose forward takes the ids (as its first positional argument ``idx``) and no
    embeddings, and which has no get_input_embeddings."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.spare = nn.Embedding(models.VOCAB, inner.config.hidden_size).to(torch.float64)

    def forward(self, idx):
        return self.inner(input_ids=idx).logits


class ReadsIds(nn.Module):
    """A forward that takes both inputs and treats embedded ids otherwise than given embeddings, as
    OpenLLaMA (a layer norm on embedded ids only) and DeepSeek-V4 (experts chosen by token id) do."""

    def __init__(self):
        super().__init__()
        self.embed, self.norm, self.head = nn.Embedding(10, 4), nn.LayerNorm(4), nn.Linear(4, 3)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids=None, inputs_embeds=None):
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        if input_ids is not None:
            inputs_embeds = self.norm(inputs_embeds) * (1 + input_ids % 2)[..., None]
        return self.head(torch.tanh(inputs_embeds)).sum(1)


def test_a_model_given_ids_runs_on_the_ids_as_it_does_without_lrpcpp():
    torch.manual_seed(0)
    model, ids = ReadsIds().double(), torch.tensor([[1, 2, 3, 4], [5, 6, 7, 9]])
    got = lrpcpp.attribute(model, input_ids=ids, target=0)
    with torch.no_grad():
        assert torch.equal(got.output, model(input_ids=ids)[:, 0])
        assert not torch.allclose(got.output, model(inputs_embeds=model.embed(ids))[:, 0])
    assert not model.embed._forward_hooks
    # the relevance of the embeddings the ids were embedded into, through the model's path for ids:
    # at the operation level, the layer norm's standard deviation held constant and tanh's identity
    # rule with its stabiliser (RULES.md section 2; epsilon 1e-10 in gradient mode), written out in float64
    got = lrpcpp.attribute(model, input_ids=ids, target=0, level="operations", strict=True)
    x = model.embed(ids).detach().requires_grad_()
    centred = x - x.mean(-1, keepdim=True)
    sigma = (centred.pow(2).mean(-1, keepdim=True) + model.norm.eps).sqrt().detach()
    h = (centred / sigma * model.norm.weight + model.norm.bias) * (1 + ids % 2)[..., None]
    t = h * (torch.tanh(h) / (h + 1e-10 * torch.where(h >= 0, 1.0, -1.0))).detach()
    (grad,) = torch.autograd.grad(model.head(t).sum(1)[:, 0].sum(), x)
    torch.testing.assert_close(got.relevance, x * grad, rtol=1e-10, atol=1e-14)


class TransposesIds(ReadsIds):
    """A forward that embeds the ids transposed (sequence first, as XLNet's): the embedding module is
    not called with the ids themselves, so the model is explained through ``inputs_embeds``."""

    def forward(self, input_ids=None, inputs_embeds=None):
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids.T.contiguous()).transpose(0, 1)
        return self.head(torch.tanh(self.norm(inputs_embeds))).sum(1)


def test_a_model_that_embeds_its_ids_transposed_is_explained_through_its_embeddings():
    torch.manual_seed(0)
    model, ids = TransposesIds().double(), torch.tensor([[1, 2, 3, 4], [5, 6, 7, 9]])
    got = lrpcpp.attribute(model, input_ids=ids, target=0, level="operations", strict=True)
    want = lrpcpp.attribute(model, inputs_embeds=model.embed(ids).detach(), target=0, level="operations")
    assert torch.equal(got.relevance, want.relevance) and torch.equal(got.output, want.output)
    assert sum(got.coverage.ruled.values()) == sum(want.coverage.ruled.values())  # (the ids' call counted nothing)
    assert not model.embed._forward_hooks


class TiedCopy(ReadsIds):
    """A forward that embeds its ids with a module of its own tied to ``get_input_embeddings()`` (the
    same weight parameter) and refuses embeddings, as T5's sequence classifier does."""

    def __init__(self):
        super().__init__()
        self.encoder_embed = nn.Embedding(10, 4)
        self.encoder_embed.weight = self.embed.weight

    def forward(self, input_ids=None, inputs_embeds=None):
        if input_ids is None:
            raise NotImplementedError("Passing input embeddings is not supported")
        return self.head(torch.tanh(self.norm(self.encoder_embed(input_ids)))).sum(1)


def test_ids_embedded_by_a_module_tied_to_the_input_embeddings_have_their_relevance():
    torch.manual_seed(0)
    model, ids = TiedCopy().double(), torch.tensor([[1, 2, 3, 4], [5, 6, 7, 9]])
    got = lrpcpp.attribute(model, input_ids=ids, target=0, level="operations", strict=True)
    want = lrpcpp.attribute(model, input_ids=ids, target=0, level="operations", embedding="encoder_embed")
    assert torch.equal(got.relevance, want.relevance) and torch.equal(got.output, want.output)
    assert got.relevance.abs().sum() > 0
    assert not model.embed._forward_hooks and not model.encoder_embed._forward_hooks


class _Doubled(nn.Embedding):
    def forward(self, input_ids):
        return 2 * super().forward(input_ids)


def test_a_tied_module_that_embeds_otherwise_keeps_its_own_embeddings():
    # the tied module's output is not the embeddings of get_input_embeddings(): replacing it would
    # change the model's value, so it is left alone (and this forward, which refuses embeddings, fails)
    model, ids = TiedCopy().double(), torch.tensor([[1, 2, 3, 4]])
    model.encoder_embed = _Doubled(10, 4).double()
    model.encoder_embed.weight = model.embed.weight
    with pytest.raises(NotImplementedError, match="Passing input embeddings is not supported"):
        lrpcpp.attribute(model, input_ids=ids, target=0)
    assert not model.embed._forward_hooks and not model.encoder_embed._forward_hooks


class _WithScale(nn.Embedding):
    """Returns the embeddings with a second output, as I-BERT's ``QuantEmbedding`` returns them with
    their quantisation scale (``None`` without quantisation)."""

    def forward(self, input_ids):
        return super().forward(input_ids), None


class EmbedsWithScale(ReadsIds):
    def __init__(self):
        super().__init__()
        self.embed = _WithScale(10, 4)

    def forward(self, input_ids=None, inputs_embeds=None):
        if inputs_embeds is None:
            inputs_embeds, scale = self.embed(input_ids)
            assert scale is None  # (the rest of the module's output reaches the forward as it was)
        return self.head(torch.tanh(self.norm(inputs_embeds))).sum(1)


@pytest.mark.parametrize("kind", ["ids", "ids or embeddings"])
def test_an_embedding_module_that_returns_a_tuple_gives_the_relevance_of_its_first_item(kind):
    torch.manual_seed(0)
    model, ids = EmbedsWithScale().double(), torch.tensor([[1, 2, 3, 4], [5, 6, 7, 9]])
    want = lrpcpp.attribute(model, inputs_embeds=model.embed(ids)[0].detach(), target=0, level="operations")
    if kind == "ids":  # a forward that takes no embeddings: called with the ids, the module's output replaced
        model.forward = lambda input_ids: EmbedsWithScale.forward(model, input_ids)
    got = lrpcpp.attribute(model, input_ids=ids, target=0, level="operations", strict=True)
    assert torch.equal(got.relevance, want.relevance) and torch.equal(got.output, want.output)
    assert got.relevance.abs().sum() > 0 and not model.embed._forward_hooks


class PromptsIds(ReadsIds):
    """A forward that casts its ids to int32 and puts prompt ids before them, then embeds them all, as
    CPM-Ant does (its forward takes no embeddings)."""

    def forward(self, input_ids):
        prompt = torch.tensor([[8, 9, 8]], dtype=torch.int32).expand(input_ids.shape[0], 3)
        h = self.embed(torch.cat([prompt, input_ids.to(torch.int32)], 1))
        return self.head(torch.tanh(self.norm(h))).sum(1)


def test_ids_that_the_forward_extends_keep_the_relevance_of_their_own_positions():
    torch.manual_seed(0)
    model, ids = PromptsIds().double(), torch.tensor([[1, 2, 3, 4], [5, 6, 7, 9]])
    got = lrpcpp.attribute(model, input_ids=ids, target=0, level="operations", strict=True)
    with torch.no_grad():
        assert torch.equal(got.output, model(ids)[:, 0])
    assert got.relevance.shape == (2, 4, 4) and not model.embed._forward_hooks  # the given positions only
    # written out in float64 (RULES.md section 2): the prompt's embeddings carry no relevance, the layer
    # norm's standard deviation is held constant, tanh takes the identity rule with its stabiliser
    x = model.embed(ids).detach().requires_grad_()
    prompt = model.embed(torch.tensor([[8, 9, 8]])).detach().expand(2, 3, 4)
    h = torch.cat([prompt, x], 1)
    centred = h - h.mean(-1, keepdim=True)
    sigma = (centred.pow(2).mean(-1, keepdim=True) + model.norm.eps).sqrt().detach()
    n = centred / sigma * model.norm.weight + model.norm.bias
    t = n * (torch.tanh(n) / (n + 1e-10 * torch.where(n >= 0, 1.0, -1.0))).detach()
    (grad,) = torch.autograd.grad(model.head(t).sum(1)[:, 0].sum(), x)
    torch.testing.assert_close(got.relevance, x * grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("embedding", [None, "embedded_name", "embedded_module"])
def test_embedding_given_or_not_gives_the_default_on_a_registered_model(llama, embedding):
    kw = models.inputs("llama")
    kw["attention_mask"] = torch.ones_like(kw["input_ids"])
    kw["attention_mask"][1, :2] = 0
    given = {None: None, "embedded_name": "model.embed_tokens", "embedded_module": llama.model.embed_tokens}
    want = lrpcpp.attribute(llama, target=5, **kw)
    got = lrpcpp.attribute(llama, target=5, embedding=given[embedding], **kw)
    assert torch.equal(got.relevance, want.relevance)


@pytest.mark.parametrize("embedding", [None, "inner.model.embed_tokens"])
def test_a_model_taking_only_ids_gets_the_embeddings_through_a_hook(llama, embedding):
    ids = models.inputs("llama")["input_ids"]
    wrapper = IdsOnly(llama)
    want = lrpcpp.attribute(llama, input_ids=ids, target=5)
    got = lrpcpp.attribute(wrapper, input_ids=ids, target=5, embedding=embedding)
    torch.testing.assert_close(got.relevance, want.relevance, rtol=1e-12, atol=1e-12)
    assert not llama.model.embed_tokens._forward_hooks  # the hook is gone


def test_an_embedding_the_forward_does_not_call_is_an_error(llama):
    wrapper = IdsOnly(llama)
    with pytest.raises(ValueError, match=r"embedding module \(Embedding\) was not called with input_ids"):
        lrpcpp.attribute(wrapper, input_ids=models.inputs("llama")["input_ids"], embedding=wrapper.spare)
    assert not wrapper.spare._forward_hooks


@pytest.mark.parametrize(
    "embedding,error,match",
    [
        ("model.embed_token", ValueError, r"embedding='model\.embed_token' names no module .*'model\.embed_tokens'"),
        (nn.Embedding(4, 32), ValueError, r"embedding= must be a module of the model .*not part of this Llama"),
        (3, TypeError, r"embedding= must be the nn\.Module that embeds input_ids or its name.*got int"),
    ],
)
def test_a_wrong_embedding_is_refused(llama, embedding, error, match):
    with pytest.raises(error, match=match):
        lrpcpp.attribute(llama, embedding=embedding, **models.inputs("llama"))


def test_embedding_without_input_ids_is_refused(llama):
    embeds = torch.randn(1, 3, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"embedding= is the module that embeds input_ids; give it with input_ids"):
        lrpcpp.attribute(llama, inputs_embeds=embeds, embedding=llama.model.embed_tokens)


class OneHot(nn.Module):
    """Embeds the ids without an nn.Embedding."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(8, 4, dtype=torch.float64))

    def forward(self, input_ids):
        return (nn.functional.one_hot(input_ids, 8).to(torch.float64) @ self.table).sum(dim=(1, 2))[:, None]


def test_a_model_without_an_embedding_says_what_to_pass():
    with pytest.raises(
        TypeError,
        match=r"input_ids needs model\.get_input_embeddings\(\).*calls no nn\.Embedding.*OneHot has no "
        r"get_input_embeddings.*embedding= \(the",
    ):
        lrpcpp.attribute(OneHot(), input_ids=torch.tensor([[1, 2, 3]]))
