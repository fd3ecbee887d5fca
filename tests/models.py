"""Tiny random-weight models of every supported family, built from transformers configs."""

from typing import Mapping

import torch
import transformers as tfm
from transformers import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

VOCAB = 64
_DECODER = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_MOE = dict(num_experts_per_tok=2)

# family -> (config class, model class, config arguments)
FAMILIES = {
    "llama": (tfm.LlamaConfig, tfm.LlamaForCausalLM, _DECODER),
    "mistral": (tfm.MistralConfig, tfm.MistralForCausalLM, _DECODER),
    "qwen2": (tfm.Qwen2Config, tfm.Qwen2ForCausalLM, _DECODER),
    "qwen3": (tfm.Qwen3Config, tfm.Qwen3ForCausalLM, dict(_DECODER, head_dim=8)),
    "qwen3_moe": (
        tfm.Qwen3MoeConfig,
        tfm.Qwen3MoeForCausalLM,
        dict(_DECODER, head_dim=8, moe_intermediate_size=24, num_experts=4, **_MOE),
    ),
    "gemma": (tfm.GemmaConfig, tfm.GemmaForCausalLM, dict(_DECODER, head_dim=8)),
    # tanh soft-capping is neither in AttnLRP nor CP-LRP: these models are explained without it
    "gemma2": (
        tfm.Gemma2Config,
        tfm.Gemma2ForCausalLM,
        dict(_DECODER, head_dim=8, final_logit_softcapping=None, attn_logit_softcapping=None),
    ),
    "gemma3": (
        tfm.Gemma3TextConfig,
        tfm.Gemma3ForCausalLM,
        dict(_DECODER, head_dim=8, final_logit_softcapping=None, attn_logit_softcapping=None),
    ),
    "phi3": (tfm.Phi3Config, tfm.Phi3ForCausalLM, _DECODER),
    "mixtral": (tfm.MixtralConfig, tfm.MixtralForCausalLM, dict(_DECODER, num_local_experts=4, **_MOE)),
    "gpt2": (
        tfm.GPT2Config,
        tfm.GPT2LMHeadModel,
        dict(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=1, eos_token_id=2),
    ),
    "bert": (
        tfm.BertConfig,
        tfm.BertForSequenceClassification,
        dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=VOCAB,
            num_labels=3,
            pad_token_id=0,
        ),
    ),
    "vit": (
        tfm.ViTConfig,
        tfm.ViTForImageClassification,
        dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=16,
            patch_size=4,
            num_labels=3,
        ),
    ),
}
MOE = {"mixtral", "qwen3_moe"}
# transformers 4.x computes the routing weights inside the mixture-of-experts block's forward, where
# the registry cannot apply their rule: those models are explained at the operation level (tested in
# test_models.py and test_operation_moe.py), so they are no part of the families every whole-model
# test runs on
TRANSFORMERS_4 = int(tfm.__version__.split(".")[0]) < 5
MOE_4X = {f: FAMILIES.pop(f) for f in sorted(MOE)} if TRANSFORMERS_4 else {}
VISION = {"vit"}


def build(family: str, dtype=torch.float64, attn: str = "sdpa", seed: int = 0, **overrides):
    config_cls, model_cls, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    if family in MOE and dtype == torch.float64:
        overrides.setdefault("experts_implementation", "eager")  # grouped_mm takes no float64
    config = config_cls(**dict(kwargs, **overrides))
    if attn == "sdpa" and not getattr(model_cls, "_supports_sdpa", False):
        attn = "eager"  # e.g. Gemma 2
    config._attn_implementation = attn
    model = model_cls(config).to(dtype).eval()
    with torch.no_grad():  # larger weights than the default init, so that outputs are far from zero
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    return model


def inputs(family: str, batch: int = 2, seq: int = 6, dtype=torch.float64, seed: int = 1):
    """Model keyword arguments for one batch: pixels for vision models, token ids otherwise."""
    g = torch.Generator().manual_seed(seed)
    if family in VISION:
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g, dtype=dtype)}
    return {"input_ids": torch.randint(3, VOCAB, (batch, seq), generator=g)}


def bias_free(model):
    """Zeroes every bias and every additive embedding other than the tokens' (positions, token types,
    ViT's class token and positions), so that CP-LRP must conserve relevance exactly."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if (
                leaf == "bias"
                or leaf in ("cls_token", "position_embeddings")
                or any(k in name for k in ("position_embeddings", "token_type_embeddings", "wpe"))
            ):
                p.zero_()
    return model


def attribute_ruled(model, **kw):
    """``lrpcpp.attribute`` with a call that has no rule (an ``UnruledOperationWarning``) as an error."""
    import warnings

    import lrpcpp
    from lrpcpp.models.operations import UnruledOperationWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", UnruledOperationWarning)
        return lrpcpp.attribute(model, **kw)


# the sizes of a small model of any causal language model type, where its config has them
_SMALL = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    d_model=32,
    ffn_dim=48,
    num_layers=2,
    moe_intermediate_size=16,
    num_local_experts=4,
    num_experts=4,
    num_experts_per_tok=2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def build_from_defaults(model_type: str, classes: Mapping[str, str] = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
    """A float32 model of ``model_type`` from its config's defaults, with the sizes above where it has
    them (float32: torch's grouped matrix product of the experts has no float64 kernel). ``classes``:
    the model class by type (by default the causal language model's)."""
    config = CONFIG_MAPPING[model_type]()
    for key, value in _SMALL.items():
        if hasattr(config, key):
            try:
                setattr(config, key, value)
            except AttributeError:  # a property derived from other attributes
                pass
    if getattr(config, "layer_types", None) is not None:
        try:
            config.layer_types = config.layer_types[: config.num_hidden_layers]
        except AttributeError:  # derived from the number of layers
            pass
    torch.manual_seed(0)
    model = getattr(tfm, classes[model_type])(config)
    return model.eval()
