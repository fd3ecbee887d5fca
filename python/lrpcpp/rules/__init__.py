"""The layer rules for linear and convolution layers (RULES.md section 3), one rule per module.

A rule is given to a layer by a :class:`lrpcpp.models.presets.Preset` (by module type, for the input
layer, or by module name), or per call with ``rules={name or type: rule}``::

    lrpcpp.attribute(model, pixel_values=x, preset="epsilon_plus",
                     rules={"fc": lrpcpp.rules.Gamma(0.1), nn.Conv2d: lrpcpp.rules.ZPlus()})
"""

from .alpha_beta import AlphaBeta
from .base import Bound, Rule, Transform, weight_transforms
from .epsilon import Epsilon
from .flat import Flat
from .gamma import Gamma
from .pass_through import Pass
from .w_square import WSquare
from .z_box import ZBox
from .z_plus import ZPlus

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
    "Bound",
    "Transform",
    "weight_transforms",
]
