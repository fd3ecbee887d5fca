"""Whole models under relevance rules: model families (:mod:`.families`), the state a model is put
in (:mod:`.state`), scoped patching (:mod:`.patching`), presets of layer rules (:mod:`.presets`)
with their per-layer forwards (:mod:`.layers`, :mod:`.attention`) and batch-norm merging
(:mod:`.canonizers`), composites of drop-in modules (:mod:`.composite`) and the operation-level
explicit rules (:mod:`.explicit`)."""

from . import attention, canonizers, composite, explicit, families, layers, patching, presets, state

__all__ = ["attention", "canonizers", "composite", "explicit", "families", "layers", "patching", "presets", "state"]
