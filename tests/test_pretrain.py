"""Tests of dualform.pretrain and the momentum model options it trains (η = 0, learned η)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dualform import attention, pretrain
from dualform.models import build_model, tiny_config


def _tiny_corpus(length: int = 4000, seed: int = 0) -> np.ndarray:
  """A learnable token stream: a repeating 16-token phrase with 10% random substitutions (vocab 128)."""
  rng = np.random.default_rng(seed)
  tokens = np.tile(np.arange(3, 19), length // 16 + 1)[:length]
  noise = rng.random(length) < 0.1
  tokens[noise] = rng.integers(0, 128, noise.sum())
  return tokens.astype(np.uint16)


def _config(steps=8, kind="softmax", eta=None, learn=False, **overrides):
  model = tiny_config("llama", max_len=64)
  if kind == "momentum":
    model = model.with_attention("momentum", eta).replace(learn_momentum_eta=learn)
  base = dict(model=model, steps=steps, batch_size=4, seq_len=32, learning_rate=1e-2, warmup_steps=1,
              log_every=1, checkpoint_every=2, compute_dtype="float32")
  base.update(overrides)
  return pretrain.PretrainConfig(**base)


def test_training_lowers_the_loss(tmp_path):
  config = _config(steps=30, log_every=5, checkpoint_every=30)
  result = pretrain.train(config, tmp_path / "run", _tiny_corpus(), log=lambda line: None)
  first, last = result.losses[1], np.mean([result.losses[step] for step in range(26, 31)])
  assert first > np.log(128) - 0.5  # starts near uniform over the vocabulary
  assert last < first - 1.5, (first, last)
  lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [line["step"] for line in lines] == [5, 10, 15, 20, 25, 30]
  assert set(lines[0]) >= {"step", "loss", "lr", "tokens_per_second", "epoch", "elapsed"}
  assert lines[-1]["loss"] == pytest.approx(result.losses[30], rel=0, abs=0)


def test_schedule_warms_up_linearly_then_decays_to_the_floor():
  config = _config(steps=100, warmup_steps=10, learning_rate=1.0, min_learning_rate_ratio=0.1)
  schedule = pretrain.learning_rate_schedule(config)
  np.testing.assert_allclose([float(schedule(s)) for s in (0, 5, 10, 100)], [0.0, 0.5, 1.0, 0.1], atol=1e-6)
  assert float(schedule(50)) < float(schedule(20))


def test_resume_is_bit_exact(tmp_path):
  tokens = _tiny_corpus()
  config = _config(steps=8, kind="momentum", eta=0.5)  # the generic path plus the momentum scan
  straight = pretrain.train(config, tmp_path / "straight", tokens, log=lambda line: None)
  first = pretrain.train(config, tmp_path / "split", tokens, stop_after=4, log=lambda line: None)
  assert first.step == 4
  second = pretrain.train(config, tmp_path / "split", tokens, log=lambda line: None)
  assert second.resumed_from == 4 and second.step == 8
  for a, b in zip(jax.tree.leaves(nnx.state(straight.model, nnx.Param)),
                  jax.tree.leaves(nnx.state(second.model, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  read = lambda run: [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
  assert read("straight") == read("split")
  assert len(read("split")) == 8
  # A finished run restarts as a no-op, and restore_model returns the same parameters.
  again = pretrain.train(config, tmp_path / "split", tokens, log=lambda line: None)
  assert again.step == 8 and again.losses == {}
  restored = pretrain.restore_model(config, tmp_path / "split")
  for a, b in zip(jax.tree.leaves(nnx.state(restored, nnx.Param)),
                  jax.tree.leaves(nnx.state(straight.model, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_drops_metric_lines_past_the_checkpoint(tmp_path):
  tokens = _tiny_corpus()
  config = _config(steps=6, checkpoint_every=2)
  pretrain.train(config, tmp_path / "run", tokens, stop_after=4, log=lambda line: None)
  metrics = tmp_path / "run" / "metrics.jsonl"
  with open(metrics, "a") as handle:  # a crashed job logged step 5 but never checkpointed it
    handle.write(json.dumps(dict(step=5, loss=123.0)) + "\n")
  pretrain.train(config, tmp_path / "run", tokens, log=lambda line: None)
  steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
  assert steps == [1, 2, 3, 4, 5, 6]
  assert all(json.loads(line)["loss"] != 123.0 for line in metrics.read_text().splitlines())


def test_a_different_config_in_the_same_workdir_is_refused(tmp_path):
  tokens = _tiny_corpus()
  pretrain.train(_config(steps=2), tmp_path / "run", tokens, log=lambda line: None)
  with pytest.raises(ValueError, match="different config"):
    pretrain.train(_config(steps=3), tmp_path / "run", tokens, log=lambda line: None)


def test_bad_config_raises():
  with pytest.raises(ValueError, match="seq_len"):
    _config(seq_len=128)
  with pytest.raises(ValueError, match="warmup_steps"):
    _config(steps=4, warmup_steps=4)


def test_momentum_with_eta_zero_equals_vanilla_attention():
  with jax.enable_x64(True):
    base = tiny_config("llama", dtype="float64", param_dtype="float64")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 24)), jnp.int32)
    vanilla = build_model(base, seed=1)(tokens)
    momentum = build_model(base.with_attention("momentum", 0.0), seed=1)(tokens)
    np.testing.assert_allclose(np.asarray(momentum), np.asarray(vanilla), rtol=1e-10, atol=0)
    # ... and a nonzero eta changes the output (the test above can fail).
    different = build_model(base.with_attention("momentum", 0.5), seed=1)(tokens)
    assert np.max(np.abs(np.asarray(different) - np.asarray(vanilla))) > 1e-3


def test_learned_eta_starts_at_the_fixed_eta_and_trains():
  with jax.enable_x64(True):
    base = tiny_config("llama", dtype="float64", param_dtype="float64").with_attention("momentum", 0.3)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 24)), jnp.int32)
    fixed = build_model(base, seed=2)
    learned = build_model(base.replace(learn_momentum_eta=True), seed=2)
    assert learned.layers[0].attn.eta_logit.shape == (base.num_kv_heads,)
    np.testing.assert_allclose(np.asarray(learned(tokens)), np.asarray(fixed(tokens)), rtol=1e-10, atol=0)
  # The learned coefficient receives a gradient (float32 is enough for that).
  model = build_model(tiny_config("llama").with_attention("momentum", 0.3).replace(learn_momentum_eta=True), 0)
  tokens32 = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 25)), jnp.int32)
  grads = nnx.grad(pretrain.loss_fn)(model, tokens32)
  assert float(jnp.abs(grads.layers[0].attn.eta_logit[...]).max()) > 0
  with pytest.raises(ValueError, match="learned eta"):
    tiny_config("llama").with_attention("momentum", 1.0).replace(learn_momentum_eta=True)


def test_evaluate_perplexity_matches_a_direct_computation():
  with jax.default_matmul_precision("highest"):
    model = build_model(tiny_config("llama", max_len=64), seed=0)
    tokens = _tiny_corpus(400)
    result = pretrain.evaluate_perplexity(model, tokens, 16, max_tokens=160, batch_size=4)  # 10 blocks: 4+4+2
    blocks = np.stack([tokens[j * 16:(j + 1) * 16 + 1] for j in range(10)]).astype(np.int32)
    logits = model(jnp.asarray(blocks[:, :-1]))
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(blocks[:, 1:])).mean()
    assert result["tokens"] == 160 and result["blocks"] == 10
    np.testing.assert_allclose(result["nll"], float(nll), rtol=1e-5)
    np.testing.assert_allclose(result["perplexity"], np.exp(float(nll)), rtol=1e-5)


def test_associative_scan_momentum_equals_the_scan():
  with jax.enable_x64(True):
    values = jax.random.normal(jax.random.key(3), (2, 37, 3, 5), jnp.float64)
    for eta in (0.7, jnp.asarray([0.1, 0.5, 0.9])):  # scalar, and one eta per key/value head
      expected = attention.momentum_values(values, eta)
      np.testing.assert_allclose(attention.momentum_values_associative(values, eta), expected, rtol=1e-10,
                                 atol=1e-12)
      np.testing.assert_allclose(attention.momentum_values_closed_form(values, eta), expected, rtol=1e-10,
                                 atol=1e-12)
    base = tiny_config("llama", dtype="float64", param_dtype="float64").with_attention("momentum", 0.4)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 128, (2, 20)), jnp.int32)
    scanned = build_model(base, seed=3)(tokens)
    parallel = build_model(base.replace(momentum_method="associative_scan"), seed=3)(tokens)
    np.testing.assert_allclose(np.asarray(parallel), np.asarray(scanned), rtol=1e-10, atol=1e-12)
  with pytest.raises(ValueError, match="momentum_method"):
    base.replace(momentum_method="fft")


def test_confidence_interval_and_paired_aggregation():
  from experiments import momentum
  from experiments.configs.momentum import get_config
  interval = momentum.mean_confidence_interval([1.0, 2.0, 3.0])
  half = 4.302652729749464 / np.sqrt(3)  # t_{0.975, 2} * s / sqrt(n) with s = 1
  assert interval["mean"] == 2.0 and interval["std"] == 1.0 and interval["n"] == 3
  np.testing.assert_allclose([interval["low"], interval["high"]], [2.0 - half, 2.0 + half], rtol=1e-12)
  assert momentum.mean_confidence_interval([5.0])["low"] is None

  config = get_config("smoke")
  config.etas = (0.5,)
  config.learned_eta = False

  def record(variant, seed, perplexity, accuracy):
    by_length = {str(length): dict(perplexity=perplexity + length) for length in config.data.eval_lengths}
    return dict(variant=variant, kind="softmax" if variant == "vanilla" else "momentum", eta=None, learned=False,
                seed=seed, param_count=10, final_train_loss=1.0, learned_eta=None, train_tokens_seen=64,
                perplexity={name: by_length for name in config.data.valid_corpora},
                icl={"sst2": dict(icl=accuracy, zsl=50.0, k_eff=4, majority_class=50.0)})
  records = [record("vanilla", 0, 100.0, 50.0), record("eta0.5", 0, 90.0, 60.0),
             record("vanilla", 1, 200.0, 52.0), record("eta0.5", 1, 196.0, 58.0)]
  results = momentum.aggregate(config, records)
  key = f"{config.data.valid_corpora[0]}@{config.data.eval_lengths[0]}"
  difference = results["variants"]["eta0.5"]["perplexity_difference_vs_vanilla"][key]
  assert difference["mean"] == -7.0 and difference["n"] == 2  # paired: (-10, -4), not the unpaired means
  assert results["variants"]["eta0.5"]["icl_difference_vs_vanilla"]["average"]["mean"] == 8.0
  assert list(results["variants"]) == ["vanilla", "eta0.5"]
  assert "| eta0.5 |" in momentum.summary_markdown(config, results)
