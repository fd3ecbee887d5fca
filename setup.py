"""Build the lrpcpp wheel: the native operators as a torch C++ extension.

CUDA kernels are compiled when torch is a CUDA build and nvcc exists under
CUDA_HOME (LRPCPP_CUDA=1 forces them, LRPCPP_CUDA=0 turns them off); DEBUG=1
builds with -O0 -g. The metadata (name, version, console script, extras) is in
pyproject.toml; here are only the extension and the torch it pins. Build against the
torch in the current environment:

    pip wheel --no-build-isolation --no-deps -w dist .
"""

import glob
import os
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(ROOT, "pyproject.toml"), "rb") as _f:
    VERSION = tomllib.load(_f)["project"]["version"]
TORCH_VERSION = torch.__version__.split("+")[0]
NUMPY = "numpy>=1.22,<3"


def want_cuda() -> bool:
    flag = os.environ.get("LRPCPP_CUDA", "")
    available = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    )
    if flag == "0":
        return False
    if flag == "1" and not available:
        raise RuntimeError(
            "LRPCPP_CUDA=1 needs a CUDA build of torch and nvcc under CUDA_HOME "
            f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})"
        )
    return available


def rel(pattern: str) -> list:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def write_build_info(cuda: bool) -> None:
    path = os.path.join(ROOT, "python", "lrpcpp", "_build_info.py")
    text = (
        "# Written by setup.py: the torch this build of lrpcpp is tied to.\n"
        f'TORCH_VERSION = "{torch.__version__}"\n'
        f"WITH_CUDA = {cuda}\n"
        f'VERSION = "{VERSION}"\n'
    )
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)


def extension():
    cuda = want_cuda()
    write_build_info(cuda)
    debug = os.environ.get("DEBUG", "0") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    link = []
    if torch.backends.openmp.is_available():
        # at::parallel_for in the kernels is inline code: it runs in parallel only when the
        # extension itself is compiled with OpenMP (it shares torch's libgomp at run time)
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    sources = rel("csrc/*.cpp") + rel("csrc/ops/*.cpp")
    for backend in ("cpu", "meta", "autograd"):
        sources += rel(f"csrc/ops/{backend}/*.cpp")
    depends = rel("csrc/*.h") + rel("csrc/ops/*.h") + rel("csrc/ops/*/*.h") + rel("csrc/ops/*/*.cuh")
    kwargs = dict(
        name="lrpcpp._C",
        sources=sources,
        depends=depends,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )
    if sys.platform.startswith("linux"):
        # the process's shared C++ runtime, named by its file and before the compiler's own libraries: a
        # compiler that links libstdc++ statically (a wrapper adding -static-libstdc++, whose own library
        # directory may hold only libstdc++.a, so -lstdc++ is not enough) would otherwise give the
        # extension a private copy of it, and the errors it throws into torch's runtime crash the process
        # or lose their message
        kwargs["libraries"] = [":libstdc++.so.6"]
    if not cuda:
        return CppExtension(**kwargs)
    kwargs["sources"] += rel("csrc/ops/cuda/*.cu")
    kwargs["define_macros"] = [("WITH_CUDA", None)]
    kwargs["extra_compile_args"]["nvcc"] = ["-O0", "-g"] if debug else ["-O3"]
    return CUDAExtension(**kwargs)


setup(
    # the compiled operators are tied to the exact torch they were built against; numpy: lrpcpp.viz
    # and the command line's views (`import lrpcpp` imports them)
    install_requires=[f"torch=={TORCH_VERSION}", NUMPY],
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)},
)
