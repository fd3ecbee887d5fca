"""Smoke test of the benchmark scripts: the quick mode runs end to end and prints its report."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT, subprocess_env

pytest.importorskip("transformers")


def test_bench_models_quick():
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_models.py"), "--quick"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "## Whole-model attribution (CPU)" in out
    assert "| model | input | variant | time (ms) | time / plain |" in out
    assert "The operation level's torch function mode per forward" in out
    for variant in (
        "plain gradient (params frozen)",
        "lrpcpp.attribute (params as loaded)",
        "lrpcpp.attribute (params frozen)",
        "one call, 16 targets",
    ):
        assert variant in out
    assert "relevance finite: **no**" not in out


@pytest.mark.slow
def test_tensor_memory_quick():
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "tensor_memory.py"), "--quick", "--only", "vit"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ViT")]
    assert [row.split(" | ")[2] for row in rows] == [
        "plain gradient",
        "lrpcpp.attribute",
        'attribute, `level="operations"`',
    ]
    peaks = [float(row.split(" | ")[3]) for row in rows]
    assert all(p > 0 for p in peaks) and rows[0].split(" | ")[4] == "1.000"
    assert "vit, registry - plain, live at the peak:" in proc.stdout
