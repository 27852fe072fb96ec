"""Tests of dualform.data.tasks and dualform.data.templates: the task table, the loaders and their errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dualform.data import tasks, templates
from dualform.data.tasks import DataError, Example

SHARED_DATA = tasks.default_data_dir()
needs_shared_data = pytest.mark.skipif(not (SHARED_DATA / "cb" / "train.jsonl").is_file(),
                                       reason=f"shared data not found in {SHARED_DATA}")

# PROTOCOL §2: input template (index 0) and label words in class-id order.
EXPECTED_TEMPLATES = {
    "sst2": ("Sentence: {sentence} Label:", ("Negative", "Positive")),
    "sst5": ("Sentence: {text} Label:", ("terrible", "bad", "neutral", "good", "great")),
    "mr": ("Review: {text} Sentiment:", ("Negative", "Positive")),
    "subj": ("Input: {text} Type:", ("objective", "subjective")),
    "agnews": ("Classify the news articles into the categories of World, Sports, Business, and Technology. "
               "Article: {text} Answer:", ("World", "Sports", "Business", "Technology")),
    "cb": ("{premise} Question: {hypothesis}. True, False, or Neither? Answer:", ("True", "False", "Neither")),
}
# PROTOCOL §1: pool sizes and evaluated-set sizes.
EXPECTED_SIZES = {"sst2": (67349, 872), "sst5": (8544, 1101), "mr": (8530, 1066), "subj": (8000, 2000),
                  "agnews": (6001, 2000), "cb": (250, 56)}


def _write_lines(path, lines):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return path


def _one_line_error(excinfo) -> str:
  message = str(excinfo.value)
  assert "\n" not in message
  return message


def test_task_table_matches_protocol():
  assert tasks.TASK_NAMES == ("sst2", "sst5", "mr", "subj", "agnews", "cb")
  for name, (template, words) in EXPECTED_TEMPLATES.items():
    spec = tasks.get_task(name)
    assert spec.input_template == template
    assert spec.label_words == words
    assert spec.num_classes == len(words)
    assert spec.templates[0].output_template == " {answer}"
  assert tasks.get_task("cb").record_fields == ("premise", "hypothesis")
  assert tasks.get_task("agnews").templates[1].input_template == "News: {text} Type:"
  assert len(tasks.get_task("cb").templates) == 5


def test_get_task_rejects_unknown_names_and_template_indices():
  with pytest.raises(ValueError, match="unknown task 'imdb'"):
    tasks.get_task("imdb")
  with pytest.raises(ValueError, match="template_index 1 out of range"):
    tasks.get_task("sst2").template(1)


def test_default_data_dir_honours_environment(monkeypatch, tmp_path):
  monkeypatch.delenv("DUALFORM_DATA_DIR", raising=False)
  monkeypatch.delenv("DUALFORM_SHARED_DIR", raising=False)
  assert tasks.default_data_dir().parts[-2:] == ("shared", "data")
  monkeypatch.setenv("DUALFORM_SHARED_DIR", str(tmp_path / "shared"))
  assert tasks.default_data_dir() == tmp_path / "shared" / "data"
  monkeypatch.setenv("DUALFORM_DATA_DIR", str(tmp_path / "mine"))
  assert tasks.default_data_dir() == tmp_path / "mine"


@needs_shared_data
@pytest.mark.parametrize("name", tasks.TASK_NAMES)
def test_shared_files_load_with_protocol_sizes_and_order(name):
  spec = tasks.get_task(name)
  pool = tasks.load_pool(spec)
  evaluated = tasks.load_eval_set(spec)
  assert (len(pool), len(evaluated)) == EXPECTED_SIZES[name] == (len(pool), spec.expected_eval_size)
  assert [example.index for example in pool[:3]] == [0, 1, 2]
  if spec.eval_index_file is None:
    # Every row, in default_rng(1).permutation(n) order.
    expected = np.random.default_rng(1).permutation(len(evaluated))
    assert [example.index for example in evaluated] == expected.tolist()
  assert all(0 <= example.label < spec.num_classes for example in evaluated)
  assert set(evaluated[0].fields) == set(spec.record_fields)


@needs_shared_data
def test_agnews_indices_are_the_seed_1_shuffle_prefix():
  # The index file claims default_rng(1).permutation(7600)[:2000]; load_eval_set keeps its order.
  evaluated = tasks.load_eval_set("agnews")
  assert [example.index for example in evaluated] == tasks.eval_order(7600)[:2000].tolist()


@needs_shared_data
def test_verbatim_text_keeps_sst2_trailing_space():
  example = tasks.load_eval_set("sst2")[0]
  assert example.fields["text"].endswith(" ")
  assert templates.format_input("sst2", example) == "Sentence: " + example.fields["text"] + " Label:"


def test_format_input_and_answer_text_by_hand():
  example = Example(fields={"text": " a {text} gem . "}, label=1, index=0)
  assert templates.format_input("sst2", example) == "Sentence:  a {text} gem .  Label:"
  assert templates.format_input("agnews", example, template_index=1) == "News:  a {text} gem .  Type:"
  assert templates.answer_text("sst2", 0) == " Negative"
  assert templates.answer_texts("sst5") == (" terrible", " bad", " neutral", " good", " great")
  assert templates.demonstration_text("mr", example) == "Review:  a {text} gem .  Sentiment: Positive"
  cb = Example(fields={"premise": "It rained.", "hypothesis": "it was wet"}, label=2, index=4)
  assert templates.format_input("cb", cb) == ("It rained. Question: it was wet. True, False, or Neither? "
                                              "Answer:")
  assert templates.answer_text("cb", 2, template_index=1) == " Answer: Maybe."


def test_template_errors_are_one_line():
  with pytest.raises(ValueError) as excinfo:
    templates.answer_text("sst2", 2)
  assert "label 2 out of range" in _one_line_error(excinfo)
  with pytest.raises(ValueError) as excinfo:
    templates.format_input("cb", Example(fields={"text": "x"}, label=0, index=0))
  assert "needs field 'premise'" in _one_line_error(excinfo)


def test_load_from_fixture_folder(tmp_path):
  _write_lines(tmp_path / "cb" / "train.jsonl",
               [json.dumps({"premise": f"p{i}", "hypothesis": f"h{i}", "label": i % 3}) for i in range(5)])
  _write_lines(tmp_path / "cb" / "dev.jsonl",
               [json.dumps({"premise": f"q{i}", "hypothesis": "h", "label": 0}) for i in range(4)])
  pool = tasks.load_pool("cb", tmp_path)
  assert [example.fields["premise"] for example in pool] == ["p0", "p1", "p2", "p3", "p4"]
  assert [example.label for example in pool] == [0, 1, 2, 0, 1]
  evaluated = tasks.load_eval_set("cb", tmp_path)
  order = np.random.default_rng(1).permutation(4).tolist()
  assert [example.fields["premise"] for example in evaluated] == [f"q{i}" for i in order]
  assert [example.index for example in evaluated] == order


def test_missing_file_says_how_to_point_at_the_data(tmp_path):
  with pytest.raises(DataError) as excinfo:
    tasks.load_pool("sst2", tmp_path)
  message = _one_line_error(excinfo)
  assert str(tmp_path / "sst2" / "train.jsonl") in message
  assert "--data_dir" in message and "DUALFORM_DATA_DIR" in message


@pytest.mark.parametrize("line, expected", [
    ('{"text": "ok", "label": 0', "malformed JSON"),
    ('{"label": 0}', "missing field 'text'"),
    ('{"text": "ok"}', "missing field 'label'"),
    ('{"text": "ok", "label": 2}', "label 2 out of range"),
    ('{"text": "ok", "label": -1}', "label -1 out of range"),
    ('{"text": "ok", "label": "1"}', "must be an integer"),
    ('{"text": "ok", "label": true}', "must be an integer"),
    ('{"text": "ok", "label": 1.0}', "must be an integer"),
    ('{"text": 3, "label": 1}', "field 'text' must be a string"),
    ('["text", 1]', "expected a JSON object"),
    ("", "empty line"),
])
def test_malformed_records_name_file_and_line(tmp_path, line, expected):
  path = _write_lines(tmp_path / "mr" / "train.jsonl", ['{"text": "fine", "label": 1}', line])
  with pytest.raises(DataError) as excinfo:
    tasks.load_pool("mr", tmp_path)
  message = _one_line_error(excinfo)
  assert message.startswith(f"{path}:2: ")
  assert expected in message


def test_bad_index_file_is_reported(tmp_path):
  _write_lines(tmp_path / "agnews" / "test.jsonl", [json.dumps({"text": "t", "label": 0})] * 3)
  index_path = tmp_path / "agnews" / "dai2022_eval2000_indices.json"
  index_path.write_text(json.dumps({"indices": [2, 0]}))
  assert [example.index for example in tasks.load_eval_set("agnews", tmp_path)] == [2, 0]
  index_path.write_text(json.dumps({"indices": [0, 3]}))
  with pytest.raises(DataError, match="not a row index in 0..2"):
    tasks.load_eval_set("agnews", tmp_path)
  index_path.write_text(json.dumps({"indices": [1, 1]}))
  with pytest.raises(DataError, match="repeated row indices"):
    tasks.load_eval_set("agnews", tmp_path)
