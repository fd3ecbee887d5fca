"""Loads the compiled operator library ``_C`` into ``torch.ops.lrpcpp``, checking that it was built
against the installed torch (and its CUDA)."""

import glob
import os

import torch

try:
    from . import _build_info
except ImportError as e:  # pragma: no cover - only a broken checkout lands here
    raise ImportError("lrpcpp is not built: run `make build` (or `pip install --no-build-isolation .`) first") from e

__all__ = ["library_path", "load_library"]


def library_path() -> str:
    """The file of the compiled operator library ``_C`` beside this package."""
    here = os.path.dirname(os.path.abspath(__file__))
    libs = glob.glob(os.path.join(here, "_C*.so")) + glob.glob(os.path.join(here, "_C*.pyd"))
    if not libs:
        raise ImportError(f"lrpcpp: the compiled operator library _C was not found in {here}; run `make build`")
    return libs[0]


def load_library() -> None:
    if _build_info.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"lrpcpp was built against torch {_build_info.TORCH_VERSION} but torch {torch.__version__} "
            "is installed; rebuild it against this torch with `make build` or "
            "`pip install --no-build-isolation --force-reinstall --no-deps .`"
        )
    torch.ops.load_library(library_path())
    built_cuda = torch.ops.lrpcpp.cuda_version()
    if built_cuda > 0 and torch.version.cuda is not None:
        major, minor = (int(v) for v in torch.version.cuda.split(".")[:2])
        if built_cuda // 1000 != major:
            raise ImportError(
                f"lrpcpp was built with CUDA {built_cuda // 1000}.{built_cuda % 1000 // 10} but torch uses "
                f"CUDA {major}.{minor}; rebuild lrpcpp against this torch"
            )
