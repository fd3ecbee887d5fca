"""The ``lrpcpp`` command without its optional packages (the wheel's ``cli`` extra): what needs a
missing one ends, before any model is loaded, in one line naming it and how to install it.

A missing package is simulated by ``sys.modules[name] = None`` (its import then fails, and
``importlib.util.find_spec`` finds nothing)."""

import sys

import pytest
from lrpcpp.cli import command


@pytest.fixture
def nothing_loaded(monkeypatch, tmp_path):
    """No model may be loaded: the hint must come before any work."""

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(command, "_load", load)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def missing(monkeypatch, *modules):
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def hint(what, package):
    return f"lrpcpp: error: {what} needs {package} (pip install 'lrpcpp[cli]')\n"


def image_file(tmp_path):
    path = tmp_path / "cat.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n")  # never read: the hint comes first
    return str(path)


@pytest.mark.parametrize(
    "argv, modules, expected",
    [
        (["explain", "--png", "out.png"], ["matplotlib"], hint("--png", "matplotlib")),
        (["explain", "--model", "DIR", "--image", "IMAGE"], ["PIL"], hint("--image", "Pillow")),
        (["explain", "--model", "DIR", "--image", "IMAGE", "--png", "out.png"], ["PIL"], hint("--image", "Pillow")),
        (
            ["explain", "--latent", "--model", "DIR", "--image", "IMAGE", "--png", "o.png"],
            ["matplotlib"],
            hint("--png", "matplotlib"),
        ),
        (["explain", "--html", "out.html"], ["matplotlib"], hint("--html", "matplotlib")),
        (["explain", "--latex", "out.tex"], ["matplotlib"], hint("--latex", "matplotlib")),
        (["explain", "--color", "always"], ["matplotlib"], hint("a coloured terminal view (--color)", "matplotlib")),
        (["explain"], ["transformers"], hint("lrpcpp explain", "transformers")),
        (
            ["explain", "--dataset", "reviews"],
            ["datasets"],
            "lrpcpp: error: --dataset needs datasets (pip install datasets)\n",
        ),
        (["evaluate"], ["matplotlib"], hint("the plot of the curves (--png)", "matplotlib")),
        (["evaluate", "--limit", "1"], ["transformers", "matplotlib"], hint("lrpcpp evaluate", "transformers")),
        (["export", "--model", "DIR", "m.pt"], ["transformers"], hint("lrpcpp export", "transformers")),
    ],
)
def test_a_missing_optional_package_is_named_before_any_work(
    argv, modules, expected, nothing_loaded, monkeypatch, capsys
):
    argv = [str(nothing_loaded) if a == "DIR" else image_file(nothing_loaded) if a == "IMAGE" else a for a in argv]
    missing(monkeypatch, *modules)
    assert command.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == expected


def test_with_the_packages_present_the_command_goes_on_to_load_the_model(nothing_loaded, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    # the fixture's _load raises: reaching it is an internal error (exit 1), not a hint
    assert command.main(["explain", "--png", "out.png"]) == 1
    assert "a model was loaded" in capsys.readouterr().err
