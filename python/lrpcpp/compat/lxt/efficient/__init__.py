"""LXT's ``lxt.efficient`` (gradient times input): :mod:`.rules`. LXT's ``monkey_patch`` patches the
classes of a ``transformers`` modelling module; lrpcpp patches one model instance instead, with
:func:`lrpcpp.patch` or :func:`lrpcpp.attribute`."""
