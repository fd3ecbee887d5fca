"""The ``lrpcpp`` command line: :mod:`~lrpcpp.cli.command` (the parser and the commands),
:mod:`~lrpcpp.cli.loading` (models from local files), :mod:`~lrpcpp.cli.explain` (explanations as
plain data), :mod:`~lrpcpp.cli.evaluate` (perturbation faithfulness) and :mod:`~lrpcpp.cli.render`
(terminal, HTML, LaTeX and PNG views).

Importing it is cheap: transformers, matplotlib and Pillow are imported only by the commands that
need them.
"""

from .command import entry, main

__all__ = ["main", "entry"]
