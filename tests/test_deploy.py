"""Deploying explainable models (lrpcpp.deploy): TorchScript archives in Python, in a fresh process
and in the C++ example program; torch.export programs saved as .pt2; torch.compile(fullgraph=True)
of patched models and of the attribution.

Every reference is lrpcpp.attribute on the same model and input, computed in the test; the deployed
forms are run on inputs other than the example they were traced or exported with (other values,
another length, padding).
"""

import os
import subprocess
import sys

import lrpcpp
import lrpcpp.deploy as deploy
import pytest
import torch

pytest.importorskip("transformers", reason="whole-model tests need transformers (requirements-dev.txt)")
from conftest import cmake_build, recording_backend, subprocess_env  # noqa: E402
from models import FAMILIES, VISION, build, inputs  # noqa: E402

ALL = sorted(FAMILIES)
TEXT = [f for f in ALL if f not in VISION]
LAYER_NORM = {"gpt2", "bert", "vit"}  # families whose norms are nn.LayerNorm (gi_layer_norm)
RTOL = 1e-5  # float32: relative to the largest relevance


def assert_same_relevance(actual, expected, rtol=RTOL):
    scale = float(expected.abs().max())
    assert scale > 0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


def text_input(model, family, seq=7, seed=5, pad=2):
    """Embeddings and a mask with the second item right-padded by ``pad`` tokens."""
    ids = inputs(family, batch=2, seq=seq, seed=seed)["input_ids"]
    mask = torch.ones_like(ids)
    if pad:
        mask[1, seq - pad :] = 0
    with torch.no_grad():
        return model.get_input_embeddings()(ids).detach(), mask


def example(model, family):
    """The export example: another length and other values than the inputs the tests explain."""
    return text_input(model, family, seq=5, seed=11, pad=1)


def hooks_and_flags(model):
    return (
        [(len(m._forward_hooks), len(m._forward_pre_hooks), "forward" in m.__dict__) for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        model.training,
    )


# ----------------------------------------------------------------------------- TorchScript archives
@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("family", TEXT)
def test_archive_gives_the_relevance_of_attribute(family, method, tmp_path):
    model = build(family, dtype=torch.float32)
    path = tmp_path / "model.pt"
    embeds, example_mask = example(model, family)
    deploy.export_archive(model, path, inputs_embeds=embeds, attention_mask=example_mask, method=method, check=False)
    archive = torch.jit.load(str(path))
    x, mask = text_input(model, family)
    expected = lrpcpp.attribute(model, inputs_embeds=x, attention_mask=mask, method=method)
    # TorchScript's executor profiles the first call and optimises the graph for the later ones
    for _ in range(3):
        got = deploy.attribute_deployed(archive, x, mask)
        assert torch.equal(got.target, expected.target)
        torch.testing.assert_close(
            got.output, expected.output, rtol=RTOL, atol=RTOL * float(expected.output.abs().max())
        )
        assert_same_relevance(got.relevance, expected.relevance)
    assert torch.all(got.relevance[1, -2:] == 0)  # padding


def test_export_archive_records_what_it_saved_and_leaves_the_model_as_it_was(tmp_path):
    model = build("llama", dtype=torch.float32).train()
    model.lm_head.weight.requires_grad_(False)
    before = hooks_and_flags(model)
    ids = inputs("llama", seq=5)["input_ids"]
    path = tmp_path / "llama.pt"
    info = deploy.export_archive(model, path, input_ids=ids, method="cp-lrp")
    assert hooks_and_flags(model) == before
    assert deploy.archive_info(path) == info
    assert info["method"] == "cp-lrp" and info["mode"] == "gradient" and info["model_type"] == "llama"
    assert info["example_shape"] == [2, 5] and info["hidden_size"] == 32 and info["dtype"] == "float32"
    assert info["torch"] == torch.__version__ and info["lrpcpp"] == lrpcpp.__version__
    assert info["output"].startswith("next-token logits")
    assert info["embed"] == "embed(input_ids) -> inputs_embeds"
    archive = torch.jit.load(str(path))
    assert not any(p.requires_grad for p in archive.parameters())  # no weight gradients in the backward
    # the rules are in the archive: with CP-LRP, LLaMA's are all torch's own ops (q, k and the MLP gate
    # detached; the RMSNorms' rsqrt held constant), so the archive explains as the patched model does
    x, mask = text_input(model, "llama")
    assert_same_relevance(
        deploy.attribute_deployed(archive, x, mask).relevance,
        lrpcpp.attribute(model, inputs_embeds=x, attention_mask=mask, method="cp-lrp").relevance,
    )
    other = inputs("llama", seq=8, seed=3)["input_ids"]
    assert torch.equal(archive.embed(other), model.get_input_embeddings()(other))


def test_archive_explains_several_targets_in_one_pass(tmp_path):
    model = build("qwen2", dtype=torch.float32)
    path = tmp_path / "qwen2.pt"
    embeds, mask = example(model, "qwen2")
    deploy.export_archive(model, path, inputs_embeds=embeds, attention_mask=mask)
    archive = torch.jit.load(str(path))
    graph = str(archive.inlined_graph)
    for op in ("lrpcpp::gi_identity", "lrpcpp::gi_grad_scale"):
        assert op in graph, op
    x, mask = text_input(model, "qwen2")
    many = deploy.attribute_deployed(archive, x, mask, target=[3, 9])
    assert many.relevance.shape == (2,) + tuple(x.shape)
    for k, t in enumerate([3, 9]):
        assert_same_relevance(
            many.relevance[k], lrpcpp.attribute(model, inputs_embeds=x, attention_mask=mask, target=t).relevance
        )


class FixedLengthModel(torch.nn.Module):
    """A plain model whose forward turns the sequence length into a Python number, which a trace
    records as a constant."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 3)
        self.act = torch.nn.GELU()

    def get_input_embeddings(self):
        return self.embed

    def forward(self, inputs_embeds, attention_mask):
        weight = torch.linspace(0.5, 1.5, int(inputs_embeds.shape[1]))[:, None]
        return self.head(self.act(inputs_embeds * weight * attention_mask[..., None])).sum(1)


def test_export_archive_warns_when_the_trace_fixed_the_length(tmp_path):
    model = FixedLengthModel()
    ids = torch.randint(0, 10, (2, 5))
    with pytest.warns(UserWarning, match="specialised to the example length"):
        info = deploy.export_archive(model, tmp_path / "fixed.pt", input_ids=ids)
    assert info["output"].startswith("class logits") and info["model_type"] is None
    # the archive still explains inputs of the example's length
    archive = torch.jit.load(str(tmp_path / "fixed.pt"))
    x = model.embed(torch.randint(0, 10, (2, 5))).detach()
    assert_same_relevance(
        deploy.attribute_deployed(archive, x).relevance,
        lrpcpp.attribute(model, inputs_embeds=x, attention_mask=torch.ones(2, 5)).relevance,
    )


def test_export_archive_checks_its_arguments(tmp_path):
    model = build("llama", dtype=torch.float32)
    ids = inputs("llama")["input_ids"]
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        deploy.export_archive(model, tmp_path / "a.pt")
    with pytest.raises(ValueError, match="method must be one of"):
        deploy.export_archive(model, tmp_path / "a.pt", input_ids=ids, method="explicit")
    with pytest.raises(ValueError, match=r"attention_mask must be \[batch, seq\]"):
        deploy.export_archive(model, tmp_path / "a.pt", input_ids=ids, attention_mask=ids[:, :2])
    with pytest.raises(ValueError, match="holds no lrpcpp.json"):
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp_path / "plain.pt"))
        deploy.archive_info(tmp_path / "plain.pt")


@pytest.mark.subprocess
@pytest.mark.compile
def test_archive_in_a_fresh_process_needs_import_lrpcpp(tmp_path):
    model = build("gpt2", dtype=torch.float32)
    embeds, mask = example(model, "gpt2")
    archive, program = tmp_path / "gpt2.pt", tmp_path / "gpt2.pt2"
    deploy.export_archive(model, archive, inputs_embeds=embeds, attention_mask=mask)
    deploy.export_program(model, program, inputs_embeds=embeds, attention_mask=mask)
    x, mask = text_input(model, "gpt2")
    data, out = tmp_path / "inputs.pt", tmp_path / "relevance.pt"
    torch.save({"inputs_embeds": x, "attention_mask": mask}, data)
    load = f"import torch\nm = torch.jit.load({str(archive)!r})\n"

    # without the import: the loader's error says what to do
    proc = subprocess.run(
        [sys.executable, "-c", load],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=str(tmp_path),
        timeout=300,
    )
    assert proc.returncode != 0
    assert "lrpcpp::gi_grad_scale" in proc.stderr and "run `import lrpcpp` before torch.jit.load" in proc.stderr
    assert deploy.MISSING_OPERATORS_MESSAGE in proc.stderr

    # with it: the archive and the .pt2 program explain in a process that never saw the model
    code = (
        "import torch, lrpcpp\nfrom lrpcpp.deploy import attribute_deployed\n"
        + load
        + f"p = torch.export.load({str(program)!r}).module()\n"
        f"d = torch.load({str(data)!r})\n"
        "r = {k: attribute_deployed(f, d['inputs_embeds'], d['attention_mask']).relevance\n"
        "     for k, f in (('ts', m), ('pt2', p))}\n"
        f"torch.save(r, {str(out)!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=subprocess_env(), cwd=str(tmp_path), timeout=300)
    expected = lrpcpp.attribute(model, inputs_embeds=x, attention_mask=mask).relevance
    got = torch.load(out)
    assert_same_relevance(got["ts"], expected)
    assert_same_relevance(got["pt2"], expected)


# ----------------------------------------------------------------------------- the C++ example
@pytest.fixture(scope="module")
def explain_program():
    """build/cmake/examples/cpp/lrpcpp_explain, brought up to date."""
    return os.path.join(cmake_build("lrpcpp_explain"), "examples", "cpp", "lrpcpp_explain")


def run_explain_program(program, archive, data, *flags):
    proc = subprocess.run([program, str(archive), str(data), *flags], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    items, relevance = [], []
    for line in proc.stdout.splitlines():
        if line.startswith("item "):
            _, _, _, target, _, position, _, logit = line.split()
            items.append((int(target), int(position), float(logit)))
        elif line.startswith("relevance "):
            relevance.append([float(v) for v in line.split()[1:]])
    return items, torch.tensor(relevance, dtype=torch.float64)


@pytest.mark.subprocess
@pytest.mark.parametrize(
    "family, given, flags", [("llama", "inputs_embeds", ()), ("bert", "input_ids", ("--target", "2"))]
)
def test_cpp_example_gives_the_relevance_of_attribute(explain_program, family, given, flags, tmp_path):
    model = build(family, dtype=torch.float32)
    embeds, mask = example(model, family)
    archive = tmp_path / f"{family}.pt"
    deploy.export_archive(model, archive, inputs_embeds=embeds, attention_mask=mask)
    ids = inputs(family, batch=2, seq=7, seed=5)["input_ids"]
    x, mask = text_input(model, family)  # the embeddings of these ids
    data = tmp_path / "inputs.pt"
    torch.save({given: x if given == "inputs_embeds" else ids, "attention_mask": mask}, data)

    items, relevance = run_explain_program(explain_program, archive, data, *flags)

    target = int(flags[1]) if flags else None
    expected = lrpcpp.attribute(model, inputs_embeds=x, attention_mask=mask, target=target)
    assert [t for t, _, _ in items] == expected.target.tolist()
    language_model = family != "bert"  # the last unmasked positions; none for a classifier
    assert [p for _, p, _ in items] == ([x.shape[1] - 1, x.shape[1] - 3] if language_model else [-1, -1])
    torch.testing.assert_close(torch.tensor([v for _, _, v in items]), expected.output, rtol=RTOL, atol=RTOL)
    assert_same_relevance(relevance, expected.token_relevance.double())
    assert torch.all(relevance[1, -2:] == 0)


@pytest.mark.subprocess
def test_cpp_example_reports_bad_arguments(explain_program, tmp_path):
    proc = subprocess.run([explain_program, str(tmp_path / "missing.pt")], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage: lrpcpp_explain" in proc.stderr
    proc = subprocess.run(
        [explain_program, str(tmp_path / "missing.pt"), str(tmp_path / "x.pt")], capture_output=True, text=True
    )
    assert proc.returncode == 1 and "lrpcpp_explain:" in proc.stderr


# ----------------------------------------------------------------------------- torch.export
@pytest.mark.compile
@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3_moe"])
def test_exported_program_saved_as_pt2_gives_the_relevance_of_attribute(family, tmp_path):
    model = build(family, dtype=torch.float32)
    embeds, mask = example(model, family)
    path = tmp_path / f"{family}.pt2"
    program = deploy.export_program(model, path, inputs_embeds=embeds, attention_mask=mask, check=False)
    ops = {
        str(n.target)
        for g in program.graph_module.modules()
        if isinstance(g, torch.fx.GraphModule)
        for n in g.graph.nodes
    }
    assert "lrpcpp.gi_identity.default" in ops and "lrpcpp.gi_grad_scale.default" in ops
    if family in LAYER_NORM:
        assert "lrpcpp.gi_layer_norm.default" in ops
    loaded = torch.export.load(str(path)).module()
    for seq, pad in ((7, 2), (4, 0)):  # dynamic batch and sequence length
        x, m = text_input(model, family, seq=seq, pad=pad)
        expected = lrpcpp.attribute(model, inputs_embeds=x, attention_mask=m)
        assert_same_relevance(deploy.attribute_deployed(loaded, x, m).relevance, expected.relevance)


@pytest.mark.compile
@pytest.mark.parametrize("form", ["archive", "program"])
def test_exported_forms_count_positions_over_the_unmasked_tokens_as_attribute_does(form, tmp_path):
    # a left-padded decoder batch: position_ids from the attention mask, as lrpcpp.attribute passes them
    model = build("gpt2", dtype=torch.float32)
    embeds, mask = example(model, "gpt2")
    if form == "archive":
        deploy.export_archive(model, tmp_path / "m.pt", inputs_embeds=embeds, attention_mask=mask, check=False)
        loaded = torch.jit.load(str(tmp_path / "m.pt"))
    else:
        deploy.export_program(model, tmp_path / "m.pt2", inputs_embeds=embeds, attention_mask=mask, check=False)
        loaded = torch.export.load(str(tmp_path / "m.pt2")).module()
    x, m = text_input(model, "gpt2", pad=0)
    m[1, :3] = 0
    expected = lrpcpp.attribute(model, inputs_embeds=x, attention_mask=m)
    got = deploy.attribute_deployed(loaded, x, m)
    assert torch.equal(got.target, expected.target)
    assert_same_relevance(got.relevance, expected.relevance)


# ----------------------------------------------------------------------------- torch.compile
def _compiled_relevance(family, method, backend):
    model = build(family, dtype=torch.float32)
    kw = inputs(family, dtype=torch.float32)
    if family in VISION:
        key, x, extra = "pixel_values", kw["pixel_values"], {}
    else:
        x, mask = text_input(model, family)
        key, extra = "inputs_embeds", {"attention_mask": mask}

    def relevance(m):
        leaf = x.clone().requires_grad_()
        logits = m(**{key: leaf}, **extra).logits
        logits = logits[:, -3] if logits.dim() == 3 else logits  # a position unmasked in both items
        (g,) = torch.autograd.grad(logits[:, 1].sum(), leaf)
        return (leaf * g).detach()

    with lrpcpp.patch(model, method=method):
        expected = relevance(model)
        torch._dynamo.reset()
        got = relevance(torch.compile(model, backend=backend, fullgraph=True))
    torch._dynamo.reset()
    return got, expected


@pytest.mark.compile
@pytest.mark.parametrize("family", ALL)
def test_patched_model_compiles_fullgraph_with_the_relevance_ops(family):
    # fullgraph=True: any graph break is an error
    seen = []
    got, expected = _compiled_relevance(family, "attnlrp", recording_backend(seen))
    assert_same_relevance(got, expected)
    assert any("lrpcpp.gi_scale_backward" in s for s in seen)
    assert any("lrpcpp.gi_layer_norm_backward" in s for s in seen) == (family in LAYER_NORM)


@pytest.mark.compile
@pytest.mark.parametrize("family", ["llama", "phi3", "mixtral", "bert"])
def test_patched_model_compiles_fullgraph_with_cp_lrp(family):
    seen = []
    got, expected = _compiled_relevance(family, "cp-lrp", recording_backend(seen))
    assert_same_relevance(got, expected)
    # (LLaMA's CP-LRP rules are all torch's own ops: detached gates, q and k, and its RMSNorms' rsqrt
    # held constant)
    assert any("lrpcpp.gi_scale_backward" in s for s in seen) == (family != "llama")


@pytest.mark.compile
def test_compile_attribute_with_inductor_gives_the_relevance_of_attribute():
    # the default backend, inductor: generated kernels, so equal up to rounding
    model, reference = build("llama", dtype=torch.float32), build("llama", dtype=torch.float32)  # same weights
    ids = inputs("llama", seq=7)["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    torch._dynamo.reset()
    with deploy.compile_attribute(model) as explain:
        for target in (None, [3, 9]):
            got = explain(input_ids=ids, attention_mask=mask, target=target)
            expected = lrpcpp.attribute(reference, input_ids=ids, attention_mask=mask, target=target)
            assert torch.equal(got.target, expected.target)
            assert_same_relevance(got.relevance, expected.relevance)
            assert_same_relevance(got.token_relevance, expected.token_relevance)
    torch._dynamo.reset()


@pytest.mark.compile
def test_compile_attribute_counts_positions_over_the_unmasked_tokens_as_attribute_does():
    # a left-padded decoder batch: position_ids from the attention mask, as lrpcpp.attribute passes them
    model, reference = build("gpt2", dtype=torch.float32), build("gpt2", dtype=torch.float32)  # same weights
    ids = inputs("gpt2", seq=7)["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    expected = lrpcpp.attribute(reference, input_ids=ids, attention_mask=mask)
    torch._dynamo.reset()
    with deploy.compile_attribute(model, backend=recording_backend([])) as explain:
        got = explain(input_ids=ids, attention_mask=mask)
    torch._dynamo.reset()
    assert torch.equal(got.target, expected.target)
    assert_same_relevance(got.relevance, expected.relevance)


@pytest.mark.compile
def test_compile_attribute_with_all_logits_or_only_the_explained_ones():
    # a causal LM computes only the logits at the explained position unless all_logits=True
    model, reference = build("mistral", dtype=torch.float32), build("mistral", dtype=torch.float32)
    ids = inputs("mistral", seq=7)["input_ids"]
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    expected = lrpcpp.attribute(reference, input_ids=ids, attention_mask=mask, target=[5, 8])
    for all_logits in (False, True):
        logits_shapes = []

        def backend(
            gm, example_inputs, logits_shapes=logits_shapes
        ):  # records the shapes of the compiled forward's outputs
            (output,) = [n for n in gm.graph.nodes if n.op == "output"]
            logits_shapes.extend(
                tuple(v.meta["example_value"].shape)
                for v in output.args[0]
                if isinstance(v, torch.fx.Node) and "example_value" in v.meta
            )
            return recording_backend([])(gm, example_inputs)

        torch._dynamo.reset()
        with deploy.compile_attribute(model, backend=backend, all_logits=all_logits) as explain:
            got = explain(input_ids=ids, attention_mask=mask, target=[5, 8])
        assert torch.equal(got.target, expected.target)
        assert_same_relevance(got.relevance, expected.relevance)
        assert (2, 7 if all_logits else 2, 64) in logits_shapes  # [batch, batch, vocab]: each item's position
    torch._dynamo.reset()


@pytest.mark.compile
@pytest.mark.parametrize("family", ["gpt2", "vit"])
def test_compile_attribute_reuses_its_graphs_and_unpatches(family):
    model, reference = build(family, dtype=torch.float32), build(family, dtype=torch.float32)  # same weights
    before = hooks_and_flags(model)
    seen, compiled = [], []
    record = recording_backend(seen)

    def backend(gm, example_inputs):
        compiled.append(gm)
        return record(gm, example_inputs)

    def kwargs(seed, seq):
        kw = inputs(family, seq=seq, seed=seed, dtype=torch.float32)
        return kw if family in VISION else dict(kw, attention_mask=torch.ones_like(kw["input_ids"]))

    torch._dynamo.reset()
    with deploy.compile_attribute(model, backend=backend) as explain:
        for seed in (1, 2, 3):  # the same shapes: compiled once
            kw = kwargs(seed, 6)
            assert_same_relevance(explain(**kw).relevance, lrpcpp.attribute(reference, **kw).relevance)
        assert len(compiled) == 1
        if family not in VISION:
            for seq in (4, 9):  # a second length compiles once more, with dynamic shapes
                kw = kwargs(1, seq)
                assert_same_relevance(explain(**kw).relevance, lrpcpp.attribute(reference, **kw).relevance)
            assert len(compiled) == 2
    torch._dynamo.reset()
    assert any("lrpcpp.gi_scale_backward" in s for s in seen)
    assert any("lrpcpp.gi_layer_norm_backward" in s for s in seen)
    assert hooks_and_flags(model) == before
    with pytest.raises(RuntimeError, match="removed"):
        explain(**kwargs(1, 6))
