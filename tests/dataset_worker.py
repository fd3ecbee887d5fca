"""One rank of a dataset attribution under torchrun, for tests/test_dataset.py and
benchmarks/bench_dataset.py: the items and the model are those of :func:`items` and :func:`model`.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dataset_worker.py OUT
        [--stop-after K --stop-rank R]   # rank R dies after K lines (the K+1-th written in part)
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
if os.environ.get("LRPCPP_TEST_INSTALLED") != "1":  # the in-place build, unless the tests check a wheel
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))

import lrpcpp  # noqa: E402
import lrpcpp.dataset  # noqa: E402
from models import build  # noqa: E402

WINDOW_BATCHES = 2  # small windows, so that a few dozen items make several of them


def items(n: int = 30, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 14, (n,), generator=g).tolist()
    return [{"input_ids": torch.randint(3, 64, (length,), generator=g).tolist()} for length in lengths]


def model(family: str = "llama"):
    return build(family)


def stop_after(k: int, path: str) -> None:
    """Makes the process die while writing its (k+1)-th line: half of it reaches ``path``."""
    original = lrpcpp.dataset.DatasetItem.to_json
    count = [0]

    def to_json(self):
        line = original(self)
        count[0] += 1
        if count[0] > k:
            with open(path, "ab") as f:
                f.write(line[: len(line) // 2].encode())
            os._exit(3)
        return line

    lrpcpp.dataset.DatasetItem.to_json = to_json


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--family", default="llama")
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--stop-after", type=int, default=None)
    ap.add_argument("--stop-rank", type=int, default=0)
    ap.add_argument("--window", type=int, default=WINDOW_BATCHES)
    args = ap.parse_args()
    torch.set_num_threads(1)
    lrpcpp.dataset.WINDOW_BATCHES = args.window
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if args.stop_after is not None and rank == args.stop_rank:
        stop_after(args.stop_after, f"{args.out}.rank{rank}-of-{world}" if world > 1 else args.out)
    written = lrpcpp.attribute_dataset(
        model(args.family), items(args.n), batch_size=args.batch_size, out=args.out, progress=False
    )
    print(f"rank {rank}: {written} items", flush=True)


if __name__ == "__main__":
    main()
