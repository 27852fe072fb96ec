"""Shape-only tests of every named config (``nnx.eval_shape``: nothing is allocated, nothing downloaded).

Checked per config: the parameter count against the published one (PROTOCOL.md §12.1, §13.1) and against a
closed-form count, the exact set of parameter paths and their shapes, the logits shape of plain, partial
and cached forwards, and the K/V-only trainable count selected by the anchored regex.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from dualform.models import NAMED_CONFIGS, PUBLISHED_PARAM_COUNTS, abstract_model, get_config, param_count
from dualform.params import TRAINABLE_KV, flat_params, select_params

ALL_NAMES = sorted(NAMED_CONFIGS)


def closed_form_param_count(config) -> int:
  """Parameter count from the config alone."""
  dim, mlp, vocab = config.embed_dim, config.mlp_dim, config.vocab_size
  query_width, kv_width = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
  attention = dim * query_width + 2 * dim * kv_width + query_width * dim
  if config.family == "fairseq_dense":
    attention += query_width + 2 * kv_width + dim  # q, k, v, o biases
    mlp_params = 2 * dim * mlp + mlp + dim  # fc1, fc2 with biases
    norms = 2 * dim  # scale and bias
  else:
    mlp_params = 3 * dim * mlp  # gate, up, down
    norms = dim  # scale only
  per_layer = attention + mlp_params + 2 * norms
  head = 0 if config.tie_embeddings else dim * vocab
  return vocab * dim + config.num_layers * per_layer + norms + head


def expected_paths(config) -> set[str]:
  names = {"embed/embedding"}
  norm_leaves = ("scale", "bias") if config.family == "fairseq_dense" else ("scale",)
  linear_leaves = ("kernel", "bias") if config.family == "fairseq_dense" else ("kernel",)
  mlp_names = ("fc1", "fc2") if config.family == "fairseq_dense" else ("gate_proj", "up_proj", "down_proj")
  names |= {f"final_norm/{leaf}" for leaf in norm_leaves}
  for layer in range(config.num_layers):
    for norm in ("attn_norm", "mlp_norm"):
      names |= {f"layers/{layer}/{norm}/{leaf}" for leaf in norm_leaves}
    for projection in ("q_proj", "k_proj", "v_proj", "o_proj"):
      names |= {f"layers/{layer}/attn/{projection}/{leaf}" for leaf in linear_leaves}
    for name in mlp_names:
      names |= {f"layers/{layer}/mlp/{name}/{leaf}" for leaf in linear_leaves}
  if not config.tie_embeddings:
    names.add("lm_head/kernel")
  return names


class _LazyAbstractModels(dict):
  """Builds each abstract model on first use (pytest-xdist workers then build only what they test)."""

  def __missing__(self, name):
    self[name] = abstract_model(NAMED_CONFIGS[name])
    return self[name]


@pytest.fixture(scope="module")
def abstract_models():
  return _LazyAbstractModels()


@pytest.mark.parametrize("name", ALL_NAMES)
def test_param_count_and_tree(name, abstract_models):
  config, model = NAMED_CONFIGS[name], abstract_models[name]
  count = param_count(model)
  assert count == closed_form_param_count(config)
  if name in PUBLISHED_PARAM_COUNTS:
    assert count == PUBLISHED_PARAM_COUNTS[name]
  params = flat_params(model)
  assert set(params) == expected_paths(config)
  dim, query_width = config.embed_dim, config.num_heads * config.head_dim
  kv_width = config.num_kv_heads * config.head_dim
  assert params["embed/embedding"].shape == (config.vocab_size, dim)
  assert params["layers/0/attn/q_proj/kernel"].shape == (dim, query_width)
  assert params["layers/0/attn/k_proj/kernel"].shape == (dim, kv_width)
  assert params["layers/0/attn/v_proj/kernel"].shape == (dim, kv_width)
  assert params[f"layers/{config.num_layers - 1}/attn/o_proj/kernel"].shape == (query_width, dim)
  first_mlp = "fc1" if config.family == "fairseq_dense" else "gate_proj"
  assert params[f"layers/0/mlp/{first_mlp}/kernel"].shape == (dim, config.mlp_dim)
  assert all(leaf.dtype == jnp.float32 for leaf in params.values())
  assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in params.values())  # nothing allocated


def test_published_sizes_of_the_two_large_fairseq_models(abstract_models):
  assert round(param_count(abstract_models["fairseq-dense-1.3b"]) / 1e9, 2) == 1.31
  assert round(param_count(abstract_models["fairseq-dense-2.7b"]) / 1e9, 2) == 2.65
  assert set(PUBLISHED_PARAM_COUNTS) <= set(NAMED_CONFIGS)


@pytest.mark.parametrize("name", ["smollm2-135m", "fairseq-dense-1.3b", "smollm2-1.7b", "fairseq-dense-2.7b"])
def test_logits_shapes(name, abstract_models):
  config, model = NAMED_CONFIGS[name], abstract_models[name]
  graphdef, state = nnx.split(model)
  tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)

  def forward(state, tokens, **kwargs):
    return nnx.merge(graphdef, state).forward(tokens, **kwargs)

  assert jax.eval_shape(lambda s, t: nnx.merge(graphdef, s)(t), state, tokens).shape == (2, 16, config.vocab_size)
  positions = jax.ShapeDtypeStruct((2, 3), jnp.int32)
  partial = jax.eval_shape(lambda s, t, p: forward(s, t, logit_positions=p), state, tokens, positions)
  assert partial.logits.shape == (2, 3, config.vocab_size)
  context = jax.ShapeDtypeStruct((1, 40), jnp.int32)
  cache = jax.eval_shape(lambda s, c: nnx.merge(graphdef, s).encode_prefix(c), state, context)
  assert len(cache.keys) == config.num_layers
  assert cache.keys[0].shape == (1, 40, config.num_kv_heads, config.head_dim)
  cached = jax.eval_shape(lambda s, t, c: forward(s, t, cache=c), state, tokens, cache)
  assert cached.logits.shape == (2, 16, config.vocab_size)


@pytest.mark.parametrize("name,expected", [("smollm2-135m", 30 * 2 * 192 * 576),
                                           ("fairseq-dense-1.3b", 24 * 2 * (2048 ** 2 + 2048))])
def test_kv_trainable_counts(name, expected, abstract_models):
  selection = select_params(abstract_models[name], TRAINABLE_KV)
  assert selection.count == expected
  assert expected in (6_635_520, 201_424_896)
  config = NAMED_CONFIGS[name]
  leaves_per_layer = 4 if config.use_bias else 2
  assert len(selection.paths) == config.num_layers * leaves_per_layer
  assert all("/attn/k_proj/" in path or "/attn/v_proj/" in path for path in selection.paths)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_kv_trainable_count_closed_form(name, abstract_models):
  config = NAMED_CONFIGS[name]
  kv_width = config.num_kv_heads * config.head_dim
  per_projection = config.embed_dim * kv_width + (kv_width if config.use_bias else 0)
  assert select_params(abstract_models[name], TRAINABLE_KV).count == config.num_layers * 2 * per_projection


def test_bfloat16_parameters_are_built_in_bfloat16():
  config = get_config("fairseq-dense-125m").replace(dtype="bfloat16", param_dtype="bfloat16")
  params = flat_params(abstract_model(config))
  assert {leaf.dtype for leaf in params.values()} == {jnp.dtype(jnp.bfloat16)}


def test_unknown_config_name_is_refused():
  with pytest.raises(ValueError, match="unknown model config 'gpt-4'; known: "):
    get_config("gpt-4")
