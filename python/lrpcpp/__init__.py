"""lrpcpp: Layer-wise Relevance Propagation for transformers as native PyTorch operators.

Importing the package loads the compiled operators into ``torch.ops.lrpcpp`` and re-exports the
public API of its modules (see the architecture page of the documentation).
"""

from ._library import load_library as _load_library

_load_library()

from . import _vmap, deploy, functional, models, modules, rules, targets, viz  # noqa: E402,F401
from ._build_info import VERSION as __version__  # noqa: E402
from .attribution import Attribution, attribute  # noqa: E402
from .dataset import DatasetItem, attribute_dataset  # noqa: E402
from .models.composite import Composite  # noqa: E402
from .models.explicit import ExplicitRules  # noqa: E402
from .models.families import Family, UnsupportedModelError, register_family  # noqa: E402
from .models.patching import PatchHandle, patch  # noqa: E402
from .models.presets import PRESETS, Preset, preset, register_preset  # noqa: E402
from .rules import AlphaBeta, Epsilon, Flat, Gamma, Pass, Rule, WSquare, ZBox, ZPlus  # noqa: E402

__all__ = [
    "functional",
    "modules",
    "rules",
    "models",
    "targets",
    "deploy",
    "attribute",
    "Attribution",
    "attribute_dataset",
    "DatasetItem",
    "Composite",
    "ExplicitRules",
    "patch",
    "PatchHandle",
    "register_family",
    "Family",
    "UnsupportedModelError",
    "viz",
    "Preset",
    "preset",
    "PRESETS",
    "register_preset",
    "Rule",
    "Epsilon",
    "Gamma",
    "AlphaBeta",
    "ZPlus",
    "ZBox",
    "Flat",
    "WSquare",
    "Pass",
    "__version__",
]
