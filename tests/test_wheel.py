"""The wheel: built from setup.py against this environment's torch, it pins that torch and
works when installed on its own (no source tree on the path)."""

import glob
import os
import subprocess
import sys
import zipfile

import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from test_packaging import PROJECT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_records_torch_and_installs(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w", str(tmp_path), ROOT],
        check=True,
        cwd=ROOT,
    )
    (wheel,) = glob.glob(str(tmp_path / "lrpcpp-*.whl"))
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
    requires = [
        Requirement(line.split(":", 1)[1]) for line in metadata.splitlines() if line.startswith("Requires-Dist:")
    ]
    (transformers,) = [r for r in requires if r.name == "transformers"]
    assert transformers.specifier == SpecifierSet(">=4.45,<6")
    assert transformers.marker is not None and transformers.marker.evaluate({"extra": "cli"})
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
