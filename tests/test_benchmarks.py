"""Smoke test of the benchmark scripts: the quick mode runs end to end and prints its report."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, subprocess_env

pytest.importorskip("transformers")


def quick_run(script, *args):
    """``benchmarks/<script> --quick [args]`` in a fresh process: its standard output, once it exited with 0."""
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", script), "--quick", *args],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_bench_models_quick():
    out = quick_run("bench_models.py")
    assert "## Whole-model attribution (CPU)" in out
    assert "| model | input | variant | time (ms) | time / plain |" in out
    assert "The operation level's torch function mode per forward" in out
    assert "The operation level against its floor" in out
    for variant in (
        "plain gradient (params frozen)",
        "lrpcpp.attribute (params as loaded)",
        "lrpcpp.attribute (params frozen)",
        "(the operation level's floor; params frozen)",
        "one call, 16 targets",
    ):
        assert variant in out
    assert "relevance finite: **no**" not in out


def test_bench_mode_floor_quick():
    out = quick_run("bench_mode_floor.py")
    assert "## The operation level's floor: what seeing every call of a forward costs (CPU)" in out
    for row in ("| none |", "| python |", "| dispatch |", "| attribute, operation level |"):
        assert row in out
    # the C mode is measured, or the report says why it is not
    assert "| C |" in out or "The C mode is left out" in out


def test_bench_attention_quick():
    out = quick_run("bench_attention.py", "--seqs", "32", "--reps", "1")
    assert "## LLaMA-style block with the fused attention (CPU)" in out
    assert "| lrpcpp block, fused lf.scaled_dot_product_attention (relevance) |" in out


def test_bench_long_quick():
    out = quick_run("bench_long.py")
    lines = out.splitlines()
    assert lines[0] == "## Long sequences, with and without activation checkpointing (CPU)"

    def table(header, columns):
        """The body of the table under ``header``: 4 rows (sequences 16 and 32, without and with
        checkpointing) of ``columns`` cells, nothing more."""
        at = lines.index(header)
        assert lines[at + 1].count("|") == columns + 1
        rows = [ln.split("|")[1:-1] for ln in lines[at + 2 : at + 6]]
        assert all(len(r) == columns for r in rows) and not lines[at + 6].startswith("|")
        assert [(r[0].strip(), r[1].strip()) for r in rows] == [
            ("16", "no"),
            ("16", "yes"),
            ("32", "no"),
            ("32", "yes"),
        ]
        return [[x.strip() for x in r[2:]] for r in rows]

    times = table(
        "| sequence | checkpointing | plain gradient (ms) | attribute (ms) | operation level (ms) | attribute / plain "
        "| operation level / plain | CPU time: attribute / plain | operation level / plain |",
        9,
    )
    assert all(float(x) >= 0 for r in times for x in r)
    memory = table(
        "| sequence | checkpointing | plain gradient (MiB) | attribute (MiB) | operation level (MiB) | attribute / "
        "plain | operation level / plain |",
        7,
    )
    # the smoke test measures the memory of the first sequence only (the ratios are "—" where the plain
    # gradient's increase is 0 at this size)
    assert all(float(x) >= 0 for r in memory[:2] for x in r[:3]) and all(x == "—" for r in memory[2:] for x in r)
    assert (
        "relevance with checkpointing bitwise equal to without: attribute yes, attribute, "
        '`level="operations"` yes; plain gradient with checkpointing bitwise equal to without: yes;' in out
    )
    assert "relevance finite: yes" in out


@pytest.mark.slow
def test_tensor_memory_quick():
    out = quick_run("tensor_memory.py", "--only", "vit")
    rows = [line for line in out.splitlines() if line.startswith("| ViT")]
    assert [row.split(" | ")[2] for row in rows] == [
        "plain gradient",
        "lrpcpp.attribute",
        'attribute, `level="operations"`',
    ]
    peaks = [float(row.split(" | ")[3]) for row in rows]
    assert all(p > 0 for p in peaks) and rows[0].split(" | ")[4] == "1.000"
    assert "vit, registry - plain, live at the peak:" in out


def _family_sweep(tmp_path, *args):
    """scripts/family_sweep.py run with ``args``: its process and its JSON results."""
    out = tmp_path / "sweep.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "family_sweep.py"), *args, "--json", str(out)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=ROOT,
        timeout=600,
    )
    return proc, json.loads(out.read_text())["results"] if out.exists() else None


def test_family_sweep_names_each_outcome(tmp_path):
    proc, results = _family_sweep(tmp_path, "--only", "gpt2", "bloom", "xmod")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert results["gpt2"] == dict(outcome="explained", unruled={}, level="registry", finite=True, value=True)
    assert results["bloom"]["outcome"] == "explained" and results["bloom"]["level"] == "operations"
    # X-MOD's forward needs a language set first: the model's limit, not lrpcpp's
    assert results["xmod"]["outcome"] == "model" and "set_default_language" in results["xmod"]["why"]
    assert "3 model types: {'explained': 2, 'model': 1}" in proc.stdout  # (in the order first seen)


def test_family_sweep_of_encoders_explains_their_top_class(tmp_path):
    types = ("esm", "fnet", "t5", "mistral4", "ibert", "canine")
    proc, results = _family_sweep(tmp_path, "--task", "sequence-classification", "--only", *types)
    assert proc.returncode == 1, proc.stderr[-4000:]  # (an lrpcpp error: CANINE's ids reach no embedding module)
    # erf, the real part of an FFT: ruled and passed; T5's classifier embeds the ids with its encoder's
    # own module (tied to get_input_embeddings()) and refuses inputs_embeds; Mistral 4's latent attention
    # has query heads of its rotary and other parts together; I-BERT's embedding module returns the
    # embeddings with their quantisation scale (None: not quantised)
    for family in ("esm", "fnet", "t5", "mistral4", "ibert"):
        assert results[family] == dict(outcome="explained", unruled={}, level="operations", finite=True, value=True)
    canine = results["canine"]  # (it hashes the ids into the buckets of several embeddings)
    assert canine["outcome"] == "lrpcpp error" and "its forward calls no nn.Embedding with input_ids" in canine["why"]
    assert "sequence-classification: 6 model types" in proc.stdout


def test_family_sweep_of_image_classifiers_explains_their_top_class(tmp_path):
    proc, results = _family_sweep(tmp_path, "--task", "image-classification", "--only", "resnet", "levit")
    assert proc.returncode == 0, proc.stderr[-4000:]
    for family in ("resnet", "levit"):  # a CNN (batch norms, max pooling), a hybrid with attention biases
        assert results[family] == dict(outcome="explained", unruled={}, level="operations", finite=True, value=True)
    assert "image-classification: 2 model types" in proc.stdout


def test_family_sweep_builds_hybrids_latent_attention_and_multimodal_language_models(tmp_path):
    # the sweep's small configs: a hybrid keeps a layer of each kind (qwen3_next's attention among its
    # linear-attention layers, jamba's among its Mamba layers), latent attention a key and value per
    # head (deepseek_v3), experts routed in one group (beam), a multimodal config gives its language
    # model's (llama4); rwkv (without its cache) and hy_v4's norm that returns its factor alone are explained;
    # a heterogeneous config keeps its layers' own sizes (gemma4_text's full-attention heads), and
    # gemma3n_text's last layers reuse the keys and values of the first
    types = ("qwen3_next", "jamba", "deepseek_v3", "llama4", "rwkv", "hy_v4", "beam", "gemma4_text", "gemma3n_text")
    proc, results = _family_sweep(tmp_path, "--only", *types)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for family in types:
        assert results[family] == dict(outcome="explained", unruled={}, level="operations", finite=True, value=True)


def test_results_file_replaces_only_the_sections_written(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import results_file
    finally:
        sys.path.pop(0)
    path = str(tmp_path / "RESULTS.md")
    with open(path, "w") as f:
        f.write("# Title\n\nold intro\n\n## A\n\nold a\n\n### A detail\n\nold detail\n\n## B\n\nkept b\n")
    results_file.write_sections("# Title\n\nnew intro\n\n## A\n\nnew a\n\n## C\n\nnew c\n", path)
    text = open(path).read()
    assert text == "# Title\n\nnew intro\n\n## A\n\nnew a\n\n## B\n\nkept b\n\n## C\n\nnew c\n"
