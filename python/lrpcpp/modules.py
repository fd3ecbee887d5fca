"""Drop-in ``torch.nn`` modules whose backward pass carries LRP relevance.

Each class subclasses the torch module it replaces, so it has the same
constructor, parameters and ``state_dict``; ``from_module(m)`` builds one that
shares ``m``'s parameters and buffers (no copy)::

    import lrpcpp.modules as lm

    layer = lm.LinearEpsilon(10, 20)
    layer = lm.LinearEpsilon.from_module(existing_linear)

All modules are TorchScript-compatible.
"""

from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

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

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 epsilon: float = 1e-6) -> None:
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

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None,
                 epsilon: float = 1e-6) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
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
        return lf.conv2d_epsilon(x, self.weight, self.bias, self.stride, self._lrp_padding, self.dilation,
                                 self.groups, self.epsilon)

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

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, epsilon: float = 1e-6) -> None:
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
