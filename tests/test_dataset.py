"""lrpcpp.attribute_dataset: padded batches equal single items, the results file in input order,
interrupted runs gone on with, and the same file from two processes (torchrun, gloo, on CPU)."""

import json
import os
import subprocess
import sys

import lrpcpp
import lrpcpp.dataset
import pytest
import torch
from conftest import subprocess_env
from dataset_worker import WINDOW_BATCHES, items, model, stop_after
from models import build

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "dataset_worker.py")


@pytest.fixture(autouse=True)
def small_windows(monkeypatch):
    monkeypatch.setattr(lrpcpp.dataset, "WINDOW_BATCHES", WINDOW_BATCHES)


def _assert_same_results(got, expected):
    """Records (or DatasetItems as records) equal item by item; relevance to rtol 1e-12 of its scale
    (a padded batch gives each row its relevance alone up to the rounding of other matrix shapes)."""
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert (g["index"], g["input_ids"], g["target"]) == (e["index"], e["input_ids"], e["target"])
        rel, ref = torch.tensor(g["relevance"]), torch.tensor(e["relevance"])
        scale = float(ref.abs().max())
        torch.testing.assert_close(rel, ref, rtol=1e-12, atol=1e-12 * scale)
        torch.testing.assert_close(torch.tensor(g["output"]), torch.tensor(e["output"]), rtol=1e-12, atol=1e-12)


def _record(item):
    return json.loads(item.to_json())


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_dataset_equals_attribute_item_by_item(family):
    m = build(family)
    data = items(19)
    results = list(lrpcpp.attribute_dataset(m, data, batch_size=4, progress=False))
    assert [r.index for r in results] == list(range(len(data)))  # input order, though sorted by length
    expected = []
    for k, item in enumerate(data):
        alone = lrpcpp.attribute(m, input_ids=torch.tensor([item["input_ids"]]))
        expected.append(
            {
                "index": k,
                "input_ids": item["input_ids"],
                "relevance": alone.token_relevance[0].tolist(),
                "target": int(alone.target[0]),
                "output": float(alone.output[0]),
            }
        )
    _assert_same_results([_record(r) for r in results], expected)
    assert results[0].relevance.dtype == torch.float64


def test_padding_side_follows_the_model(monkeypatch):
    seen = []
    real = lrpcpp.dataset.attribute

    def spy(model, input_ids, attention_mask, **kw):
        seen.append(attention_mask.clone())
        return real(model, input_ids=input_ids, attention_mask=attention_mask, **kw)

    monkeypatch.setattr(lrpcpp.dataset, "attribute", spy)
    data = [{"input_ids": [5, 6, 7]}, {"input_ids": [5, 6]}]
    list(lrpcpp.attribute_dataset(build("llama"), data, batch_size=2, progress=False))
    assert seen[-1].tolist() == [[0, 1, 1], [1, 1, 1]]  # a causal decoder: left padding
    list(lrpcpp.attribute_dataset(build("bert"), data, batch_size=2, progress=False))
    assert seen[-1].tolist() == [[1, 1, 0], [1, 1, 1]]  # an encoder: right padding


def test_without_out_each_rank_yields_its_own_items(monkeypatch):
    m, data = build("bert"), items(7)
    whole = list(lrpcpp.attribute_dataset(m, data, batch_size=2, progress=False))
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        mine = list(lrpcpp.attribute_dataset(m, data, batch_size=2, progress=False))
        assert [r.index for r in mine] == list(range(rank, 7, 2))
        _assert_same_results([_record(r) for r in mine], [_record(r) for r in whole[rank::2]])
    assert not torch.distributed.is_initialized()


def test_texts_with_a_tokenizer_and_keyword_arguments():
    class Tokenizer:  # what attribute_dataset calls: tokenizer(text)["input_ids"], pad_token_id
        pad_token_id = 0

        def __call__(self, text):
            return {"input_ids": [3 + (ord(c) % 60) for c in text]}

    m = build("bert")
    texts = ["abc", "hello there", "xy"]
    results = list(lrpcpp.attribute_dataset(m, texts, tokenizer=Tokenizer(), target=1, progress=False))
    for r, text in zip(results, texts):
        alone = lrpcpp.attribute(m, input_ids=torch.tensor([Tokenizer()(text)["input_ids"]]), target=1)
        assert r.target == 1
        torch.testing.assert_close(r.relevance, alone.token_relevance[0], rtol=1e-12, atol=1e-12)


def test_file_in_input_order_and_resumed_after_an_interruption(tmp_path, monkeypatch):
    m, data = model(), items(30)
    whole = tmp_path / "whole.jsonl"
    assert lrpcpp.attribute_dataset(m, data, batch_size=4, out=str(whole), progress=False) == 30
    records = lrpcpp.dataset.read_dataset(str(whole))
    _assert_same_results(records, [_record(r) for r in lrpcpp.attribute_dataset(m, data, batch_size=4)])

    cut = tmp_path / "cut.jsonl"

    class Interrupted(Exception):
        pass

    def die(code):
        raise Interrupted

    monkeypatch.setattr(os, "_exit", die)
    monkeypatch.setattr(lrpcpp.dataset.DatasetItem, "to_json", lrpcpp.dataset.DatasetItem.to_json)  # undone below
    stop_after(11, str(cut))  # 11 lines written whole, then half of the 12th
    with pytest.raises(Interrupted):
        lrpcpp.attribute_dataset(m, data, batch_size=4, out=str(cut), progress=False)
    monkeypatch.undo()
    monkeypatch.setattr(lrpcpp.dataset, "WINDOW_BATCHES", WINDOW_BATCHES)
    assert cut.read_bytes().count(b"\n") == 11 and not cut.read_bytes().endswith(b"\n")
    assert lrpcpp.attribute_dataset(m, data, batch_size=4, out=str(cut), progress=False) == 30 - 11
    assert cut.read_bytes() == whole.read_bytes()  # the same batches, the same bytes
    assert lrpcpp.attribute_dataset(m, data, batch_size=4, out=str(cut), progress=False) == 0  # nothing left


def test_a_file_of_other_items_is_refused_and_kept(tmp_path):
    m, data = model(), items(6)
    path = tmp_path / "out.jsonl"
    lrpcpp.attribute_dataset(m, data, batch_size=4, out=str(path), progress=False)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="the items changed"):
        lrpcpp.attribute_dataset(m, items(6, seed=1), batch_size=4, out=str(path), progress=False)
    assert path.read_bytes() == before
    other = tmp_path / "other.jsonl"
    other.write_text('{"something": 1}\n')
    with pytest.raises(ValueError, match="not a results file"):
        lrpcpp.attribute_dataset(m, data, out=str(other), progress=False)
    assert other.read_text() == '{"something": 1}\n'


def test_parts_of_another_number_of_processes_are_refused(tmp_path):
    out = tmp_path / "out.jsonl"
    part = tmp_path / "out.jsonl.rank1-of-2"
    part.write_text('{"index": 1, "input_ids": [3]}\n')
    with pytest.raises(ValueError, match="another number of processes than this one"):
        lrpcpp.attribute_dataset(build("bert"), [{"input_ids": [3]}, {"input_ids": [3]}], out=str(out), progress=False)
    assert not out.exists() and part.read_text() == '{"index": 1, "input_ids": [3]}\n'


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(items=["text"]), TypeError, "texts need tokenizer"),
        (dict(items=[{"input_ids": [3, 4], "labels": 1}]), ValueError, "the one key 'input_ids'"),
        (dict(items=[3]), TypeError, "must be a text or a mapping"),
        (dict(items=[{"input_ids": []}]), ValueError, "has no tokens"),
        (dict(items=[{"input_ids": [[1, 2], [3, 4]]}]), ValueError, "one row of integer token ids"),
        (dict(items=[{"input_ids": [3]}], batch_size=0), ValueError, "batch_size must be a positive int"),
        (dict(items=[{"input_ids": [3]}], attention_mask=None), TypeError, "come from the items"),
        (dict(items=[{"input_ids": [3]}], target=torch.tensor([1, 2])), ValueError, "does not follow the items"),
    ],
)
def test_bad_input_is_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        lrpcpp.attribute_dataset(build("bert"), progress=False, **kwargs)


def _torchrun(out, *extra, timeout=300):
    env = subprocess_env()  # the lrpcpp these tests import: the in-place build or the installed wheel
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", WORKER, str(out)]
    return subprocess.run(cmd + list(extra), capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_two_ranks_equal_one_process_and_resume_to_the_same_file(tmp_path):
    one = tmp_path / "one.jsonl"
    lrpcpp.attribute_dataset(model(), items(), batch_size=4, out=str(one), progress=False)
    two = tmp_path / "two.jsonl"
    run = _torchrun(two)
    assert run.returncode == 0, run.stdout + run.stderr
    _assert_same_results(lrpcpp.dataset.read_dataset(str(two)), lrpcpp.dataset.read_dataset(str(one)))
    assert sorted(os.listdir(tmp_path)) == ["one.jsonl", "two.jsonl"]  # the part files are merged and removed

    cut = tmp_path / "cut.jsonl"
    run = _torchrun(cut, "--stop-after", "5", "--stop-rank", "1")
    assert run.returncode != 0
    assert not cut.exists()  # nothing merged
    part = tmp_path / "cut.jsonl.rank1-of-2"
    assert part.read_bytes().count(b"\n") == 5 and not part.read_bytes().endswith(b"\n")
    run = _torchrun(cut)
    assert run.returncode == 0, run.stdout + run.stderr
    assert cut.read_bytes() == two.read_bytes()
    assert not part.exists()
