"""lrpcpp.attribute refuses what it cannot explain, with a message naming the argument; and what it
accepts (preset options, wrappers, padded batches) it explains as documented."""

import dataclasses
import warnings

import lrpcpp
import numpy as np
import pytest
import torch
from lrpcpp import rules as P
from models import build, inputs
from torch import nn


@pytest.fixture(scope="module")
def gpt2():
    return build("gpt2")


# ----------------------------------------------------------------------------- targets
@pytest.mark.parametrize("target", [torch.tensor(1.7), torch.tensor([1.0, 2.0]), torch.tensor([True, False])])
def test_a_non_integer_target_tensor_is_refused(gpt2, target):
    with pytest.raises(TypeError, match=r"target must hold integer class or token ids, got a torch\.(float|bool)"):
        lrpcpp.attribute(gpt2, target=target, **inputs("gpt2"))


@pytest.mark.parametrize("target", [[1.7, 2], [True], [], 1.7, "3"])
def test_a_non_integer_target_is_refused(gpt2, target):
    with pytest.raises(TypeError, match="target"):
        lrpcpp.attribute(gpt2, target=target, **inputs("gpt2"))


@pytest.mark.parametrize("target", [-1, 64, torch.tensor([3, -2]), [5, 64]])
def test_out_of_range_target_ids_are_refused(gpt2, target):
    with pytest.raises(ValueError, match=r"target ids must lie in \[0, 64\)"):
        lrpcpp.attribute(gpt2, target=target, **inputs("gpt2"))


@pytest.mark.parametrize("target", [torch.tensor([1, 2, 3]), torch.tensor([[1], [2]])])
def test_a_per_row_target_of_the_wrong_shape_is_refused(gpt2, target):
    with pytest.raises(ValueError, match=r"target tensor holds one id, or one id per batch item \(shape \[2\]\)"):
        lrpcpp.attribute(gpt2, target=target, **inputs("gpt2"))


def test_integer_targets_of_every_accepted_kind_agree(gpt2):
    kw = inputs("gpt2")
    ref = lrpcpp.attribute(gpt2, target=5, **kw)
    for same in (np.int64(5), torch.tensor(5), torch.tensor([5]), torch.tensor([5, 5], dtype=torch.int32)):
        got = lrpcpp.attribute(gpt2, target=same, **kw)
        torch.testing.assert_close(got.relevance, ref.relevance, rtol=0, atol=0)
        assert got.target.tolist() == [5, 5]


# ----------------------------------------------------------------------------- callable targets
@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda out: out.logits[:, -1, 3].detach(), ValueError, "does not depend on the model output"),
        (lambda out: torch.zeros(2), ValueError, "does not depend on the model output"),
        (
            lambda out: out.logits[:, -1, :2],
            ValueError,
            r"one value per batch item \(shape \[2\]\).*got shape \(2, 2\)",
        ),
        (lambda out: out.logits[:, -2:, 3].flatten(), ValueError, r"shape \[2\].*got shape \(4,\)"),
        (lambda out: out.logits[0, -1, 3].tolist(), TypeError, "callable target must return a tensor, got float"),
    ],
)
def test_a_callable_target_must_return_a_value_per_row_that_depends_on_the_output(gpt2, make, error, match):
    with pytest.raises(error, match=match):
        lrpcpp.attribute(gpt2, target=make, **inputs("gpt2"))


def test_a_callable_target_may_return_one_value_for_the_whole_batch(gpt2):
    kw = inputs("gpt2")
    both = lrpcpp.attribute(gpt2, target=lambda out: out.logits[:, -1, 3].sum(), **kw)
    rows = lrpcpp.attribute(gpt2, target=3, **kw)
    torch.testing.assert_close(both.relevance, rows.relevance, rtol=1e-12, atol=1e-12)
    assert both.output.shape == (1,)


# ----------------------------------------------------------------------------- presets
def test_preset_checks_its_option_names_now_and_lists_the_valid_ones():
    with pytest.raises(
        TypeError,
        match=r"'vit' has no option gama_linear; its options are gamma_linear, gamma_conv, "
        r"epsilon",
    ):
        lrpcpp.preset("vit", gama_linear=0.5)
    with pytest.raises(ValueError, match="unknown preset 'vitt'"):
        lrpcpp.preset("vitt")
    with pytest.raises(TypeError, match="preset must be a registered preset name"):
        lrpcpp.preset(0.05)
    built = lrpcpp.preset("vit", gamma_linear=0.5)
    assert built.types[nn.Linear] == P.Gamma(0.5) and built.name == "vit"
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.method = "attnlrp"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            dict(gamma_linear=0.05),
            r"gamma_linear= is an option of the preset\(s\) vit.*lrpcpp\.preset\('vit', gamma_linear",
        ),
        (dict(gama_linear=0.5), r"gama_linear= looks like gamma_linear=, which is an option"),
        (dict(low=0.0), r"low= is an option of the preset\(s\) epsilon_gamma_box"),
    ],
)
def test_a_preset_option_among_the_model_inputs_is_refused(kwargs, match):
    model = build("vit")
    with pytest.raises(TypeError, match=match):
        lrpcpp.attribute(model, preset="vit", **kwargs, **inputs("vit"))


def test_preset_options_reach_attribute_patch_and_composite():
    model = build("vit")
    kw = inputs("vit")
    chosen = lrpcpp.preset("vit", gamma_linear=0.5)
    by_hand = lrpcpp.Preset(types={nn.Linear: P.Gamma(0.5), nn.Conv2d: P.Gamma(0.25)}, method="cp-lrp")
    got = lrpcpp.attribute(model, preset=chosen, **kw).relevance
    torch.testing.assert_close(got, lrpcpp.attribute(model, preset=by_hand, **kw).relevance, rtol=0, atol=0)
    default = lrpcpp.attribute(model, preset="vit", **kw).relevance
    assert not torch.allclose(got, default, rtol=1e-3, atol=0)
    with lrpcpp.patch(model, preset=chosen) as handle:
        assert set(handle.layer_rules.values()) == {P.Gamma(0.5), P.Gamma(0.25)}
    assert lrpcpp.Composite(preset=chosen).preset.types[nn.Linear] == P.Gamma(0.5)


def test_a_model_input_that_the_forward_names_is_not_taken_for_a_preset_option():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3).double()

        def forward(self, x, low=1.0):
            return self.fc(x.flatten(1) * low)

    model = Scaled()
    x = torch.randn(2, 4, 1, 1, dtype=torch.float64)
    got = lrpcpp.attribute(model, pixel_values=x, low=2.0, target=0)
    torch.testing.assert_close(got.output, model(2.0 * x)[:, 0].detach())


# ----------------------------------------------------------------------------- models and grad modes
def test_a_function_is_refused():
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module .*got function"):
        lrpcpp.attribute(lambda inputs_embeds: inputs_embeds.sum(-1), inputs_embeds=torch.randn(1, 3, 4))


class Wrapper(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, inputs_embeds, attention_mask=None):
        return self.inner(inputs_embeds=inputs_embeds, attention_mask=attention_mask).logits


def test_a_wrapped_model_without_embeddings_says_what_to_pass(gpt2):
    with pytest.raises(
        TypeError,
        match=r"input_ids needs model\.get_input_embeddings\(\).*Wrapper has no "
        r"get_input_embeddings; pass inputs_embeds=.*\(here: model\.inner\)",
    ):
        lrpcpp.attribute(Wrapper(gpt2), **inputs("gpt2"))


def test_a_wrapped_model_given_embeddings_is_explained_as_the_model_itself(gpt2):
    ids = inputs("gpt2")["input_ids"]
    emb = gpt2.get_input_embeddings()(ids).detach()
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    got = lrpcpp.attribute(Wrapper(gpt2), inputs_embeds=emb, attention_mask=mask, target=7)
    # the wrapper's forward takes no position_ids: its positions are the inner model's defaults
    ref = lrpcpp.attribute(
        gpt2, inputs_embeds=emb, attention_mask=mask, target=7, position_ids=torch.arange(ids.shape[1]).expand_as(ids)
    )
    torch.testing.assert_close(got.relevance, ref.relevance, rtol=1e-12, atol=1e-12)


class _EmbeddedWith(nn.Module):
    """A model whose embedding module returns ``embed(ids)``'s output as it is."""

    def __init__(self, embed):
        super().__init__()
        self.embed, self.head = embed, nn.Linear(4, 2)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids=None, inputs_embeds=None):
        return self.head(inputs_embeds).sum(1)


class _NamedEmbedding(nn.Embedding):
    def forward(self, ids):  # (a mapping: its embeddings are not found in it)
        return {"embeddings": super().forward(ids)}


class _IdsAsTheyAre(nn.Module):
    def forward(self, ids):
        return ids


@pytest.mark.parametrize(
    "embed, message",
    [
        (_NamedEmbedding(10, 4), r"embeds input_ids \(_NamedEmbedding\) returned a dict, not a tensor "),
        (_IdsAsTheyAre(), r"the embeddings of input_ids \(_IdsAsTheyAre's output\) must be floating point"),
    ],
)
def test_an_embedding_module_that_returns_no_embeddings_is_named(embed, message):
    with pytest.raises(TypeError, match=message):
        lrpcpp.attribute(_EmbeddedWith(embed), input_ids=torch.tensor([[1, 2, 3]]))


def test_a_wrapper_of_two_architectures_is_refused(gpt2):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = gpt2, build("llama")

    with pytest.raises(lrpcpp.UnsupportedModelError, match=r"several architectures \(a: gpt2, b: llama\)"):
        lrpcpp.patch(Two(), level="registry")  # level="auto" explains it at the operation level


def test_inference_mode_is_refused_and_no_grad_works(gpt2):
    kw = inputs("gpt2")
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match=r"cannot run under torch\.inference_mode\(\)"):
            lrpcpp.attribute(gpt2, **kw)
        emb = gpt2.get_input_embeddings()(kw["input_ids"])
    ref = lrpcpp.attribute(gpt2, **kw)
    with torch.no_grad():
        under_no_grad = lrpcpp.attribute(gpt2, **kw)
    torch.testing.assert_close(under_no_grad.relevance, ref.relevance, rtol=0, atol=0)
    # embeddings made under inference_mode are explained outside it
    from_inference = lrpcpp.attribute(gpt2, inputs_embeds=emb)
    torch.testing.assert_close(from_inference.relevance, ref.relevance, rtol=0, atol=0)


# ----------------------------------------------------------------------------- attention masks
def test_an_all_zero_attention_mask_row_is_refused(gpt2):
    kw = inputs("gpt2", batch=3)
    mask = torch.ones_like(kw["input_ids"])
    mask[1] = 0
    with pytest.raises(ValueError, match=r"attention_mask row\(s\) \[1\] are all zeros"):
        lrpcpp.attribute(gpt2, attention_mask=mask, **kw)


def test_an_explained_output_that_is_not_finite_is_refused():
    """A NaN or infinite logit (the model's own forward gives it) is refused, naming the batch item,
    not explained with NaN relevance."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(8, 4), nn.Linear(4, 3)

        def get_input_embeddings(self):
            return self.embed

        def forward(self, inputs_embeds):
            logits = self.head(inputs_embeds.mean(1))
            return logits / torch.tensor([1.0, 0.0])[: len(logits), None]  # a second row divides by zero

    model, ids = Model(), torch.tensor([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(ValueError, match=r"explained output of batch item\(s\) \[1\] is not finite"):
        lrpcpp.attribute(model, input_ids=ids, target=0)
    assert torch.isfinite(lrpcpp.attribute(model, input_ids=ids[:1], target=0).relevance).all()


def test_an_attention_mask_of_the_wrong_shape_is_refused(gpt2):
    kw = inputs("gpt2")
    with pytest.raises(ValueError, match=r"attention_mask must have the shape \[batch, seq\] = \[2, 6\]"):
        lrpcpp.attribute(gpt2, attention_mask=torch.ones(2, 5, dtype=torch.long), **kw)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3", "phi3"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_a_padded_decoder_batch_equals_each_row_alone(family, side):
    model = build(family)
    ids = inputs(family, batch=2, seq=7)["input_ids"]
    mask = torch.ones_like(ids)
    lengths = (7, 4)
    real = [slice(0, 7), slice(3, 7) if side == "left" else slice(0, 4)]
    mask[1] = 0
    mask[1, real[1]] = 1
    batch = lrpcpp.attribute(model, input_ids=ids, attention_mask=mask)
    for i in range(2):
        single = lrpcpp.attribute(model, input_ids=ids[i : i + 1, real[i]])
        assert single.relevance.shape[1] == lengths[i]
        torch.testing.assert_close(batch.output[i : i + 1], single.output, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(batch.relevance[i : i + 1, real[i]], single.relevance, rtol=1e-7, atol=1e-10)
    assert torch.all(batch.relevance[1][mask[1] == 0] == 0)


def _llama_classifier():
    import transformers as tfm
    from models import _DECODER

    torch.manual_seed(0)
    config = tfm.LlamaConfig(**dict(_DECODER, num_labels=3))
    config._attn_implementation = "sdpa"
    return tfm.LlamaForSequenceClassification(config).double().eval()


def test_a_decoder_classifier_explains_a_left_padded_batch_and_refuses_right_padding():
    model = _llama_classifier()
    ids = inputs("llama", batch=2, seq=7)["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    batch = lrpcpp.attribute(model, input_ids=ids, attention_mask=mask, target=1)
    single = lrpcpp.attribute(model, input_ids=ids[1:, 3:], target=1)
    torch.testing.assert_close(batch.output[1:], single.output, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(batch.relevance[1:, 3:], single.relevance, rtol=1e-7, atol=1e-10)
    right = torch.ones_like(ids)
    right[1, 4:] = 0  # the classifier would read a pad's logits
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] end in padding.*pad the batch on the left"):
        lrpcpp.attribute(model, input_ids=ids, attention_mask=right, target=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_the_finite_check_finds_every_nan_and_infinity_and_nothing_else(dtype):
    from lrpcpp.attribution import all_finite, warn_not_finite

    big = torch.finfo(dtype).max
    finite = torch.tensor([[1.0, -2.0, 3.0], [big, big, big]], dtype=torch.float64).to(dtype)  # its sum overflows
    assert all_finite(finite) and all_finite(finite[:0])
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = finite.clone()
        t[1, 2] = bad
        assert not all_finite(t)
        for sums in (None, {"x": t.sum(-1)}):  # (the per-token sums that attribute has: tested first)
            with pytest.warns(RuntimeWarning, match=r"relevance of x \(batch item\(s\) \[1\]\) is not finite"):
                warn_not_finite({"x": t}, many=False, sums=sums)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_not_finite({"x": finite}, many=False)
        warn_not_finite({"x": finite}, many=False, sums={"x": finite.sum(-1)})  # a sum that overflows
