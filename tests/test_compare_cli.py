"""The CLI ``python -m experiments.compare``: a smoke run in a subprocess, and every bad input giving one
``error:`` line on stderr, a non-zero exit and nothing written."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from compare_fixtures import cached_loader, write_cb, write_jsonl
from dualform.data import tasks

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_cli_smoke_run_writes_every_file(tmp_path):
  data_dir = write_cb(tmp_path / "data")
  workdir = tmp_path / "run"
  command = [sys.executable, "-m", "experiments.compare", "--task", "cb", "--model", "random:tiny-llama",
             "--max_examples", "6", "--k", "4", "--data_dir", str(data_dir), "--workdir", str(workdir)]
  environment = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
  completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=environment)
  assert completed.returncode == 0, completed.stderr[-2000:]
  assert "# cb on random:tiny-llama" in completed.stdout
  names = {path.name for path in workdir.iterdir()}
  assert {"config.json", "results.json", "summary.md", "records", "simaou.png", "simam.png",
          "accuracy.png"} <= names
  assert json.loads((workdir / "config.json").read_text())["k"] == 4
  results = json.loads((workdir / "results.json").read_text())
  assert results["num_examples"] == 6 and results["environment"]["versions"]["jax"]
  assert len(list((workdir / "records").glob("*.npz"))) == 4  # ft_train, ft, zsl, icl


@pytest.fixture
def cli(monkeypatch, capsys):
  """Runs the CLI's main in-process (cached tiny models); returns (exit code, stderr lines)."""
  from absl import flags

  from dualform import loading
  from experiments import compare as cli_module

  monkeypatch.setattr(loading, "load_pretrained", cached_loader)

  def call(*arguments: str):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["compare", *arguments])
    try:
      cli_module.main(["compare"])
      code = 0
    except SystemExit as exit_:
      code = exit_.code
    finally:
      flags.FLAGS.unparse_flags()
    return code, capsys.readouterr().err.strip().splitlines()

  return call


def _assert_error(result, fragment: str):
  code, lines = result
  assert code == 2
  errors = [line for line in lines if line.startswith("error:")]
  assert len(errors) == 1 and fragment in errors[0], lines


def _long_premise_rows():
  return [{"premise": "word " * 3000, "hypothesis": "a", "label": 0}]


@pytest.mark.parametrize("case", ["unknown_task", "unknown_model", "missing_file", "malformed_line",
                                  "label_out_of_range", "k_too_large", "prompt_too_long"])
def test_bad_inputs_one_line_error_nothing_written(tmp_path, cli, case):
  data_dir = tmp_path / "data"
  arguments = ["--task", "cb", "--model", "random:tiny-llama", "--max_examples", "6", "--k", "4"]
  fragment = {"unknown_task": "unknown task", "unknown_model": "no-such-model", "missing_file": "not found",
              "malformed_line": "dev.jsonl:3", "label_out_of_range": "label", "k_too_large": "exceeds the pool",
              "prompt_too_long": "max_len"}[case]
  if case == "unknown_task":
    arguments[1] = "imdb"
  elif case == "unknown_model":
    arguments[3] = "no-such-model"
  if case != "missing_file":
    write_cb(data_dir)
  if case == "malformed_line":
    path = data_dir / "cb" / "dev.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = '{"premise": "broken'
    path.write_text("\n".join(lines) + "\n")
  elif case == "label_out_of_range":
    write_jsonl(data_dir / "cb" / "dev.jsonl", [{"premise": "a", "hypothesis": "b", "label": 7}])
  elif case == "k_too_large":
    arguments[-1] = "50"
  elif case == "prompt_too_long":
    write_cb(data_dir, dev_rows=_long_premise_rows())
  workdir = tmp_path / "out" / "run"
  _assert_error(cli(*arguments, "--data_dir", str(data_dir), "--workdir", str(workdir)), fragment)
  assert not workdir.exists()
  assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_existing_run_folder_refused(tmp_path, cli):
  data_dir = write_cb(tmp_path / "data")
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "old.txt").write_text("keep")
  _assert_error(cli("--task", "cb", "--model", "random:tiny-llama", "--data_dir", str(data_dir), "--workdir",
                    str(workdir)), "already exists")
  assert [path.name for path in workdir.iterdir()] == ["old.txt"]


def test_task_all_loads_the_model_once(monkeypatch):
  """--task all shares one loaded model between the tasks (one read of the checkpoint, one random init)."""
  from dualform import loading
  from experiments import compare as cli_module

  calls = []
  monkeypatch.setattr(loading, "load_pretrained", lambda name, **kwargs: calls.append((name, kwargs)) or object())
  load = cli_module._loader_once()  # pylint: disable=protected-access
  first = load("random:tiny-llama", dtype="float32")
  assert load("random:tiny-llama", dtype="float32") is first
  assert load("random:tiny-llama", dtype="bfloat16") is not first
  assert calls == [("random:tiny-llama", {"dtype": "float32"}), ("random:tiny-llama", {"dtype": "bfloat16"})]


@pytest.mark.skipif(not (tasks.default_data_dir() / "agnews" / "test.jsonl").is_file(),
                    reason="needs the shared datasets (../shared/data or $DUALFORM_DATA_DIR)")
def test_cli_task_all_writes_every_task_folder(tmp_path):
  """``--task all`` (a tiny model, 3 examples per task): six complete folders, each with its plots, drawn
  by the spawned plotting process while later tasks run."""
  workdir = tmp_path / "all"
  command = [sys.executable, "-m", "experiments.compare", "--task", "all", "--model", "random:tiny-llama",
             "--max_examples", "3", "--k", "2", "--workdir", str(workdir)]
  environment = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
  completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=environment)
  assert completed.returncode == 0, completed.stderr[-2000:]
  assert sorted(path.name for path in workdir.iterdir()) == ["agnews", "cb", "mr", "sst2", "sst5", "subj"]
  for folder in workdir.iterdir():
    names = {path.name for path in folder.iterdir()}
    assert {"config.json", "results.json", "summary.md", "simaou.png", "simam.png", "accuracy.png"} <= names, folder
    assert json.loads((folder / "results.json").read_text())["task"] == folder.name
