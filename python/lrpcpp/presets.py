"""Layer rules for linear and convolution layers, and named presets of them (RULES.md section 3).

A :class:`Preset` says which rule each ``nn.Linear`` and ``nn.Conv2d`` of a model takes: by
module type, for the first such layer of the model (the input layer), and by qualified module
name, in increasing priority. It also names the treatment of attention (``method``) and whether
batch norms are merged into the convolutions before them. Presets are registered by name, and
:func:`preset` builds one with its options (checked against the options it takes); the keyword
arguments of :func:`lrpcpp.attribute` itself go to the model only::

    lrpcpp.attribute(model, pixel_values=x, preset=lrpcpp.preset("vit", gamma_linear=0.05, gamma_conv=0.25))
    lrpcpp.attribute(model, pixel_values=x, preset=lrpcpp.preset("epsilon_gamma_box", low=low, high=high),
                     rules={"fc": lrpcpp.presets.Gamma(0.1), nn.Conv2d: lrpcpp.presets.ZPlus()})
    lrpcpp.Composite(preset="epsilon_plus")  # a name alone: the preset with its default options

    @lrpcpp.register_preset("my_preset")
    def my_preset(gamma: float = 0.1) -> lrpcpp.Preset:
        return lrpcpp.Preset(types={nn.Linear: Epsilon(), nn.Conv2d: Gamma(gamma)})

The rules themselves are the native ops of :mod:`lrpcpp.functional` (``linear_gamma``,
``conv2d_z_box``, ...), with their weight transforms taken from
:func:`lrpcpp.modules.weight_transform` (computed once per weight version).
"""

import dataclasses
import inspect
import types
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.weak import WeakIdKeyDictionary

from . import functional as lf
from . import modules as lm

__all__ = [
    "Rule",
    "Epsilon",
    "Gamma",
    "AlphaBeta",
    "ZPlus",
    "ZBox",
    "Flat",
    "WSquare",
    "Pass",
    "Preset",
    "PRESETS",
    "register_preset",
    "preset",
    "get_preset",
    "preset_arguments",
    "preset_options",
    "conv_bn_pairs",
    "merged_conv_bn",
    "MergedBatchNorm",
]

Bound = Union[float, Tensor]


# ----------------------------------------------------------------------------- rules
class Rule:
    """A rule for linear and convolution layers. ``linear`` and ``conv2d`` compute the layer's output
    (exactly ``F.linear`` / ``F.conv2d``) through the rule's op; ``gi`` selects the
    gradient-times-input form (``lrpcpp.patch``'s gradient mode) over explicit relevance."""

    name = "rule"
    transform = ""  # the weight transform(s) the rule's op takes: "abs", "pos", "sq", "pos+neg" or ""

    def linear(
        self, x: Tensor, weight: Tensor, bias: Optional[Tensor], transform: Optional[Tensor], gi: bool
    ) -> Tensor:
        raise NotImplementedError

    def conv2d(
        self,
        x: Tensor,
        weight: Tensor,
        bias: Optional[Tensor],
        stride,
        padding,
        dilation,
        groups: int,
        transform: Optional[Tensor],
        gi: bool,
    ) -> Tensor:
        raise NotImplementedError

    def module(self, layer: nn.Module) -> Optional[nn.Module]:
        """A drop-in for ``layer`` in explicit semantics (for :class:`lrpcpp.Composite`)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Epsilon(Rule):
    """The epsilon rule (RULES.md section 1). In gradient mode the layer keeps torch's own gradient,
    which is this rule with ``epsilon -> 0`` (RULES.md section 2)."""

    epsilon: float = 1e-6
    name = "epsilon"

    def linear(self, x, weight, bias, transform, gi):
        return F.linear(x, weight, bias) if gi else lf.linear_epsilon(x, weight, bias, self.epsilon)

    def conv2d(self, x, weight, bias, stride, padding, dilation, groups, transform, gi):
        if gi:
            return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        return lf.conv2d_epsilon(x, weight, bias, stride, padding, dilation, groups, self.epsilon)

    def module(self, layer):
        cls = lm.LinearEpsilon if isinstance(layer, nn.Linear) else lm.Conv2dEpsilon
        return cls.from_module(layer, epsilon=self.epsilon)


@dataclass(frozen=True)
class Gamma(Rule):
    """The gamma rule: ``W + gamma W+`` for the positive contributions (RULES.md section 3)."""

    gamma: float = 0.25
    epsilon: float = 1e-6
    name = "gamma"
    transform = "abs"

    def linear(self, x, weight, bias, transform, gi):
        return lf.linear_gamma(x, weight, bias, self.gamma, self.epsilon, transform, gi)

    def conv2d(self, x, weight, bias, stride, padding, dilation, groups, transform, gi):
        return lf.conv2d_gamma(
            x, weight, bias, stride, padding, dilation, groups, self.gamma, self.epsilon, transform, gi
        )

    def module(self, layer):
        cls = lm.LinearGamma if isinstance(layer, nn.Linear) else lm.Conv2dGamma
        return cls.from_module(layer, gamma=self.gamma, epsilon=self.epsilon)


@dataclass(frozen=True)
class AlphaBeta(Rule):
    """The alpha-beta rule, ``alpha - beta = 1`` (RULES.md section 3)."""

    alpha: float = 2.0
    beta: float = 1.0
    epsilon: float = 1e-6
    name = "alpha_beta"
    transform = "pos+neg"

    def linear(self, x, weight, bias, transform, gi):
        pos, neg = transform if transform is not None else (None, None)
        return lf.linear_alpha_beta(x, weight, bias, self.alpha, self.beta, self.epsilon, pos, neg, gi)

    def conv2d(self, x, weight, bias, stride, padding, dilation, groups, transform, gi):
        pos, neg = transform if transform is not None else (None, None)
        return lf.conv2d_alpha_beta(
            x, weight, bias, stride, padding, dilation, groups, self.alpha, self.beta, self.epsilon, pos, neg, gi
        )

    def module(self, layer):
        cls = lm.LinearAlphaBeta if isinstance(layer, nn.Linear) else lm.Conv2dAlphaBeta
        return cls.from_module(layer, alpha=self.alpha, beta=self.beta, epsilon=self.epsilon)


@dataclass(frozen=True)
class ZPlus(Rule):
    """The z-plus rule: numerators ``x_i w_ij+`` (RULES.md section 3)."""

    epsilon: float = 1e-6
    name = "z_plus"
    transform = "pos"

    def linear(self, x, weight, bias, transform, gi):
        return lf.linear_z_plus(x, weight, bias, self.epsilon, transform, gi)

    def conv2d(self, x, weight, bias, stride, padding, dilation, groups, transform, gi):
        return lf.conv2d_z_plus(x, weight, bias, stride, padding, dilation, groups, self.epsilon, transform, gi)

    def module(self, layer):
        cls = lm.LinearZPlus if isinstance(layer, nn.Linear) else lm.Conv2dZPlus
        return cls.from_module(layer, epsilon=self.epsilon)


@dataclass(frozen=True, eq=False)
class ZBox(Rule):
    """The z-box rule for an input layer with ``low <= x <= high`` (numbers, or tensors broadcastable
    to the layer's input such as per-channel ``[C, 1, 1]`` bounds)."""

    low: Bound = 0.0
    high: Bound = 1.0
    epsilon: float = 1e-6
    name = "z_box"
    transform = "abs"

    def _bounds(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        return (
            torch.as_tensor(self.low, dtype=x.dtype, device=x.device),
            torch.as_tensor(self.high, dtype=x.dtype, device=x.device),
        )

    def linear(self, x, weight, bias, transform, gi):
        lo, hi = self._bounds(x)
        return lf.linear_z_box(x, weight, bias, lo, hi, self.epsilon, transform, gi)

    def conv2d(self, x, weight, bias, stride, padding, dilation, groups, transform, gi):
        lo, hi = self._bounds(x)
        return lf.conv2d_z_box(x, weight, bias, lo, hi, stride, padding, dilation, groups, self.epsilon, transform, gi)

    def module(self, layer):
        cls = lm.LinearZBox if isinstance(layer, nn.Linear) else lm.Conv2dZBox
        return cls.from_module(layer, lower=self.low, upper=self.high, epsilon=self.epsilon)

    def __repr__(self) -> str:
        def show(b):
            return f"tensor{tuple(b.shape)}" if isinstance(b, Tensor) else repr(b)

        return f"ZBox(low={show(self.low)}, high={show(self.high)}, epsilon={self.epsilon})"


@dataclass(frozen=True)
class Flat(Rule):
    """The flat rule: every connected input takes an equal share (RULES.md section 3)."""

    epsilon: float = 1e-6
    name = "flat"

    def linear(self, x, weight, bias, transform, gi):
        return lf.linear_flat(x, weight, bias, self.epsilon, gi)

    def conv2d(self, x, weight, bias, stride, padding, dilation, groups, transform, gi):
        return lf.conv2d_flat(x, weight, bias, stride, padding, dilation, groups, self.epsilon, gi)

    def module(self, layer):
        cls = lm.LinearFlat if isinstance(layer, nn.Linear) else lm.Conv2dFlat
        return cls.from_module(layer, epsilon=self.epsilon)


@dataclass(frozen=True)
class WSquare(Rule):
    """The w-square rule: numerators ``w_ij**2`` (RULES.md section 3)."""

    epsilon: float = 1e-6
    name = "w_square"
    transform = "sq"

    def linear(self, x, weight, bias, transform, gi):
        return lf.linear_w_square(x, weight, bias, self.epsilon, transform, gi)

    def conv2d(self, x, weight, bias, stride, padding, dilation, groups, transform, gi):
        return lf.conv2d_w_square(x, weight, bias, stride, padding, dilation, groups, self.epsilon, transform, gi)

    def module(self, layer):
        cls = lm.LinearWSquare if isinstance(layer, nn.Linear) else lm.Conv2dWSquare
        return cls.from_module(layer, epsilon=self.epsilon)


@dataclass(frozen=True)
class Pass(Rule):
    """Leaves the layer as it is (the patch's or composite's default treatment)."""

    name = "pass"


# ----------------------------------------------------------------------------- presets
RuleKey = Union[str, type]


@dataclass(frozen=True)
class Preset:
    """Which rule each linear and convolution layer takes, and how the rest of the model is treated.
    Frozen: :meth:`with_rules` and :func:`dataclasses.replace` make changed copies.

    * ``types``: ``{module type: rule}``; a layer takes the rule of the most specific listed type
      it is an instance of (``nn.Linear``, ``nn.Conv2d``).
    * ``first``: the rule of the model's first linear or convolution layer in module order (the
      input layer, e.g. z-box for pixels), or ``None``.
    * ``names``: ``{qualified module name: rule}``, the highest priority. For an
      ``nn.MultiheadAttention`` named ``attn``, ``"attn.in_proj"`` names its input projection and
      ``"attn.out_proj"`` its output projection.
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
                raise TypeError(f"lrpcpp.Preset: the rule for {key!r} must be an lrpcpp.presets rule, got {rule!r}")
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
                    rule = self.names.get(key) or self._by_type(module.out_proj)
                    if rule is not None and not isinstance(rule, Pass):
                        out[key] = rule
                first_seen = True
                continue
            if not isinstance(module, (nn.Linear, nn.Conv2d)) or name in inside_mha:
                continue
            rule = self._by_type(module)
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


def register_preset(name: str) -> Callable[[Callable[..., Preset]], Callable[..., Preset]]:
    """Decorator: registers ``fn(**arguments) -> Preset`` under ``name`` (replacing an earlier one)."""

    def register(fn: Callable[..., Preset]) -> Callable[..., Preset]:
        PRESETS[name] = fn
        return fn

    return register


def preset_arguments(name: str) -> Tuple[str, ...]:
    """The keyword arguments the preset ``name`` takes."""
    return tuple(inspect.signature(_factory(name)).parameters)


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
    fn = PRESETS.get(name)
    if fn is None:
        raise ValueError(f"lrpcpp: unknown preset {name!r}; registered presets: {', '.join(sorted(PRESETS))}")
    return fn


def get_preset(
    preset: Union[str, Preset], rules: Optional[Mapping[RuleKey, Optional[Rule]]] = None, **arguments: Any
) -> Preset:
    """The :class:`Preset` registered as ``preset`` built with ``arguments`` (or ``preset`` itself),
    with the per-layer overrides ``rules`` applied."""
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
        built = dataclasses.replace(built, name=preset)
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
def vit(gamma_linear: float = 0.05, gamma_conv: float = 0.25, epsilon: float = 1e-6) -> Preset:
    """The AttnLRP recipe for Vision Transformers: CP-LRP in attention (query and key held constant),
    the gamma rule on linear layers (``gamma_linear``) and convolutions (``gamma_conv``)."""
    return Preset(
        types={nn.Linear: Gamma(gamma_linear, epsilon), nn.Conv2d: Gamma(gamma_conv, epsilon)}, method="cp-lrp"
    )


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
    return Preset(types={nn.Linear: Epsilon(epsilon), nn.Conv2d: Gamma(gamma, epsilon)}, first=ZBox(low, high, epsilon))


@register_preset("epsilon_plus")
def epsilon_plus(epsilon: float = 1e-6) -> Preset:
    """z-plus on convolutions, epsilon on linear layers."""
    return Preset(types={nn.Linear: Epsilon(epsilon), nn.Conv2d: ZPlus(epsilon)})


@register_preset("epsilon_plus_flat")
def epsilon_plus_flat(epsilon: float = 1e-6) -> Preset:
    """As ``epsilon_plus``, with the flat rule on the input layer."""
    return Preset(types={nn.Linear: Epsilon(epsilon), nn.Conv2d: ZPlus(epsilon)}, first=Flat(epsilon))


@register_preset("epsilon_alpha2_beta1")
def epsilon_alpha2_beta1(epsilon: float = 1e-6) -> Preset:
    """alpha-beta with alpha = 2, beta = 1 on convolutions, epsilon on linear layers."""
    return Preset(types={nn.Linear: Epsilon(epsilon), nn.Conv2d: AlphaBeta(2.0, 1.0, epsilon)})


@register_preset("epsilon_alpha2_beta1_flat")
def epsilon_alpha2_beta1_flat(epsilon: float = 1e-6) -> Preset:
    """As ``epsilon_alpha2_beta1``, with the flat rule on the input layer."""
    return Preset(types={nn.Linear: Epsilon(epsilon), nn.Conv2d: AlphaBeta(2.0, 1.0, epsilon)}, first=Flat(epsilon))


# ----------------------------------------------------------------------------- batch-norm merging
_PAIRS: "weakref.WeakKeyDictionary[nn.Module, Tuple[Tuple[int, ...], List[Tuple[str, str]]]]" = (
    weakref.WeakKeyDictionary()
)


def conv_bn_pairs(model: nn.Module) -> List[Tuple[str, str]]:
    """``(convolution name, batch-norm name)`` for every ``BatchNorm2d`` whose input is the output of
    an ``nn.Conv2d`` and nothing else, found by tracing the model with ``torch.fx``; where the model
    cannot be traced, the pairs that follow each other directly in an ``nn.Sequential``."""
    modules = dict(model.named_modules())
    if not any(isinstance(m, nn.BatchNorm2d) for m in modules.values()):
        return []
    structure = tuple(id(m) for m in modules.values())
    cached = _PAIRS.get(model)
    if cached is not None and cached[0] == structure:
        return list(cached[1])
    try:
        pairs = _traced_pairs(model, modules)
    except Exception:  # dynamic control flow, unsupported calls: fall back to the module structure
        pairs = _sequential_pairs(model)
    _PAIRS[model] = (structure, pairs)
    return list(pairs)


def _traced_pairs(model: nn.Module, modules: Mapping[str, nn.Module]) -> List[Tuple[str, str]]:
    import torch.fx

    graph = torch.fx.Tracer().trace(model)
    calls: Dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0] if node.args else None
        if not isinstance(src, torch.fx.Node) or src.op != "call_module":
            continue
        conv = modules.get(src.target)
        if (
            isinstance(conv, nn.Conv2d)
            and len(src.users) == 1
            and calls[src.target] == 1
            and calls[node.target] == 1
            and conv.out_channels == modules[node.target].num_features
        ):
            pairs.append((src.target, node.target))
    return pairs


def _sequential_pairs(model: nn.Module) -> List[Tuple[str, str]]:
    pairs = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (a, conv), (b, bn) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and conv.out_channels == bn.num_features:
                prefix = f"{name}." if name else ""
                pairs.append((prefix + a, prefix + b))
    return pairs


def _mergeable(bn: nn.BatchNorm2d) -> bool:
    return bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None


# conv weight -> (state of the sources, merged weight, merged bias)
_MERGED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def merged_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Tuple[Tensor, Tensor]:
    """The weight and bias of ``bn(conv(x))`` as one convolution (eval-mode batch norm), computed in
    float64 and cast to the weight's dtype; computed once and reused while the convolution's and
    batch norm's tensors are unchanged."""
    sources = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    state = tuple(None if t is None else (id(t), t._version, t.data_ptr(), t.device, t.dtype) for t in sources)
    state += (bn.eps,)
    hit = _MERGED.get(conv.weight)
    if hit is not None and hit[0] == state:
        return hit[1], hit[2]
    with torch.no_grad():
        w = conv.weight.detach()
        var = bn.running_var.detach().double()
        scale = torch.rsqrt(var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.detach().double()
        shift = -bn.running_mean.detach().double()
        if conv.bias is not None:
            shift = shift + conv.bias.detach().double()
        bias = shift * scale
        if bn.bias is not None:
            bias = bias + bn.bias.detach().double()
        weight = (w.double() * scale.reshape(-1, 1, 1, 1)).to(w.dtype)
        bias = bias.to(w.dtype)
    _MERGED[conv.weight] = (state, weight, bias)
    return weight, bias


class MergedBatchNorm(nn.Module):
    """Stands in for a batch norm merged into the convolution before it (:class:`lrpcpp.Composite`
    with a preset): a copy of its input, as a batch norm's output is a new tensor."""

    def __init__(self, into: str) -> None:
        super().__init__()
        self.into = into

    def forward(self, x: Tensor) -> Tensor:
        return x.clone()

    def extra_repr(self) -> str:
        return f"merged into {self.into!r}"


def _merged_module(rule: Rule, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Module:
    new = rule.module(conv)
    weight, bias = merged_conv_bn(conv, bn)
    new._parameters["weight"] = nn.Parameter(weight, requires_grad=False)
    new._parameters["bias"] = nn.Parameter(bias, requires_grad=False)
    return new


def composite_name_map(preset: Preset, model: nn.Module) -> Dict[str, Callable[[nn.Module], nn.Module]]:
    """The ``name_map`` of :class:`lrpcpp.Composite` for ``preset`` on ``model``: a drop-in with the
    layer's rule for each linear and convolution layer, and, where ``preset.merge_batch_norm``, the
    batch norm merged into the convolution before it (computed from its running statistics now)."""
    modules = dict(model.named_modules())
    # nn.MultiheadAttention reads its projections' weights itself: they keep the composite's treatment
    mha = {n for n, m in modules.items() if isinstance(m, nn.MultiheadAttention)}
    assigned = {n: r for n, r in preset.assign(model).items() if n in modules and n.rpartition(".")[0] not in mha}
    out: Dict[str, Callable[[nn.Module], nn.Module]] = {
        name: (lambda r: lambda m: r.module(m))(rule) for name, rule in assigned.items()
    }
    if preset.merge_batch_norm:
        for conv_name, bn_name in conv_bn_pairs(model):
            bn = modules[bn_name]
            if conv_name in assigned and _mergeable(bn) and not bn.training:
                out[conv_name] = (lambda r, b: lambda m: _merged_module(r, m, b))(assigned[conv_name], bn)
                out[bn_name] = (lambda c: lambda m: MergedBatchNorm(c))(conv_name)
    return out


# ----------------------------------------------------------------------------- patching
def _conv_geometry(conv: nn.Conv2d) -> Tuple[List[int], str, List[int]]:
    """(explicit pre-padding, its mode, the convolution's numeric padding), as Conv2dEpsilon pads."""
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        return [int(p) for p in conv._reversed_padding_repeated_twice], mode, [0, 0]
    return [], "constant", [int(p) for p in conv.padding]


def _transform(rule: Rule, weight: Tensor):
    """The cached weight transform(s) a rule's op takes: None, a tensor, or a tuple of tensors."""
    if not rule.transform:
        return None
    kinds = rule.transform.split("+")
    if len(kinds) == 1:
        return lm.weight_transform(weight, kinds[0])
    return tuple(lm.weight_transform(weight, k) for k in kinds)


def _rows(t, rows: slice):
    if t is None:
        return None
    return tuple(u[rows] for u in t) if isinstance(t, tuple) else t[rows]


def _linear_forward(module: nn.Linear, rule: Rule, gi: bool) -> Callable[[Tensor], Tensor]:
    def forward(x: Tensor) -> Tensor:
        return rule.linear(x, module.weight, module.bias, _transform(rule, module.weight), gi)

    return forward


def _conv_forward(
    conv: nn.Conv2d, rule: Optional[Rule], gi: bool, bn: Optional[nn.BatchNorm2d] = None
) -> Callable[[Tensor], Tensor]:
    pre_pad, mode, padding = _conv_geometry(conv)
    plain = types.MethodType(type(conv).forward, conv)

    def forward(x: Tensor) -> Tensor:
        merge = bn is not None and not bn.training
        if rule is None and not merge:
            return plain(x)
        if merge:
            weight, bias = merged_conv_bn(conv, bn)
        else:
            weight, bias = conv.weight, conv.bias
        if pre_pad:
            x = F.pad(x, pre_pad, mode=mode)
        if rule is None:
            return F.conv2d(x, weight, bias, conv.stride, padding, conv.dilation, conv.groups)
        return rule.conv2d(
            x, weight, bias, conv.stride, padding, conv.dilation, conv.groups, _transform(rule, weight), gi
        )

    return forward


def _bn_forward(bn: nn.BatchNorm2d) -> Callable[[Tensor], Tensor]:
    plain = types.MethodType(type(bn).forward, bn)

    def forward(x: Tensor) -> Tensor:
        # merged into the convolution before it (eval mode); in training mode, the batch norm itself.
        # A copy, as the batch norm's output is a new tensor: code after it may update it in place
        # (a residual `out += identity`), which must not touch the output the convolution's rule keeps.
        return plain(x) if bn.training else x.clone()

    return forward


def _mha_forward(mha: nn.MultiheadAttention, in_rule: Optional[Rule], out_rule: Optional[Rule], gi: bool) -> Callable:
    """``nn.MultiheadAttention.forward`` (packed input projection) with the rules on its input and
    output projections. The attention itself is ``F.scaled_dot_product_attention`` (or, when the
    weights are requested, the explicit softmax), so the patch's treatment of attention applies."""

    def project(rule: Optional[Rule], x: Tensor, rows: slice, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        w = weight[rows]
        b = None if bias is None else bias[rows]
        if rule is None:  # the patch's own treatment of a linear map
            return F.linear(x, w, b)
        return rule.linear(x, w, b, _rows(_transform(rule, weight), rows), gi)

    def forward(
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif mha.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # [seq, batch, embed] from here on
        e, h = mha.embed_dim, mha.num_heads
        d = e // h
        tgt, bsz = query.shape[0], query.shape[1]
        src = key.shape[0]
        q = project(in_rule, query, slice(0, e), mha.in_proj_weight, mha.in_proj_bias)
        k = project(in_rule, key, slice(e, 2 * e), mha.in_proj_weight, mha.in_proj_bias)
        v = project(in_rule, value, slice(2 * e, 3 * e), mha.in_proj_weight, mha.in_proj_bias)
        q = q.reshape(tgt, bsz * h, d).transpose(0, 1).reshape(bsz, h, tgt, d)
        k = k.reshape(src, bsz * h, d).transpose(0, 1).reshape(bsz, h, src, d)
        v = v.reshape(src, bsz * h, d).transpose(0, 1).reshape(bsz, h, src, d)
        mask = _additive_mask(attn_mask, key_padding_mask, bsz, h, tgt, src, q.dtype, q.device)
        if need_weights:
            scores = torch.matmul(q, k.transpose(-2, -1)) / (d**0.5)
            if mask is not None:
                scores = scores + mask
            if is_causal and mask is None:
                causal = torch.ones(tgt, src, dtype=torch.bool, device=q.device).tril()
                scores = scores.masked_fill(~causal, float("-inf"))
            weights = torch.softmax(scores, dim=-1)
            out = torch.matmul(weights, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)
            weights = None
        out = out.permute(2, 0, 1, 3).reshape(tgt, bsz, e)
        out = project(out_rule, out, slice(0, e), mha.out_proj.weight, mha.out_proj.bias)
        if not batched:
            out = out.squeeze(1)
        elif mha.batch_first:
            out = out.transpose(0, 1)
        if weights is not None:
            weights = weights.detach()
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        return out, weights

    return forward


def _additive_mask(attn_mask, key_padding_mask, bsz, h, tgt, src, dtype, device) -> Optional[Tensor]:
    """nn.MultiheadAttention's masks (True or -inf = not attended) as one additive float mask."""
    mask = None

    def as_float(m: Tensor) -> Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=device).masked_fill(m, float("-inf"))
        return m.to(dtype)

    if attn_mask is not None:
        m = as_float(attn_mask)
        mask = m.reshape(bsz, h, tgt, src) if m.dim() == 3 else m
    if key_padding_mask is not None:
        kp = as_float(key_padding_mask).reshape(bsz, 1, 1, src)
        mask = kp if mask is None else mask + kp
    return mask


def _check_mha(name: str, mha: nn.MultiheadAttention) -> None:
    from .families import UnsupportedModelError

    if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn or mha.dropout:
        raise UnsupportedModelError(
            f"lrpcpp: the layer rules of a preset support nn.MultiheadAttention with one packed input "
            f"projection, no bias_k/bias_v, no add_zero_attn and no dropout; {name} has another configuration "
            f"(override it with rules={{'{name}.in_proj': None, '{name}.out_proj': None}} to keep its projections "
            "as they are)"
        )


def apply(handle: Any, preset: Preset) -> None:
    """Puts ``preset``'s layer rules on the model of a :class:`lrpcpp.PatchHandle`: an instance
    ``forward`` per linear, convolution and multi-head attention layer (and batch norm merged into
    the convolution before it), each undone by ``handle.remove()``. Records the rule of each layer
    in ``handle.layer_rules``."""
    model = handle.model
    gi = handle.mode == "gradient"
    assigned = preset.assign(model)
    modules = dict(model.named_modules())
    merged: Dict[str, nn.BatchNorm2d] = {}
    if preset.merge_batch_norm:
        for conv_name, bn_name in conv_bn_pairs(model):
            bn = modules[bn_name]
            if _mergeable(bn):
                merged[conv_name] = bn
                handle.merged_batch_norms[conv_name] = bn_name
                handle._set_forward(bn_name, bn, _bn_forward(bn), f"merged into {conv_name}")
    for name, module in modules.items():
        if isinstance(module, nn.MultiheadAttention):
            in_rule, out_rule = assigned.get(f"{name}.in_proj"), assigned.get(f"{name}.out_proj")
            if in_rule is None and out_rule is None:
                continue
            _check_mha(name, module)
            handle._set_forward(
                name, module, _mha_forward(module, in_rule, out_rule, gi), f"projections: in {in_rule}, out {out_rule}"
            )
            for part, rule in (("in_proj", in_rule), ("out_proj", out_rule)):
                if rule is not None:
                    handle.layer_rules[f"{name}.{part}"] = rule
        elif isinstance(module, nn.Conv2d) and (name in assigned or name in merged):
            rule = assigned.get(name)
            what = f"rule {rule}" if rule is not None else "plain"
            if name in merged:
                what += f", batch norm {handle.merged_batch_norms[name]} merged"
            handle._set_forward(name, module, _conv_forward(module, rule, gi, merged.get(name)), what)
            if rule is not None:
                handle.layer_rules[name] = rule
        elif isinstance(module, nn.Linear) and name in assigned:
            rule = assigned[name]
            handle._set_forward(name, module, _linear_forward(module, rule, gi), f"rule {rule}")
            handle.layer_rules[name] = rule
