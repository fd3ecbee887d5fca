"""LXT's ``lxt.explicit`` (relevance carried by the backward pass): :mod:`.functional`."""
