"""``python -m lrpcpp``: the ``lrpcpp`` command (see :mod:`lrpcpp.cli`)."""

from .cli import entry

entry()
