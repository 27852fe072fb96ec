"""Tests of dualform.params: path strings, anchored regex selection, and the nnx filter used by wrt=."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dualform.models import build_model, tiny_config
from dualform.params import (TRAINABLE_KV, PathRegex, flat_params, param_filter, param_paths, path_string,
                             select_params)


def test_path_string():
  assert path_string(("layers", 3, "attn", "k_proj", "kernel")) == "layers/3/attn/k_proj/kernel"
  assert path_string((jax.tree_util.DictKey("embed"), "embedding")) == "embed/embedding"


def test_selection_is_anchored_and_resolved():
  model = build_model(tiny_config("fairseq_dense"))
  selection = select_params(model, TRAINABLE_KV)
  assert selection.paths == tuple(sorted(f"layers/{layer}/attn/{name}/{leaf}" for layer in (0, 1)
                                         for name in ("k_proj", "v_proj") for leaf in ("kernel", "bias")))
  assert selection.count == 2 * 2 * (32 * 32 + 32)
  assert selection.describe() == f"{TRAINABLE_KV}: 8 tensors, 4,224 values"
  kernels_only = select_params(model, r"layers/\d+/attn/(k_proj|v_proj)/kernel")
  assert len(kernels_only.paths) == 4
  # A bare substring selects nothing: patterns must match the whole path.
  with pytest.raises(ValueError, match="parameter regex 'k_proj' selects nothing; paths look like: "):
    select_params(model, "k_proj")
  with pytest.raises(ValueError, match="invalid parameter regex"):
    select_params(model, "layers/(")


def test_param_paths_of_llama():
  paths = param_paths(build_model(tiny_config("llama", num_layers=1)))
  assert paths == ["embed/embedding", "final_norm/scale", "layers/0/attn/k_proj/kernel",
                   "layers/0/attn/o_proj/kernel", "layers/0/attn/q_proj/kernel", "layers/0/attn/v_proj/kernel",
                   "layers/0/attn_norm/scale", "layers/0/mlp/down_proj/kernel", "layers/0/mlp/gate_proj/kernel",
                   "layers/0/mlp/up_proj/kernel", "layers/0/mlp_norm/scale"]


def test_filter_splits_state_and_drives_the_optimizer():
  model = build_model(tiny_config("llama"), seed=3)
  trainable_filter = param_filter(TRAINABLE_KV)
  trainable, rest = nnx.state(model, trainable_filter, ...)
  assert param_paths(trainable) == list(select_params(model, TRAINABLE_KV).paths)
  assert "layers/0/attn/q_proj/kernel" in param_paths(nnx.state(rest, nnx.Param))
  assert PathRegex(TRAINABLE_KV)(("layers", 12, "attn", "v_proj", "bias"), None)
  assert not PathRegex(TRAINABLE_KV)(("layers", 12, "attn", "v_proj", "bias_extra"), None)

  before = {path: np.asarray(value) for path, value in flat_params(model).items()}
  optimizer = nnx.Optimizer(model, optax.sgd(0.5), wrt=trainable_filter)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, size=(2, 6)), jnp.int32)

  def loss(model):
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  grads = nnx.grad(loss, argnums=nnx.DiffState(0, trainable_filter))(model)
  assert param_paths(grads) == list(select_params(model, TRAINABLE_KV).paths)
  optimizer.update(model, grads)
  after = flat_params(model)
  changed = sorted(path for path in before if not np.array_equal(before[path], after[path]))
  assert changed == list(select_params(model, TRAINABLE_KV).paths)
