"""lrpcpp: Layer-wise Relevance Propagation for transformers as native PyTorch operators.

Importing the package loads the compiled operators into ``torch.ops.lrpcpp``.
"""

import glob as _glob
import os as _os

import torch as _torch


def _load_library() -> None:
    here = _os.path.dirname(_os.path.abspath(__file__))
    try:
        from . import _build_info
    except ImportError as e:  # pragma: no cover - only a broken checkout lands here
        raise ImportError(
            "lrpcpp is not built: run `make build` (or `pip install --no-build-isolation .`) first"
        ) from e
    if _build_info.TORCH_VERSION != _torch.__version__:
        raise ImportError(
            f"lrpcpp was built against torch {_build_info.TORCH_VERSION} but torch {_torch.__version__} "
            "is installed; rebuild it against this torch with `make build` or "
            "`pip install --no-build-isolation --force-reinstall --no-deps .`"
        )
    libs = _glob.glob(_os.path.join(here, "_C*.so")) + _glob.glob(_os.path.join(here, "_C*.pyd"))
    if not libs:
        raise ImportError(f"lrpcpp: the compiled operator library _C was not found in {here}; run `make build`")
    _torch.ops.load_library(libs[0])
    built_cuda = _torch.ops.lrpcpp.cuda_version()
    if built_cuda > 0 and _torch.version.cuda is not None:
        major, minor = (int(v) for v in _torch.version.cuda.split(".")[:2])
        if built_cuda // 1000 != major:
            raise ImportError(
                f"lrpcpp was built with CUDA {built_cuda // 1000}.{built_cuda % 1000 // 10} but torch uses "
                f"CUDA {major}.{minor}; rebuild lrpcpp against this torch"
            )


_load_library()

from . import _vmap, deploy, functional, modules, presets, targets, viz  # noqa: E402,F401
from ._build_info import VERSION as __version__  # noqa: E402
from .attribution import Attribution, attribute  # noqa: E402
from .composite import Composite  # noqa: E402
from .explicit import ExplicitRules  # noqa: E402
from .families import Family, UnsupportedModelError, register_family  # noqa: E402
from .patching import PatchHandle, patch  # noqa: E402
from .presets import PRESETS, Preset, preset, register_preset  # noqa: E402

__all__ = [
    "functional",
    "modules",
    "targets",
    "deploy",
    "attribute",
    "Attribution",
    "Composite",
    "ExplicitRules",
    "patch",
    "PatchHandle",
    "register_family",
    "Family",
    "UnsupportedModelError",
    "presets",
    "viz",
    "Preset",
    "preset",
    "PRESETS",
    "register_preset",
    "__version__",
]
