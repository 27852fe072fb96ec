"""Configs as code for ``python -m experiments.compare``: one ``get_config()`` per task, on top of
:mod:`experiments.configs.base`.

Public names: :func:`get_config` (by task name), :data:`TASK_CONFIGS`.
"""

from __future__ import annotations

import importlib

TASK_CONFIGS = ("sst2", "sst5", "mr", "subj", "agnews", "cb")


def get_config(task: str):
  """The locked ConfigDict of ``task``; unknown tasks raise a one-line ValueError."""
  if task not in TASK_CONFIGS:
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASK_CONFIGS)} or all")
  return importlib.import_module(f"experiments.configs.{task}").get_config()
