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


def test_bench_attention_quick():
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "bench_attention.py"),
            "--quick",
            "--seqs",
            "32",
            "--reps",
            "1",
        ],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "## LLaMA-style block with the fused attention (CPU)" in out
    assert "| lrpcpp block, fused lf.scaled_dot_product_attention (relevance) |" in out
