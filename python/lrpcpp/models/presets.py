"""Named presets of layer rules for linear and convolution layers (RULES.md section 3).

A :class:`Preset` says which rule each ``nn.Linear`` and convolution (``nn.Conv1d`` to ``nn.Conv3d``,
``nn.ConvTranspose1d`` to ``nn.ConvTranspose3d``) of a model takes: by
module type, for the first such layer of the model (the input layer), and by qualified module
name, in increasing priority. It also names the treatment of attention (``method``) and whether
batch norms are merged into the convolutions before them. Presets are registered by name, and
:func:`preset` builds one with its options (checked against the options it takes); the keyword
arguments of :func:`lrpcpp.attribute` itself go to the model only::

    lrpcpp.attribute(model, pixel_values=x, preset=lrpcpp.preset("vit", gamma_linear=0.05, gamma_conv=0.25))
    lrpcpp.attribute(model, pixel_values=x, preset=lrpcpp.preset("epsilon_gamma_box", low=low, high=high),
                     rules={"fc": lrpcpp.rules.Gamma(0.1), nn.Conv2d: lrpcpp.rules.ZPlus()})
    lrpcpp.Composite(preset="epsilon_plus")  # a name alone: the preset with its default options

    @lrpcpp.register_preset("my_preset")
    def my_preset(gamma: float = 0.1) -> lrpcpp.Preset:
        return lrpcpp.Preset(types={nn.Linear: Epsilon(), nn.Conv2d: Gamma(gamma)})

The rules themselves are the classes of :mod:`lrpcpp.rules`, computed by the native ops of
:mod:`lrpcpp.functional`; :func:`lrpcpp.models.layers.apply_preset` puts them on a patched model.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union, cast

from torch import nn

from .._signatures import parameters
from ..rules import AlphaBeta, Bound, Epsilon, Flat, Gamma, Pass, Rule, ZBox, ZPlus

__all__ = [
    "Preset",
    "PRESETS",
    "PRESET_ALIASES",
    "register_preset",
    "preset",
    "get_preset",
    "preset_arguments",
    "preset_options",
    "CONVOLUTIONS",
]

RuleKey = Union[str, type]

#: The convolution layers the rules treat (each through its native op: 1-3 spatial dimensions,
#: transposed or not); a preset's rule for convolutions is listed under each of these types.
CONVOLUTIONS: Tuple[type, ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


def _convolutions(rule: Rule) -> Dict[type, Rule]:
    """``rule`` for every convolution layer type."""
    return {cls: rule for cls in CONVOLUTIONS}


@dataclass(frozen=True)
class Preset:
    """Which rule each linear and convolution layer takes, and how the rest of the model is treated.
    Frozen: :meth:`with_rules` and :func:`dataclasses.replace` make changed copies.

    * ``types``: ``{module type: rule}``; a layer takes the rule of the most specific listed type
      it is an instance of (``nn.Linear``, ``nn.Conv2d``, any of :data:`CONVOLUTIONS`).
    * ``first``: the rule of the model's first linear or convolution layer in module order (the
      input layer, e.g. z-box for pixels), or ``None``.
    * ``names``: ``{qualified module name: rule}``, the highest priority. For an
      ``nn.MultiheadAttention`` named ``attn``, ``"attn.in_proj"`` names its input projection and
      ``"attn.out_proj"`` its output projection. Its projections take the rule listed under
      ``nn.MultiheadAttention`` in ``types`` if there is one (``Pass()``: they keep the treatment of
      attention), else that of their own type (``nn.Linear``).
    * ``method``: ``"cp-lrp"`` or ``"attnlrp"`` for attention, ``None`` to leave it to the caller.
    * ``merge_batch_norm``: merge each eval-mode ``BatchNorm2d`` into the convolution before it for
      the duration of the attribution.
    """

    types: Dict[type, Rule] = field(default_factory=dict)
    names: Dict[str, Rule] = field(default_factory=dict)
    first: Optional[Rule] = None
    method: Optional[str] = None
    merge_batch_norm: bool = True
    name: str = "custom"

    def with_rules(self, rules: Optional[Mapping[RuleKey, Optional[Rule]]]) -> "Preset":
        """A copy with per-layer overrides: ``{module name or module type: rule}``; ``None`` as a
        rule leaves that layer as it is."""
        if not rules:
            return self
        types_, names = dict(self.types), dict(self.names)
        for key, rule in rules.items():
            rule = Pass() if rule is None else rule
            if not isinstance(rule, Rule):
                raise TypeError(f"lrpcpp.Preset: the rule for {key!r} must be an lrpcpp.rules rule, got {rule!r}")
            if isinstance(key, str):
                names[key] = rule
            elif isinstance(key, type) and issubclass(key, nn.Module):
                types_[key] = rule
            else:
                raise TypeError(f"lrpcpp.Preset: override keys are module names or module types, got {key!r}")
        return dataclasses.replace(self, types=types_, names=names)

    def _by_type(self, module: nn.Module) -> Optional[Rule]:
        for cls in type(module).__mro__:
            if cls in self.types:
                return self.types[cls]
        return None

    def assign(self, model: nn.Module) -> Dict[str, Rule]:
        """The rule of every linear and convolution layer of ``model`` (and of the projections of
        each ``nn.MultiheadAttention``), by qualified name; layers without a rule are left out."""
        modules = dict(model.named_modules())
        unknown = sorted(n for n in self.names if n not in modules and not _is_mha_part(n, modules))
        if unknown:
            raise KeyError(f"lrpcpp.Preset: rules name no layer of this {type(model).__name__}: {unknown}")
        inside_mha = {f"{n}.out_proj" for n, m in modules.items() if isinstance(m, nn.MultiheadAttention)}
        out: Dict[str, Rule] = {}
        first_seen = False
        for name, module in modules.items():
            if isinstance(module, nn.MultiheadAttention):
                for part in ("in_proj", "out_proj"):
                    key = f"{name}.{part}"
                    rule = self.names.get(key) or self._by_type(module) or self._by_type(module.out_proj)
                    if rule is not None and not isinstance(rule, Pass):
                        out[key] = rule
                first_seen = True
                continue
            if not isinstance(module, (nn.Linear, *CONVOLUTIONS)) or name in inside_mha:
                continue
            rule = self._by_type(cast(nn.Module, module))
            if not first_seen:
                first_seen = True
                rule = self.first or rule
            rule = self.names.get(name, rule)
            if rule is not None and not isinstance(rule, Pass):
                out[name] = rule
        return out


def _is_mha_part(name: str, modules: Mapping[str, nn.Module]) -> bool:
    parent, _, part = name.rpartition(".")
    return part == "in_proj" and isinstance(modules.get(parent), nn.MultiheadAttention)


#: The registered presets: name -> function(**arguments) -> :class:`Preset`.
PRESETS: Dict[str, Callable[..., Preset]] = {}


#: Other names of registered presets: zennit's class names of its composites, ``alias -> preset name``.
#: A preset registered under an alias itself takes priority over the alias.
PRESET_ALIASES: Dict[str, str] = {
    "EpsilonGammaBox": "epsilon_gamma_box",
    "EpsilonPlus": "epsilon_plus",
    "EpsilonPlusFlat": "epsilon_plus_flat",
    "EpsilonAlpha2Beta1": "epsilon_alpha2_beta1",
    "EpsilonAlpha2Beta1Flat": "epsilon_alpha2_beta1_flat",
}


def register_preset(name: str) -> Callable[[Callable[..., Preset]], Callable[..., Preset]]:
    """Decorator: registers ``fn(**arguments) -> Preset`` under ``name`` (replacing an earlier one)."""

    def register(fn: Callable[..., Preset]) -> Callable[..., Preset]:
        PRESETS[name] = fn
        return fn

    return register


def preset_arguments(name: str) -> Tuple[str, ...]:
    """The keyword arguments the preset ``name`` takes."""
    return tuple(parameters(_factory(name)))


def preset_options() -> Dict[str, Tuple[str, ...]]:
    """Every option name of the registered presets, with the presets that take it."""
    out: Dict[str, Tuple[str, ...]] = {}
    for name in sorted(PRESETS):
        for option in preset_arguments(name):
            out[option] = out.get(option, ()) + (name,)
    return out


def _factory(name: str) -> Callable[..., Preset]:
    if not isinstance(name, str):
        raise TypeError(f"lrpcpp: preset must be a registered preset name or an lrpcpp.Preset, got {name!r}")
    fn = PRESETS.get(name) or PRESETS.get(PRESET_ALIASES.get(name, ""))
    if fn is None:
        raise ValueError(
            f"lrpcpp: unknown preset {name!r}; registered presets: {', '.join(sorted(PRESETS))} (also by "
            f"zennit's names: {', '.join(sorted(PRESET_ALIASES))})"
        )
    return fn


def get_preset(
    preset: Union[str, Preset], rules: Optional[Mapping[RuleKey, Optional[Rule]]] = None, **arguments: Any
) -> Preset:
    """The :class:`Preset` registered as ``preset`` (or under the alias ``preset``, see
    :data:`PRESET_ALIASES`) built with ``arguments`` (or ``preset`` itself), with the per-layer
    overrides ``rules`` applied."""
    if isinstance(preset, Preset):
        if arguments:
            raise TypeError(f"lrpcpp: options {sorted(arguments)} are for a named preset, not a Preset object")
        return preset.with_rules(rules)
    fn = _factory(preset)
    accepted = preset_arguments(preset)
    unknown = sorted(set(arguments) - set(accepted))
    if unknown:
        raise TypeError(
            f"lrpcpp: preset {preset!r} has no option {', '.join(unknown)}; its options are "
            f"{', '.join(accepted) or '(none)'}"
        )
    built = fn(**arguments)
    if not isinstance(built, Preset):
        raise TypeError(f"lrpcpp: preset {preset!r} returned {type(built).__name__}, not an lrpcpp.Preset")
    if built.name == "custom":
        built = dataclasses.replace(built, name=preset if preset in PRESETS else PRESET_ALIASES[preset])
    return built.with_rules(rules)


def preset(name: str, **options: Any) -> Preset:
    """The registered preset ``name`` built with ``options``, for the ``preset=`` argument of
    :func:`lrpcpp.attribute`, :func:`lrpcpp.patch` and :class:`lrpcpp.Composite`::

        lrpcpp.preset("vit", gamma_linear=0.05)

    The options are checked now: an option the preset does not take is a ``TypeError`` that lists
    the ones it takes (:func:`preset_arguments`). A preset name given to ``preset=`` directly is the
    preset with its default options."""
    return get_preset(name, **options)


@register_preset("vit")
def vit(
    gamma_linear: float = 0.05, gamma_conv: float = 0.25, epsilon: float = 1e-6, attention_projections: str = "gradient"
) -> Preset:
    """The AttnLRP recipe for Vision Transformers as LXT ships it for torchvision's ViT: CP-LRP in
    attention (query and key held constant), the gamma rule on linear layers (``gamma_linear``) and
    convolutions (``gamma_conv``), with zennit's bias convention (docs/vision.rst).

    ``attention_projections``: ``"gradient"`` leaves the input and output projections of each
    ``nn.MultiheadAttention`` to the treatment of attention (the plain linear map, as in LXT, whose
    zennit rules never reach them: ``nn.MultiheadAttention`` reads their weights itself);
    ``"gamma"`` puts ``gamma_linear`` on them as well (this preset's earlier default).
    Linear layers outside ``nn.MultiheadAttention`` (e.g. a Hugging Face ViT's query, key,
    value and output layers) take ``gamma_linear`` either way."""
    if attention_projections not in ("gradient", "gamma"):
        raise ValueError(
            f"lrpcpp: preset 'vit' takes attention_projections='gradient' or 'gamma', got {attention_projections!r}"
        )
    types: Dict[type, Rule] = {nn.Linear: Gamma(gamma_linear, epsilon), **_convolutions(Gamma(gamma_conv, epsilon))}
    if attention_projections == "gradient":
        types[nn.MultiheadAttention] = Pass()
    return Preset(types=types, method="cp-lrp")


@register_preset("epsilon_gamma_box")
def epsilon_gamma_box(
    low: Optional[Bound] = None, high: Optional[Bound] = None, gamma: float = 0.25, epsilon: float = 1e-6
) -> Preset:
    """z-box on the input layer (pixels within ``[low, high]``: numbers or per-channel tensors),
    the gamma rule on convolutions, epsilon on linear layers."""
    if low is None or high is None:
        raise TypeError(
            "lrpcpp: preset 'epsilon_gamma_box' needs the input bounds low and high (numbers, or "
            "tensors broadcastable to the input, e.g. per channel of shape [3, 1, 1])"
        )
    return Preset(
        types={nn.Linear: Epsilon(epsilon), **_convolutions(Gamma(gamma, epsilon))}, first=ZBox(low, high, epsilon)
    )


@register_preset("epsilon_plus")
def epsilon_plus(epsilon: float = 1e-6, bias: str = "ignore") -> Preset:
    """z-plus on convolutions, epsilon on linear layers; ``bias="denominator"`` counts the convolutions'
    biases in z-plus's denominators as zennit does."""
    return Preset(types={nn.Linear: Epsilon(epsilon), **_convolutions(ZPlus(epsilon, bias))})


@register_preset("epsilon_plus_flat")
def epsilon_plus_flat(epsilon: float = 1e-6, bias: str = "ignore") -> Preset:
    """As ``epsilon_plus``, with the flat rule on the input layer."""
    return Preset(types={nn.Linear: Epsilon(epsilon), **_convolutions(ZPlus(epsilon, bias))}, first=Flat(epsilon))


@register_preset("epsilon_alpha2_beta1")
def epsilon_alpha2_beta1(epsilon: float = 1e-6, bias: str = "ignore") -> Preset:
    """alpha-beta with alpha = 2, beta = 1 on convolutions, epsilon on linear layers;
    ``bias="denominator"`` counts the convolutions' biases in alpha-beta's sums as zennit does."""
    return Preset(types={nn.Linear: Epsilon(epsilon), **_convolutions(AlphaBeta(2.0, 1.0, epsilon, bias))})


@register_preset("epsilon_alpha2_beta1_flat")
def epsilon_alpha2_beta1_flat(epsilon: float = 1e-6, bias: str = "ignore") -> Preset:
    """As ``epsilon_alpha2_beta1``, with the flat rule on the input layer."""
    return Preset(
        types={nn.Linear: Epsilon(epsilon), **_convolutions(AlphaBeta(2.0, 1.0, epsilon, bias))}, first=Flat(epsilon)
    )
