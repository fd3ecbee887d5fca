"""Deploying the operation level: torch.export programs and TorchScript archives reproduce
lrpcpp.attribute(level="operations"); torch.compile is refused with the reason."""

import lrpcpp
import pytest
import torch
from lrpcpp import deploy
from models import build as build_registered
from models import inputs
from test_deploy import assert_same_relevance, hooks_and_flags
from test_operation_families import build as build_unregistered

# (model, level): OLMo2 has no family entry ("auto" is the operation level); llama has one and is
# forced to the operation level
CASES = [("olmo2", "auto"), ("llama", "operations")]


def _model(family: str):
    if family == "olmo2":
        return build_unregistered("olmo2").to(torch.float32)
    return build_registered(family, dtype=torch.float32)


def _example(family: str, seq: int = 6):
    ids = inputs("llama", seq=seq)["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row
    return ids, mask


def _expected(model, ids, mask):
    embeds = model.get_input_embeddings()(ids).detach()
    expected = lrpcpp.attribute(model, inputs_embeds=embeds, attention_mask=mask, level="operations")
    assert expected.coverage is not None  # explained at the operation level
    return embeds, expected


@pytest.mark.compile
@pytest.mark.parametrize("family,level", CASES)
def test_exported_program_gives_the_relevance_of_the_operation_level(family, level, tmp_path):
    model = _model(family)
    ids, mask = _example(family)
    embeds, expected = _expected(model, ids, mask)
    before = hooks_and_flags(model)
    path = tmp_path / "model.pt2"
    deploy.export_program(model, path, input_ids=ids, attention_mask=mask, level=level, check=False)
    assert hooks_and_flags(model) == before
    program = torch.export.load(str(path)).module()
    assert any("lrpcpp.gi_grad_scale" in str(n.target) for n in program.graph.nodes)  # the rules are in the graph
    for x, m in ((embeds, mask), (embeds[:, 1:], mask[:, 1:])):  # the example and another length
        want = lrpcpp.attribute(model, inputs_embeds=x, attention_mask=m, level="operations")
        got = deploy.attribute_deployed(program, x, m, target=want.target)
        assert_same_relevance(got.relevance, want.relevance, rtol=1e-6)
    assert torch.equal(deploy.attribute_deployed(program, embeds, mask).target, expected.target)


@pytest.mark.compile
@pytest.mark.parametrize("family,level", CASES)
def test_archive_gives_the_relevance_of_the_operation_level(family, level, tmp_path):
    model = _model(family)
    ids, mask = _example(family)
    embeds, expected = _expected(model, ids, mask)
    before = hooks_and_flags(model)
    path = tmp_path / "model.pt"
    info = deploy.export_archive(model, path, input_ids=ids, attention_mask=mask, level=level)  # check=True as well
    assert info["level"] == "operations"
    assert hooks_and_flags(model) == before
    archive = torch.jit.load(str(path))
    got = deploy.attribute_deployed(archive, embeds, mask, target=expected.target)
    assert_same_relevance(got.relevance, expected.relevance, rtol=1e-6)


@pytest.mark.parametrize("family,level", CASES)
def test_compile_attribute_refuses_the_operation_level_and_says_why(family, level):
    model = _model(family)
    before = hooks_and_flags(model)
    with pytest.raises(
        RuntimeError, match=r"operation level .* cannot be compiled .*WeakIdKeyDictionary.*export_program"
    ):
        deploy.compile_attribute(model, level=level, backend="eager")
    assert hooks_and_flags(model) == before  # nothing left patched


@pytest.mark.compile
def test_the_operation_level_breaks_the_graph_of_dynamo():
    # the reason of the refusal above: should dynamo learn to trace the rule mode, this fails and
    # compile_attribute can take the operation level
    model = _model("olmo2")
    ids, mask = _example("olmo2")
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    torch._dynamo.reset()
    try:
        with lrpcpp.patch(model, level="operations"), torch.enable_grad():
            compiled = torch.compile(model, backend="eager", fullgraph=True)
            with pytest.raises(torch._dynamo.exc.Unsupported, match="WeakIdKeyDictionary"):
                compiled(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
    finally:
        torch._dynamo.reset()
