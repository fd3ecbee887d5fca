"""Throughput (items/s) of ``lrpcpp.attribute_dataset`` writing a results file, with 1 process and
with 2 processes under ``torchrun`` (gloo, CPU).

The model is a random LLaMA-style causal LM in float32 (hidden 256, 4 layers, 8 heads, MLP 688,
vocabulary 1000); the items are 96 random token id lists of 16 to 96 tokens, explained 8 at a time.
Each configuration runs in fresh processes; the time is that of the ``attribute_dataset`` call on
rank 0 (for 2 processes: from a barrier after the warm-up to the merged file), not the start or the
imports.
Configurations: 1 process with 1 thread, 1 process with 2 threads, 2 processes with 1 thread each.

    PYTHONPATH=python .venv/bin/python benchmarks/bench_dataset.py            # markdown report on stdout
    PYTHONPATH=python .venv/bin/python benchmarks/bench_dataset.py --write    # also its section of RESULTS.md

The section it writes in benchmarks/RESULTS.md is "Dataset attribution (CPU)"; only that section is
replaced. The load average before and after is recorded with it: on a shared machine other processes
take cores from the 2-process run first.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

SECTION = "## Dataset attribution (CPU)"
N_ITEMS, BATCH, MIN_LEN, MAX_LEN = 96, 8, 16, 96


def _model():
    import torch
    import transformers as tfm

    torch.manual_seed(0)
    config = tfm.LlamaConfig(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=1000,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    return tfm.LlamaForCausalLM(config).float().eval()


def _items():
    import torch

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(MIN_LEN, MAX_LEN + 1, (N_ITEMS,), generator=g).tolist()
    return [{"input_ids": torch.randint(3, 1000, (n,), generator=g).tolist()} for n in lengths]


def worker(out: str, threads: int) -> None:
    """One process of a configuration: rank 0 prints its time as JSON."""
    import lrpcpp
    import torch

    torch.set_num_threads(threads)
    model, items = _model(), _items()
    lrpcpp.attribute(model, input_ids=torch.tensor([items[0]["input_ids"]]))  # warm-up
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # the ranks start the clock together
        torch.distributed.init_process_group("gloo")
        torch.distributed.barrier()
    start = time.perf_counter()
    lrpcpp.attribute_dataset(model, items, batch_size=BATCH, out=out, progress=False)
    seconds = time.perf_counter() - start
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"seconds": seconds, "items": N_ITEMS}), flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run(processes: int, threads: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out.jsonl")
        me = [os.path.abspath(__file__), "--worker", out, "--threads", str(threads)]
        if processes == 1:
            cmd = [sys.executable] + me
        else:
            run_ = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
            cmd = run_ + me
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
        with open(out) as f:
            assert sum(1 for _ in f) == N_ITEMS
        record = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
        return record["items"] / record["seconds"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help=f"also write the section '{SECTION}' of RESULTS.md")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each configuration (the best is reported)")
    ap.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.threads)

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import results_file
    import torch
    from machine import cpu_model

    load_before = os.getloadavg()
    rows = []
    for processes, threads in ((1, 1), (1, 2), (2, 1)):
        rates = [run(processes, threads) for _ in range(args.repeat)]
        rows.append((processes, threads, max(rates), rates))
        print(f"{processes} process(es) x {threads} thread(s): {max(rates):.2f} items/s", file=sys.stderr)
    load_after = os.getloadavg()
    base = rows[0][2]
    lines = [
        SECTION,
        "",
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores; torch {torch.__version__}",
        f"- Build: commit {results_file.commit()}; date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- Load average (1, 5, 15 min) before: {', '.join(f'{v:.2f}' for v in load_before)}; "
        f"after: {', '.join(f'{v:.2f}' for v in load_after)}",
        "",
        f"Produced by `benchmarks/bench_dataset.py --write`. `lrpcpp.attribute_dataset(..., out=FILE)` on {N_ITEMS} "
        f"random token id lists of {MIN_LEN} to {MAX_LEN} tokens, batch_size {BATCH}, a random LLaMA-style causal "
        "LM in float32 (hidden 256, 4 layers, 8 heads, MLP 688, vocabulary 1000). Time of the call on rank 0 (for 2 "
        "processes: from a barrier of both after the warm-up until rank 0 has merged the parts), best of "
        f"{args.repeat} runs, each in fresh processes.",
        "",
        "| processes | threads each | items/s | vs 1 x 1 | runs (items/s) |",
        "|---:|---:|---:|---:|---|",
    ]
    for processes, threads, best, rates in rows:
        lines.append(
            f"| {processes} | {threads} | {best:.2f} | {best / base:.2f} | {', '.join(f'{r:.2f}' for r in rates)} |"
        )
    lines += [
        "",
        "On a machine that other processes load (a load average above the number of cores), the figures vary from "
        "run to run (the runs column), and a process with 2 threads loses time whenever one of its threads waits for "
        "the other to be scheduled; the speed-up of 2 processes shows on an idle machine only.",
    ]
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if args.write:
        print(f"wrote {results_file.write_section(SECTION, text)}", file=sys.stderr)


if __name__ == "__main__":
    main()
