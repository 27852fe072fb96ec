"""Tests of dualform.data.online on hand-made records and fake library modules (no network, no tfds)."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

from dualform.data import online, tasks


def test_convert_tfds_style_records():
  # TFDS yields numpy scalars and bytes.
  sst2 = {"sentence": np.bytes_(b"it 's a gem . "), "label": np.int64(1), "idx": np.int32(4)}
  assert online.convert_record("sst2", sst2, "tfds") == {"text": "it 's a gem . ", "label": 1}
  agnews = {"title": b"Nets get Carter", "description": "from Raptors \\ quot;", "label": np.array(1)}
  assert online.convert_record("agnews", agnews, "tfds") == {"text": "Nets get Carter from Raptors \\ quot;",
                                                             "label": 1}
  cb = {"premise": "caf\u00e9 ".encode(), "hypothesis": b"x", "label": 2, "idx": 0}
  assert online.convert_record("cb", cb, "tfds") == {"premise": "caf\u00e9 ", "hypothesis": "x", "label": 2}


def test_convert_hf_style_records():
  assert online.convert_record("mr", {"text": "fine", "label": 0}, "hf") == {"text": "fine", "label": 0}
  assert online.convert_record("agnews", {"text": "A B", "label": 3}, "hf") == {"text": "A B", "label": 3}
  assert online.convert_record("sst5", {"text": "t", "label": 4, "label_text": "very positive"}, "hf") == \
      {"text": "t", "label": 4}


@pytest.mark.parametrize("task, record, message", [
    ("sst2", {"sentence": "x", "label": -1}, "unlabelled split"),
    ("sst2", {"text": "x", "label": 0}, "missing field 'sentence'"),
    ("subj", {"text": "x", "label": 2}, "label 2 out of range"),
    ("subj", {"text": 5, "label": 1}, "expected text"),
    ("subj", {"text": "x", "label": "1"}, "label must be an integer"),
    ("cb", {"premise": b"\xff", "hypothesis": "h", "label": 0}, "not valid UTF-8"),
])
def test_convert_rejects_bad_records(task, record, message):
  with pytest.raises(ValueError) as excinfo:
    online.convert_records(task, [record], "hf")
  assert message in str(excinfo.value) and "row 0" in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_jsonl_lines_match_the_shared_style(tmp_path):
  record = {"text": "a\u0085b \u2028 \u00e9 \"q\"", "label": 1}
  line = online.to_jsonl_line(record)
  assert line == '{"text": "a\\u0085b \\u2028 \u00e9 \\"q\\"", "label": 1}'
  assert json.loads(line) == record
  # Every line of a shared file is reproduced byte for byte (MR dev has escaped C1 controls).
  shared = tasks.default_data_dir() / "mr" / "dev.jsonl"
  if shared.is_file():
    with open(shared, encoding="utf-8", newline="\n") as handle:
      for raw in handle:
        assert online.to_jsonl_line(json.loads(raw)) + "\n" == raw


def test_write_jsonl_round_trips_through_the_loader(tmp_path):
  records = [{"text": f"t{i}\u0097", "label": i % 2} for i in range(5)]
  path = online.write_jsonl(records, tmp_path / "mr" / "train.jsonl")
  loaded = tasks.load_pool("mr", tmp_path)
  assert [(example.fields["text"], example.label) for example in loaded] == \
      [(record["text"], record["label"]) for record in records]
  assert [p.name for p in path.parent.iterdir()] == ["train.jsonl"]  # no temporary file left


def _fake_datasets(calls):
  rows = {("ag_news", "train"): [{"text": f"train {i}", "label": i % 4} for i in range(6)],
          ("ag_news", "test"): [{"text": f"test {i}", "label": i % 4} for i in range(2500)]}

  def load_dataset(*names, split, cache_dir=None):
    calls.append((names, split, cache_dir))
    return rows[(names[0], split)]
  return types.SimpleNamespace(load_dataset=load_dataset)


def test_download_task_with_a_fake_hf_library(monkeypatch, tmp_path):
  calls = []
  monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(calls))
  written = online.download_task("agnews", tmp_path, library="hf")
  assert calls == [(("ag_news",), "train", None), (("ag_news",), "test", None)]
  assert set(written) == {"pool", "eval", "eval_indices"}
  assert len(tasks.load_pool("agnews", tmp_path)) == 6
  evaluated = tasks.load_eval_set("agnews", tmp_path)
  assert [example.index for example in evaluated] == np.random.default_rng(1).permutation(2500)[:2000].tolist()
  assert evaluated[0].fields["text"] == f"test {evaluated[0].index}"


def test_fetch_with_a_fake_tfds_library(monkeypatch):
  loaded = []

  def load(name, split, data_dir=None, shuffle_files=True):
    loaded.append((name, split, shuffle_files))
    return [{"premise": b"p", "hypothesis": b"h", "label": np.int64(1), "idx": np.int32(0)}]
  monkeypatch.setitem(sys.modules, "tensorflow_datasets",
                      types.SimpleNamespace(load=load, as_numpy=lambda dataset: iter(dataset)))
  assert online.fetch_split("cb", "eval") == [{"premise": "p", "hypothesis": "h", "label": 1}]
  assert loaded == [("super_glue/cb", "validation", False)]


def test_missing_library_and_bad_choices(monkeypatch):
  monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
  with pytest.raises(ImportError, match=r"pip install 'dualform\[online\]'"):
    online.fetch_split("sst5", "pool")
  with pytest.raises(ValueError, match="not in tfds"):
    online.fetch_split("mr", "pool", library="tfds")
  with pytest.raises(ValueError, match="role"):
    online.fetch_split("mr", "dev")
  assert set(online.SOURCES) == set(tasks.TASK_NAMES)
