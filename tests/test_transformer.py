"""Tests of dualform.models.transformer on tiny configs of both families (float32, HIGHEST matmuls).

Everything is checked against independent numpy code written here: fairseq's sinusoidal table and
position ids, Hugging Face's rotate-half RoPE, erf GELU, and a float64 numpy forward pass that returns
logits and every recorded quantity. The prefix cache is checked against full forwards of each
concatenated sequence. Relative error is ``max|actual - expected| / max|expected|``, at most 1e-5 in
float32 under ``jax.default_matmul_precision("highest")`` and 1e-10 in float64.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import special

from dualform.models import RECORD_ALL, RecordSpec, abstract_model, build_model, set_attention, tiny_config
from dualform.models import transformer as transformer_lib
from dualform.params import flat_params

F32_TOLERANCE = 1e-5
F64_TOLERANCE = 1e-10
FAMILIES = ("llama", "fairseq_dense")


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision("highest"):
    yield


def relative_error(actual, expected) -> float:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


@functools.partial(jax.jit, static_argnames=("graphdef", "record", "return_cache"))
def _jitted_forward(graphdef, state, tokens, cache, positions, logit_positions, record, record_positions,
                    return_cache):
  return nnx.merge(graphdef, state).forward(tokens, cache=cache, positions=positions,
                                            logit_positions=logit_positions, record=record,
                                            record_positions=record_positions, return_cache=return_cache)


def run_forward(model, tokens, *, cache=None, positions=None, logit_positions=None, record=None,
                record_positions=None, return_cache=False):
  """``model.forward`` under jit (one compile per shape is cheaper than eager op-by-op dispatch)."""
  graphdef, state = nnx.split(model)
  return _jitted_forward(graphdef, state, tokens, cache, positions, logit_positions, record, record_positions,
                         return_cache)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _jitted_encode_prefix(graphdef, state, tokens):
  return nnx.merge(graphdef, state).encode_prefix(tokens)


def run_encode_prefix(model, tokens):
  graphdef, state = nnx.split(model)
  return _jitted_encode_prefix(graphdef, state, tokens)


def random_model(family: str, seed: int = 0, **overrides):
  """A tiny model whose every parameter is random and O(1)-scaled (biases and norm scales included),
  so attention is far from uniform and every term of the forward pass matters."""
  config = tiny_config(family, **overrides)
  model = abstract_model(config)  # every leaf is filled below: no random init to compile
  rng = np.random.default_rng(seed + 1000)
  state = nnx.state(model, nnx.Param)

  def randomize(path, variable):
    name, shape = path[-1], variable.shape
    if name == "kernel":
      value = rng.normal(size=shape) / math.sqrt(shape[0])
    elif name == "embedding":
      value = rng.normal(size=shape) * (0.3 if config.family == "fairseq_dense" else 1.0)
    elif name == "scale":
      value = 1.0 + 0.2 * rng.normal(size=shape)
    else:  # biases
      value = 0.2 * rng.normal(size=shape)
    return variable.replace(jnp.asarray(value, variable.dtype))

  nnx.update(model, nnx.map_state(randomize, state))
  return model


# ----------------------------------------------------------------------------------------------------
# Independent numpy references.


def fairseq_sinusoidal_numpy(num_embeddings: int, embedding_dim: int, padding_idx: int,
                             dtype=np.float32) -> np.ndarray:
  """fairseq ``SinusoidalPositionalEmbedding.get_embedding`` transcribed to numpy (float32 like torch)."""
  half_dim = embedding_dim // 2
  step = math.log(10000) / (half_dim - 1)
  frequencies = np.exp(np.arange(half_dim, dtype=dtype) * -step)
  angles = np.arange(num_embeddings, dtype=dtype)[:, None] * frequencies[None, :]
  table = np.concatenate([np.sin(angles), np.cos(angles)], axis=1).reshape(num_embeddings, -1)
  if embedding_dim % 2 == 1:
    table = np.concatenate([table, np.zeros((num_embeddings, 1), dtype)], axis=1)
  table[padding_idx, :] = 0
  return table


def fairseq_make_positions(tokens: np.ndarray, padding_idx: int) -> np.ndarray:
  """fairseq ``utils.make_positions``: real tokens count from padding_idx + 1, pads get padding_idx."""
  mask = (tokens != padding_idx).astype(np.int64)
  return np.cumsum(mask, axis=1) * mask + padding_idx


def rope_numpy(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
  """Hugging Face ``apply_rotary_pos_emb`` (rotate-half layout) in float64 numpy.

  x: [B, T, N, H]; positions: [B, T].
  """
  head_dim = x.shape[-1]
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  angles = positions.astype(np.float64)[..., None] * inv_freq  # [B, T, H/2]
  embedding = np.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = np.cos(embedding), np.sin(embedding)
  half = head_dim // 2
  rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


def gelu_erf_numpy(x: np.ndarray) -> np.ndarray:
  return 0.5 * x * (1.0 + special.erf(x / math.sqrt(2.0)))


def reference_forward(model, tokens: np.ndarray) -> tuple[np.ndarray, list[dict[str, np.ndarray]]]:
  """Float64 numpy forward of one sequence [T] from position 0.

  Returns logits [T, V] and per layer: ``attn_out`` [T, D], ``scores`` [T, N, T] (``q.k / sqrt(H)``,
  pre-mask, after RoPE), ``weights`` [T, N, T] and ``queries`` [T, N, H] (``q / sqrt(H)`` before RoPE),
  following the per-layer attention kinds and etas of ``model.config``.
  """
  config = model.config
  params = {path: np.asarray(value, np.float64) for path, value in flat_params(model).items()}
  num_tokens = len(tokens)
  dim, heads, kv_heads, head_dim = config.embed_dim, config.num_heads, config.num_kv_heads, config.head_dim

  def norm(x, prefix):
    if config.family == "fairseq_dense":
      centred = x - x.mean(-1, keepdims=True)
      normed = centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + config.norm_eps)
      return normed * params[f"{prefix}/scale"] + params[f"{prefix}/bias"]
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + config.norm_eps) * params[f"{prefix}/scale"]

  def linear(x, prefix):
    out = x @ params[f"{prefix}/kernel"]
    return out + params[f"{prefix}/bias"] if config.use_bias else out

  embedding = params["embed/embedding"]
  x = embedding[tokens]
  if config.family == "fairseq_dense":
    table = fairseq_sinusoidal_numpy(num_tokens + config.padding_idx + 1, dim, config.padding_idx, np.float64)
    positions = fairseq_make_positions(tokens[None], config.padding_idx)[0]  # no pads here: 2, 3, ...
    x = math.sqrt(dim) * x + table[positions]
  positions = np.arange(num_tokens)
  causal = np.tril(np.ones((num_tokens, num_tokens), bool))
  records = []
  for layer in range(config.num_layers):
    kind, eta = config.layer_attention(layer)
    prefix = f"layers/{layer}"
    hidden = norm(x, f"{prefix}/attn_norm")
    q = linear(hidden, f"{prefix}/attn/q_proj").reshape(num_tokens, heads, head_dim)
    k = linear(hidden, f"{prefix}/attn/k_proj").reshape(num_tokens, kv_heads, head_dim)
    v = linear(hidden, f"{prefix}/attn/v_proj").reshape(num_tokens, kv_heads, head_dim)
    queries = q / math.sqrt(head_dim)
    if config.family == "llama":
      q = rope_numpy(q[None], positions[None], config.rope_theta)[0]
      k = rope_numpy(k[None], positions[None], config.rope_theta)[0]
    # query head n reads key/value head n // (N / K)
    k = np.repeat(k, heads // kv_heads, axis=1)
    v = np.repeat(v, heads // kv_heads, axis=1)
    dot = np.einsum("tnh,snh->tns", q, k)  # [T, N, S]
    scores = dot / math.sqrt(head_dim)
    mask = causal[:, None, :]
    if kind == "linear_relaxed":
      weights = np.where(mask, dot, 0.0)
    else:
      masked = np.where(mask, scores, -np.inf)
      weights = np.exp(masked - masked.max(-1, keepdims=True))
      weights /= weights.sum(-1, keepdims=True)
    out = np.einsum("tns,snh->tnh", weights, v)
    if kind == "momentum":
      for t in range(num_tokens):
        out[t] += sum(eta ** (t - i) * v[i] for i in range(t)) if t else 0.0
    attn_out = linear(out.reshape(num_tokens, heads * head_dim), f"{prefix}/attn/o_proj")
    x = x + attn_out
    hidden = norm(x, f"{prefix}/mlp_norm")
    if config.family == "fairseq_dense":
      x = x + linear(gelu_erf_numpy(linear(hidden, f"{prefix}/mlp/fc1")), f"{prefix}/mlp/fc2")
    else:
      gate = linear(hidden, f"{prefix}/mlp/gate_proj")
      x = x + linear(gate / (1.0 + np.exp(-gate)) * linear(hidden, f"{prefix}/mlp/up_proj"),
                     f"{prefix}/mlp/down_proj")
    records.append(dict(attn_out=attn_out, scores=scores, weights=weights, queries=queries))
  x = norm(x, "final_norm")
  logits = x @ embedding.T if config.tie_embeddings else x @ params["lm_head/kernel"]
  return logits, records


def random_tokens(seed: int, shape, vocab: int = 128) -> jnp.ndarray:
  # Ids from 3 up, so that no token equals fairseq's padding index 1.
  return jnp.asarray(np.random.default_rng(seed).integers(3, vocab, size=shape), jnp.int32)


# ----------------------------------------------------------------------------------------------------
# Positions, RoPE, GELU.


@pytest.mark.parametrize("dim", [32, 768, 2048])
def test_fairseq_sinusoidal_table_matches_fairseq(dim):
  # The formula over all 2050 rows, exactly (float64).
  with jax.enable_x64(True):
    expected = fairseq_sinusoidal_numpy(2050, dim, padding_idx=1, dtype=np.float64)
    table = transformer_lib.fairseq_sinusoidal_table(2050, dim, padding_idx=1, dtype=jnp.float64)
    assert relative_error(table, expected) <= F64_TOLERANCE
    evaluated = transformer_lib.fairseq_positions(jnp.arange(2, 2050)[None], dim, dtype=jnp.float64)[0]
    assert relative_error(evaluated, expected[2:]) <= F64_TOLERANCE
  # The float32 table the model uses. Rows stop at 66: XLA's and numpy's float32 exp may differ by one ulp
  # in a frequency f, which moves the angle p * f by p * ulp(f) (6e-8 p), within 1e-5 only for small p.
  expected = fairseq_sinusoidal_numpy(67, dim, padding_idx=1)
  table = np.asarray(transformer_lib.fairseq_sinusoidal_table(67, dim, padding_idx=1))
  assert np.max(np.abs(table - expected)) <= F32_TOLERANCE
  np.testing.assert_array_equal(table[1], 0.0)  # padding row
  # Halves, not interleaved: column 0 is sin(p), column dim/2 is cos(p) (frequency 1).
  np.testing.assert_allclose(table[5, 0], np.sin(5.0), rtol=1e-6)
  np.testing.assert_allclose(table[5, dim // 2], np.cos(5.0), rtol=1e-6)
  # (half - 1) denominator: the last frequency is exactly 1 / 10000 (not 10000 ** (-(half-1)/half)).
  np.testing.assert_allclose(table[60, dim // 2 - 1], np.sin(60 / 10000), rtol=1e-5)
  positions = jnp.arange(2, 67)[None]
  evaluated = np.asarray(transformer_lib.fairseq_positions(positions, dim))[0]
  assert np.max(np.abs(evaluated - expected[2:])) <= F32_TOLERANCE


def test_fairseq_embedding_positions_start_at_two():
  model = random_model("fairseq_dense")
  config = model.config
  tokens = random_tokens(0, (2, 9))
  positions = model.default_positions(2, 9)
  np.testing.assert_array_equal(positions, fairseq_make_positions(np.asarray(tokens), config.padding_idx))
  assert int(positions[0, 0]) == config.padding_idx + 1 == 2
  embedded = model.embed_tokens(tokens, positions)
  table = fairseq_sinusoidal_numpy(64, config.embed_dim, config.padding_idx)
  expected = (math.sqrt(config.embed_dim) * np.asarray(model.embed.embedding[...])[np.asarray(tokens)]
              + table[2:11][None])
  assert relative_error(embedded, expected) <= F32_TOLERANCE
  # After a cache of C tokens the default positions continue at C + 2.
  np.testing.assert_array_equal(model.default_positions(1, 3, offset=4), [[6, 7, 8]])


def test_llama_positions_start_at_zero():
  model = build_model(tiny_config("llama"))
  np.testing.assert_array_equal(model.default_positions(1, 4), [[0, 1, 2, 3]])
  np.testing.assert_array_equal(model.default_positions(1, 2, offset=5), [[5, 6]])


@pytest.mark.parametrize("theta", [10000.0, 1e5])
def test_rope_matches_hugging_face_rotate_half(theta):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 12, 3, 64))
  # The formula at positions up to the 8192-token context, exactly (float64).
  positions = np.stack([np.arange(12), rng.integers(0, 8192, size=12)])
  with jax.enable_x64(True):
    actual = transformer_lib.apply_rope(jnp.asarray(x, jnp.float64), jnp.asarray(positions), theta)
    assert relative_error(actual, rope_numpy(x, positions, theta)) <= F64_TOLERANCE
  # The float32 path at positions below 64: float32 angles p * f carry a rounding error of about
  # p * 6e-8 (one ulp of f), which stays within 1e-5 only for small p.
  positions = np.stack([np.arange(12), rng.integers(0, 64, size=12)])
  actual = transformer_lib.apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(positions), theta)
  assert relative_error(actual, rope_numpy(x, positions, theta)) <= F32_TOLERANCE


def test_rope_depends_only_on_relative_position():
  rng = np.random.default_rng(2)
  q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32) for _ in range(2))
  rotate = lambda x, p: transformer_lib.apply_rope(x, jnp.full((1, 1), p, jnp.int32), 1e4)
  dot = lambda p, s: float(jnp.sum(rotate(q, p) * rotate(k, s)))
  assert abs(dot(7, 3) - dot(107, 103)) <= F32_TOLERANCE * abs(dot(7, 3))
  assert abs(dot(7, 3) - dot(3, 7)) > 1e-3  # and it does depend on the offset's sign


def test_fairseq_mlp_uses_exact_erf_gelu():
  model = random_model("fairseq_dense")
  mlp = model.layers[0].mlp
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 5, 32)) * 2.0, jnp.float32)
  params = flat_params(model)
  w1, b1 = (np.asarray(params[f"layers/0/mlp/fc1/{name}"], np.float64) for name in ("kernel", "bias"))
  w2, b2 = (np.asarray(params[f"layers/0/mlp/fc2/{name}"], np.float64) for name in ("kernel", "bias"))
  hidden = np.asarray(x, np.float64) @ w1 + b1
  expected = gelu_erf_numpy(hidden) @ w2 + b2
  assert relative_error(mlp(x), expected) <= F32_TOLERANCE
  tanh_gelu = 0.5 * hidden * (1 + np.tanh(math.sqrt(2 / math.pi) * (hidden + 0.044715 * hidden ** 3)))
  assert relative_error(tanh_gelu @ w2 + b2, expected) > 10 * F32_TOLERANCE  # the two are distinguishable


# ----------------------------------------------------------------------------------------------------
# Full forward and recording against the numpy reference.


def assert_matches_reference(model, tokens, records, positions, logits, tolerance=F32_TOLERANCE):
  """Compares a batch-1 forward's logits [1, T, V] and records at ``positions`` [P] with the reference."""
  expected_logits, expected_records = reference_forward(model, np.asarray(tokens[0]))
  assert relative_error(logits[0], expected_logits) <= tolerance
  assert len(records) == model.config.num_layers
  for layer, (record, expected) in enumerate(zip(records, expected_records)):
    for name in ("attn_out", "scores", "weights", "queries"):
      error = relative_error(record[name][0], expected[name][positions])
      assert error <= tolerance, (layer, name, error)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_and_records_match_numpy_reference(family):
  model = random_model(family)
  config = model.config
  tokens = random_tokens(4, (1, 11))
  record_positions = jnp.asarray([[10, 0, 4]], jnp.int32)
  output = run_forward(model, tokens, record=RECORD_ALL, record_positions=record_positions)
  batch, positions, seq = 1, 3, 11
  for record in output.records:  # documented shapes
    assert record["attn_out"].shape == (batch, positions, config.embed_dim)
    assert record["scores"].shape == (batch, positions, config.num_heads, seq)
    assert record["weights"].shape == (batch, positions, config.num_heads, seq)
    assert record["queries"].shape == (batch, positions, config.num_heads, config.head_dim)
  assert output.logits.shape == (1, seq, config.vocab_size)
  assert output.cache is None
  assert_matches_reference(model, tokens, output.records, np.asarray(record_positions[0]), output.logits)
  # The attention is far from uniform, so the scores test is not vacuous.
  assert float(jnp.max(output.records[0]["weights"][0, 0])) > 0.3


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_matches_numpy_reference_in_float64(family):
  with jax.enable_x64(True):
    model = random_model(family, dtype="float64", param_dtype="float64")
    tokens = random_tokens(5, (1, 9))
    record_positions = jnp.asarray([[8, 3]], jnp.int32)
    output = run_forward(model, tokens, record=RECORD_ALL, record_positions=record_positions)
    assert output.logits.dtype == jnp.float64
    assert_matches_reference(model, tokens, output.records, np.asarray(record_positions[0]), output.logits,
                             tolerance=F64_TOLERANCE)


def test_records_can_be_selected_and_do_not_change_logits():
  model = random_model("llama")
  tokens = random_tokens(6, (2, 7))
  plain = run_forward(model, tokens)
  assert plain.records == () and plain.cache is None
  record_positions = jnp.asarray([[6], [2]], jnp.int32)
  only_scores = run_forward(model, tokens, record=RecordSpec(scores=True), record_positions=record_positions)
  assert all(set(record) == {"scores"} for record in only_scores.records)
  everything = run_forward(model, tokens, record=RECORD_ALL, record_positions=record_positions)
  np.testing.assert_array_equal(everything.logits, plain.logits)
  np.testing.assert_array_equal(only_scores.logits, plain.logits)
  # An all-off spec records nothing and needs no positions.
  assert run_forward(model, tokens, record=RecordSpec()).records == ()


def test_logit_positions_equal_gathered_full_logits():
  model = random_model("fairseq_dense")
  tokens = random_tokens(7, (3, 8))
  full = run_forward(model, tokens).logits
  logit_positions = jnp.asarray([[7, 0], [3, 3], [5, 1]], jnp.int32)
  partial = run_forward(model, tokens, logit_positions=logit_positions).logits
  assert partial.shape == (3, 2, model.config.vocab_size)
  expected = np.take_along_axis(np.asarray(full), np.asarray(logit_positions)[..., None], axis=1)
  assert relative_error(partial, expected) <= F32_TOLERANCE


def _count_equations(jaxpr) -> int:
  count = 0
  for equation in jaxpr.eqns:
    count += 1
    for sub in jax.core.jaxprs_in_params(equation.params):
      count += _count_equations(sub)
  return count


def test_jitted_plain_forward_computes_no_records():
  model = random_model("llama")
  graphdef, state = nnx.split(model)
  tokens = random_tokens(8, (2, 6))
  record_positions = jnp.asarray([[5], [1]], jnp.int32)

  def plain(state, tokens):
    return nnx.merge(graphdef, state)(tokens)

  def forward(state, tokens, record_positions, record):
    output = nnx.merge(graphdef, state).forward(tokens, record=record, record_positions=record_positions)
    return output.logits, output.records

  plain_jaxpr = jax.make_jaxpr(plain)(state, tokens)
  switched_off = jax.make_jaxpr(lambda s, t, p: forward(s, t, p, RecordSpec()))(state, tokens, record_positions)
  recorded = jax.make_jaxpr(lambda s, t, p: forward(s, t, p, RECORD_ALL))(state, tokens, record_positions)
  assert len(plain_jaxpr.out_avals) == 1
  assert len(switched_off.out_avals) == 1  # logits only: records == ()
  assert len(recorded.out_avals) == 1 + 4 * model.config.num_layers
  assert _count_equations(switched_off.jaxpr) == _count_equations(plain_jaxpr.jaxpr)
  assert _count_equations(recorded.jaxpr) > _count_equations(plain_jaxpr.jaxpr)
  # jit and no-jit agree, records included.
  jitted_logits, jitted_records = jax.jit(forward, static_argnums=3)(state, tokens, record_positions, RECORD_ALL)
  eager = model.forward(tokens, record=RECORD_ALL, record_positions=record_positions)
  assert relative_error(jitted_logits, eager.logits) <= F32_TOLERANCE
  for jitted, expected in zip(jitted_records, eager.records):
    for name in expected:
      assert relative_error(jitted[name], expected[name]) <= F32_TOLERANCE


# ----------------------------------------------------------------------------------------------------
# Prefix cache.


@pytest.mark.parametrize("family,kind,eta", [("llama", "softmax", None), ("fairseq_dense", "softmax", None),
                                             ("llama", "momentum", 0.6), ("fairseq_dense", "linear_relaxed", None)])
def test_prefix_cache_equals_full_forward(family, kind, eta):
  model = set_attention(random_model(family), kind, eta)
  context = random_tokens(9, (1, 6))
  lengths = [5, 2, 7, 1]
  continuations = [random_tokens(10 + row, (length,)) for row, length in enumerate(lengths)]
  pad = 0
  batch = jnp.stack([jnp.pad(row, (0, max(lengths) - len(row)), constant_values=pad) for row in continuations])
  record_positions = jnp.asarray([[length - 1, 0] for length in lengths], jnp.int32)
  cache = run_encode_prefix(model, context)
  assert cache.length == 6 and len(cache.keys) == model.config.num_layers
  assert cache.keys[0].shape == (1, 6, model.config.num_kv_heads, model.config.head_dim)
  cached = run_forward(model, batch, cache=cache, record=RECORD_ALL, record_positions=record_positions)
  context_length = context.shape[1]
  for row, length in enumerate(lengths):
    sequence = jnp.concatenate([context, continuations[row][None]], axis=1)
    full = run_forward(model, sequence, record=RECORD_ALL,
                       record_positions=record_positions[row:row + 1] + context_length)
    keys = context_length + length
    assert relative_error(cached.logits[row, :length], full.logits[0, context_length:]) <= F32_TOLERANCE
    for layer, (cached_record, full_record) in enumerate(zip(cached.records, full.records)):
      for name in ("attn_out", "queries"):
        assert relative_error(cached_record[name][row], full_record[name][0]) <= F32_TOLERANCE, (layer, name)
      for name in ("scores", "weights"):
        error = relative_error(cached_record[name][row, ..., :keys], full_record[name][0])
        assert error <= F32_TOLERANCE, (layer, name)
      # Padding keys after the row's end are masked out of the mixing weights.
      np.testing.assert_array_equal(cached_record["weights"][row, ..., keys:], 0.0)


def test_return_cache_of_full_forward_equals_encode_prefix():
  model = random_model("llama")
  tokens = random_tokens(11, (1, 5))
  cache = run_encode_prefix(model, tokens)
  returned = run_forward(model, tokens, return_cache=True).cache
  for key, returned_key in zip(cache.keys + cache.values, returned.keys + returned.values):
    np.testing.assert_array_equal(key, returned_key)


# ----------------------------------------------------------------------------------------------------
# Attention kinds per layer.


def test_set_attention_switches_only_the_given_layers():
  model = random_model("llama")
  tokens = random_tokens(12, (1, 8))
  record_positions = jnp.asarray([[7, 2]], jnp.int32)
  before = run_forward(model, tokens, record=RECORD_ALL, record_positions=record_positions)
  set_attention(model, "linear_relaxed", layers=(1,))
  assert model.config.attention_kinds == ("softmax", "linear_relaxed")
  assert (model.layers[0].attn.kind, model.layers[1].attn.kind) == ("softmax", "linear_relaxed")
  after = run_forward(model, tokens, record=RECORD_ALL, record_positions=record_positions)
  for name in ("attn_out", "scores", "weights", "queries"):
    np.testing.assert_array_equal(after.records[0][name], before.records[0][name])
  assert relative_error(after.records[1]["attn_out"], before.records[1]["attn_out"]) > 1e-2
  assert_matches_reference(model, tokens, after.records, np.asarray(record_positions[0]), after.logits)
  set_attention(model, "softmax")
  assert relative_error(run_forward(model, tokens).logits, before.logits) <= F32_TOLERANCE


@pytest.mark.parametrize("family", FAMILIES)
def test_momentum_attention_matches_reference(family):
  model = set_attention(random_model(family), "momentum", 0.5)
  assert model.config.momentum_eta == (0.5, 0.5)
  tokens = random_tokens(13, (1, 9))
  record_positions = jnp.asarray([[8, 1]], jnp.int32)
  output = run_forward(model, tokens, record=RECORD_ALL, record_positions=record_positions)
  assert_matches_reference(model, tokens, output.records, np.asarray(record_positions[0]), output.logits)


def test_momentum_with_zero_eta_equals_softmax():
  model = random_model("fairseq_dense")
  tokens = random_tokens(14, (2, 8))
  softmax_logits = run_forward(model, tokens).logits
  set_attention(model, "momentum", 0.0)
  assert relative_error(run_forward(model, tokens).logits, softmax_logits) <= F32_TOLERANCE
  set_attention(model, "momentum", 0.5, layers=(0,))
  assert relative_error(run_forward(model, tokens).logits, softmax_logits) > 1e-3  # eta > 0 does change the output


# ----------------------------------------------------------------------------------------------------
# Errors.


def test_sequence_longer_than_context_is_refused():
  model = build_model(tiny_config("llama", max_len=16))
  with pytest.raises(ValueError, match="exceeds the model context of 16"):
    model(jnp.zeros((1, 17), jnp.int32))
  cache = run_encode_prefix(model, jnp.zeros((1, 10), jnp.int32))
  with pytest.raises(ValueError, match="17 tokens exceeds"):
    model.forward(jnp.zeros((2, 7), jnp.int32), cache=cache)


def test_forward_argument_errors():
  model = build_model(tiny_config("fairseq_dense"))
  tokens = jnp.zeros((2, 4), jnp.int32)
  with pytest.raises(ValueError, match="record needs record_positions"):
    model.forward(tokens, record=RecordSpec(scores=True))
  with pytest.raises(ValueError, match=r"encode_prefix takes one context of shape \[1, C\]"):
    model.encode_prefix(tokens)
  other = build_model(tiny_config("fairseq_dense", num_layers=3))
  with pytest.raises(ValueError, match="cache has 3 layers, model has 2"):
    model.forward(tokens, cache=run_encode_prefix(other, tokens[:1]))
  with pytest.raises(ValueError, match="momentum attention but has no eta"):
    set_attention(model, "momentum")
  with pytest.raises(ValueError, match="unknown attention kinds"):
    set_attention(model, "flash")


@pytest.mark.parametrize("family,overrides,message", [
    ("llama", dict(family="gpt"), "unknown model family"),
    ("llama", dict(num_layers=0), "num_layers must be positive"),
    ("llama", dict(vocab_size=-1), "vocab_size must be positive"),
    ("llama", dict(num_heads=4, num_kv_heads=3), "multiple of num_kv_heads"),
    ("llama", dict(head_dim=7), "RoPE needs an even head_dim"),
    ("llama", dict(rope_theta=0.0), "rope_theta must be positive"),
    ("llama", dict(norm_eps=0.0), "norm_eps must be positive"),
    ("llama", dict(dtype="int8"), "unsupported compute dtype"),
    ("llama", dict(param_dtype="float8"), "unsupported param_dtype"),
    ("llama", dict(attention_kinds=("softmax",)), "attention_kinds has 1 entries for 2 layers"),
    ("llama", dict(attention_kinds=("softmax", "momentum")), "layer 1 uses momentum attention but has no eta"),
    ("llama", dict(attention_kinds=("softmax", "momentum"), momentum_eta=(None,)), "momentum_eta has 1 entries"),
    ("fairseq_dense", dict(head_dim=16), "num_heads \\* head_dim == embed_dim"),
    ("fairseq_dense", dict(num_kv_heads=2), "no grouped-query attention"),
    ("fairseq_dense", dict(padding_idx=-1), "padding_idx must be >= 0"),
    ("llama", dict(prefix_attention="flash"), "unknown prefix_attention 'flash'"),
    ("llama", dict(prefix_attention="cudnn"), "prefix_attention 'cudnn' needs dtype bfloat16 or float16"),
])
def test_bad_config_values_are_refused(family, overrides, message):
  with pytest.raises(ValueError, match=message):
    tiny_config(**{"family": family, **overrides})


# ----------------------------------------------------------------------------------------------------
# Layer scan (config.scan_layers): the same function with one compiled layer body.


def _with_scan(model, on: bool):
  """The same parameters under a config with ``scan_layers`` set to ``on``."""
  graphdef, state = nnx.split(model)
  copy = nnx.merge(graphdef, state)
  copy.config = copy.config.replace(scan_layers=on)
  return copy


def _has_scan(jaxpr, layers: int = 3) -> bool:
  """Whether the jaxpr scans over ``layers`` steps (momentum attention scans over tokens, not layers)."""
  return any(equation.primitive.name == "scan" and equation.params["length"] == layers
             for equation in jaxpr.eqns)


@pytest.mark.parametrize("family,kind,eta", [("llama", "softmax", None), ("fairseq_dense", "softmax", None),
                                             ("llama", "momentum", 0.6), ("fairseq_dense", "linear_relaxed", None)])
def test_scanned_layers_equal_the_unrolled_loop_in_float64(family, kind, eta):
  with jax.enable_x64(True):
    loop = set_attention(random_model(family, num_layers=3, dtype="float64", param_dtype="float64"), kind, eta)
    scan = _with_scan(loop, True)
    context, batch = random_tokens(20, (1, 6)), random_tokens(21, (3, 5))
    record_positions = jnp.asarray([[4, 0], [2, 1], [3, 3]], jnp.int32)
    for model in (loop, scan):  # the scan really runs: its jaxpr holds one scan, the loop's none
      graphdef, state = nnx.split(model)
      jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s).forward(batch).logits)(state).jaxpr
      assert _has_scan(jaxpr) == (model is scan)
    expected_cache, actual_cache = run_encode_prefix(loop, context), run_encode_prefix(scan, context)
    for expected, actual in zip(expected_cache.keys + expected_cache.values, actual_cache.keys + actual_cache.values):
      assert relative_error(actual, expected) <= F64_TOLERANCE
    expected = run_forward(loop, batch, cache=expected_cache, record=RECORD_ALL, record_positions=record_positions,
                           return_cache=True)
    actual = run_forward(scan, batch, cache=expected_cache, record=RECORD_ALL, record_positions=record_positions,
                         return_cache=True)
    assert relative_error(actual.logits, expected.logits) <= F64_TOLERANCE
    assert len(actual.records) == len(expected.records) == 3
    for actual_record, expected_record in zip(actual.records, expected.records):
      assert actual_record.keys() == expected_record.keys()
      for name in expected_record:
        assert relative_error(actual_record[name], expected_record[name]) <= F64_TOLERANCE, name
    for returned, reference in zip(actual.cache.keys + actual.cache.values, expected.cache.keys + expected.cache.values):
      assert relative_error(returned, reference) <= F64_TOLERANCE


def test_scanned_layers_give_the_same_key_value_gradient_in_float64():
  """The FT path differentiates through the scan: d loss / d (k, v) kernels equal the loop's."""
  with jax.enable_x64(True):
    loop = random_model("fairseq_dense", num_layers=3, dtype="float64", param_dtype="float64")
    tokens = random_tokens(22, (1, 9))

    def kv_gradient(model):
      graphdef, trainable, frozen = nnx.split(model, nnx.Any(nnx.PathContains("k_proj"), nnx.PathContains("v_proj")), ...)

      def loss(trainable_state):
        logits = nnx.merge(graphdef, trainable_state, frozen).forward(tokens).logits
        return -jnp.mean(jax.nn.log_softmax(logits[0, :-1])[jnp.arange(8), tokens[0, 1:]])

      return jax.jit(jax.grad(loss))(trainable)

    expected, actual = kv_gradient(loop), kv_gradient(_with_scan(loop, True))
    expected_leaves, actual_leaves = jax.tree.leaves(expected), jax.tree.leaves(actual)
    assert len(expected_leaves) == 12  # 3 layers x {k, v} x {kernel, bias}
    # One relative error over all leaves: the key bias gradient is zero up to rounding (softmax ignores
    # a score shift shared by every key), so it is compared on the scale of the others.
    flat = lambda leaves: jnp.concatenate([jnp.ravel(leaf) for leaf in leaves])
    assert relative_error(flat(actual_leaves), flat(expected_leaves)) <= F64_TOLERANCE
    informative = [leaf for (path, leaf) in jax.tree_util.tree_leaves_with_path(expected)
                   if "kernel" in jax.tree_util.keystr(path) or "v_proj" in jax.tree_util.keystr(path)]
    assert len(informative) == 9 and all(float(jnp.max(jnp.abs(leaf))) > 1e-6 for leaf in informative)


def test_scan_falls_back_to_the_loop_when_layers_differ():
  model = set_attention(random_model("llama", num_layers=3), "linear_relaxed", layers=(1,))
  scan = _with_scan(model, True)
  tokens = random_tokens(23, (2, 7))
  graphdef, state = nnx.split(scan)
  jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s).forward(tokens).logits)(state).jaxpr
  assert not _has_scan(jaxpr)
  assert relative_error(run_forward(scan, tokens).logits, run_forward(model, tokens).logits) <= F32_TOLERANCE


@pytest.mark.parametrize("family,scan", [("llama", False), ("fairseq_dense", False), ("llama", True)])
def test_padded_prefix_cache_equals_the_exact_cache(family, scan):
  """A context right-padded to C with ``valid_length`` gives the logits and records of the exact cache:
  positions continue from the valid length, padding keys get zero weight."""
  model = _with_scan(random_model(family, num_layers=3), scan)
  context, batch = random_tokens(30, (1, 7)), random_tokens(31, (3, 5))
  padded_context = jnp.concatenate([context, random_tokens(32, (1, 9))], axis=1)  # 9 padding tokens
  record_positions = jnp.asarray([[4, 0], [2, 1], [3, 3]], jnp.int32)
  exact = run_forward(model, batch, cache=run_encode_prefix(model, context), record=RECORD_ALL,
                      record_positions=record_positions)
  graphdef, state = nnx.split(model)
  padded_cache = jax.jit(lambda s, t, n: nnx.merge(graphdef, s).encode_prefix(t, n))(state, padded_context,
                                                                                    jnp.asarray(7))
  assert padded_cache.length == 16 and int(padded_cache.offset) == 7
  padded = run_forward(model, batch, cache=padded_cache, record=RECORD_ALL, record_positions=record_positions)
  assert relative_error(padded.logits, exact.logits) <= F32_TOLERANCE
  valid = np.r_[0:7, 16:21]  # the real context keys, then the continuation keys
  for padded_record, exact_record in zip(padded.records, exact.records):
    for name in ("attn_out", "queries"):
      assert relative_error(padded_record[name], exact_record[name]) <= F32_TOLERANCE, name
    for name in ("scores", "weights"):
      assert relative_error(padded_record[name][..., valid], exact_record[name]) <= F32_TOLERANCE, name
    np.testing.assert_array_equal(padded_record["weights"][..., 7:16], 0.0)


def test_padded_prefix_cache_is_refused_for_momentum_attention():
  model = set_attention(random_model("llama"), "momentum", 0.5)
  cache = run_encode_prefix(model, random_tokens(33, (1, 6)))._replace(valid_length=jnp.asarray(4, jnp.int32))
  with pytest.raises(ValueError, match="momentum attention needs an unpadded prefix"):
    model.forward(random_tokens(34, (1, 3)), cache=cache)


@pytest.mark.parametrize("scan", [False, True])
def test_fused_prefix_attention_setting_of_a_bfloat16_model(scan):
  """``prefix_attention="cudnn"``: a prefix shorter than FUSED_PREFIX_MIN_LENGTH keeps the XLA path (the
  same logits bit for bit); a longer one runs cuDNN's kernel on a GPU (logits as close to the XLA path's as
  bfloat16 allows) and is refused with a one-line error elsewhere."""
  model = _with_scan(random_model("llama", num_layers=2, dtype="bfloat16", param_dtype="bfloat16"), scan)
  fused = transformer_lib.set_prefix_attention(nnx.merge(*nnx.split(model)), "cudnn")
  assert fused.layers[1].attn.config.prefix_attention == "cudnn" and model.config.prefix_attention == "xla"
  batch = random_tokens(41, (3, 6))
  short, long = random_tokens(42, (1, 5)), random_tokens(43, (1, transformer_lib.FUSED_PREFIX_MIN_LENGTH))
  same = run_forward(fused, batch, cache=run_encode_prefix(model, short)).logits
  np.testing.assert_array_equal(np.asarray(same, np.float32),
                                np.asarray(run_forward(model, batch, cache=run_encode_prefix(model, short)).logits,
                                           np.float32))
  cache = run_encode_prefix(model, long)
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="needs a CUDA GPU; use 'xla'"):
      run_forward(fused, batch, cache=cache)
  else:
    xla = np.asarray(run_forward(model, batch, cache=cache).logits, np.float32)
    assert np.abs(np.asarray(run_forward(fused, batch, cache=cache).logits, np.float32) - xla).max() <= 0.05 * (
        np.abs(xla).max())
