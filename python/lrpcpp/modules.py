"""Drop-in ``torch.nn`` modules whose backward pass carries LRP relevance.

Each class subclasses the torch module it replaces, so it has the same
constructor, parameters and ``state_dict``; ``from_module(m)`` builds one that
shares ``m``'s parameters and buffers (no copy)::

    import lrpcpp.modules as lm

    layer = lm.LinearEpsilon(10, 20)
    layer = lm.LinearEpsilon.from_module(existing_linear)

All modules but the rule-taking convolution drop-ins (Conv1dRule, ...) are TorchScript-compatible.
"""

from typing import Any, Callable, Dict, List, Optional, Tuple, Type, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.weak import WeakIdKeyDictionary

from . import functional as lf

__all__ = [
    "LinearEpsilon",
    "Conv2dEpsilon",
    "SoftmaxDT",
    "RMSNormIdentity",
    "LayerNormEpsilon",
    "LayerNormIdentity",
    "SiLUIdentity",
    "GELUIdentity",
    "TanhIdentity",
    "ReLUIdentity",
    "SigmoidIdentity",
    "LinearGamma",
    "LinearAlphaBeta",
    "LinearZPlus",
    "LinearZBox",
    "LinearFlat",
    "LinearWSquare",
    "Conv2dGamma",
    "Conv2dAlphaBeta",
    "Conv2dZPlus",
    "Conv2dZBox",
    "Conv2dFlat",
    "Conv2dWSquare",
    "Conv1dRule",
    "Conv3dRule",
    "ConvTranspose1dRule",
    "ConvTranspose2dRule",
    "ConvTranspose3dRule",
    "CONVOLUTION_RULE_MODULES",
    "MultiheadAttention",
    "weight_transform",
    "clear_weight_transforms",
]


class _FromModule:
    """``from_module``: an instance of the rule class that shares a torch module's state."""

    # set by each subclass: the torch class it replaces, and its rule options with defaults
    _replaces = nn.Module
    _rule_defaults = {}  # type: ignore[var-annotated]

    @classmethod
    def from_module(cls, module: nn.Module, **rule_options: Any):
        if not isinstance(module, cls._replaces):
            raise TypeError(
                f"{cls.__name__}.from_module expects a {cls._replaces.__module__}.{cls._replaces.__name__}, "
                f"got {type(module).__name__}"
            )
        unknown = set(rule_options) - set(cls._rule_defaults)
        if unknown:
            raise TypeError(
                f"{cls.__name__}.from_module got unknown options {sorted(unknown)}; "
                f"it takes {sorted(cls._rule_defaults)}"
            )
        new = cls.__new__(cls)
        # a shallow copy of the state: the same Parameter and buffer objects, own dicts
        new.__dict__.update({k: (v.copy() if isinstance(v, dict) else v) for k, v in module.__dict__.items()})
        for name, default in cls._rule_defaults.items():
            setattr(new, name, rule_options.get(name, default))
        new._lrp_setup()
        return new

    def _lrp_setup(self) -> None:
        """Derive rule-specific attributes after construction or from_module."""


def _check_epsilon(cls_name: str, epsilon: float) -> None:
    if not epsilon >= 0:
        raise ValueError(f"{cls_name}: expected epsilon >= 0, got {epsilon}")


class LinearEpsilon(_FromModule, nn.Linear):
    """``nn.Linear`` with the epsilon rule (AttnLRP Eq. 8)."""

    _replaces = nn.Linear
    _rule_defaults = {"epsilon": 1e-6}
    epsilon: float

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, epsilon: float = 1e-6
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        _check_epsilon(type(self).__name__, epsilon)
        self.epsilon = epsilon

    def forward(self, x: Tensor) -> Tensor:
        return lf.linear_epsilon(x, self.weight, self.bias, self.epsilon)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, epsilon={self.epsilon}"


class Conv2dEpsilon(_FromModule, nn.Conv2d):
    """``nn.Conv2d`` with the epsilon rule. String padding and non-zero padding modes pad explicitly first."""

    _replaces = nn.Conv2d
    _rule_defaults = {"epsilon": 1e-6}
    epsilon: float
    _lrp_pre_pad: List[int]
    _lrp_padding: List[int]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        epsilon: float = 1e-6,
    ) -> None:
        # torch's stub: the argument padding_mode is a Literal, the attribute a str
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,  # type: ignore[arg-type]
            device,
            dtype,
        )
        _check_epsilon(type(self).__name__, epsilon)
        self.epsilon = epsilon
        self._lrp_setup()

    def _lrp_setup(self) -> None:
        # padding='same'/'valid' or a non-zero padding_mode: pad explicitly, then convolve unpadded
        if isinstance(self.padding, str) or self.padding_mode != "zeros":
            self._lrp_pre_pad = [int(p) for p in self._reversed_padding_repeated_twice]
            self._lrp_padding = [0, 0]
        else:
            self._lrp_pre_pad = []
            self._lrp_padding = [int(p) for p in self.padding]

    def forward(self, x: Tensor) -> Tensor:
        if len(self._lrp_pre_pad) > 0:
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._lrp_pre_pad, mode=mode)
        return lf.conv2d_epsilon(
            x, self.weight, self.bias, self.stride, self._lrp_padding, self.dilation, self.groups, self.epsilon
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, epsilon={self.epsilon}"


def _legacy_softmax_dim(ndim: int) -> int:
    return 0 if ndim in (0, 1, 3) else 1


class SoftmaxDT(_FromModule, nn.Softmax):
    """``nn.Softmax`` with the Deep Taylor rule with bias (AttnLRP Prop. 3.1); optional temperature."""

    _replaces = nn.Softmax
    _rule_defaults = {"temperature": 1.0}
    temperature: float

    def __init__(self, dim: Optional[int] = None, temperature: float = 1.0) -> None:
        super().__init__(dim)
        if not temperature > 0:
            raise ValueError(f"SoftmaxDT: expected temperature > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, x: Tensor) -> Tensor:
        dim = self.dim
        if dim is None:
            dim = _legacy_softmax_dim(x.dim())
        return lf.softmax(x, dim, self.temperature)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, temperature={self.temperature}"


class RMSNormIdentity(_FromModule, nn.RMSNorm):
    """``nn.RMSNorm`` with the identity rule (AttnLRP Prop. 3.4)."""

    _replaces = nn.RMSNorm

    def forward(self, x: Tensor) -> Tensor:
        return lf.rms_norm_identity(x, list(self.normalized_shape), self.weight, self.eps)


class LayerNormEpsilon(_FromModule, nn.LayerNorm):
    """``nn.LayerNorm`` with the epsilon rule, the standard deviation treated as a constant."""

    _replaces = nn.LayerNorm
    _rule_defaults = {"epsilon": 1e-6}
    epsilon: float

    def __init__(
        self,
        normalized_shape,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
        epsilon: float = 1e-6,
    ) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        _check_epsilon(type(self).__name__, epsilon)
        self.epsilon = epsilon

    def forward(self, x: Tensor) -> Tensor:
        return lf.layer_norm(x, list(self.normalized_shape), self.weight, self.bias, self.eps, self.epsilon)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, epsilon={self.epsilon}"


class LayerNormIdentity(_FromModule, nn.LayerNorm):
    """``nn.LayerNorm`` with the identity rule."""

    _replaces = nn.LayerNorm

    def forward(self, x: Tensor) -> Tensor:
        return lf.layer_norm_identity(x, list(self.normalized_shape), self.weight, self.bias, self.eps)


class SiLUIdentity(_FromModule, nn.SiLU):
    """``nn.SiLU`` with the identity rule."""

    _replaces = nn.SiLU

    def forward(self, x: Tensor) -> Tensor:
        return lf.silu(x)


class GELUIdentity(_FromModule, nn.GELU):
    """``nn.GELU`` (``approximate`` 'none' or 'tanh') with the identity rule."""

    _replaces = nn.GELU

    def forward(self, x: Tensor) -> Tensor:
        return lf.gelu(x, self.approximate)


class TanhIdentity(_FromModule, nn.Tanh):
    """``nn.Tanh`` with the identity rule."""

    _replaces = nn.Tanh

    def forward(self, x: Tensor) -> Tensor:
        return lf.tanh(x)


class ReLUIdentity(_FromModule, nn.ReLU):
    """``nn.ReLU`` with the identity rule (always out of place)."""

    _replaces = nn.ReLU

    def forward(self, x: Tensor) -> Tensor:
        return lf.relu(x)


class SigmoidIdentity(_FromModule, nn.Sigmoid):
    """``nn.Sigmoid`` with the identity rule."""

    _replaces = nn.Sigmoid

    def forward(self, x: Tensor) -> Tensor:
        return lf.sigmoid(x)


# ----------------------------------------------------------------------------- vision rules
# RULES.md section 3. The rules multiply by transforms of the weight (|W|, max(W, 0), min(W, 0), W**2);
# weight_transform computes it once per weight and hands out the same tensor while the weight is
# unchanged, so that neither a module nor a patched model rebuilds it per call.

_TRANSFORM_FUNCTIONS: Dict[str, Callable[[Tensor], Tensor]] = {
    "abs": torch.abs,
    "pos": lambda w: w.clamp_min(0),
    "neg": lambda w: w.clamp_max(0),
    "sq": lambda w: w * w,
}

# weight tensor -> {kind: (key of the weight's state, transform)}; entries die with their weight
_TRANSFORMS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _weight_state(weight: Tensor) -> Tuple[Any, ...]:
    return (
        weight._version,
        weight.data_ptr(),
        weight.device,
        weight.dtype,
        tuple(weight.shape),
        tuple(weight.stride()),
    )


def weight_transform(weight: Tensor, kind: str) -> Tensor:
    """``|W|`` (``kind="abs"``), ``max(W, 0)`` (``"pos"``), ``min(W, 0)`` (``"neg"``) or ``W**2``
    (``"sq"``) of ``weight``,
    computed once and returned again, as the same tensor, while ``weight`` is the same tensor object
    with the same version counter (no in-place update since), storage, device, dtype and layout.
    The transform takes no gradient. Entries are dropped with their weight, or by
    :func:`clear_weight_transforms`.
    """
    fn = _TRANSFORM_FUNCTIONS.get(kind)
    if fn is None:
        raise ValueError(
            f"lrpcpp.modules.weight_transform: kind must be one of {sorted(_TRANSFORM_FUNCTIONS)}, got {kind!r}"
        )
    state = _weight_state(weight)
    entries = _TRANSFORMS.get(weight)
    if entries is None:
        entries = {}
        _TRANSFORMS[weight] = entries
    hit = entries.get(kind)
    if hit is not None and hit[0] == state:
        return hit[1]
    with torch.no_grad():
        value = fn(weight.detach())
    entries[kind] = (state, value)
    return value


def clear_weight_transforms() -> None:
    """Drops every cached weight transform (they are rebuilt on the next use)."""
    _TRANSFORMS.clear()


def _check_rule_options(cls_name: str, options: Dict[str, Any]) -> None:
    if "epsilon" in options:
        _check_epsilon(cls_name, options["epsilon"])
    if "gamma" in options and not options["gamma"] >= 0:
        raise ValueError(f"{cls_name}: expected gamma >= 0, got {options['gamma']}")
    if "alpha" in options:
        alpha, beta = options["alpha"], options["beta"]
        if not (beta >= 0 and abs(alpha - beta - 1.0) <= 1e-9):
            raise ValueError(f"{cls_name}: expected alpha - beta = 1 and beta >= 0, got alpha={alpha}, beta={beta}")


class _VisionRule(_FromModule):
    """Common part of the vision-rule modules: rule options, the cached weight transform, repr."""

    _transform_kind = ""  # "abs", "pos", "sq" or "" (none)
    weight: Tensor  # the layer's (nn.Linear or nn.Conv2d, the other base class)

    def _set_rule_options(self, options: Dict[str, Any]) -> None:
        unknown = set(options) - set(self._rule_defaults)
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unknown options {sorted(unknown)}; it takes {sorted(self._rule_defaults)}"
            )
        for name, default in self._rule_defaults.items():
            setattr(self, name, options.get(name, default))

    def _lrp_setup(self) -> None:
        _check_rule_options(type(self).__name__, {k: getattr(self, k) for k in self._rule_defaults})

    @torch.jit.unused
    def _weight_transform(self) -> Optional[Tensor]:
        """The rule's weight transform, from the cache (None when the rule needs none)."""
        return weight_transform(self.weight, self._transform_kind) if self._transform_kind else None

    @torch.jit.unused
    def _pos_neg(self) -> Tuple[Tensor, Tensor]:
        """max(W, 0) and min(W, 0), from the cache (the alpha-beta rule)."""
        return weight_transform(self.weight, "pos"), weight_transform(self.weight, "neg")

    def extra_repr(self) -> str:
        options = ", ".join(f"{k}={getattr(self, k)}" for k in self._rule_defaults if k not in ("lower", "upper"))
        return f"{super().extra_repr()}, {options}"  # type: ignore[misc]  # nn.Linear/Conv2d's, later in the MRO


class _LinearRule(_VisionRule, nn.Linear):
    _replaces = nn.Linear

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, **rule_options: Any
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias, device, dtype)
        self._set_rule_options(rule_options)
        self._lrp_setup()


class _Conv2dRule(_VisionRule, nn.Conv2d):
    _replaces = nn.Conv2d
    _lrp_pre_pad: List[int]
    _lrp_padding: List[int]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        **rule_options: Any,
    ) -> None:
        nn.Conv2d.__init__(
            self,
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,  # type: ignore[arg-type]  # torch's stub: the argument is a Literal, the attribute a str
            device,
            dtype,
        )
        self._set_rule_options(rule_options)
        self._lrp_setup()

    def _lrp_setup(self) -> None:
        super()._lrp_setup()
        # as Conv2dEpsilon: string padding or a non-zero padding_mode pads explicitly first
        if isinstance(self.padding, str) or self.padding_mode != "zeros":
            self._lrp_pre_pad = [int(p) for p in self._reversed_padding_repeated_twice]
            self._lrp_padding = [0, 0]
        else:
            self._lrp_pre_pad = []
            self._lrp_padding = [int(p) for p in self.padding]

    def _padded(self, x: Tensor) -> Tensor:
        if len(self._lrp_pre_pad) > 0:
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._lrp_pre_pad, mode=mode)
        return x


class _Bounded:
    """z-box: the bounds as (non-persistent) buffers in the weight's dtype and on its device."""

    lower: Tensor
    upper: Tensor

    def _lrp_setup(self) -> None:
        super()._lrp_setup()  # type: ignore[misc]
        weight = self.weight  # type: ignore[attr-defined]
        for name in ("lower", "upper"):
            value = getattr(self, name)
            if value is None:
                raise ValueError(f"{type(self).__name__}: the z-box rule needs both bounds, lower and upper")
            tensor = torch.as_tensor(value, dtype=weight.dtype, device=weight.device).detach().clone()
            self.__dict__.pop(name, None)
            self._buffers.pop(name, None)  # type: ignore[attr-defined]
            self.register_buffer(name, tensor, persistent=False)  # type: ignore[attr-defined]
        if bool((self.lower > self.upper).any()):  # type: ignore[attr-defined]
            raise ValueError(f"{type(self).__name__}: expected lower <= upper")


class LinearGamma(_LinearRule):
    """``nn.Linear`` with the gamma rule (:func:`lrpcpp.functional.linear_gamma`); options ``gamma``,
    ``epsilon``, ``gi``. ``|W|`` comes from :func:`weight_transform`."""

    _rule_defaults = {"gamma": 0.25, "epsilon": 1e-6, "gi": False}
    _transform_kind = "abs"
    gamma: float
    epsilon: float
    gi: bool

    def forward(self, x: Tensor) -> Tensor:
        t = None if torch.jit.is_scripting() else self._weight_transform()
        return lf.linear_gamma(x, self.weight, self.bias, self.gamma, self.epsilon, t, self.gi)


class LinearAlphaBeta(_LinearRule):
    """``nn.Linear`` with the alpha-beta rule; options ``alpha``, ``beta`` (alpha - beta = 1),
    ``epsilon``, ``gi``,
    ``bias_in_denominator`` (count the bias in the denominators, zennit's convention)."""

    _rule_defaults = {"alpha": 2.0, "beta": 1.0, "epsilon": 1e-6, "gi": False, "bias_in_denominator": False}
    alpha: float
    beta: float
    epsilon: float
    gi: bool
    bias_in_denominator: bool

    def forward(self, x: Tensor) -> Tensor:
        pos: Optional[Tensor] = None
        neg: Optional[Tensor] = None
        if not torch.jit.is_scripting():
            pos, neg = self._pos_neg()
        return lf.linear_alpha_beta(
            x, self.weight, self.bias, self.alpha, self.beta, self.epsilon, pos, neg, self.gi, self.bias_in_denominator
        )


class LinearZPlus(_LinearRule):
    """``nn.Linear`` with the z-plus rule; options ``epsilon``, ``gi``,
    ``bias_in_denominator`` (count the bias in the denominators, zennit's convention)."""

    _rule_defaults = {"epsilon": 1e-6, "gi": False, "bias_in_denominator": False}
    _transform_kind = "pos"
    epsilon: float
    gi: bool
    bias_in_denominator: bool

    def forward(self, x: Tensor) -> Tensor:
        t = None if torch.jit.is_scripting() else self._weight_transform()
        return lf.linear_z_plus(x, self.weight, self.bias, self.epsilon, t, self.gi, self.bias_in_denominator)


class LinearZBox(_Bounded, _LinearRule):
    """``nn.Linear`` with the z-box rule for inputs within ``[lower, upper]`` (numbers or tensors
    broadcastable to the input); options ``lower``, ``upper``, ``epsilon``, ``gi``."""

    _rule_defaults = {"lower": None, "upper": None, "epsilon": 1e-6, "gi": False}
    _transform_kind = "abs"
    epsilon: float
    gi: bool

    def forward(self, x: Tensor) -> Tensor:
        t = None if torch.jit.is_scripting() else self._weight_transform()
        return lf.linear_z_box(x, self.weight, self.bias, self.lower, self.upper, self.epsilon, t, self.gi)


class LinearFlat(_LinearRule):
    """``nn.Linear`` with the flat rule; options ``epsilon``, ``gi``."""

    _rule_defaults = {"epsilon": 1e-6, "gi": False}
    epsilon: float
    gi: bool

    def forward(self, x: Tensor) -> Tensor:
        return lf.linear_flat(x, self.weight, self.bias, self.epsilon, self.gi)


class LinearWSquare(_LinearRule):
    """``nn.Linear`` with the w-square rule; options ``epsilon``, ``gi``,
    ``bias_in_denominator`` (count the bias in the denominators, zennit's convention)."""

    _rule_defaults = {"epsilon": 1e-6, "gi": False, "bias_in_denominator": False}
    _transform_kind = "sq"
    epsilon: float
    gi: bool
    bias_in_denominator: bool

    def forward(self, x: Tensor) -> Tensor:
        t = None if torch.jit.is_scripting() else self._weight_transform()
        return lf.linear_w_square(x, self.weight, self.bias, self.epsilon, t, self.gi, self.bias_in_denominator)


class Conv2dGamma(_Conv2dRule):
    """``nn.Conv2d`` with the gamma rule (:func:`lrpcpp.functional.conv2d_gamma`); options ``gamma``,
    ``epsilon``, ``gi``. String padding and non-zero padding modes pad explicitly first."""

    _rule_defaults = {"gamma": 0.25, "epsilon": 1e-6, "gi": False}
    _transform_kind = "abs"
    gamma: float
    _lrp_pre_pad: List[int]
    _lrp_padding: List[int]
    epsilon: float
    gi: bool

    def forward(self, x: Tensor) -> Tensor:
        t = None if torch.jit.is_scripting() else self._weight_transform()
        return lf.conv2d_gamma(
            self._padded(x),
            self.weight,
            self.bias,
            self.stride,
            self._lrp_padding,
            self.dilation,
            self.groups,
            self.gamma,
            self.epsilon,
            t,
            self.gi,
        )


class Conv2dAlphaBeta(_Conv2dRule):
    """``nn.Conv2d`` with the alpha-beta rule; options ``alpha``, ``beta``, ``epsilon``, ``gi``,
    ``bias_in_denominator`` (count the bias in the denominators, zennit's convention)."""

    _rule_defaults = {"alpha": 2.0, "beta": 1.0, "epsilon": 1e-6, "gi": False, "bias_in_denominator": False}
    alpha: float
    beta: float
    _lrp_pre_pad: List[int]
    _lrp_padding: List[int]
    epsilon: float
    gi: bool
    bias_in_denominator: bool

    def forward(self, x: Tensor) -> Tensor:
        pos: Optional[Tensor] = None
        neg: Optional[Tensor] = None
        if not torch.jit.is_scripting():
            pos, neg = self._pos_neg()
        return lf.conv2d_alpha_beta(
            self._padded(x),
            self.weight,
            self.bias,
            self.stride,
            self._lrp_padding,
            self.dilation,
            self.groups,
            self.alpha,
            self.beta,
            self.epsilon,
            pos,
            neg,
            self.gi,
            self.bias_in_denominator,
        )


class Conv2dZPlus(_Conv2dRule):
    """``nn.Conv2d`` with the z-plus rule; options ``epsilon``, ``gi``,
    ``bias_in_denominator`` (count the bias in the denominators, zennit's convention)."""

    _rule_defaults = {"epsilon": 1e-6, "gi": False, "bias_in_denominator": False}
    _transform_kind = "pos"
    _lrp_pre_pad: List[int]
    _lrp_padding: List[int]
    epsilon: float
    gi: bool
    bias_in_denominator: bool

    def forward(self, x: Tensor) -> Tensor:
        t = None if torch.jit.is_scripting() else self._weight_transform()
        return lf.conv2d_z_plus(
            self._padded(x),
            self.weight,
            self.bias,
            self.stride,
            self._lrp_padding,
            self.dilation,
            self.groups,
            self.epsilon,
            t,
            self.gi,
            self.bias_in_denominator,
        )


class Conv2dZBox(_Bounded, _Conv2dRule):
    """``nn.Conv2d`` with the z-box rule for inputs within ``[lower, upper]`` (numbers, or tensors
    broadcastable to the input such as per-channel ``[C, 1, 1]`` bounds); options ``lower``,
    ``upper``, ``epsilon``, ``gi``. Zero padding is not an input and takes no relevance; other
    padding modes pad explicitly first, and their padded values are inputs like any other."""

    _rule_defaults = {"lower": None, "upper": None, "epsilon": 1e-6, "gi": False}
    _transform_kind = "abs"
    _lrp_pre_pad: List[int]
    _lrp_padding: List[int]
    epsilon: float
    gi: bool

    def forward(self, x: Tensor) -> Tensor:
        t = None if torch.jit.is_scripting() else self._weight_transform()
        return lf.conv2d_z_box(
            self._padded(x),
            self.weight,
            self.bias,
            self.lower,
            self.upper,
            self.stride,
            self._lrp_padding,
            self.dilation,
            self.groups,
            self.epsilon,
            t,
            self.gi,
        )


class Conv2dFlat(_Conv2dRule):
    """``nn.Conv2d`` with the flat rule; options ``epsilon``, ``gi``."""

    _rule_defaults = {"epsilon": 1e-6, "gi": False}
    _lrp_pre_pad: List[int]
    _lrp_padding: List[int]
    epsilon: float
    gi: bool

    def forward(self, x: Tensor) -> Tensor:
        return lf.conv2d_flat(
            self._padded(x),
            self.weight,
            self.bias,
            self.stride,
            self._lrp_padding,
            self.dilation,
            self.groups,
            self.epsilon,
            self.gi,
        )


class Conv2dWSquare(_Conv2dRule):
    """``nn.Conv2d`` with the w-square rule; options ``epsilon``, ``gi``,
    ``bias_in_denominator`` (count the bias in the denominators, zennit's convention)."""

    _rule_defaults = {"epsilon": 1e-6, "gi": False, "bias_in_denominator": False}
    _transform_kind = "sq"
    _lrp_pre_pad: List[int]
    _lrp_padding: List[int]
    epsilon: float
    gi: bool
    bias_in_denominator: bool

    def forward(self, x: Tensor) -> Tensor:
        t = None if torch.jit.is_scripting() else self._weight_transform()
        return lf.conv2d_w_square(
            self._padded(x),
            self.weight,
            self.bias,
            self.stride,
            self._lrp_padding,
            self.dilation,
            self.groups,
            self.epsilon,
            t,
            self.gi,
            self.bias_in_denominator,
        )


class _ConvolutionRule(_FromModule):
    """The drop-in of a convolution other than ``nn.Conv2d`` (``nn.Conv1d``, ``nn.Conv3d``,
    ``nn.ConvTranspose1d/2d/3d``) with a layer rule of :mod:`lrpcpp.rules` (``rule=Gamma(0.25)``,
    ``ZPlus()``, ``ZBox(low, high)``, ...): its forward is the rule's ``convolution`` op
    (:func:`lrpcpp.functional.convolution_gamma`, ...), which returns exactly the layer's output; the
    weight transforms come from :func:`weight_transform`. Options ``rule`` (required) and ``gi``.
    String padding and non-zero padding modes pad explicitly first. Not TorchScript-compatible (the
    rule is a Python object): script the ``lrpcpp.functional.convolution_*`` calls instead."""

    _rule_defaults = {"rule": None, "gi": False}
    rule: Any
    gi: bool

    def _init_rule(self, torch_class: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any], options: Dict[str, Any]):
        torch_class.__init__(self, *args, **kwargs)  # an argument neither torch's nor a rule option: its TypeError
        for name, default in self._rule_defaults.items():
            setattr(self, name, options.get(name, default))
        self._lrp_setup()

    def _lrp_setup(self) -> None:
        if not callable(getattr(self.rule, "convolution", None)):
            raise TypeError(
                f"{type(self).__name__}: expected rule to be a layer rule of lrpcpp.rules (Gamma(0.25), ZPlus(), "
                f"...), got {self.rule!r}"
            )

    @torch.jit.unused
    def forward(self, x: Tensor, output_size: Optional[List[int]] = None) -> Tensor:
        conv = cast(nn.modules.conv._ConvNd, self)
        n = len(conv.kernel_size)
        transposed = isinstance(conv, nn.modules.conv._ConvTransposeNd)
        output_padding = [int(p) for p in conv.output_padding]
        if output_size is not None:
            if not transposed:
                raise TypeError(f"{type(self).__name__}.forward takes output_size only for a transposed convolution")
            output_padding = conv._output_padding(  # type: ignore[operator]
                x, output_size, list(conv.stride), list(conv.padding), list(conv.kernel_size), n, list(conv.dilation)
            )
        padding = [int(p) for p in conv.padding] if not isinstance(conv.padding, str) else [0] * n
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            x = F.pad(x, [int(p) for p in conv._reversed_padding_repeated_twice], mode=mode)
            padding = [0] * n
        kinds = self.rule.transform.split("+") if self.rule.transform else []
        transforms = tuple(weight_transform(conv.weight, k) for k in kinds)
        return self.rule.convolution(
            x,
            conv.weight,
            conv.bias,
            list(conv.stride),
            padding,
            list(conv.dilation),
            transposed,
            output_padding,
            conv.groups,
            transforms[0] if len(transforms) == 1 else (transforms or None),
            self.gi,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rule={self.rule!r}, gi={self.gi}"  # type: ignore[misc]


class Conv1dRule(_ConvolutionRule, nn.Conv1d):
    """``nn.Conv1d`` with a layer rule of :mod:`lrpcpp.rules`: ``Conv1dRule(4, 8, 3, rule=Gamma(0.25))``
    or ``Conv1dRule.from_module(conv, rule=ZPlus())``; options ``rule`` (required) and ``gi``. The
    forward is the rule's ``convolution`` op, exactly the layer's output; string padding and non-zero
    padding modes pad explicitly first. Not TorchScript-compatible (the rule is a Python object)."""

    _replaces = nn.Conv1d

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in self._rule_defaults}
        self._init_rule(nn.Conv1d, args, kwargs, options)


class Conv3dRule(_ConvolutionRule, nn.Conv3d):
    """``nn.Conv3d`` with a layer rule, as :class:`Conv1dRule`."""

    _replaces = nn.Conv3d

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in self._rule_defaults}
        self._init_rule(nn.Conv3d, args, kwargs, options)


class ConvTranspose1dRule(_ConvolutionRule, nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` with a layer rule, as :class:`Conv1dRule`; ``forward(x, output_size)``
    as torch's."""

    _replaces = nn.ConvTranspose1d

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in self._rule_defaults}
        self._init_rule(nn.ConvTranspose1d, args, kwargs, options)


class ConvTranspose2dRule(_ConvolutionRule, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` with a layer rule, as :class:`ConvTranspose1dRule`."""

    _replaces = nn.ConvTranspose2d

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in self._rule_defaults}
        self._init_rule(nn.ConvTranspose2d, args, kwargs, options)


class ConvTranspose3dRule(_ConvolutionRule, nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` with a layer rule, as :class:`ConvTranspose1dRule`."""

    _replaces = nn.ConvTranspose3d

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in self._rule_defaults}
        self._init_rule(nn.ConvTranspose3d, args, kwargs, options)


#: the drop-in class of each convolution kind that takes a rule object (nn.Conv2d has one class per rule)
CONVOLUTION_RULE_MODULES: Dict[type, Type[_ConvolutionRule]] = {
    nn.Conv1d: Conv1dRule,
    nn.Conv3d: Conv3dRule,
    nn.ConvTranspose1d: ConvTranspose1dRule,
    nn.ConvTranspose2d: ConvTranspose2dRule,
    nn.ConvTranspose3d: ConvTranspose3dRule,
}


# ----------------------------------------------------------------------------- attention
_ATTENTION_METHODS = ("attnlrp", "cp-lrp")


def _as_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """An ``nn.MultiheadAttention`` mask as the float mask added to the scores (True: -inf, not attended)."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class MultiheadAttention(_FromModule, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with the explicit rules: the input and output projections through
    :func:`lrpcpp.functional.linear_epsilon`, the attention through the fused
    :func:`lrpcpp.functional.scaled_dot_product_attention`; options ``method`` (``"attnlrp"`` or
    ``"cp-lrp"``) and ``epsilon`` (of every epsilon rule in the layer).
    With ``need_weights=True`` (torch's default) the attention weights are computed separately, from
    detached ``q`` and ``k``, and take no relevance; ``need_weights=False`` skips them.
    Dropout in training mode is not supported."""

    _replaces = nn.MultiheadAttention
    _rule_defaults = {"method": "attnlrp", "epsilon": 1e-6}
    method: str
    epsilon: float

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: Optional[int] = None,
        vdim: Optional[int] = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
        method: str = "attnlrp",
        epsilon: float = 1e-6,
    ) -> None:
        super().__init__(
            embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first, device, dtype
        )
        self.method = method
        self.epsilon = epsilon
        self._lrp_setup()

    def _lrp_setup(self) -> None:
        name = type(self).__name__
        _check_epsilon(name, self.epsilon)
        if self.method not in _ATTENTION_METHODS:
            raise ValueError(f"{name}: expected method 'attnlrp' or 'cp-lrp', got {self.method!r}")

    def _in_weights(self) -> Tuple[Tensor, Tensor, Tensor]:
        e = self.embed_dim
        w = self.in_proj_weight
        if w is not None:
            return w[0:e], w[e : 2 * e], w[2 * e :]
        wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        assert wq is not None and wk is not None and wv is not None
        return wq, wk, wv

    def _in_biases(self) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        e = self.embed_dim
        b = self.in_proj_bias
        if b is None:
            return None, None, None
        return b[0:e], b[e : 2 * e], b[2 * e :]

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        if self.training and self.dropout > 0.0:
            raise RuntimeError(
                "lrpcpp.modules.MultiheadAttention: dropout is not supported (LRP explains the eval-mode "
                "forward); call .eval() or set dropout=0.0"
            )
        if not (query.dim() in (2, 3) and key.dim() == query.dim() and value.dim() == query.dim()):
            raise ValueError(
                "lrpcpp.modules.MultiheadAttention: expected query, key and value all 3-D (batched) or all "
                f"2-D (unbatched), got {query.dim()}-D, {key.dim()}-D and {value.dim()}-D"
            )
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # [sequence, batch, features] from here on, as in torch
        tgt, bsz, src = query.size(0), query.size(1), key.size(0)
        h, d = self.num_heads, self.head_dim
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "lrpcpp.modules.MultiheadAttention: is_causal is a hint that attn_mask is the causal mask; "
                "expected attn_mask too"
            )
        # torch's choice: the hint replaces the mask only without a key padding mask and weights
        causal = is_causal and key_padding_mask is None and not need_weights
        if causal:
            attn_mask = None
        masks: List[Tensor] = []
        if attn_mask is not None:
            if list(attn_mask.shape) == [tgt, src]:
                masks.append(attn_mask)
            elif list(attn_mask.shape) == [bsz * h, tgt, src]:
                masks.append(attn_mask.reshape(bsz, h, tgt, src))
            else:
                raise ValueError(
                    f"lrpcpp.modules.MultiheadAttention: expected attn_mask of shape {[tgt, src]} or "
                    f"{[bsz * h, tgt, src]}, got {list(attn_mask.shape)}"
                )
        if key_padding_mask is not None:
            if list(key_padding_mask.shape) != [bsz, src]:
                raise ValueError(
                    f"lrpcpp.modules.MultiheadAttention: expected key_padding_mask of shape {[bsz, src]}, "
                    f"got {list(key_padding_mask.shape)}"
                )
            masks.append(key_padding_mask.reshape(bsz, 1, 1, src))
        for m in masks:
            if m.dtype != torch.bool and not m.is_floating_point():
                raise TypeError(
                    f"lrpcpp.modules.MultiheadAttention: expected bool or floating-point masks, got {m.dtype}"
                )
        # add_bias_kv and add_zero_attn append keys, which every mask attends (False, 0), as in torch
        extra = 0
        if self.bias_k is not None:
            extra += 1
        if self.add_zero_attn:
            extra += 1
        if extra > 0:
            masks = [F.pad(m, [0, extra]) for m in masks]
        # one mask for the fused op: bool (True: attended) when every mask is, else the float sum
        mask: Optional[Tensor] = None
        if len(masks) > 0:
            if all([m.dtype == torch.bool for m in masks]):
                not_attended = masks[0]
                for m in masks[1:]:
                    not_attended = not_attended | m
                mask = not_attended.logical_not()
            else:
                added = _as_additive(masks[0], query.dtype)
                for m in masks[1:]:
                    added = added + _as_additive(m, query.dtype)
                mask = added

        wq, wk, wv = self._in_weights()
        bq, bk, bv = self._in_biases()
        q = lf.linear_epsilon(query, wq, bq, self.epsilon).reshape(tgt, bsz, h, d).permute(1, 2, 0, 3)
        k = lf.linear_epsilon(key, wk, bk, self.epsilon)
        v = lf.linear_epsilon(value, wv, bv, self.epsilon)
        bias_k, bias_v = self.bias_k, self.bias_v
        if bias_k is not None and bias_v is not None:
            # the learned key and value: constants of the attention (parameters take no relevance)
            k = torch.cat([k, bias_k.detach().expand(1, bsz, h * d)])
            v = torch.cat([v, bias_v.detach().expand(1, bsz, h * d)])
        k = k.reshape(-1, bsz, h, d).permute(1, 2, 0, 3)
        v = v.reshape(-1, bsz, h, d).permute(1, 2, 0, 3)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(bsz, h, 1, d)], dim=2)
            v = torch.cat([v, v.new_zeros(bsz, h, 1, d)], dim=2)
        # the op of lf.scaled_dot_product_attention, called directly (its keyword-only options do not script)
        out = torch.ops.lrpcpp.scaled_dot_product_attention(
            q, k, v, mask, causal, None, False, self.method, self.epsilon
        )
        out = out.permute(2, 0, 1, 3).reshape(tgt, bsz, h * d)
        out = lf.linear_epsilon(out, self.out_proj.weight, self.out_proj.bias, self.epsilon)
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)

        weights: Optional[Tensor] = None
        if need_weights:
            # torch's attention weights, apart from the relevance path (detached: they take none)
            scores = torch.matmul(q.detach(), k.detach().transpose(-2, -1)) * (1.0 / float(d) ** 0.5)
            if mask is not None:
                if mask.dtype == torch.bool:
                    scores = scores.masked_fill(mask.logical_not(), float("-inf"))
                else:
                    scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        return out, weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, method={self.method!r}, epsilon={self.epsilon}"
