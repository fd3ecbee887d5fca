"""AttnLRP as an inseq attribution method: importing this module registers ``"attnlrp"`` with
inseq (its ``GradientAttributionRegistry``), for ``inseq.load_model(model, "attnlrp", ...)``::

    import inseq
    import lrpcpp.interop.inseq  # noqa: F401  (registers "attnlrp")

    model = inseq.load_model(hf_model, "attnlrp", tokenizer=tokenizer)
    out = model.attribute(prompt, generated_texts=prompt_and_continuation, attributed_fn="logit")

Each generation step is explained as :func:`lrpcpp.attribute` explains the next token: the method
is Captum's ``InputXGradient`` run inside :func:`lrpcpp.patch` of the Hugging Face model
(:class:`lrpcpp.interop.captum.AttnLRP`). inseq's default explained value is the next token's
probability; ``attributed_fn="logit"`` explains its logit, as lrpcpp does.
"""

from inseq.attr.feat.gradient_attribution import GradientAttributionRegistry

from .captum import AttnLRP

__all__ = ["AttnLRPAttribution"]


class AttnLRPAttribution(GradientAttributionRegistry):
    """inseq's ``"attnlrp"`` method. ``options`` (``method="cp-lrp"``, ``epsilon``, ``preset``,
    ``level``) go to :class:`lrpcpp.interop.captum.AttnLRP`, which patches the inseq model's
    Hugging Face model (``attribution_model.model``) for each step."""

    method_name = "attnlrp"

    def __init__(self, attribution_model, **options):
        super().__init__(attribution_model)
        self.method = AttnLRP(self.attribution_model, model=self.attribution_model.model, **options)
