"""The public API is importable from the places the docs name, and the package's modules import
each other only through public names of the defining module (never the package root)."""

import ast
import importlib
import pathlib
import re

import lrpcpp
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PACKAGE = ROOT / "python" / "lrpcpp"

DIRECTIVE = re.compile(r"^\s*\.\. (auto\w+|currentmodule|module|py:module)::\s*(\S+)", re.MULTILINE)


def doc_targets(text: str):
    """(directive, fully qualified name) of every autodoc directive, with the current module
    (``currentmodule``, ``module``, ``automodule``) resolved."""
    current = None
    for directive, target in DIRECTIVE.findall(text):
        name = target.split("(")[0]  # an explicit signature follows the name
        if directive in ("currentmodule", "module", "py:module"):
            current = None if name == "None" else name
        elif directive == "automodule":
            current = name
            yield directive, name
        else:
            yield directive, name if current is None or name.startswith("lrpcpp") else f"{current}.{name}"


def resolve(name: str):
    """The object a dotted name names: the longest importable module, then attributes."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(name)


def documented():
    return [
        (f"{page.name}: {d} {n}", n) for page in sorted(DOCS.glob("*.rst")) for d, n in doc_targets(page.read_text())
    ]


def test_docs_name_autodoc_targets():
    assert len(documented()) > 50


@pytest.mark.parametrize("where,name", documented(), ids=[w for w, _ in documented()])
def test_documented_name_imports(where, name):
    resolve(name)


def test_resolve_fails_on_a_missing_name():
    with pytest.raises(AttributeError):
        resolve("lrpcpp.models.presets.NoSuchThing")
    with pytest.raises(ImportError):
        resolve("nosuchpackage.thing")
    text = (
        ".. currentmodule:: lrpcpp.models\n.. autoclass:: presets.Preset\n"
        ".. automodule:: lrpcpp.rules\n.. autoclass:: Gamma\n"
    )
    assert list(doc_targets(text)) == [
        ("autoclass", "lrpcpp.models.presets.Preset"),
        ("automodule", "lrpcpp.rules"),
        ("autoclass", "lrpcpp.rules.Gamma"),
    ]


@pytest.mark.parametrize("name", lrpcpp.__all__)
def test_root_all_names_exist(name):
    assert hasattr(lrpcpp, name), f"lrpcpp.__all__ names {name!r}, which lrpcpp does not have"


def test_root_keeps_its_public_names():
    for name in (
        "attribute",
        "Attribution",
        "patch",
        "PatchHandle",
        "Composite",
        "ExplicitRules",
        "preset",
        "Preset",
        "PRESETS",
        "register_preset",
        "register_family",
        "Family",
        "UnsupportedModelError",
        "functional",
        "modules",
        "targets",
        "viz",
        "deploy",
        "rules",
        "models",
        "Epsilon",
        "ZBox",
        "__version__",
    ):
        assert name in lrpcpp.__all__
    assert lrpcpp.Epsilon is lrpcpp.rules.Epsilon
    assert lrpcpp.Preset is lrpcpp.models.presets.Preset


# ----------------------------------------------------------------------------- imports inside the package
def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_violations(path: pathlib.Path, source: str):
    """Imports in ``source`` (the module at ``path``) of the package root, or of an underscore name
    from another lrpcpp module. A package's own ``__init__`` may import its submodules."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "lrpcpp":
                    found.append(f"line {node.lineno}: import lrpcpp")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not (target == "lrpcpp" or target.startswith("lrpcpp.")):
                continue
            for alias in node.names:
                name = alias.name
                full = f"{target}.{name}"
                if target == "lrpcpp" and not (PACKAGE / f"{name}.py").exists() and not (PACKAGE / name).is_dir():
                    found.append(f"line {node.lineno}: from the package root: {name}")
                if name.startswith("_") and not name.startswith("__"):
                    is_module = (PACKAGE.parent / full.replace(".", "/")).with_suffix(".py").exists()
                    if not is_module and target != here:
                        found.append(f"line {node.lineno}: private name {full}")
    return found


def test_package_imports_only_public_names_of_modules():
    """The library and the command line (lrpcpp.cli) alike."""
    modules = sorted(PACKAGE.rglob("*.py"))
    assert any(p.parent.name == "cli" for p in modules)
    bad = {str(p.relative_to(PACKAGE)): v for p in modules if (v := import_violations(p, p.read_text()))}
    assert not bad, f"imports of the package root or of private names across modules: {bad}"


def test_import_check_can_fail():
    path = PACKAGE / "models" / "patching.py"
    assert import_violations(path, "from ..attribution import _call\n") == [
        "line 1: private name lrpcpp.attribution._call"
    ]
    assert import_violations(path, "import lrpcpp\n") == ["line 1: import lrpcpp"]
    assert import_violations(path, "from .. import Preset\n") == ["line 1: from the package root: Preset"]
    assert import_violations(path, "from lrpcpp import patch\n") == ["line 1: from the package root: patch"]
    # allowed: public names, submodules, a private module
    assert (
        import_violations(path, "from ..rules import Rule\nfrom .. import functional as lf\nfrom .._files import x\n")
        == []
    )
