"""Shared fixtures of the comparison tests: a tiny CB data folder and a cached model loader."""

from __future__ import annotations

import functools
import json
import pathlib

from dualform.loading import load_pretrained as _load_pretrained  # the original, before any monkeypatch

CB_TRAIN = [
    ("The cat sat on the mat all day.", "the cat was on the mat", 0),
    ("Nobody knows whether it rained.", "it rained", 2),
    ("She never went to Paris.", "she went to Paris", 1),
    ("The meeting was moved to Friday.", "the meeting is on Friday", 0),
    ("He doubts the plan will work.", "the plan will work", 2),
    ("The shop closed at noon.", "the shop was open at night", 1),
    ("They finished the race first.", "they won the race", 0),
    ("It is unclear who wrote the note.", "Sam wrote the note", 2),
    ("The bridge is made of stone.", "the bridge is wooden", 1),
    ("Birds sang in the morning.", "there were birds", 0),
]
CB_DEV = [
    ("The train left on time.", "the train was late", 1),
    ("Maybe the keys are in the car.", "the keys are in the car", 2),
    ("The soup was hot.", "the soup was warm", 0),
    ("He lost his umbrella again.", "he has an umbrella now", 2),
    ("The lights were off.", "the room was dark", 0),
    ("She sold her bike.", "she still owns her bike", 1),
]


def write_jsonl(path: pathlib.Path, rows) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_cb(data_dir: pathlib.Path, dev_rows=None) -> pathlib.Path:
  """A tiny ``cb`` task folder (10 pool rows, 6 evaluated rows unless ``dev_rows`` is given)."""
  write_jsonl(data_dir / "cb" / "train.jsonl",
              [{"premise": p, "hypothesis": h, "label": label} for p, h, label in CB_TRAIN])
  rows = dev_rows if dev_rows is not None else [{"premise": p, "hypothesis": h, "label": label}
                                                for p, h, label in CB_DEV]
  write_jsonl(data_dir / "cb" / "dev.jsonl", rows)
  return data_dir


@functools.lru_cache(maxsize=None)
def cached_pretrained(name: str, dtype: str = "float32"):
  return _load_pretrained(name, dtype=dtype)


def cached_loader(name, *, dtype="float32", **kwargs):
  del kwargs
  return cached_pretrained(str(name), dtype)
