"""The comparison's sharded path: ``--mesh data=8`` on 8 simulated CPU devices equals the one-device run.

Both runs go through the command line in subprocesses, because the device count must be set (``XLA_FLAGS``)
before jax is imported and pytest workers have imported it already.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from compare_fixtures import write_cb

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run_compare(data_dir: pathlib.Path, workdir: pathlib.Path, *extra: str, devices: int = 1) -> dict:
  command = [sys.executable, "-m", "experiments.compare", "--task", "cb", "--model", "random:tiny-llama",
             "--max_examples", "8", "--k", "4", "--data_dir", str(data_dir), "--workdir", str(workdir), *extra]
  environment = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                 "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
  completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=environment)
  assert completed.returncode == 0, completed.stderr[-2000:]
  return json.loads((workdir / "results.json").read_text())


def _label_scores(results: dict) -> dict[str, np.ndarray]:
  """{setting: [N, classes]} label scores of the run's single (seed, perm) pair."""
  (run_id,) = {run_id for example in results["examples"] for run_id in example["label_scores"]}
  return {setting: np.asarray([example["label_scores"][run_id][setting] for example in results["examples"]])
          for setting in results["settings"]}


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory):
  """(data folder, results of the one-device run), shared by the mesh cases."""
  root = tmp_path_factory.mktemp("compare_single")
  data_dir = write_cb(root / "data")
  return data_dir, _run_compare(data_dir, root / "single")


@pytest.mark.parametrize("mesh", ["data=8", "data=2,model=4"])
def test_sharded_comparison_equals_single_device(single_device_run, mesh, tmp_path):
  """Data parallel over 8 devices, and data x model parallel (weights split over a model axis of 4)."""
  data_dir, single = single_device_run
  sharded = _run_compare(data_dir, tmp_path / "sharded", "--mesh", mesh, devices=8)
  assert sharded["environment"]["device_count"] == 8
  assert [example["predictions"] for example in single["examples"]] == \
      [example["predictions"] for example in sharded["examples"]]
  single_scores, sharded_scores = _label_scores(single), _label_scores(sharded)
  for setting, scores in single_scores.items():
    np.testing.assert_allclose(sharded_scores[setting], scores, rtol=1e-5, atol=1e-5, err_msg=setting)
  for comparison, by_position in single["runs"][0]["metrics"].items():
    for position, metrics in by_position.items():
      for name in ("simaou", "simam", "zsl_simam"):
        np.testing.assert_allclose(sharded["runs"][0]["metrics"][comparison][position][name]["per_layer"],
                                   metrics[name]["per_layer"], rtol=1e-4, atol=1e-5,
                                   err_msg=f"{comparison} {position} {name}")
