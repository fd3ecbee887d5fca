"""zennit (pinned in requirements-nodeps.txt), the reference LRP implementation the vision rules are
tested against, imported where torchvision is missing.

zennit's package imports torchvision's ResNet block classes at import time (``zennit.torchvision``,
for its ResNet canonizers only); torchvision does not install beside the CPU torch of this project.
Without torchvision, stand-in block classes are put in place for that import and removed afterwards:
zennit's rules, attributors and composites never use them, and the tests build the ResNet canonizer
from zennit's block forward for their own blocks. zennit is a required test dependency: a missing
zennit is an import error, not a skip.
"""

import sys
import types

from torch import nn


def import_zennit():
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    else:
        import zennit

        return zennit
    names = ("torchvision", "torchvision.models", "torchvision.models.resnet")
    resnet = types.ModuleType(names[2])
    resnet.BasicBlock = type("BasicBlock", (nn.Module,), {})  # type: ignore[attr-defined]
    resnet.Bottleneck = type("Bottleneck", (nn.Module,), {})  # type: ignore[attr-defined]
    models = types.ModuleType(names[1])
    models.resnet = resnet  # type: ignore[attr-defined]
    tv = types.ModuleType(names[0])
    tv.models = models  # type: ignore[attr-defined]
    saved = {k: sys.modules.get(k) for k in names}
    sys.modules.update(dict(zip(names, (tv, models, resnet))))
    try:
        import zennit
        import zennit.attribution
        import zennit.composites
        import zennit.rules
        import zennit.torchvision  # noqa: F401
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return zennit
