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


def test_bench_long_quick():
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_long.py"), "--quick"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "## Long sequences, with and without activation checkpointing (CPU)"
    header = lines.index(
        "| sequence | checkpointing | plain gradient (ms) | attribute (ms) | attribute / plain | operation level (ms) "
        "| operation level / plain | peak increase: plain (MiB) | attribute (MiB) | attribute / plain | operation "
        "level (MiB) | operation level / plain |"
    )
    rows = [ln.split("|")[1:-1] for ln in lines[header + 2 : header + 6]]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [("16", "no"), ("16", "yes"), ("32", "no"), ("32", "yes")]
    assert all(len(r) == 12 for r in rows) and not lines[header + 6].startswith("|")
    for r in rows:  # times and their ratios are numbers; the memory of the first sequence only was measured
        assert all(float(x) >= 0 for x in r[2:7])
        assert all(x.strip() != "—" for x in r[7:]) if r[0].strip() == "16" else all(x.strip() == "—" for x in r[7:])
    assert (
        "relevance with checkpointing bitwise equal to without: attribute yes, attribute, "
        '`level="operations"` yes; plain gradient with checkpointing bitwise equal to without: yes;' in proc.stdout
    )
    assert "relevance finite: yes" in proc.stdout
