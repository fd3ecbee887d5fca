"""The version is stated once, in pyproject.toml, and the Python package, CMake and the installed
CMake package (find_package(lrpcpp) in a C++ program) all report it."""

import os
import re
import shutil
import subprocess
import sys

import lrpcpp
import pytest
import torch
from conftest import INSTALLED, ROOT, cmake_build

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

with open(os.path.join(ROOT, "pyproject.toml"), "rb") as _f:
    PROJECT = tomllib.load(_f)["project"]
VERSION = PROJECT["version"]

# files that may name the version of something else, or of lrpcpp at the time of a recorded run
NOT_SEARCHED = re.compile(r"^(benchmarks/RESULTS\.md|requirements[^/]*\.txt|pyproject\.toml)$")


def test_the_version_is_stated_only_in_pyproject():
    assert re.fullmatch(r"\d+\.\d+\.\d+", VERSION), VERSION
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split()
    assert "setup.py" in files and "CMakeLists.txt" in files
    literal = re.compile(r"(?<![\w.])" + re.escape(VERSION) + r"(?![\w.])")
    stated = []
    for name in files:
        path = os.path.join(ROOT, name)
        if NOT_SEARCHED.match(name) or not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            data = f.read()
        if b"\0" in data:  # binary
            continue
        stated += [
            f"{name}:{i}"
            for i, line in enumerate(data.decode(errors="replace").splitlines(), 1)
            if literal.search(line)
        ]
    assert stated == []


def test_the_package_reports_the_version_of_pyproject():
    assert lrpcpp.__version__ == VERSION


@pytest.mark.subprocess
def test_cmake_reads_the_version_of_pyproject():
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not on PATH")
    proc = subprocess.run(
        [cmake, "-P", os.path.join(ROOT, "cmake", "lrpcppVersion.cmake")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    # message() without a mode writes to stderr
    assert proc.stderr.strip() == VERSION


@pytest.mark.subprocess
def test_cmake_refuses_a_pyproject_without_one_version(tmp_path):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not on PATH")
    (tmp_path / "cmake").mkdir()
    shutil.copy(os.path.join(ROOT, "cmake", "lrpcppVersion.cmake"), tmp_path / "cmake")
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "lrpcpp"\n')
    proc = subprocess.run(
        [cmake, "-P", str(tmp_path / "cmake" / "lrpcppVersion.cmake")], capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert "pyproject.toml" in proc.stderr and "version" in proc.stderr


@pytest.mark.slow
@pytest.mark.subprocess
def test_installed_cmake_package_builds_and_runs_a_consumer(tmp_path):
    build_dir = cmake_build("lrpcpp")
    prefix = tmp_path / "prefix"
    proc = subprocess.run(["cmake", "--install", build_dir, "--prefix", str(prefix)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    config = list(prefix.glob("lib*/cmake/lrpcpp/lrpcppConfigVersion.cmake"))
    assert len(config) == 1, list(prefix.rglob("*"))
    assert f'set(PACKAGE_VERSION "{VERSION}")' in config[0].read_text()
    assert (prefix / "include" / "lrpcpp.h").is_file()

    consumer = tmp_path / "consumer"
    proc = subprocess.run(
        [
            "cmake",
            "-S",
            os.path.join(ROOT, "tests", "cpp", "find_package"),
            "-B",
            str(consumer),
            f"-DCMAKE_PREFIX_PATH={prefix};{torch.utils.cmake_prefix_path}",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = subprocess.run(["cmake", "--build", str(consumer)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the consumer links the installed library, not the one in the build tree
    with open(consumer / "CMakeCache.txt") as f:
        assert re.search(r"^lrpcpp_DIR:PATH=" + re.escape(str(prefix)), f.read(), re.M)
    proc = subprocess.run([str(consumer / "lrpcpp_consumer")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split("\n")[:2] == [f"lrpcpp {VERSION}", "ok"]


def make_venv(path, *site_dirs):
    """A fresh virtual environment (no pip, no site-packages of this one) whose path holds ``site_dirs``
    (a ``.pth`` file); its Python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    with open(os.path.join(purelib, "given.pth"), "w") as f:
        f.write("".join(f"{d}\n" for d in site_dirs))
    return python


def no_pythonpath():
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.skipif(INSTALLED, reason="checks the checkout's in-place build, not an installed wheel")
def test_python_m_lrpcpp_works_in_a_checkout_after_make(tmp_path):
    """`make` runs scripts/checkout_path.py for .venv: then `python -m lrpcpp` finds the package built
    in place, from any directory and with no PYTHONPATH (an environment like .venv: its packages, not
    lrpcpp)."""
    import sysconfig

    python = make_venv(tmp_path / "venv", sysconfig.get_path("purelib"))
    subprocess.run([str(python), os.path.join(ROOT, "scripts", "checkout_path.py")], check=True)
    subprocess.run([str(python), os.path.join(ROOT, "scripts", "checkout_path.py")], check=True)  # again: no-op
    for cwd in (ROOT, str(tmp_path)):
        proc = subprocess.run(
            [str(python), "-m", "lrpcpp", "--version"], env=no_pythonpath(), cwd=cwd, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == f"lrpcpp {VERSION}\n"
    proc = subprocess.run(
        [str(python), "-c", "import lrpcpp; print(lrpcpp.__file__)"],
        env=no_pythonpath(),
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
    )
    assert proc.stdout.strip() == os.path.join(ROOT, "python", "lrpcpp", "__init__.py")
