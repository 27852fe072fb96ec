"""Tests of dualform.finetune: the K/V-only SGD step against a plain jax.grad + manual SGD reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dualform import finetune as ft
from dualform import params as params_lib
from dualform.models import build_model, tiny_config
from dualform.models.transformer import RecordSpec

FAMILIES = ("llama", "fairseq_dense")


def _model(family: str):
  config = tiny_config(family, dtype="float64", param_dtype="float64")
  return build_model(config, seed=1)


def _sequences(seed: int = 0):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, 128, size=n).tolist() for n in (7, 12, 5)]


def _kv(path: str) -> bool:
  return params_lib.PathRegex(ft.KV_PATTERN)(tuple(path.split("/")), None)


def _relative_error(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _reference_causal_lm(model, sequences, lr, has_bos):
  """Plain jax.grad of the mean NLL over all parameters, then SGD on the K/V paths only."""
  graphdef, state = nnx.split(model)
  queries = []
  for sequence in sequences:
    tokens = jnp.asarray([sequence])

    def loss_fn(state):
      logits = nnx.merge(graphdef, state)(tokens)
      log_probs = jax.nn.log_softmax(logits[0, :-1], axis=-1)
      return -jnp.mean(log_probs[jnp.arange(len(sequence) - 1), tokens[0, 1:]])

    per_layer = [np.asarray(q).reshape(len(sequence), -1) for q in _queries(graphdef, state, tokens)]
    queries.append(np.stack(per_layer, axis=1)[(1 if has_bos else 0):])  # [T, L, heads * head_dim]
    grads = jax.jit(jax.grad(loss_fn))(state)
    flat_state, flat_grads = params_lib.flat_params(state), params_lib.flat_params(grads)
    updated = {path: (value - lr * flat_grads[path] if _kv(path) else value) for path, value in flat_state.items()}
    state = _state_from_flat(state, updated)
  return params_lib.flat_params(state), np.concatenate(queries)


def _queries(graphdef, state, tokens):
  """Per layer [T, heads, head_dim] queries of a plain (jitted) forward pass."""
  @jax.jit
  def run(state):
    out = nnx.merge(graphdef, state).forward(tokens, record=RecordSpec(queries=True),
                                             record_positions=jnp.arange(tokens.shape[1])[None])
    return [layer["queries"][0] for layer in out.records]
  return run(state)


def _state_from_flat(state, flat):
  """A copy of ``state`` with the parameter values of ``flat`` (path string -> array)."""
  def replace(path, variable):
    return variable.replace(flat[params_lib.path_string(path)])
  return jax.tree.map_with_path(replace, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


@pytest.mark.parametrize("family", FAMILIES)
def test_step_equals_grad_and_manual_sgd(family):
  with jax.enable_x64(True):
    model = _model(family)
    before = {path: np.asarray(value) for path, value in params_lib.flat_params(model).items()}
    sequences = _sequences()
    has_bos = family == "fairseq_dense"
    result = ft.finetune(model, sequences, ft.FinetuneConfig(learning_rate=0.7), has_bos=has_bos)
    reference, reference_queries = _reference_causal_lm(model, sequences, 0.7, has_bos)
    after = params_lib.flat_params(result.model)
    trained = sorted(path for path in after if _kv(path))
    # Relative error over the trained set as one vector: the K bias gradient is 0 in exact arithmetic
    # (softmax is shift invariant), so that tensor alone holds only ~1e-21 rounding noise on both sides.
    assert _relative_error(np.concatenate([np.ravel(after[p]) for p in trained]),
                           np.concatenate([np.ravel(reference[p]) for p in trained])) <= 1e-10
    for path, value in after.items():
      if not _kv(path):
        assert np.array_equal(np.asarray(value), before[path]), f"frozen parameter {path} changed"
    assert sum(not np.array_equal(np.asarray(after[p]), before[p]) for p in trained) > 0
    # The input model is untouched.
    for path, value in params_lib.flat_params(model).items():
      assert np.array_equal(np.asarray(value), before[path])
    assert result.queries.shape == reference_queries.shape
    assert _relative_error(result.queries, reference_queries) <= 1e-10
    assert result.demo_token_counts.tolist() == [len(s) - (1 if has_bos else 0) for s in sequences]
    assert result.trainable_count == sum(np.asarray(before[p]).size for p in before if _kv(p))
    assert result.trainable_names == trained  # K/V kernels, plus biases for fairseq only (llama has none)
    assert any(name.endswith("bias") for name in trained) == (family == "fairseq_dense")
    assert result.traces <= 1  # one trace serves every sequence length (bucketed + masked)
    on_device = ft.finetune(model, sequences, ft.FinetuneConfig(learning_rate=0.7, queries_on_device=True),
                            has_bos=has_bos)
    assert isinstance(on_device.queries, jax.Array) and isinstance(result.queries, np.ndarray)
    np.testing.assert_array_equal(np.asarray(on_device.queries), result.queries)


def _reference_lcgd(model, sequence, lr):
  """Layer-causal GD by hand: layer l's K/V get the gradient of NLL(unembed(block_l(x_l))) with x_l fixed."""
  tokens = jnp.asarray([sequence])
  positions = model.default_positions(1, len(sequence))
  x = model.embed_tokens(tokens, positions)
  updated = {}
  for layer, block in enumerate(model.layers):
    graphdef, kv_state, rest = nnx.split(block, params_lib.param_filter(r"^attn/(k_proj|v_proj)/(kernel|bias)$"), ...)

    def layer_loss(kv_state, x=x):
      out, _, _ = nnx.merge(graphdef, kv_state, rest)(x, positions, None, None, None)
      log_probs = jax.nn.log_softmax(model.unembed(out)[0, :-1], axis=-1)
      return -jnp.mean(log_probs[jnp.arange(len(sequence) - 1), tokens[0, 1:]])

    grads = jax.jit(jax.grad(layer_loss))(kv_state)
    for path, value in params_lib.flat_params(kv_state).items():
      updated[f"layers/{layer}/{path}"] = value - lr * params_lib.flat_params(grads)[path]
    x, _, _ = block(x, positions, None, None, None)
  return updated


@pytest.mark.parametrize("family", FAMILIES)
def test_lcgd_equals_per_layer_reference(family):
  with jax.enable_x64(True):
    model = _model(family)
    sequence = _sequences()[1]
    result = ft.finetune(model, [sequence], ft.FinetuneConfig(learning_rate=0.5, objective="lcgd"),
                         has_bos=family == "fairseq_dense")
    reference = _reference_lcgd(model, sequence, 0.5)
    after = params_lib.flat_params(result.model)
    paths = sorted(reference)
    assert paths == sorted(result.trainable_names)
    assert _relative_error(np.concatenate([np.ravel(after[p]) for p in paths]),
                           np.concatenate([np.ravel(reference[p]) for p in paths])) <= 1e-10


def test_bad_configs_raise_one_line_errors():
  with pytest.raises(ValueError, match="learning_rate must be positive"):
    ft.FinetuneConfig(learning_rate=0.0)
  with pytest.raises(ValueError, match="unknown finetuning objective"):
    ft.FinetuneConfig(learning_rate=0.1, objective="adam")
  model = build_model(tiny_config("llama"), seed=0)
  with pytest.raises(ValueError, match="selects nothing"):
    ft.finetune(model, _sequences(), ft.FinetuneConfig(learning_rate=0.1, trainable=r"^k_proj$"), has_bos=False)
  with pytest.raises(ValueError, match="no finetuning sequences"):
    ft.finetune(model, [], ft.FinetuneConfig(learning_rate=0.1), has_bos=False)
  with pytest.raises(ValueError, match="at least 2"):
    ft.finetune(model, [[5]], ft.FinetuneConfig(learning_rate=0.1), has_bos=False)
