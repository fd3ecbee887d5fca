"""Model families: which modules of an architecture are attention, gated MLPs, mixtures of experts
and normalisations, described as data.

Whole-model patching (:mod:`lrpcpp.models.patching`) needs to know, for each architecture, where the products
of two relevance-carrying tensors are (attention and gated MLPs) and which normalisation modules
scale their input element-wise. Everything else is found by type: ``nn.LayerNorm``, ``nn.Linear``,
element-wise activation modules and ``nn.MultiheadAttention`` need no entry, so plain ``torch.nn``
models work without one.

A new Hugging Face family is one call::

    lrpcpp.register_family(
        "mymodel",
        model_types=("mymodel",),             # config.model_type values
        attention=("MyAttention",),           # class names; q/k/v projections are child modules
        gated_mlp=("MyMLP",),                 # act(gate(x)) * up(x); the activation is a child module
        norms=("MyRMSNorm",),                 # element-wise scaling norms (RMSNorm and variants)
    )
"""

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, Optional, Tuple, Union, cast

from torch import nn

__all__ = ["Family", "register_family", "family_of", "is_a", "FAMILIES", "UnsupportedModelError"]


class UnsupportedModelError(ValueError):
    """The model's architecture has no family entry, so its relevance map would be silently wrong."""


# The sizes are plain int attributes of Hugging Face modules (Any here: torch's stub types a module's
# attributes as tensors or modules).
def _equal_thirds(module: Any) -> Tuple[int, int, int]:
    return (module.split_size, module.split_size, module.split_size)


def _grouped_query(module: Any) -> Tuple[int, int, int]:
    q = module.config.num_attention_heads * module.head_dim
    kv = module.num_key_value_heads * module.head_dim
    return (q, kv, kv)


@dataclass(frozen=True)
class Family:
    """Where an architecture keeps the parts that need more than their ordinary gradient.

    A class name in ``attention``, ``gated_mlp`` or ``moe`` matches a module of that class or of a
    subclass of it (:func:`is_a`).

    attention: class names of attention modules. Their query, key and value
        projections are the child modules named by ``q``, ``k`` and ``v`` (a name, or a tuple of
        alternative names of which the module has one: layouts differ between transformers versions);
        a fused projection is named by ``qkv`` with ``qkv_split(module) -> (q, k, v)`` output sizes. A
        module of an attention class that holds another one (transformers 4.x's ``ViTAttention`` holds
        ``ViTSelfAttention``) is only a wrapper: the inner one is the attention.
    gated_mlp: class names of MLPs computing ``act(gate(x)) * up(x)``; ``gate_act`` names the
        activation child applied to the gate.
    moe: class names of sparse mixture-of-experts blocks with a ``router`` child returning
        ``(logits, top-k weights, top-k indices)`` and an ``experts`` child whose activation child
        is ``expert_act``.
    norms: class names of normalisations that scale their input element-wise (RMSNorm and its
        variants, e.g. Gemma's ``1 + weight``). Any class whose name ends in ``RMSNorm`` counts too.
    causal: a causal decoder whose forward takes ``position_ids``: :func:`lrpcpp.attribute` passes
        positions counted over the unmasked tokens of ``attention_mask`` (so a left-padded row has the
        positions it has alone) unless the caller gives them.
    """

    name: str
    model_types: Tuple[str, ...]
    attention: Tuple[str, ...] = ()
    q: Union[str, Tuple[str, ...]] = "q_proj"
    k: Union[str, Tuple[str, ...]] = "k_proj"
    v: Union[str, Tuple[str, ...]] = "v_proj"
    qkv: Optional[str] = None
    qkv_split: Optional[Callable[[nn.Module], Tuple[int, int, int]]] = None
    gated_mlp: Tuple[str, ...] = ()
    gate_act: str = "act_fn"
    moe: Tuple[str, ...] = ()
    router: str = "gate"
    experts: str = "experts"
    expert_act: str = "act_fn"
    norms: Tuple[str, ...] = field(default=())
    causal: bool = False

    def __post_init__(self) -> None:
        if self.qkv is not None and self.qkv_split is None:
            raise ValueError(
                f"lrpcpp.register_family: the family '{self.name}' names a fused projection qkv={self.qkv!r} but no "
                "qkv_split(module) -> (q, k, v) sizes"
            )


FAMILIES: Dict[str, Family] = {}


def register_family(name: str, **fields) -> Family:
    """Adds (or replaces) the family ``name``; see :class:`Family` for the fields."""
    family = Family(name=name, **fields)
    FAMILIES[name] = family
    return family


def _llama_like(name: str, prefix: str, model_types: Tuple[str, ...], **extra) -> None:
    register_family(
        name,
        model_types=model_types,
        attention=(f"{prefix}Attention",),
        gated_mlp=(f"{prefix}MLP",),
        norms=(f"{prefix}RMSNorm",),
        causal=True,
        **extra,
    )


_llama_like("llama", "Llama", ("llama",))
_llama_like("mistral", "Mistral", ("mistral",))
_llama_like("qwen2", "Qwen2", ("qwen2",))
_llama_like("qwen3", "Qwen3", ("qwen3",))
_llama_like("gemma", "Gemma", ("gemma",))
_llama_like("gemma2", "Gemma2", ("gemma2",))
_llama_like("gemma3", "Gemma3", ("gemma3_text",))
_llama_like("mixtral", "Mixtral", ("mixtral",), moe=("MixtralSparseMoeBlock",))
_llama_like("qwen3_moe", "Qwen3Moe", ("qwen3_moe",), moe=("Qwen3MoeSparseMoeBlock",))
register_family(
    "phi3",
    model_types=("phi3",),
    attention=("Phi3Attention",),
    qkv="qkv_proj",
    qkv_split=_grouped_query,
    gated_mlp=("Phi3MLP",),
    gate_act="activation_fn",
    norms=("Phi3RMSNorm",),
    causal=True,
)
register_family(
    "gpt2", model_types=("gpt2",), attention=("GPT2Attention",), qkv="c_attn", qkv_split=_equal_thirds, causal=True
)
register_family("bert", model_types=("bert",), attention=("BertSelfAttention",), q="query", k="key", v="value")
# transformers 5.x: ViTAttention with q_proj, k_proj, v_proj; 4.x: ViTSelfAttention (inside a ViTAttention
# wrapper) with query, key, value
register_family(
    "vit",
    model_types=("vit",),
    attention=("ViTAttention", "ViTSelfAttention"),
    q=("q_proj", "query"),
    k=("k_proj", "key"),
    v=("v_proj", "value"),
)


def is_a(module: nn.Module, class_names: Tuple[str, ...]) -> bool:
    """Whether ``module``'s class or one of its base classes is named in ``class_names`` (transformers
    4.x subclasses an attention class per kernel, e.g. ``BertSdpaSelfAttention(BertSelfAttention)``)."""
    cls = type(module)
    try:  # once per class and names: a patch asks for every module of the model and each kind of the family
        return _class_is_a(cast(Hashable, cls), class_names)  # (typeshed: a class is hashable)
    except TypeError:  # names given as a list
        return _class_is_a.__wrapped__(cls, class_names)


@functools.lru_cache(maxsize=4096)
def _class_is_a(cls: Any, class_names: Tuple[str, ...]) -> bool:
    return any(c.__name__ in class_names for c in cls.__mro__)


def _supported() -> str:
    return ", ".join(sorted(FAMILIES))


def _model_type(module: nn.Module) -> Optional[str]:
    return getattr(getattr(module, "config", None), "model_type", None)


def family_of(model: nn.Module) -> Optional[Family]:
    """The family of a Hugging Face model (by ``config.model_type``); for a torch module holding
    Hugging Face models (a wrapper), the family of those; ``None`` for a plain torch model.

    Raises :class:`UnsupportedModelError` for a Hugging Face model of an unknown architecture, and
    for a module holding models of several architectures.
    """
    model_type = _model_type(model)
    if model_type is None:
        inner: Dict[str, str] = {}
        for name, module in model.named_modules():
            t = _model_type(module)
            if t is not None:
                inner.setdefault(t, name)
        if not inner:
            return None
        if len(inner) > 1:
            raise UnsupportedModelError(
                f"lrpcpp: this {type(model).__name__} holds Hugging Face models of several architectures "
                f"({', '.join(f'{n}: {t}' for t, n in inner.items())}); explain each model on its own"
            )
        (model_type,) = inner
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    raise UnsupportedModelError(
        f"lrpcpp has no family entry for model_type '{model_type}' ({type(model).__name__}); supported "
        f"families: {_supported()}. Describe it with lrpcpp.register_family(name, model_types=('{model_type}',), "
        "attention=(...), gated_mlp=(...), norms=(...)) — see the 'Whole models' docs page"
    )
