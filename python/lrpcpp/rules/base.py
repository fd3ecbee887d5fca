"""The base of the layer rules for linear and convolution layers (RULES.md section 3), and the helper
that gives a rule's op its cached weight transform(s).

Each rule is a frozen dataclass of its parameters whose ``linear``, ``conv2d`` and ``convolution``
(any other convolution: 1-D, 3-D, transposed) compute the layer's output through the rule's native
op of :mod:`lrpcpp.functional` (``linear_gamma``, ``conv2d_z_box``, ``convolution_z_plus``, ...), and
whose ``module`` builds the matching drop-in of :mod:`lrpcpp.modules`.
"""

from typing import List, Optional, Tuple, Union

from torch import Tensor, nn

from .. import modules as lm

__all__ = [
    "Rule",
    "Bound",
    "Transform",
    "weight_transforms",
    "BIAS_CONVENTIONS",
    "BiasConvention",
    "check_bias_convention",
]

Bound = Union[float, Tensor]
#: the weight transform(s) a rule's op takes: none, one tensor, or several (alpha-beta: pos, neg)
Transform = Union[None, Tensor, Tuple[Tensor, ...]]


#: where alpha-beta, z-plus and w-square put a layer's bias: "ignore" leaves it out of the denominators
#: (lrpcpp's convention, conservative), "denominator" counts it there as zennit does (b+ in the sum of the
#: positive terms, b- in that of the negative ones; b**2 for w-square)
BIAS_CONVENTIONS = ("ignore", "denominator")


def check_bias_convention(rule: str, bias: str) -> bool:
    """True when ``bias`` is ``"denominator"``; a ``ValueError`` naming the rule for an unknown value."""
    if bias not in BIAS_CONVENTIONS:
        raise ValueError(f"{rule}: expected bias to be one of {BIAS_CONVENTIONS}, got {bias!r}")
    return bias == "denominator"


class BiasConvention:
    """For a rule with a ``bias`` field (one of :data:`BIAS_CONVENTIONS`): checked when the rule is
    made, and read by its ops as ``bias_in_denominator``."""

    bias: str

    def __post_init__(self):
        check_bias_convention(type(self).__name__, self.bias)

    @property
    def bias_in_denominator(self) -> bool:
        return self.bias == "denominator"


class Rule:
    """A rule for linear and convolution layers. ``linear`` and ``conv2d`` compute the layer's output
    (exactly ``F.linear`` / ``F.conv2d``) through the rule's op; ``gi`` selects the
    gradient-times-input form (``lrpcpp.patch``'s gradient mode) over explicit relevance."""

    name = "rule"
    transform = ""  # the weight transform(s) the rule's op takes: "abs", "pos", "sq", "pos+neg" or ""

    def linear(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], transform: Transform, gi: bool) -> Tensor:
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
        transform: Transform,
        gi: bool,
    ) -> Tensor:
        raise NotImplementedError

    def convolution(
        self,
        x: Tensor,
        weight: Tensor,
        bias: Optional[Tensor],
        stride: List[int],
        padding: List[int],
        dilation: List[int],
        transposed: bool,
        output_padding: List[int],
        groups: int,
        transform: Transform,
        gi: bool,
    ) -> Tensor:
        """Any convolution (``torch.convolution``'s arguments: 1 to 3 spatial dimensions, transposed or
        not) through the rule's ``convolution_*`` op."""
        raise NotImplementedError

    def module(self, layer: nn.Module) -> nn.Module:
        """A drop-in for ``layer`` in explicit semantics (for :class:`lrpcpp.Composite`)."""
        raise NotImplementedError


def weight_transforms(rule: Rule, weight: Tensor) -> Transform:
    """The cached weight transform(s) a rule's op takes: None, a tensor, or a tuple of tensors
    (:func:`lrpcpp.modules.weight_transform`, computed once per weight version)."""
    if not rule.transform:
        return None
    kinds = rule.transform.split("+")
    if len(kinds) == 1:
        return lm.weight_transform(weight, kinds[0])
    return tuple(lm.weight_transform(weight, k) for k in kinds)
