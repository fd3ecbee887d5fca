"""Decoder families without a family entry, explained at the operation level: tiny random float64
models built from transformers configs (as tests/models.py builds the registered families)."""

import lrpcpp
import pytest
import torch
import transformers as tfm
from lrpcpp import deploy
from lrpcpp.models.families import FAMILIES
from models import _DECODER, VOCAB, attribute_ruled, bias_free, build_from_defaults, inputs
from transformers import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

_IDS = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# family -> (config class, model class, config arguments); the layouts of the published checkpoints
UNREGISTERED = {
    # RMSNorm after each sublayer, RMSNorm on the queries and keys
    "olmo2": (tfm.Olmo2Config, tfm.Olmo2ForCausalLM, _DECODER),
    # LLaMA with scalar multipliers on the embeddings, residuals, attention scores and logits
    "granite": (
        tfm.GraniteConfig,
        tfm.GraniteForCausalLM,
        dict(_DECODER, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=4.0),
    ),
    # parallel residual, fused qkv, partial rotary, LayerNorm, gelu MLP (Pythia)
    "gpt_neox": (tfm.GPTNeoXConfig, tfm.GPTNeoXForCausalLM, dict(_DECODER, num_key_value_heads=4)),
    # Falcon-7B: parallel attention and MLP, multi-query attention, LayerNorm
    "falcon": (
        tfm.FalconConfig,
        tfm.FalconForCausalLM,
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, multi_query=True, parallel_attn=True, **_IDS),
    ),
    # Phi-2: parallel block, partial rotary, LayerNorm, gelu_new MLP, biases
    "phi": (tfm.PhiConfig, tfm.PhiForCausalLM, dict(_DECODER, partial_rotary_factor=0.5)),
    # LayerNorm, partial rotary, gated MLP
    "stablelm": (tfm.StableLmConfig, tfm.StableLmForCausalLM, _DECODER),
    # bias-free LayerNorm, parallel block, scaled logits
    "cohere": (tfm.CohereConfig, tfm.CohereForCausalLM, dict(_DECODER, logit_scale=0.5)),
    # ALiBi: the scores are torch.baddbmm(alibi, batch1=q, batch2=k); its own GELU module (BloomGelu,
    # a custom autograd.Function); LayerNorm on the embeddings
    "bloom": (tfm.BloomConfig, tfm.BloomForCausalLM, dict(hidden_size=32, n_layer=2, n_head=4, **_IDS)),
}
# the function that multiplies queries and keys, where it is not F.scaled_dot_product_attention (the
# families whose attention has no sdpa implementation)
SCORES = {"bloom": "baddbmm"}
EAGER = {"bloom": "eager"}
METHODS = ["attnlrp", "cp-lrp"]


def build(family: str, seed: int = 0):
    config_cls, model_cls, kwargs = UNREGISTERED[family]
    torch.manual_seed(seed)
    config = config_cls(**kwargs)
    config._attn_implementation = EAGER.get(family, "sdpa")
    model = model_cls(config).to(torch.float64).eval()
    with torch.no_grad():  # larger weights than the default init, so that outputs are far from zero
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", sorted(UNREGISTERED))
def test_an_unregistered_decoder_is_explained_at_the_operation_level(family, method):
    model, ids = build(family), inputs("llama")["input_ids"]
    with pytest.raises(lrpcpp.UnsupportedModelError, match="register_family"):
        lrpcpp.patch(model, level="registry")
    got = attribute_ruled(model, input_ids=ids, method=method)  # level="auto"
    assert got.coverage is not None and got.coverage.unruled == {}
    assert any(SCORES.get(family, "scaled_dot_product_attention") in n for n in got.coverage.ruled)
    assert torch.isfinite(got.relevance).all() and got.relevance.abs().sum() > 0
    # the rules change the gradient: the relevance is not the plain gradient times input
    x = model.get_input_embeddings()(ids).detach().requires_grad_()
    logits = model(inputs_embeds=x).logits[:, -1]
    torch.testing.assert_close(logits.gather(1, got.target[:, None])[:, 0], got.output, rtol=1e-12, atol=1e-12)
    logits.gather(1, got.target[:, None]).sum().backward()
    assert not torch.allclose(got.relevance, x * x.grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("family", sorted(UNREGISTERED))
def test_patched_forward_is_bitwise_the_plain_forward(family):
    model, ids = build(family), inputs("llama")["input_ids"]
    x = model.get_input_embeddings()(ids).detach()
    plain = model(inputs_embeds=x).logits
    for method in METHODS:
        with lrpcpp.patch(model, method=method) as handle:
            assert handle.level == "operations"
            patched = model(inputs_embeds=x.clone().requires_grad_()).logits
        assert torch.equal(patched, plain)


@pytest.mark.parametrize("family", sorted(UNREGISTERED))
def test_cp_lrp_conserves_on_a_bias_free_model(family):
    # RULES.md section 2: with CP-LRP the attention weights and the gates are constants, LayerNorm's
    # standard deviation is held constant and activations and RMSNorms take the identity rule, so on
    # a float64 model without biases the explained logit is a positively homogeneous function of
    # degree 1 of the embeddings and their relevance sums to it (Euler). What is left is the identity
    # rule's stabiliser, a relative error of epsilon / |x| (epsilon = 1e-10) per activation, and
    # rounding: 1e-9 of the summed magnitudes bounds both in float64 (about 1e-11 is seen) with room
    # to spare. Cohere's LayerNorm computes in float32 whatever the model's dtype, so there the
    # relevance sums to float32 precision (2**-23 = 1.2e-7 per operation): 1e-6. Both are far below
    # what a rule that does not conserve loses (AttnLRP's softmax, checked below: several percent).
    rtol = 1e-6 if family == "cohere" else 1e-9
    model = bias_free(build(family))
    ids = inputs("llama")["input_ids"]
    got = attribute_ruled(model, input_ids=ids, method="cp-lrp")
    total = got.relevance.sum(dim=(1, 2))
    scale = got.relevance.abs().sum(dim=(1, 2))
    assert torch.all((total - got.output).abs() <= rtol * scale), (total, got.output)
    # AttnLRP's softmax rule does not conserve (its bias term absorbs relevance)
    lost = attribute_ruled(model, input_ids=ids, method="attnlrp").relevance.sum(dim=(1, 2)) - got.output
    assert torch.all(lost.abs() > 1e-3 * scale)


# entries a user could register for four of them (llama-like, or a plain MLP for Phi): the registry
# level and explicit mode then apply, and the operation level must give their numbers. Without an
# entry explicit mode refuses these models (docs/models.rst), tested below. (Not Cohere: its LayerNorm is
# its own class, which the registry would leave with the gradient of its standard deviation.)
ENTRIES = {
    "olmo2": dict(attention=("Olmo2Attention",), gated_mlp=("Olmo2MLP",), norms=("Olmo2RMSNorm",)),
    "granite": dict(attention=("GraniteAttention",), gated_mlp=("GraniteMLP",), norms=("GraniteRMSNorm",)),
    "stablelm": dict(attention=("StableLmAttention",), gated_mlp=("StableLmMLP",)),
    "phi": dict(attention=("PhiAttention",)),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", sorted(ENTRIES))
def test_operation_level_equals_the_registry_given_an_entry(family, method):
    model, ids = build(family), inputs("llama")["input_ids"]
    got = attribute_ruled(model, input_ids=ids, method=method)
    assert got.coverage is not None
    lrpcpp.register_family(f"test_{family}", model_types=(model.config.model_type,), causal=True, **ENTRIES[family])
    try:
        ref = lrpcpp.attribute(model, input_ids=ids, method=method)
        # explicit mode covers a model with an entry; with epsilon -> 0 it gives gradient mode's
        # relevance (RULES.md section 2), at the tolerance tests/test_models.py uses for that
        explicit = lrpcpp.attribute(model, input_ids=ids, method=method, mode="explicit", epsilon=1e-12)
    finally:
        FAMILIES.pop(f"test_{family}")
    assert ref.coverage is None  # the registry level
    torch.testing.assert_close(got.relevance, ref.relevance, rtol=1e-10, atol=1e-12)
    scale = float(got.relevance.abs().max())
    torch.testing.assert_close(explicit.relevance, got.relevance, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("family", sorted(UNREGISTERED))
def test_explicit_mode_refuses_an_unregistered_decoder(family):
    # explicit mode covers only the models the family registry describes (docs/models.rst), so the
    # operation level is not compared with it here: for these families it is refused, by name
    model, ids = build(family), inputs("llama")["input_ids"]
    with pytest.raises(lrpcpp.UnsupportedModelError, match="register_family"):
        lrpcpp.attribute(model, input_ids=ids, mode="explicit")


# BLOOM's eager attention gives a left-padded row NaN in its own forward (float64: the padded queries
# attend to nothing, and their NaN values reach the real queries through weights of 0)
@pytest.mark.parametrize("family", sorted(set(UNREGISTERED) - {"bloom"}))
def test_a_left_padded_batch_row_equals_the_row_alone(family):
    # a decoder without a family entry is causal by its config and classes: positions are counted
    # over the unmasked tokens, as for the registered decoders
    model = build(family)
    ids = inputs("llama", batch=2, seq=7)["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    batch = attribute_ruled(model, input_ids=ids, attention_mask=mask)
    for i, real in enumerate([slice(0, 7), slice(3, 7)]):
        single = attribute_ruled(model, input_ids=ids[i : i + 1, real])
        torch.testing.assert_close(batch.output[i : i + 1], single.output, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(batch.relevance[i : i + 1, real], single.relevance, rtol=1e-7, atol=1e-10)
    assert torch.all(batch.relevance[1, :3] == 0)
    # the exported forms' forward counts them as well
    x = model.get_input_embeddings()(ids).detach()
    padded = deploy.ExplainableModel(model)(x, mask)[1, 3:]
    alone = deploy.ExplainableModel(model)(x[1:, 3:], mask[1:, 3:])[0]
    torch.testing.assert_close(padded, alone, rtol=1e-12, atol=1e-12)


def test_a_row_the_model_itself_makes_nan_is_an_error_that_says_so():
    model = build("bloom")
    ids = inputs("llama", batch=2, seq=7)["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        assert torch.isnan(model(input_ids=ids, attention_mask=mask).logits[1]).all()
    with pytest.raises(ValueError, match=r"batch item\(s\) \[1\] is not finite .* the model's own forward gives it"):
        lrpcpp.attribute(model, input_ids=ids, attention_mask=mask)


def test_causality_of_a_model_without_entry_comes_from_its_config_and_classes():
    from lrpcpp.attribution import is_causal_decoder

    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, vocab_size=VOCAB)
    olmo2 = tfm.Olmo2Config(**_DECODER)
    assert is_causal_decoder(build("olmo2"))
    assert is_causal_decoder(tfm.Olmo2Model(olmo2))  # no generation head: its attention is causal
    if hasattr(tfm, "Olmo2ForSequenceClassification"):  # not in transformers 4.x
        assert is_causal_decoder(tfm.Olmo2ForSequenceClassification(olmo2))
    assert is_causal_decoder(torch.nn.Sequential(tfm.Olmo2Model(olmo2)))  # a module holding one
    assert not is_causal_decoder(tfm.RobertaModel(tfm.RobertaConfig(**small)))  # an encoder
    assert is_causal_decoder(tfm.RobertaForCausalLM(tfm.RobertaConfig(**small, is_decoder=True)))
    t5 = tfm.T5Config(d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4, vocab_size=VOCAB)
    assert not is_causal_decoder(tfm.T5ForConditionalGeneration(t5))  # an encoder-decoder
    assert not is_causal_decoder(torch.nn.Linear(2, 2))


# Families whose layers call functions that the ones above do not (found by scripts/family_sweep.py,
# which explains every causal language model type of transformers 5.24 built small from its config):
# the function each must have ruled or passed.
CALLS = {
    "gpt_oss": "Tensor.max",  # attention sinks: the scores minus their maximum before the softmax
    "mimo_v2_flash": "Tensor.max",  # the same
    "xglm": "torch.max",  # the scores held above the dtype's minimum
    "granite_swa": "torch.logsumexp",  # an attention sink's scale sigmoid(logsumexp(scores) - sink)
    "llama4_text": "torch.view_as_complex",  # rotary embeddings by complex products; the router's scatter_
    "phimoe": "torch.scatter",  # the router's weights placed at the chosen experts
    "ernie4_5_moe": "torch.clamp",  # the routing weights' sum held above epsilon
    "lara_mini": "torch._C._linalg.linalg_solve_triangular",  # the gated delta rule's chunk transform
    "mega": "torch._C._fft.fft_irfft",  # convolutions by FFT (transformers 4.x)
}
if tfm.__version__.startswith("4."):  # (5.24's RecurrentGemma cannot run from its config's defaults)
    # a square root with a clipped gradient, a custom autograd.Function
    CALLS["recurrent_gemma"] = (
        "transformers.models.recurrent_gemma.modeling_recurrent_gemma.SqrtBoundDerivative.apply "
        "(a custom autograd.Function)"
    )


@pytest.mark.parametrize("family", sorted(f for f in CALLS if f in CONFIG_MAPPING))  # (of this transformers)
def test_every_call_of_these_families_has_a_rule(family):
    model, ids = build_from_defaults(family), inputs("llama")["input_ids"]
    got = lrpcpp.attribute(model, input_ids=ids, strict=True)
    assert got.coverage is not None and got.coverage.unruled == {}
    assert CALLS[family] in {**got.coverage.ruled, **got.coverage.passed}
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, -1]
    torch.testing.assert_close(logits.gather(1, got.target[:, None])[:, 0], got.output, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(got.relevance).all() and got.relevance.abs().sum() > 0
    x = model.get_input_embeddings()(ids).detach()
    with lrpcpp.patch(model):
        patched = model(inputs_embeds=x.clone().requires_grad_()).logits
    assert torch.equal(patched, model(inputs_embeds=x).logits)


# Encoders (sequence classifiers, scripts/family_sweep.py --task sequence-classification) whose layers
# call functions that none of the families above calls: the function each must have ruled or passed.
ENCODER_CALLS = {
    "esm": "torch.erf",  # its GELU written out: x * (1 + erf(x / sqrt(2))) / 2
    "convbert": "torch.nn.functional.unfold",  # the span-based dynamic convolution's windows
    "fnet": "Tensor.real",  # Fourier mixing: the real part of a 2-D FFT
    "longformer": "Tensor.as_strided",  # sliding-window attention over overlapping chunks
}


@pytest.mark.parametrize("family", sorted(f for f in ENCODER_CALLS if f in CONFIG_MAPPING))
def test_every_call_of_these_encoders_has_a_rule(family):
    model = build_from_defaults(family, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)
    ids = inputs("llama")["input_ids"]
    got = lrpcpp.attribute(model, input_ids=ids, strict=True)
    assert got.coverage is not None and got.coverage.unruled == {}
    assert ENCODER_CALLS[family] in {**got.coverage.ruled, **got.coverage.passed}
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits.gather(1, got.target[:, None])[:, 0], got.output, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(got.relevance).all() and got.relevance.abs().sum() > 0


def test_a_model_that_puts_prompt_ids_before_the_given_ones_is_explained():
    # CPM-Ant: its forward takes no embeddings, casts the ids to int32 and embeds them after prompt ids
    model, ids = build_from_defaults("cpmant"), inputs("llama")["input_ids"]
    got = lrpcpp.attribute(model, input_ids=ids, strict=True)
    assert got.coverage is not None and got.coverage.unruled == {}
    assert got.relevance.shape[:2] == ids.shape
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, -1]
    torch.testing.assert_close(logits.gather(1, got.target[:, None])[:, 0], got.output, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(got.relevance).all() and got.relevance.abs().sum() > 0


def test_a_cache_written_in_place_gets_a_message_that_names_use_cache():
    # RWKV writes its recurrent state into its cache in place, which breaks the backward pass of a
    # forward that builds the cache (its plain gradient too): the error says what to pass, and without
    # the cache the model is explained with every call ruled
    torch.manual_seed(0)
    config = tfm.RwkvConfig(
        hidden_size=16, attention_hidden_size=16, intermediate_size=32, num_hidden_layers=2, vocab_size=VOCAB
    )
    model = tfm.RwkvForCausalLM(config).double().eval()
    ids = torch.tensor([[3, 9, 4, 11, 7]])
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(model(inputs_embeds=embeds).logits[0, -1].max(), embeds)
    with pytest.raises(RuntimeError, match=r"wrote in place .* pass use_cache=False\. torch: .* modified inplace"):
        lrpcpp.attribute(model, input_ids=ids)
    got = attribute_ruled(model, input_ids=ids, use_cache=False)
    assert got.coverage is not None and not got.coverage.unruled and torch.isfinite(got.relevance).all()
