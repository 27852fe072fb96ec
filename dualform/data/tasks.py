"""The six classification tasks of Dai et al. and strict loaders for their JSONL files (PROTOCOL §1-§2).

Public names:

  Template          frozen (input_template, output_template, label_words) triple, as in the original
                    ``templates_set_without_newline`` of ``LMOps:struprompting/tasks/fewshot_task.py``.
  TaskSpec          frozen description of one task: templates, files, number of classes, record fields.
  TASKS             {name: TaskSpec} for sst2, sst5, mr, subj, agnews, cb.
  TASK_NAMES        the task names in the order of PROTOCOL §1.
  get_task(name)    looks a task up; unknown names raise ``ValueError``.
  Example           one record: ``fields`` (field name -> text), ``label`` (0-based class id) and
                    ``index`` (0-based line number in the source file).
  DataError         ``ValueError`` subclass raised for every problem with a data file (one line, naming the
                    file and the line number).
  default_data_dir()  ``$DUALFORM_DATA_DIR``, else ``$DUALFORM_SHARED_DIR/data``, else
                    ``<project root>/../shared/data``.
  read_examples(task, path)  every record of one JSONL file, validated, in file order.
  load_pool(task, data_dir=None)       the demonstration pool (``<task>/train.jsonl``) in file order.
  load_eval_set(task, data_dir=None)   the evaluated examples in the order
                    ``np.random.default_rng(1).permutation(n)`` (AGNews: the 2,000 listed indices, in the
                    index file's order, which is already that order).
  eval_order(n)     ``np.random.default_rng(1).permutation(n)``, the evaluation order (PROTOCOL §1).

Validation is strict: a missing file, malformed JSON, a missing field, a field of the wrong type, or a label
out of range raises ``DataError`` with ``<path>:<line>: <what is wrong>; <how to fix it>``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

EVAL_SHUFFLE_SEED = 1  # ``get_dataset_valid`` shuffles the evaluated split with seed 1 (PROTOCOL §1).


class DataError(ValueError):
  """A data file is missing or malformed; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Template:
  """One prompt template: ``input_template`` with ``{field}`` slots, ``output_template`` with ``{answer}``.

  ``label_words[j]`` fills ``{answer}`` for class j, so the answer text of class j is
  ``output_template.replace("{answer}", label_words[j])`` (leading space included: ``" {answer}"``).
  """
  input_template: str
  output_template: str
  label_words: tuple[str, ...]

  def __post_init__(self):
    if "{answer}" not in self.output_template:
      raise ValueError(f"output template {self.output_template!r} has no {{answer}} slot; add one")
    if len(self.label_words) < 2:
      raise ValueError(f"a template needs at least two label words; got {self.label_words!r}")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """A classification task: its templates (index 0 = the original's), data files and record fields.

  Attributes:
    name: task name (``sst2``, ``sst5``, ``mr``, ``subj``, ``agnews``, ``cb``).
    templates: the available templates; index 0 is the one the original runs use (PROTOCOL §2).
    pool_file: demonstration pool, relative to the data folder.
    eval_file: evaluated file, relative to the data folder.
    eval_index_file: optional JSON file (``{"indices": [...]}``) listing the evaluated rows of ``eval_file``.
    num_classes: number of classes; labels are 0..num_classes-1 in verbaliser order.
    record_fields: the text fields every JSONL record must carry (besides ``label``).
    expected_eval_size: number of evaluated examples in PROTOCOL §1 (for reference and for runners that
      check record counts; not enforced on load, so small fixture files work).
  """
  name: str
  templates: tuple[Template, ...]
  pool_file: str
  eval_file: str
  eval_index_file: str | None
  num_classes: int
  record_fields: tuple[str, ...]
  expected_eval_size: int

  def __post_init__(self):
    for template in self.templates:
      if len(template.label_words) != self.num_classes:
        raise ValueError(f"task {self.name}: template has {len(template.label_words)} label words "
                         f"for {self.num_classes} classes; give one word per class")

  @property
  def input_template(self) -> str:
    """The original input template (index 0)."""
    return self.templates[0].input_template

  @property
  def label_words(self) -> tuple[str, ...]:
    """The original label words (template index 0), in class-id order."""
    return self.templates[0].label_words

  def template(self, template_index: int = 0) -> Template:
    """Returns template ``template_index``; out of range raises ``ValueError``."""
    if not isinstance(template_index, (int, np.integer)) or not 0 <= template_index < len(self.templates):
      raise ValueError(f"task {self.name}: template_index {template_index!r} out of range; "
                       f"use 0..{len(self.templates) - 1}")
    return self.templates[int(template_index)]


def _single(input_template: str, label_words: tuple[str, ...]) -> tuple[Template, ...]:
  return (Template(input_template, " {answer}", label_words),)


_CB_ALTERNATIVE_WORDS = ("Yes", "No", "Maybe")

TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec(
        name="sst2", templates=_single("Sentence: {sentence} Label:", ("Negative", "Positive")),
        pool_file="sst2/train.jsonl", eval_file="sst2/dev.jsonl", eval_index_file=None,
        num_classes=2, record_fields=("text",), expected_eval_size=872),
    "sst5": TaskSpec(
        name="sst5",
        templates=_single("Sentence: {text} Label:", ("terrible", "bad", "neutral", "good", "great")),
        pool_file="sst5/train.jsonl", eval_file="sst5/dev.jsonl", eval_index_file=None,
        num_classes=5, record_fields=("text",), expected_eval_size=1101),
    "mr": TaskSpec(
        name="mr", templates=_single("Review: {text} Sentiment:", ("Negative", "Positive")),
        pool_file="mr/train.jsonl", eval_file="mr/dev.jsonl", eval_index_file=None,
        num_classes=2, record_fields=("text",), expected_eval_size=1066),
    "subj": TaskSpec(
        name="subj", templates=_single("Input: {text} Type:", ("objective", "subjective")),
        pool_file="subj/train.jsonl", eval_file="subj/test.jsonl", eval_index_file=None,
        num_classes=2, record_fields=("text",), expected_eval_size=2000),
    "agnews": TaskSpec(
        name="agnews",
        templates=(
            Template("Classify the news articles into the categories of World, Sports, Business, and "
                     "Technology. Article: {text} Answer:", " {answer}",
                     ("World", "Sports", "Business", "Technology")),
            Template("News: {text} Type:", " {answer}", ("World", "Sports", "Business", "Technology")),
        ),
        pool_file="agnews/train.jsonl", eval_file="agnews/test.jsonl",
        eval_index_file="agnews/dai2022_eval2000_indices.json",
        num_classes=4, record_fields=("text",), expected_eval_size=2000),
    "cb": TaskSpec(
        name="cb",
        templates=(
            Template("{premise} Question: {hypothesis}. True, False, or Neither? Answer:", " {answer}",
                     ("True", "False", "Neither")),
            Template("{premise} Based on the paragraph above can we conclude that \"{hypothesis}\"? "
                     "Yes, No, or Maybe?", " Answer: {answer}.", _CB_ALTERNATIVE_WORDS),
            Template("{premise} Can we infer the following? {hypothesis}.", " {answer}", _CB_ALTERNATIVE_WORDS),
            Template("Read the following paragraph and determine if the hypothesis is true: {premise} "
                     "Hypothesis: {hypothesis}.", " {answer}", _CB_ALTERNATIVE_WORDS),
            Template("Can we draw the following hypothesis from the context? Context: {premise} "
                     "Hypothesis: {hypothesis}. Answer:", " {answer}", _CB_ALTERNATIVE_WORDS),
        ),
        pool_file="cb/train.jsonl", eval_file="cb/dev.jsonl", eval_index_file=None,
        num_classes=3, record_fields=("premise", "hypothesis"), expected_eval_size=56),
}

TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def get_task(name: str | TaskSpec) -> TaskSpec:
  """Returns the ``TaskSpec`` called ``name`` (a ``TaskSpec`` passes through)."""
  if isinstance(name, TaskSpec):
    return name
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASK_NAMES)}")
  return TASKS[name]


@dataclasses.dataclass(frozen=True, eq=True)
class Example:
  """One labelled record: text ``fields`` (verbatim), 0-based ``label``, 0-based source line ``index``."""
  fields: Mapping[str, str]
  label: int
  index: int

  def __hash__(self):
    return hash((tuple(sorted(self.fields.items())), self.label, self.index))


def _project_root() -> Path:
  return Path(__file__).resolve().parents[2]


def default_data_dir() -> Path:
  """``$DUALFORM_DATA_DIR``, else ``$DUALFORM_SHARED_DIR/data``, else ``<project root>/../shared/data``."""
  if os.environ.get("DUALFORM_DATA_DIR"):
    return Path(os.environ["DUALFORM_DATA_DIR"])
  if os.environ.get("DUALFORM_SHARED_DIR"):
    return Path(os.environ["DUALFORM_SHARED_DIR"]) / "data"
  return _project_root().parent / "shared" / "data"


def _resolve(data_dir: str | os.PathLike | None) -> Path:
  return default_data_dir() if data_dir is None else Path(data_dir)


_FIX_PATH = "pass --data_dir or set DUALFORM_DATA_DIR to the folder that holds <task>/train.jsonl"


def _check_exists(path: Path, task: TaskSpec, role: str) -> None:
  if not path.is_file():
    raise DataError(f"{path}: {role} file of task {task.name} not found; {_FIX_PATH}")


def _parse_record(task: TaskSpec, record: object, where: str, index: int) -> Example:
  """Validates one decoded JSON record and turns it into an ``Example``."""
  if not isinstance(record, dict):
    raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}; "
                    f"write one object per line")
  fields = {}
  for name in (*task.record_fields, "label"):
    if name not in record:
      raise DataError(f"{where}: missing field {name!r}; task {task.name} records need "
                      f"{', '.join((*task.record_fields, 'label'))}")
  for name in task.record_fields:
    value = record[name]
    if not isinstance(value, str):
      raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}; "
                      f"fix the record")
    fields[name] = value
  label = record["label"]
  if isinstance(label, bool) or not isinstance(label, int):
    raise DataError(f"{where}: field 'label' must be an integer, got {type(label).__name__} "
                    f"{label!r}; use a 0-based class id")
  if not 0 <= label < task.num_classes:
    raise DataError(f"{where}: label {label} out of range for task {task.name}; "
                    f"use 0..{task.num_classes - 1}")
  return Example(fields=fields, label=label, index=index)


def read_examples(task: str | TaskSpec, path: str | os.PathLike) -> list[Example]:
  """Reads and validates every record of a JSONL file, in file order (``index`` = 0-based line)."""
  task = get_task(task)
  path = Path(path)
  _check_exists(path, task, "data")
  examples = []
  # newline="\n": split records only at "\n" (the files escape U+2028/U+2029 and C1 controls anyway).
  with open(path, encoding="utf-8", newline="\n") as handle:
    for line_number, line in enumerate(handle, start=1):
      where = f"{path}:{line_number}"
      body = line[:-1] if line.endswith("\n") else line
      if body.endswith("\r"):
        body = body[:-1]
      if not body.strip():
        raise DataError(f"{where}: empty line; remove it (one JSON object per line)")
      try:
        record = json.loads(body)
      except json.JSONDecodeError as error:
        raise DataError(f"{where}: malformed JSON ({error.msg} at column {error.colno}); "
                        f"fix or remove the line") from None
      examples.append(_parse_record(task, record, where, line_number - 1))
  if not examples:
    raise DataError(f"{path}: no records; the file of task {task.name} is empty")
  return examples


def load_pool(task: str | TaskSpec, data_dir: str | os.PathLike | None = None) -> list[Example]:
  """The demonstration pool ``<data_dir>/<task>/train.jsonl`` in file order (PROTOCOL §1, §4)."""
  task = get_task(task)
  path = _resolve(data_dir) / task.pool_file
  _check_exists(path, task, "pool")
  return read_examples(task, path)


def eval_order(num_examples: int) -> np.ndarray:
  """``np.random.default_rng(1).permutation(n)``: the order the original evaluates in (PROTOCOL §1)."""
  return np.random.default_rng(EVAL_SHUFFLE_SEED).permutation(num_examples)


def _read_indices(path: Path, task: TaskSpec, num_rows: int) -> list[int]:
  _check_exists(path, task, "evaluation index")
  try:
    content = json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as error:
    raise DataError(f"{path}:{error.lineno}: malformed JSON ({error.msg}); fix the index file") from None
  indices = content.get("indices") if isinstance(content, dict) else content
  if not isinstance(indices, list):
    raise DataError(f"{path}:1: expected a list or an object with key 'indices'; fix the index file")
  for position, value in enumerate(indices):
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < num_rows:
      raise DataError(f"{path}:1: entry {position} ({value!r}) is not a row index in 0..{num_rows - 1}; "
                      f"fix the index file")
  if len(set(indices)) != len(indices):
    raise DataError(f"{path}:1: repeated row indices; each evaluated row must be listed once")
  return indices


def load_eval_set(task: str | TaskSpec, data_dir: str | os.PathLike | None = None) -> list[Example]:
  """The evaluated examples, in ``default_rng(1).permutation(n)`` order (AGNews: the listed indices).

  ``Example.index`` stays the 0-based line number in the evaluated file, so records can be traced back.
  """
  task = get_task(task)
  root = _resolve(data_dir)
  path = root / task.eval_file
  _check_exists(path, task, "evaluation")
  rows = read_examples(task, path)
  if task.eval_index_file is not None:
    order = _read_indices(root / task.eval_index_file, task, len(rows))
  else:
    order = eval_order(len(rows)).tolist()
  return [rows[i] for i in order]
