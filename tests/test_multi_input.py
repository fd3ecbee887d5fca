"""Several inputs explained in one call: CLIP's text and pixels, T5's encoder ids and decoder prefix
(both without a family entry, so explained at the operation level), each a relevance leaf of its own
in ``Attribution.inputs``."""

import copy

import lrpcpp
import pytest
import torch
import transformers as tfm
from conftest import fails_in_torch_before_2_13
from lrpcpp.attribution import explaining, select_target

f64 = torch.float64


def _randomised(model):
    torch.manual_seed(0)
    model = model.to(f64).eval()
    with torch.no_grad():  # larger weights than the default init, so that outputs are far from zero
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    return model


def clip():
    layers = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2)
    text = dict(layers, vocab_size=64, max_position_embeddings=8, bos_token_id=1, eos_token_id=2)
    vision = dict(layers, image_size=16, patch_size=4)
    torch.manual_seed(0)
    return _randomised(tfm.CLIPModel(tfm.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)))


def t5():
    config = tfm.T5Config(
        d_model=16, d_kv=8, d_ff=24, num_layers=1, num_decoder_layers=1, num_heads=2, vocab_size=40, pad_token_id=0
    )
    torch.manual_seed(0)
    return _randomised(tfm.T5ForConditionalGeneration(config))


def _ids(shape, seed, low=3, high=40):
    return torch.randint(low, high, shape, generator=torch.Generator().manual_seed(seed))


PIXELS = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=f64)
TEXT = _ids((2, 5), 2, high=64)


def _second_caption(out):
    return out.logits_per_image[:, 1]


def test_clip_text_and_pixels_both_get_relevance(float64_default):
    attr = lrpcpp.attribute(clip(), input_ids=TEXT, pixel_values=PIXELS, target=_second_caption, strict=True)
    assert list(attr.inputs) == ["input_ids", "pixel_values"]
    assert attr.inputs["input_ids"].shape == (2, 5, 16) and attr.inputs["pixel_values"].shape == PIXELS.shape
    for relevance in attr.inputs.values():
        assert torch.isfinite(relevance).all() and relevance.abs().sum() > 0
    # relevance and token_relevance are those of the first input, the text
    assert torch.equal(attr.relevance, attr.inputs["input_ids"])
    assert torch.equal(attr.token_relevance, attr.relevance.sum(-1))


def _bias_free(model):
    """A copy without the summands that are no input: biases, position and class embeddings."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "position_embedding" in name or "class_embedding" in name:
                p.zero_()
    return model


def test_clip_cp_lrp_conserves_over_both_inputs(float64_default):
    # RULES.md: with the biases zero, linear and layer-norm rules conserve up to their epsilon, and CP-LRP
    # holds the softmax constant (which does not conserve under AttnLRP's Prop. 3.1). The image-text
    # product splits its relevance between the two embeddings: only both inputs together hold it all.
    model = _bias_free(clip())
    attr = lrpcpp.attribute(model, input_ids=TEXT, pixel_values=PIXELS, target=_second_caption, method="cp-lrp")
    total = sum(r.sum() for r in attr.inputs.values())
    torch.testing.assert_close(total, attr.output.sum(), rtol=1e-8, atol=0)
    for relevance in attr.inputs.values():  # neither input alone
        assert not torch.isclose(relevance.sum(), attr.output.sum(), rtol=1e-2)


def _patched_relevance(model, ids):
    """The relevance of one input computed from the steps attribute is made of, by hand."""
    with explaining(model) as handle, torch.enable_grad(), handle.rules.context():
        leaf = model.get_input_embeddings()(ids).detach().requires_grad_()
        explained, _ = select_target(model(inputs_embeds=leaf), None, None)
        (grad,) = torch.autograd.grad(explained, [leaf], torch.ones_like(explained))
    return grad * leaf.detach()


def test_one_input_is_explained_as_before():
    model = t5().get_encoder()
    head = torch.nn.Linear(16, 3, bias=False).to(f64)

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.head = model, head

        def get_input_embeddings(self):
            return self.encoder.get_input_embeddings()

        def forward(self, inputs_embeds):
            return self.head(self.encoder(inputs_embeds=inputs_embeds).last_hidden_state[:, 0])

    classifier, ids = Classifier(), _ids((2, 6), 4)
    attr = lrpcpp.attribute(classifier, input_ids=ids)
    assert list(attr.inputs) == ["input_ids"] and torch.equal(attr.inputs["input_ids"], attr.relevance)
    assert torch.equal(attr.relevance, _patched_relevance(classifier, ids))


ENCODER = _ids((2, 6), 5)
PREFIX = _ids((2, 4), 6)


def _decoder_logits(model, mask=None):
    with torch.no_grad():
        return model(input_ids=ENCODER, decoder_input_ids=PREFIX, decoder_attention_mask=mask).logits


@pytest.mark.parametrize(
    "mask",
    [None, torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]), torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])],
    ids=["unmasked", "right-padded", "left-padded"],
)
def test_t5_encoder_and_decoder_prefix(mask):
    model = t5()
    if not torch.isfinite(_decoder_logits(model, mask)).all():
        # transformers 4.x: a left-padded decoder position attends to nothing and its logits are NaN;
        # the explained logit is finite, but the NaN reaches the relevance through the backward
        assert tfm.__version__.startswith("4."), "transformers 5 gives finite logits here"
        with pytest.warns(
            RuntimeWarning,
            match=r"input_ids \(batch item\(s\) \[1\]\), decoder_input_ids \(batch item\(s\) \[1\]\) is not",
        ):
            lrpcpp.attribute(model, input_ids=ENCODER, decoder_input_ids=PREFIX, decoder_attention_mask=mask)
        return
    attr = lrpcpp.attribute(
        model, input_ids=ENCODER, decoder_input_ids=PREFIX, decoder_attention_mask=mask, strict=True
    )
    assert list(attr.inputs) == ["input_ids", "decoder_input_ids"]
    assert torch.equal(attr.relevance, attr.inputs["input_ids"]) and attr.inputs["decoder_input_ids"].shape == (
        2,
        4,
        16,
    )
    for relevance in attr.inputs.values():
        assert torch.isfinite(relevance).all() and relevance.abs().sum(-1).gt(0).any(-1).all()
    # the default target: the top next-token logit after the last unmasked decoder position
    last = torch.tensor([3, 3]) if mask is None else torch.tensor([3, int(mask[1].nonzero().max())])
    logits = _decoder_logits(model, mask)[torch.arange(2), last]
    assert torch.equal(attr.target, logits.argmax(-1))
    torch.testing.assert_close(attr.output, logits.amax(-1), rtol=1e-12, atol=0)
    # masked decoder positions get exactly none, unmasked ones some
    token = attr.inputs["decoder_input_ids"].abs().sum(-1)
    unmasked = torch.ones(2, 4, dtype=torch.bool) if mask is None else mask.bool()
    assert torch.equal(token[~unmasked], torch.zeros_like(token[~unmasked]))
    assert (token[unmasked] > 0).all()


def test_t5_decoder_ids_and_embeddings_agree():
    model = t5()
    by_ids = lrpcpp.attribute(model, input_ids=ENCODER, decoder_input_ids=PREFIX)
    embeds = model.get_decoder().get_input_embeddings()(PREFIX).detach()
    by_embeds = lrpcpp.attribute(model, input_ids=ENCODER, decoder_inputs_embeds=embeds)
    assert list(by_embeds.inputs) == ["input_ids", "decoder_inputs_embeds"]
    assert torch.equal(by_ids.inputs["decoder_input_ids"], by_embeds.inputs["decoder_inputs_embeds"])
    assert torch.equal(by_ids.relevance, by_embeds.relevance)


def test_errors():
    model = t5()
    embeds = model.get_input_embeddings()(ENCODER).detach()
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        lrpcpp.attribute(model, input_ids=ENCODER, inputs_embeds=embeds, decoder_input_ids=PREFIX)
    with pytest.raises(ValueError, match="exactly one of decoder_input_ids and decoder_inputs_embeds"):
        lrpcpp.attribute(model, input_ids=ENCODER, decoder_input_ids=PREFIX, decoder_inputs_embeds=embeds[:, :4])
    with pytest.raises(ValueError, match="no input to explain"):
        lrpcpp.attribute(model)
    with pytest.raises(ValueError, match=r"decoder_attention_mask must have the shape \[batch, seq\] = \[2, 4\]"):
        lrpcpp.attribute(model, input_ids=ENCODER, decoder_input_ids=PREFIX, decoder_attention_mask=torch.ones(2, 6))
    with pytest.raises(TypeError, match="takes no decoder_inputs_embeds"):
        lrpcpp.attribute(clip(), pixel_values=PIXELS, decoder_input_ids=PREFIX)


def _graph_backend(graphs):
    def backend(gm, example_inputs):  # the graphs as dynamo traced them, run as they are
        graphs.append(gm)
        return gm.forward

    return backend


def _assert_each_input(got, want, rtol=0.0):
    assert list(got.inputs) == list(want.inputs)
    assert torch.equal(got.target, want.target) if want.target is not None else got.target is None
    assert torch.equal(got.relevance, got.inputs[next(iter(got.inputs))])
    for name, expected in want.inputs.items():
        scale = float(expected.abs().max())
        assert scale > 0
        torch.testing.assert_close(got.inputs[name], expected, rtol=rtol, atol=rtol * scale)


# T5's decoder builds its cache in forward, and the cache deep-copies the config, which dynamo before
# torch 2.13 cannot trace
T5_DEEPCOPY = "dynamo cannot trace the copy.deepcopy of T5's config by its cache (torch._dynamo.exc.Unsupported)"


@pytest.mark.compile
@pytest.mark.slow
@fails_in_torch_before_2_13(T5_DEEPCOPY)
def test_compile_attribute_gives_the_relevance_of_t5s_encoder_and_decoder_inputs():
    # fullgraph=True; the traced graph run as dynamo recorded it gives exactly the eager relevance of each
    # input, on the example and on other lengths of both (one more compilation, with dynamic shapes)
    from lrpcpp import deploy

    model, reference = t5(), t5()  # the same weights
    graphs = []
    torch._dynamo.reset()
    try:
        with deploy.compile_attribute(model, backend=_graph_backend(graphs)) as explain:
            for encoder, prefix, mask in [
                (ENCODER, PREFIX, None),
                (ENCODER, PREFIX, torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])),
                (_ids((2, 5), 7), _ids((2, 3), 8), None),
                (_ids((2, 9), 9), _ids((2, 5), 10), None),
            ]:
                given = dict(input_ids=encoder, decoder_input_ids=prefix, decoder_attention_mask=mask)
                got = explain(**given)
                want = lrpcpp.attribute(reference, **given)
                _assert_each_input(got, want)
                assert torch.equal(got.output, want.output)
            assert len(graphs) == 3  # unmasked, masked, other lengths (dynamic, the last one too)
            # the decoder's embeddings in place of its ids: the same leaf
            embeds = model.get_decoder().get_input_embeddings()(PREFIX).detach()
            by_embeds = explain(input_ids=ENCODER, decoder_inputs_embeds=embeds)
            assert list(by_embeds.inputs) == ["input_ids", "decoder_inputs_embeds"]
            assert torch.equal(
                by_embeds.inputs["decoder_inputs_embeds"], explain(**given_first()).inputs["decoder_input_ids"]
            )
            # a list of targets: one map per target for each input
            many = explain(input_ids=ENCODER, decoder_input_ids=PREFIX, target=[3, 5])
            want = lrpcpp.attribute(reference, input_ids=ENCODER, decoder_input_ids=PREFIX, target=[3, 5])
            _assert_each_input(many, want, rtol=1e-12)
            assert many.inputs["decoder_input_ids"].shape == (2, 2, 4, 16)
    finally:
        torch._dynamo.reset()
    assert all("forward" not in m.__dict__ and not m._forward_hooks for m in model.modules())


def given_first():
    return dict(input_ids=ENCODER, decoder_input_ids=PREFIX)


@pytest.mark.compile
@pytest.mark.slow
def test_compile_attribute_gives_the_relevance_of_clips_text_and_pixels(float64_default):
    # CLIPModel's forward takes no inputs_embeds: the token embedding returns the text leaf through a
    # forward hook that stays for the compiled graph. The traced graph computes the image-text product
    # with a different rounding (observed: 2e-16 of the largest relevance in float64)
    from lrpcpp import deploy

    model, reference = clip(), clip()
    graphs = []
    torch._dynamo.reset()
    try:
        with deploy.compile_attribute(model, backend=_graph_backend(graphs)) as explain:
            for text in (TEXT, _ids((2, 5), 11, high=64), _ids((2, 7), 12, high=64)):
                got = explain(input_ids=text, pixel_values=PIXELS, target=_second_caption)
                want = lrpcpp.attribute(reference, input_ids=text, pixel_values=PIXELS, target=_second_caption)
                _assert_each_input(got, want, rtol=1e-12)
                assert got.inputs["pixel_values"].shape == PIXELS.shape
    finally:
        torch._dynamo.reset()
    assert len(graphs) <= 2
    assert all("forward" not in m.__dict__ and not m._forward_hooks for m in model.modules())


@pytest.mark.compile
@pytest.mark.slow
@fails_in_torch_before_2_13(T5_DEEPCOPY)
def test_compile_attribute_with_inductor_gives_the_relevance_of_each_input():
    # the default backend, inductor, in float32: generated kernels, equal up to rounding
    from lrpcpp import deploy

    model, reference = t5().float(), t5().float()
    torch._dynamo.reset()
    try:
        with deploy.compile_attribute(model) as explain:
            for encoder, prefix in [(ENCODER, PREFIX), (_ids((2, 8), 13), _ids((2, 5), 14))]:
                got = explain(input_ids=encoder, decoder_input_ids=prefix)
                want = lrpcpp.attribute(reference, input_ids=encoder, decoder_input_ids=prefix)
                _assert_each_input(got, want, rtol=1e-6)
    finally:
        torch._dynamo.reset()


def _deployed_inputs(given, model):
    """The program's inputs for what attribute is given: the ids as their embeddings."""
    out = dict(given)
    if "decoder_input_ids" in out:
        out["decoder_inputs_embeds"] = model.get_decoder().get_input_embeddings()(out.pop("decoder_input_ids")).detach()
    if "pixel_values" in out:  # CLIP's forward takes no inputs_embeds: the ids with their embeddings
        out["inputs_embeds"] = model.text_model.embeddings.token_embedding(out["input_ids"]).detach()
    else:
        out["inputs_embeds"] = model.get_input_embeddings()(out.pop("input_ids")).detach()
    return out


@pytest.mark.compile
@pytest.mark.parametrize("several", ["t5", "clip"])
def test_exported_program_gives_the_relevance_of_each_input(several, tmp_path, float64_default):
    # the program takes the inputs as a dict and runs on other lengths (dynamic); its relevance of each
    # input is lrpcpp.attribute's, in attribute's order
    from lrpcpp import deploy

    if several == "t5":
        model, target = t5(), None
        cases = [
            dict(
                input_ids=ENCODER, decoder_input_ids=PREFIX, decoder_attention_mask=torch.ones(2, 4, dtype=torch.long)
            ),
            dict(
                input_ids=_ids((2, 9), 15),
                decoder_input_ids=_ids((2, 3), 16),
                decoder_attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]),
            ),
        ]
    else:
        model, target = clip(), _second_caption
        cases = [
            dict(input_ids=TEXT, pixel_values=PIXELS),
            dict(input_ids=_ids((2, 7), 17, high=64), pixel_values=PIXELS),
        ]
    path = tmp_path / "model.pt2"
    deploy.export_program(model, path, **cases[0], target=target)  # check=True: compares on the example
    assert all("forward" not in m.__dict__ and not m._forward_hooks for m in model.modules())
    program = torch.export.load(str(path)).module()
    for given in cases:
        want = lrpcpp.attribute(model, **given, target=target)
        got = deploy.attribute_deployed(program, **_deployed_inputs(given, model), target=target)
        assert len(got.inputs) == 2
        for have, expected in zip(got.inputs.values(), want.inputs.values()):
            # T5: bitwise; CLIP: the image-text product rounds differently in the exported graph
            rtol = 0.0 if several == "t5" else 1e-12
            torch.testing.assert_close(have, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


def test_archive_refuses_several_inputs_and_names_export_program(tmp_path):
    from lrpcpp import deploy

    with pytest.raises(ValueError, match=r"got input_ids, decoder_input_ids\. .*lrpcpp\.deploy\.export_program"):
        deploy.export_archive(t5(), tmp_path / "m.pt", input_ids=ENCODER, decoder_input_ids=PREFIX)
    assert not (tmp_path / "m.pt").exists()
