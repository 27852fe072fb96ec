"""Optional online sources: TensorFlow Datasets or Hugging Face ``datasets`` -> the shared JSONL schema.

Nothing here runs unless called, and neither library is imported before a fetch: the project works
offline from ``../shared/data``. Install the extra (``pip install 'dualform[online]'``) to fetch.

Public names:

  OnlineSource      frozen (library, name, config, pool split, eval split) of one task in one library.
  SOURCES           {task: {"tfds" | "hf": OnlineSource}}; TFDS lacks sst5, mr and subj, so those are HF only.
  convert_record(task, record, library) -> dict
                    one library record -> ``{"text", "label"}`` (CB: ``{"premise", "hypothesis", "label"}``),
                    text verbatim (bytes decoded as UTF-8); unlabelled rows (label -1) raise ``ValueError``.
  convert_records(task, records, library) -> list[dict]
  to_jsonl_line(record) -> str      one JSON line in the shared files' style (UTF-8; C1 controls and
                    U+2028/U+2029 escaped so no line splitter breaks a record).
  write_jsonl(records, path)        atomic write (temporary file, then rename).
  fetch_split(task, role, library="auto", cache_dir=None) -> list[dict]
                    ``role`` is ``"pool"`` or ``"eval"``; downloads through the library, then converts.
  download_task(task, out_dir, library="auto", cache_dir=None) -> dict[str, Path]
                    writes ``<out_dir>/<pool file>``, ``<out_dir>/<eval file>`` and, for AGNews, the index file
                    ``default_rng(1).permutation(n)[:2000]``; point ``DUALFORM_DATA_DIR`` at ``out_dir``.

Caveats: AGNews from TFDS (``ag_news_subset``) is converted as ``title + " " + description`` like the HF
``ag_news`` builder; that the two libraries ship byte-identical text is assumed, not checked. A downloaded
AGNews pool is the full 120,000-row train set, not the shared 6,001-row tail, so its demonstrations differ.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from dualform.data.tasks import TaskSpec, eval_order, get_task

LIBRARIES: tuple[str, ...] = ("tfds", "hf")
AGNEWS_EVAL_SIZE = 2000  # get_dataset_valid keeps the first 2,000 shuffled rows (PROTOCOL §1).


@dataclasses.dataclass(frozen=True)
class OnlineSource:
  """Where one task lives in one library: dataset ``name`` (+ ``config``) and the split of each role."""
  library: str
  name: str
  config: str | None
  pool_split: str
  eval_split: str


SOURCES: dict[str, dict[str, OnlineSource]] = {
    "sst2": {"tfds": OnlineSource("tfds", "glue", "sst2", "train", "validation"),
             "hf": OnlineSource("hf", "glue", "sst2", "train", "validation")},
    "sst5": {"hf": OnlineSource("hf", "SetFit/sst5", None, "train", "validation")},
    "mr": {"hf": OnlineSource("hf", "rotten_tomatoes", None, "train", "validation")},
    "subj": {"hf": OnlineSource("hf", "SetFit/subj", None, "train", "test")},
    "agnews": {"tfds": OnlineSource("tfds", "ag_news_subset", None, "train", "test"),
               "hf": OnlineSource("hf", "ag_news", None, "train", "test")},
    "cb": {"tfds": OnlineSource("tfds", "super_glue", "cb", "train", "validation"),
           "hf": OnlineSource("hf", "super_glue", "cb", "train", "validation")},
}

# Characters the shared files write as \uXXXX escapes: C1 controls and the Unicode line/paragraph separators.
_ESCAPED = re.compile("[\u0080-\u009f\u2028\u2029]")


def _text(value: object, where: str) -> str:
  if isinstance(value, np.ndarray) and value.shape == ():
    value = value.item()
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError:
      raise ValueError(f"{where}: text is not valid UTF-8; re-export the dataset as UTF-8") from None
  if isinstance(value, str):
    return value
  raise ValueError(f"{where}: expected text, got {type(value).__name__}; check the dataset's features")


def _label(value: object, task: TaskSpec, where: str) -> int:
  if isinstance(value, np.ndarray) and value.shape == ():
    value = value.item()
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{where}: label must be an integer, got {type(value).__name__} {value!r}")
  label = int(value)
  if label == -1:
    raise ValueError(f"{where}: label -1 marks an unlabelled split; use a labelled split")
  if not 0 <= label < task.num_classes:
    raise ValueError(f"{where}: label {label} out of range for task {task.name}; use 0..{task.num_classes - 1}")
  return label


def _field(record: Mapping, name: str, where: str) -> object:
  if name not in record:
    raise ValueError(f"{where}: missing field {name!r}; has {sorted(record)}")
  return record[name]


def convert_record(task: str | TaskSpec, record: Mapping, library: str, where: str = "record") -> dict:
  """Converts one TFDS (``library="tfds"``) or HF (``"hf"``) record to the shared JSONL schema.

  sst2: ``sentence`` -> ``text``; agnews (TFDS): ``title + " " + description`` -> ``text``; cb: ``premise``,
  ``hypothesis``; everything else: ``text``. ``label`` is kept (0-based, HF order = verbaliser order).
  """
  task = get_task(task)
  if library not in LIBRARIES:
    raise ValueError(f"library must be one of {LIBRARIES}, got {library!r}")
  if not isinstance(record, Mapping):
    raise ValueError(f"{where}: expected a mapping of features, got {type(record).__name__}")
  label = _label(_field(record, "label", where), task, where)
  if task.name == "cb":
    return {"premise": _text(_field(record, "premise", where), where),
            "hypothesis": _text(_field(record, "hypothesis", where), where), "label": label}
  if task.name == "sst2":
    text = _text(_field(record, "sentence", where), where)
  elif task.name == "agnews" and library == "tfds":
    text = (_text(_field(record, "title", where), where) + " "
            + _text(_field(record, "description", where), where))
  else:
    text = _text(_field(record, "text", where), where)
  return {"text": text, "label": label}


def convert_records(task: str | TaskSpec, records: Iterable[Mapping], library: str) -> list[dict]:
  """``convert_record`` over records, naming the 0-based row in errors."""
  return [convert_record(task, record, library, where=f"row {row}") for row, record in enumerate(records)]


def to_jsonl_line(record: Mapping) -> str:
  """One JSON object on one line (no newline), UTF-8 text, C1 controls and U+2028/U+2029 escaped."""
  line = json.dumps(dict(record), ensure_ascii=False)
  return _ESCAPED.sub(lambda match: f"\\u{ord(match.group()):04x}", line)


def write_jsonl(records: Iterable[Mapping], path: str | os.PathLike) -> Path:
  """Writes one JSON line per record to ``path`` atomically (temporary file in the folder, then rename)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", newline="\n", dir=path.parent,
                                       prefix=f".{path.name}.", delete=False)
  try:
    with handle:
      for record in records:
        handle.write(to_jsonl_line(record) + "\n")
    os.replace(handle.name, path)
  except BaseException:
    Path(handle.name).unlink(missing_ok=True)
    raise
  return path


def _import(module: str, extra_hint: str):
  try:
    return importlib.import_module(module)
  except ImportError:
    raise ImportError(f"fetching online needs the {module!r} package; {extra_hint}") from None


def _choose(task: TaskSpec, library: str) -> OnlineSource:
  available = SOURCES[task.name]
  if library == "auto":
    return available.get("tfds") or available["hf"]
  if library not in LIBRARIES:
    raise ValueError(f"library must be 'auto', 'tfds' or 'hf', got {library!r}")
  if library not in available:
    raise ValueError(f"task {task.name} is not in {library}; use library={'/'.join(available)!r}")
  return available[library]


def _load_tfds(source: OnlineSource, split: str, cache_dir: str | os.PathLike | None) -> list[Mapping]:
  tfds = _import("tensorflow_datasets", "pip install 'dualform[online]' (tensorflow-datasets)")
  name = source.name if source.config is None else f"{source.name}/{source.config}"
  dataset = tfds.load(name, split=split, data_dir=None if cache_dir is None else str(cache_dir),
                      shuffle_files=False)
  return list(tfds.as_numpy(dataset))


def _load_hf(source: OnlineSource, split: str, cache_dir: str | os.PathLike | None) -> list[Mapping]:
  datasets = _import("datasets", "pip install 'dualform[online]' (datasets)")
  arguments = (source.name,) if source.config is None else (source.name, source.config)
  dataset = datasets.load_dataset(*arguments, split=split,
                                  cache_dir=None if cache_dir is None else str(cache_dir))
  return list(dataset)


def fetch_split(task: str | TaskSpec, role: str, library: str = "auto",
                cache_dir: str | os.PathLike | None = None) -> list[dict]:
  """Downloads the ``role`` split (``"pool"`` or ``"eval"``) of ``task`` and converts it (file order kept).

  ``library="auto"`` uses TFDS when it has the task, else Hugging Face ``datasets``.
  """
  task = get_task(task)
  if role not in ("pool", "eval"):
    raise ValueError(f"role must be 'pool' or 'eval', got {role!r}")
  source = _choose(task, library)
  split = source.pool_split if role == "pool" else source.eval_split
  loader = _load_tfds if source.library == "tfds" else _load_hf
  return convert_records(task, loader(source, split, cache_dir), source.library)


def download_task(task: str | TaskSpec, out_dir: str | os.PathLike, library: str = "auto",
                  cache_dir: str | os.PathLike | None = None) -> dict[str, Path]:
  """Writes the pool and evaluated files of ``task`` under ``out_dir`` in the shared layout.

  For AGNews it also writes the index file: ``default_rng(1).permutation(n)[:2000]`` (PROTOCOL §1).
  Note that TFDS may not keep the HF row order; the evaluated order then differs from the original's.
  """
  task = get_task(task)
  out_dir = Path(out_dir)
  written = {"pool": write_jsonl(fetch_split(task, "pool", library, cache_dir), out_dir / task.pool_file)}
  eval_records = fetch_split(task, "eval", library, cache_dir)
  written["eval"] = write_jsonl(eval_records, out_dir / task.eval_file)
  if task.eval_index_file is not None:
    indices = eval_order(len(eval_records))[:AGNEWS_EVAL_SIZE].tolist()
    index_path = out_dir / task.eval_index_file
    index_path.write_text(json.dumps({"description": f"default_rng(1).permutation({len(eval_records)})"
                                                     f"[:{AGNEWS_EVAL_SIZE}], written by dualform.data.online",
                                      "indices": indices}), encoding="utf-8")
    written["eval_indices"] = index_path
  return written
