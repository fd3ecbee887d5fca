"""Sphinx configuration for the lrpcpp documentation.

Build (warnings are errors) from the repository root, with lrpcpp built in place:

    PYTHONPATH=python .venv/bin/sphinx-build -W --keep-going -b html docs build/docs

Only the builtin theme and builtin extensions are used, so the build needs no
network access.
"""

import os
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "python"))

project = "lrpcpp"
author = "the lrpcpp authors"
copyright = "the lrpcpp authors"

# the version, stated once in pyproject.toml's [project] table
with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    release = tomllib.load(f)["project"]["version"]
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
]

# autodoc: show signatures as written, with their defaults and annotations
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"
add_module_names = False

master_doc = "index"
exclude_patterns = ["_build"]
default_role = "literal"
pygments_style = "sphinx"
highlight_language = "python"

html_theme = "alabaster"
html_title = f"lrpcpp {release}"
html_theme_options = {
    "description": "Layer-wise Relevance Propagation for transformers as native PyTorch operators",
    "fixed_sidebar": True,
    "page_width": "1100px",
    "sidebar_width": "230px",
}
