"""Wiring tests of dualform.compare.run on tiny random models (records, settings, seeds, files)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

from compare_fixtures import cached_loader, cached_pretrained, write_cb
from dualform import compare
from dualform import params as params_lib
from dualform.data import packing
from experiments import configs, plot


def _config(data_dir, model, **overrides):
  config = configs.get_config("cb")
  config.model = model
  config.data_dir = str(data_dir)
  config.k = 4
  config.max_examples = 6
  for name, value in overrides.items():
    setattr(config, name, value)
  return config


def test_run_llama_every_setting_two_seeds(tmp_path):
  data_dir = write_cb(tmp_path / "data")
  config = _config(data_dir, "random:tiny-llama", settings="zsl,ft,icl,ft_lcgd,icl_perm", seeds="3,4",
                   perm_ids="0,1", lr=0.01)
  workdir = tmp_path / "run"
  results = compare.run(config, workdir, load_pretrained=cached_loader, finalize=[plot.plot_run])
  names = {path.name for path in workdir.iterdir()}
  assert {"config.json", "results.json", "summary.md", "records", "simaou.png", "simam.png",
          "accuracy.png"} <= names
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.")]  # no temporary folder left
  on_disk = json.loads((workdir / "results.json").read_text())
  assert on_disk["aggregate"] == json.loads(json.dumps(on_disk["aggregate"]))
  assert results["num_examples"] == 6 and len(results["examples"]) == 6
  assert results["single_token_labels"] and results["separator_id"] == 198 and results["bos"] is False
  assert [run["run_id"] for run in results["runs"]] == ["seed3-perm0", "seed4-perm1"]
  settings = ["ft", "ft_lcgd", "zsl", "icl", "icl_perm"]
  assert results["settings"] == settings
  tokenizer = cached_pretrained("random:tiny-llama").tokenizer
  for run in results["runs"]:
    for name in settings:
      records = np.load(workdir / "records" / f"{run['run_id']}_{name}.npz")
      assert records["label_scores"].shape == (6, 3)  # one row per evaluated example
      assert records["attn_out"].shape[:3] == (6, 2, 2)  # [N, layers, positions, D]
      if name.startswith("icl"):
        assert records["context_scores"].shape[:3] == (6, 2, 2)
    train = np.load(workdir / "records" / f"{run['run_id']}_ft_train.npz")
    context = run["context"]
    assert train["queries"].shape[0] == sum(end - start for start, end in context["demo_spans"])
    assert run["finetune"]["ft"]["trainable_count"] > 0 and run["finetune"]["ft_lcgd"]["objective"] == "lcgd"
    assert run["context"]["token_ids"].count(198) == run["k_eff"]  # one separator after every demo
    assert tokenizer.decode(run["context"]["token_ids"]) == run["context"]["text"]
    for comparison in ("icl_vs_ft", "icl_vs_ft_lcgd", "icl_vs_icl_perm"):
      blocks = run["metrics"][comparison]
      assert set(blocks) == {"pred_pos", "label_pos"}
      assert len(blocks["pred_pos"]["simaou"]["per_layer"]) == 2
      assert "kendall" in blocks["pred_pos"] and "kendall" not in blocks["label_pos"]
      assert "shuffled" in blocks["pred_pos"]
  assert results["runs"][1]["icl_perm_context"]["perm_id"] == 2
  assert results["aggregate"]["accuracy/icl"]["n"] == 2
  assert results["aggregate"]["icl_vs_ft/simaou"]["n"] == 2
  for example in results["examples"]:
    assert set(example["predictions"]) == {"seed3-perm0", "seed4-perm1"}
    assert set(example["predictions"]["seed3-perm0"]) == set(settings)
  summary = (workdir / "summary.md").read_text()
  assert "SimAOU" in summary and "Rec2FTP" in summary and "± " in summary


def test_run_fairseq_sweep_label_pos_and_determinism(tmp_path):
  data_dir = write_cb(tmp_path / "data")
  config = _config(data_dir, "random:tiny-fairseq", position="label_pos", lr_sweep=True, lr_grid=(1e-3, 1e-1),
                   lr_heldout_examples=3)
  first = compare.run(config, tmp_path / "a", load_pretrained=cached_loader)
  assert first["bos"] is True and first["separator_id"] == 2 and first["position"] == "label_pos"
  run = first["runs"][0]
  assert run["context"]["token_ids"][0] == 0
  assert run["learning_rate"]["source"] == "lr_sweep"
  sweep = run["learning_rate"]["sweep"]
  assert sweep["grid"] == [1e-3, 1e-1] and sweep["chosen"] in sweep["grid"] and len(sweep["results"]) == 2
  # The held-out slice excludes the demonstrations.
  assert not set(sweep["heldout_pool_indices"]) & set(run["context"]["demo_pool_indices"])
  assert "kendall" in run["metrics"]["icl_vs_ft"]["label_pos"]
  second = compare.run(config, tmp_path / "b", load_pretrained=cached_loader)
  for name in ("zsl", "ft", "icl"):
    a = np.load(tmp_path / "a" / "records" / f"seed3-perm0_{name}.npz")
    b = np.load(tmp_path / "b" / "records" / f"seed3-perm0_{name}.npz")
    np.testing.assert_array_equal(a["label_scores"], b["label_scores"])
  assert first["runs"][0]["headline"] == second["runs"][0]["headline"]


def test_accelerator_options_change_speed_not_results(tmp_path):
  """The GPU options (layer scan, padded ICL cache, fixed rows, no records on disk, compiles ahead on worker
  threads) give the default run's predictions and metrics. In float64: SimAM_Δ compares small score updates (FT and ICL minus ZSL), which
  amplify float32 rounding of a different summation order."""
  data_dir = write_cb(tmp_path / "data")
  config = _config(data_dir, "random:tiny-fairseq", lr=0.01, dtype="float64")
  fast = _config(data_dir, "random:tiny-fairseq", lr=0.01, dtype="float64", scan_layers=True,
                 eval_prefix_multiple=64, eval_fixed_rows=True, save_records=False, compile_workers=2)
  with jax.enable_x64(True):
    plain = compare.run(config, tmp_path / "plain", load_pretrained=cached_loader)
    accelerated = compare.run(fast, tmp_path / "fast", load_pretrained=cached_loader)
  assert list((tmp_path / "fast" / "records").iterdir()) == []
  assert len(list((tmp_path / "plain" / "records").iterdir())) == 4  # zsl, ft, icl and the FT training queries
  assert [row["predictions"] for row in accelerated["examples"]] == [row["predictions"] for row in plain["examples"]]
  first, second = plain["runs"][0], accelerated["runs"][0]
  assert first["headline"].keys() == second["headline"].keys()
  for name, value in first["headline"].items():
    if value is None:  # e.g. Rec2FTP with an empty denominator
      assert second["headline"][name] is None, name
    else:
      assert second["headline"][name] == pytest.approx(value, rel=1e-9, abs=1e-12, nan_ok=True), name


def test_device_analysis_equals_host_analysis(tmp_path):
  """--analysis device (float32 jax, records kept on the device) reproduces the host's float64 metrics to
  float32 accuracy on every comparison, including the ICL-vs-ICL ceiling; its random baselines are drawn
  with jax.random from the same keys (other values, same record layout)."""
  data_dir = write_cb(tmp_path / "data")
  kwargs = dict(settings="zsl,ft,icl,icl_perm", lr=0.01, matmul_precision="highest")
  on_host = compare.run(_config(data_dir, "random:tiny-llama", **kwargs), tmp_path / "host",
                        load_pretrained=cached_loader)
  on_device = compare.run(_config(data_dir, "random:tiny-llama", analysis="device", **kwargs),
                          tmp_path / "device", load_pretrained=cached_loader)
  assert on_host["analysis_backend"] == "host" and on_device["analysis_backend"] == "device"
  first, second = on_host["runs"][0], on_device["runs"][0]
  assert first["headline"].keys() == second["headline"].keys()
  for name, value in first["headline"].items():
    if "random_" in name:
      continue
    if value is None:
      assert second["headline"][name] is None, name
    else:
      assert second["headline"][name] == pytest.approx(value, abs=2e-6, nan_ok=True), name
  for comparison in ("icl_vs_ft", "icl_vs_icl_perm"):
    block_host, block_device = first["metrics"][comparison]["pred_pos"], second["metrics"][comparison]["pred_pos"]
    assert block_device["random_simaou"]["generator"] == "jax.random"
    assert block_device["random_simaou"]["key"] == block_host["random_simaou"]["key"]
    assert block_device["kendall"]["token"]["random_kendall"]["generator"] == "jax.random"
    assert abs(block_device["random_simaou"]["mean"]) < 1


def test_existing_folder_refused_and_overwrite(tmp_path):
  data_dir = write_cb(tmp_path / "data")
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "keep.txt").write_text("old")
  config = _config(data_dir, "random:tiny-llama", settings="zsl,icl")
  with pytest.raises(ValueError, match="already exists"):
    compare.run(config, workdir, load_pretrained=cached_loader)
  assert (workdir / "keep.txt").read_text() == "old"
  compare.run(config, workdir, overwrite=True, load_pretrained=cached_loader)
  assert not (workdir / "keep.txt").exists() and (workdir / "results.json").exists()


def test_deferred_finish_commits_the_folder_only_when_run(tmp_path):
  """With ``defer`` the results come back at once and the folder appears only when the deferred step runs
  (--task all runs it on a thread); a failing finalize step removes the temporary folder and raises."""
  data_dir = write_cb(tmp_path / "data")
  config = _config(data_dir, "random:tiny-llama", settings="zsl,icl")
  deferred = []
  results = compare.run(config, tmp_path / "run", load_pretrained=cached_loader, defer=deferred.append)
  assert results["task"] == "cb" and len(deferred) == 1 and not (tmp_path / "run").exists()
  assert deferred[0]() == tmp_path / "run" and (tmp_path / "run" / "results.json").exists()

  def broken(folder):
    raise RuntimeError("plot failed")

  deferred.clear()
  compare.run(config, tmp_path / "broken", load_pretrained=cached_loader, finalize=[broken], defer=deferred.append)
  with pytest.raises(RuntimeError, match="plot failed"):
    deferred[0]()
  assert sorted(path.name for path in tmp_path.iterdir()) == ["data", "run"]


def test_untrained_control_keeps_embeddings_and_norms():
  model = cached_pretrained("random:tiny-fairseq").model
  control = compare.untrained_control(model, seed=7)
  before, after = params_lib.flat_params(model), params_lib.flat_params(control)
  for path in before:
    same = np.array_equal(np.asarray(before[path]), np.asarray(after[path]))
    reinitialised = params_lib.PathRegex(r"^layers/\d+/(attn|mlp)/.*$")(tuple(path.split("/")), None)
    if reinitialised and path.endswith("kernel"):
      assert not same, path
    elif not reinitialised:
      assert same, path
  assert nnx.graphdef(control) == nnx.graphdef(model)


def test_config_validation_and_runs():
  config = configs.get_config("cb")
  assert compare.resolve_runs(config) == [(3, 0)]
  config.seeds, config.perm_ids = "1,2,3", "0,1,2"
  assert compare.resolve_runs(config) == [(1, 0), (2, 1), (3, 2)]
  for field, value, message in (("position", "middle", "unknown position"),
                                ("settings", "zsl,ft", "must include 'icl'"),
                                ("settings", "zsl,icl,bogus", "unknown settings"),
                                ("perm_ids", "0,1", "one per seed"),
                                ("seeds", "a,b", "comma list"),
                                ("model_init", "random", "unknown model_init"),
                                ("compile_workers", -1, "compile_workers must be >= 0"),
                                ("prefix_attention", "flash", "unknown prefix_attention 'flash'"),
                                ("prefix_attention", "cudnn", "needs --dtype bfloat16")):
    bad = configs.get_config("cb")
    setattr(bad, field, value)
    with pytest.raises(ValueError, match=message):
      compare.validate_config(bad)
  bad = configs.get_config("cb")
  bad.prefix_attention, bad.dtype, bad.mesh = "cudnn", "bfloat16", "data=1"
  with pytest.raises(ValueError, match="runs on one device"):
    compare.validate_config(bad)
  if jax.default_backend() != "gpu":
    bad.mesh = ""
    with pytest.raises(ValueError, match="needs a CUDA GPU; this run's backend is cpu"):
      compare.validate_config(bad)
  with pytest.raises(ValueError, match="unknown task"):
    configs.get_config("imdb")


def test_records_count_checked_against_context():
  """Kendall's token order: FT queries line up with the packed context's demo tokens."""
  tokenizer = cached_pretrained("random:tiny-llama").tokenizer
  from compare_fixtures import CB_TRAIN
  from dualform.data import tasks
  pool = [tasks.Example(fields={"premise": p, "hypothesis": h}, label=label, index=i)
          for i, (p, h, label) in enumerate(CB_TRAIN)]
  context = packing.pack_context(tokenizer, "cb", pool, seed=3, k=4, max_query_len=40)
  sequences = packing.finetune_sequences(tokenizer, "cb", context)
  assert sequences.num_demo_tokens == len(context.demo_token_positions)


def test_icl_ceiling_skips_a_permutation_that_keeps_the_order():
  """perm_id 1 of seed 3 over 4 demonstrations is the identity; the ceiling must use another order."""
  import types

  orders = {0: [5, 6, 7, 8], 1: [5, 6, 7, 8], 2: [6, 5, 8, 7]}
  pack = lambda perm: types.SimpleNamespace(demo_pool_indices=orders[perm], k_eff=4, perm_id=perm)
  assert compare._other_order(pack, pack(0), 0).perm_id == 2
  with pytest.raises(ValueError, match="at least 2 demonstrations"):
    compare._other_order(pack, types.SimpleNamespace(demo_pool_indices=[5], k_eff=1), 0)



def test_dry_run_plan_reports_the_buckets_each_context_leaves_room_for(tmp_path):
  from dualform.models import get_config  # pylint: disable=import-outside-toplevel
  data_dir = write_cb(tmp_path / "data")
  result = compare.plan(_config(data_dir, "random:tiny-llama", eval_minimum_bucket=64))
  max_len = get_config("tiny-llama").max_len
  assert result["bucket_lengths"] and min(result["bucket_lengths"]) >= 64
  for run in result["runs"]:
    room = max_len - run["context_length"]
    assert run["icl_bucket_lengths"] == sorted({min(bucket, room) for bucket in result["bucket_lengths"]})
