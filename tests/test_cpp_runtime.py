"""The extension shares the process's C++ runtime: it loads the shared libstdc++ and defines none of
the runtime's exception machinery itself. A private copy (a compiler that links libstdc++ statically)
throws its errors into torch's runtime, which crashed the process on bad input."""

import shutil
import subprocess
import sys

import pytest
from lrpcpp._library import library_path

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="libstdc++ is the Linux C++ runtime")


def _tool(name):
    path = shutil.which(name)
    assert path, f"{name} (binutils) is needed to read the extension's dynamic section"
    return path


def _run(*cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def test_the_extension_loads_the_shared_libstdcxx():
    dynamic = _run(_tool("readelf"), "-d", library_path())
    needed = [line.split("[", 1)[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert any(n.startswith("libstdc++.so") for n in needed), needed


def test_the_extension_defines_no_cxx_runtime_of_its_own():
    defined = _run(_tool("nm"), "-D", "--defined-only", library_path()).split()
    own = sorted({s for s in defined if s in ("__cxa_throw", "__cxa_begin_catch", "__gxx_personality_v0")})
    assert not own, f"the extension defines the C++ runtime's {own}: a copy of libstdc++ linked in"
