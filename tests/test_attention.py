"""Tests for dualform.attention: softmax and relaxed linear attention against references.

References: a plain numpy implementation (float64, relative error <= 1e-10) and
``jax.nn.dot_product_attention`` (float32 under matmul precision "highest", <= 1e-5; in float64 that
function is only ~1e-7 accurate in jax 0.10, so it is not used as a float64 reference). Covers grouped-query
heads, causal masks with a cached prefix (S > T), arbitrary masks, custom scales, jit, and gradients.
"""


import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.test_util import check_grads

from dualform import attention
from numerics import precision, relative_error

PRECISIONS = ("float64", "float32")
HYPOTHESIS = settings(max_examples=15, deadline=None)
# (batch, queries T, keys S >= T, kv heads K, group G = N / K, head dim H, value dim)
SHAPES = (
    (1, 1, 1, 1, 1, 1, 1),
    (2, 3, 3, 1, 1, 4, 4),
    (1, 2, 5, 2, 2, 3, 2),
    (2, 4, 6, 1, 3, 2, 3),
    (1, 3, 4, 2, 1, 5, 5),
    (2, 2, 2, 2, 3, 2, 1),
)


def numpy_attention(q, k, v, mask=None, scale=None, kind="softmax"):
  """Reference in float64 numpy: repeat each kv head G times (head n reads kv head n // G)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  if scale is None:
    scale = 1.0 if kind == "linear_relaxed" else q.shape[-1] ** -0.5
  scores = np.einsum("btnh,bsnh->bnts", q, k) * scale
  visible = np.ones(scores.shape, bool) if mask is None else np.broadcast_to(
      np.expand_dims(np.asarray(mask), -3), scores.shape)
  if kind == "linear_relaxed":
    weights = np.where(visible, scores, 0.0)
  else:
    logits = np.where(visible, scores, -np.inf)
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
  return np.einsum("bnts,bsnv->btnv", weights, v)


def random_inputs(shape, seed, dtype):
  batch, queries, keys, kv_heads, group, head_dim, value_dim = shape
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((batch, queries, kv_heads * group, head_dim))
  k = rng.standard_normal((batch, keys, kv_heads, head_dim))
  v = rng.standard_normal((batch, keys, kv_heads, value_dim))
  return tuple(jnp.asarray(a, dtype) for a in (q, k, v))


def make_mask(kind, shape, seed):
  batch, queries, keys = shape[:3]
  if kind == "none":
    return None
  if kind == "causal":
    return attention.causal_mask(queries, keys)
  visible = np.random.default_rng(seed + 1).random((batch, queries, keys)) < 0.6
  visible[..., 0] = True  # every query sees at least one key (a fully masked softmax row is undefined)
  return jnp.asarray(visible)


# ---------------------------------------------------------------------------------------------------
# Hand-sized cases.


def test_softmax_attention_hand_sized():
  with jax.enable_x64(True):
    # H = 1 so scale = 1; scores (0, ln 3) -> weights (1/4, 3/4); out = 4/4 + 8 * 3/4 = 7.
    q = jnp.ones((1, 1, 1, 1))
    k = jnp.array([0.0, np.log(3.0)]).reshape(1, 2, 1, 1)
    v = jnp.array([4.0, 8.0]).reshape(1, 2, 1, 1)
    np.testing.assert_allclose(attention.softmax_attention(q, k, v), [[[[7.0]]]], rtol=1e-14)
    weights = attention.attention_weights(attention.attention_scores(q, k), None, "softmax")
    np.testing.assert_allclose(weights, [[[[0.25, 0.75]]]], rtol=1e-14)


def test_linear_attention_hand_sized():
  q = jnp.array([1.0, 2.0]).reshape(1, 1, 1, 2)
  k = jnp.array([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 2, 1, 2)
  v = jnp.array([[1.0, 1.0], [2.0, 0.0]]).reshape(1, 2, 1, 2)
  # (q.k1) v1 + (q.k2) v2 = 1 (1, 1) + 2 (2, 0) = (5, 1); no softmax, no 1/sqrt(H) scaling.
  np.testing.assert_array_equal(attention.linear_attention(q, k, v), [[[[5.0, 1.0]]]])
  only_first = jnp.array([[True, False]])
  np.testing.assert_array_equal(attention.linear_attention(q, k, v, mask=only_first), [[[[1.0, 1.0]]]])


def test_causal_mask_hand_sized():
  # Two queries are the last two of three keys: query 0 is key 1, query 1 is key 2.
  np.testing.assert_array_equal(attention.causal_mask(2, 3), [[True, True, False], [True, True, True]])
  np.testing.assert_array_equal(attention.causal_mask(2, 2), [[True, False], [True, True]])


def test_grouped_query_head_order_hand_sized():
  # Two query heads share one kv head; four query heads over two kv heads map n -> n // 2.
  q = jnp.ones((1, 1, 4, 1))
  k = jnp.zeros((1, 1, 2, 1))
  v = jnp.array([10.0, 20.0]).reshape(1, 1, 2, 1)
  np.testing.assert_array_equal(attention.softmax_attention(q, k, v)[0, 0, :, 0], [10.0, 10.0, 20.0, 20.0])


# ---------------------------------------------------------------------------------------------------
# Randomized against references (jitted: one compilation per shape, kind and precision).

jitted_attention = jax.jit(attention.attention, static_argnames=("kind", "scale"))


@pytest.mark.parametrize("name", PRECISIONS)
@pytest.mark.parametrize("kind", ["softmax", "linear_relaxed"])
@HYPOTHESIS
@given(shape=st.sampled_from(SHAPES), mask_kind=st.sampled_from(["none", "causal", "random"]),
       scale=st.sampled_from([None, 0.7]), seed=st.integers(0, 2**31 - 1))
def test_attention_matches_numpy(name, kind, shape, mask_kind, scale, seed):
  with precision(name) as (dtype, tolerance):
    q, k, v = random_inputs(shape, seed, dtype)
    mask = make_mask(mask_kind, shape, seed)
    actual = jitted_attention(q, k, v, kind=kind, mask=mask, scale=scale)
    assert actual.dtype == dtype and actual.shape == q.shape[:3] + v.shape[-1:]
    assert relative_error(actual, numpy_attention(q, k, v, mask, scale, kind)) <= tolerance


@HYPOTHESIS
@given(shape=st.sampled_from([s for s in SHAPES if s[5] == s[6]]),
       mask_kind=st.sampled_from(["none", "causal", "random"]), seed=st.integers(0, 2**31 - 1))
def test_softmax_matches_jax_dot_product_attention(shape, mask_kind, seed):
  with precision("float32") as (dtype, tolerance):
    q, k, v = random_inputs(shape, seed, dtype)
    mask = make_mask(mask_kind, shape, seed)
    reference_mask = None if mask is None else jnp.broadcast_to(
        jnp.expand_dims(mask, -3), (q.shape[0], 1, q.shape[1], k.shape[1]))
    expected = jax.jit(jax.nn.dot_product_attention, static_argnames="implementation")(
        q, k, v, mask=reference_mask, implementation="xla")
    assert relative_error(jitted_attention(q, k, v, kind="softmax", mask=mask), expected) <= tolerance


@jax.jit
def pieces(q, k, v):
  mask = attention.causal_mask(q.shape[1], k.shape[1])
  scores = attention.attention_scores(q, k)
  weights = attention.attention_weights(scores, mask, "softmax")
  return mask, scores, weights, attention.weighted_values(weights, v), attention.softmax_attention(q, k, v, mask=mask)


@pytest.mark.parametrize("name", PRECISIONS)
@HYPOTHESIS
@given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**31 - 1))
def test_pieces_compose_and_scores_are_pre_mask(name, shape, seed):
  with precision(name) as (dtype, tolerance):
    q, k, v = random_inputs(shape, seed, dtype)
    mask, scores, weights, out, composed = pieces(q, k, v)
    expected_scores = np.einsum("btnh,bsnh->bnts", np.asarray(q, np.float64),
                                np.repeat(np.asarray(k, np.float64), shape[4], axis=2)) * shape[5] ** -0.5
    assert scores.shape == (shape[0], shape[3] * shape[4], shape[1], shape[2])
    assert relative_error(scores, expected_scores) <= tolerance
    np.testing.assert_allclose(np.sum(np.asarray(weights, np.float64), axis=-1), 1.0, rtol=tolerance)
    assert np.all(np.asarray(weights)[..., ~np.asarray(mask)] == 0)
    assert relative_error(out, composed) <= tolerance


def test_low_precision_inputs_keep_their_dtype():
  q, k, v = random_inputs((1, 3, 3, 2, 2, 4, 4), 0, jnp.bfloat16)
  out = attention.softmax_attention(q, k, v, mask=attention.causal_mask(3, 3))
  assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))


# ---------------------------------------------------------------------------------------------------
# jit == eager, gradients, errors.


@pytest.mark.parametrize("name", PRECISIONS)
@pytest.mark.parametrize("kind", ["softmax", "linear_relaxed", "momentum"])
def test_jit_matches_eager(name, kind):
  with precision(name) as (dtype, tolerance):
    q, k, v = random_inputs((2, 3, 5, 2, 2, 3, 3), 7, dtype)
    mask = attention.causal_mask(3, 5)
    eta = 0.5 if kind == "momentum" else None
    run = lambda q, k, v: attention.attention(q, k, v, kind=kind, mask=mask, eta=eta)
    assert relative_error(jax.jit(run)(q, k, v), run(q, k, v)) <= tolerance


def test_gradients_flow_and_match_finite_differences():
  with jax.enable_x64(True):
    q, k, v = random_inputs((1, 2, 3, 1, 2, 2, 2), 8, jnp.float64)
    mask = attention.causal_mask(2, 3)
    for kind in ("softmax", "linear_relaxed", "momentum"):
      run = lambda q, k, v: attention.attention(q, k, v, kind=kind, mask=mask, eta=0.3)
      gradients = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(run(*a))), argnums=(0, 1, 2)))(q, k, v)
      assert all(bool(jnp.all(jnp.isfinite(g))) for g in gradients), kind
      check_grads(jax.jit(run), (q, k, v), order=1, modes=("rev",))
    pieces = {
        "attention_scores": lambda q: attention.attention_scores(q, k),
        "attention_weights": lambda q: attention.attention_weights(attention.attention_scores(q, k), mask, "softmax"),
        "weighted_values": lambda q: attention.weighted_values(attention.attention_scores(q, k), v),
    }
    for name, function in pieces.items():
      gradient = jax.grad(lambda a: jnp.sum(jnp.sin(function(a))))(q)
      assert bool(jnp.all(jnp.isfinite(gradient))), name
    # Closed form: d/dq_t sum(LinAttn) = sum_s k_s (sum_h v_s,h), per query head through its kv head.
    gradient = jax.grad(lambda q: jnp.sum(attention.linear_attention(q, k, v)))(q)
    expected = np.einsum("bskh,bsk->bkh", np.asarray(k), np.asarray(v).sum(-1))  # [B, K, H]
    expected = np.repeat(expected, 2, axis=1)[:, None].repeat(2, axis=1)  # [B, T, N, H]
    np.testing.assert_allclose(gradient, expected, rtol=1e-12)


def test_bad_inputs_raise_one_line_value_errors():
  q, k, v = jnp.ones((1, 2, 3, 4)), jnp.ones((1, 2, 2, 4)), jnp.ones((1, 2, 2, 4))
  cases = [
      lambda: attention.attention(q, k, v),  # 3 query heads over 2 kv heads
      lambda: attention.attention(jnp.ones((2, 4)), k, v),
      lambda: attention.attention(jnp.ones((1, 2, 2, 3)), k, v),
      lambda: attention.attention(jnp.ones((1, 2, 2, 4)), k, jnp.ones((1, 3, 2, 4))),
      lambda: attention.attention(jnp.ones((1, 2, 2, 4)), k, v, kind="cosine"),
      lambda: attention.attention(jnp.ones((1, 2, 2, 4)), k, v, kind="momentum"),
      lambda: attention.causal_mask(3, 2),
  ]
  for case in cases:
    with pytest.raises(ValueError) as error:
      case()
    assert "\n" not in str(error.value)


def test_shared_batch_one_keys_and_values_equal_their_broadcast_copy():
  """A batch-1 key/value set (a prefix cache) is used by every query row exactly as a per-row copy would be."""
  with precision("float64") as (dtype, tolerance):
    keys = jax.random.split(jax.random.key(7), 3)
    q = jax.random.normal(keys[0], (3, 4, 6, 5), dtype)
    k = jax.random.normal(keys[1], (1, 7, 2, 5), dtype)
    v = jax.random.normal(keys[2], (1, 7, 2, 5), dtype)
    copies = lambda a: jnp.broadcast_to(a, (3,) + a.shape[1:])
    scores = attention.attention_scores(q, k)
    assert relative_error(scores, attention.attention_scores(q, copies(k))) <= tolerance
    weights = attention.attention_weights(scores, None, "softmax")
    assert relative_error(attention.weighted_values(weights, v),
                          attention.weighted_values(weights, copies(v))) <= tolerance
    with pytest.raises(ValueError, match="k batch must be 1"):
      attention.attention_scores(q, jnp.concatenate([k, k]))


@pytest.mark.parametrize("name", PRECISIONS)
@pytest.mark.parametrize("kind", ["softmax", "linear_relaxed"])
@HYPOTHESIS
@given(batch=st.integers(1, 3), seq=st.integers(1, 5), prefix=st.integers(1, 9), kv_heads=st.integers(1, 3),
       group=st.integers(1, 3), head_dim=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_prefix_attention_equals_attention_over_the_concatenated_keys(name, kind, batch, seq, prefix, kv_heads,
                                                                       group, head_dim, seed):
  """Split-softmax attention over [shared prefix; own tokens] = causal attention over the concatenation."""
  with precision(name) as (dtype, tolerance):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(3 * rng.standard_normal(shape), dtype)  # spread scores: a real max
    q, k, v = normal(batch, seq, kv_heads * group, head_dim), normal(batch, seq, kv_heads, head_dim), \
        normal(batch, seq, kv_heads, head_dim)
    prefix_k, prefix_v = normal(1, prefix, kv_heads, head_dim), normal(1, prefix, kv_heads, head_dim)
    scale = 1.0 if kind == "linear_relaxed" else None
    actual = jax.jit(attention.prefix_attention, static_argnames=("kind", "scale"))(
        q, k, v, prefix_k, prefix_v, kind=kind, scale=scale)
    full_k = jnp.concatenate([jnp.broadcast_to(prefix_k, (batch,) + prefix_k.shape[1:]), k], axis=1)
    full_v = jnp.concatenate([jnp.broadcast_to(prefix_v, (batch,) + prefix_v.shape[1:]), v], axis=1)
    mask = attention.causal_mask(seq, prefix + seq)
    assert actual.dtype == dtype and actual.shape == q.shape
    assert relative_error(actual, numpy_attention(q, full_k, full_v, mask, scale, kind)) <= tolerance


@pytest.mark.parametrize("name", PRECISIONS)
@pytest.mark.parametrize("kind", ["softmax", "linear_relaxed"])
def test_padded_prefix_with_its_length_equals_the_unpadded_prefix(name, kind):
  """Keys and values past ``prefix_length`` are padding: any values there leave the output unchanged,
  and one jitted function serves prefixes of several lengths padded to one C."""
  with precision(name) as (dtype, tolerance):
    rng = np.random.default_rng(5)
    normal = lambda *shape: jnp.asarray(3 * rng.standard_normal(shape), dtype)
    q, k, v = normal(2, 4, 6, 5), normal(2, 4, 3, 5), normal(2, 4, 3, 5)
    padded_k, padded_v = normal(1, 12, 3, 5), normal(1, 12, 3, 5)  # large garbage in the padding too
    scale = 1.0 if kind == "linear_relaxed" else None
    padded = jax.jit(functools.partial(attention.prefix_attention, kind=kind, scale=scale))
    for length in (1, 7, 12):
      expected = attention.prefix_attention(q, k, v, padded_k[:, :length], padded_v[:, :length], kind=kind,
                                            scale=scale)
      actual = padded(q, k, v, padded_k, padded_v, prefix_length=jnp.asarray(length))
      assert relative_error(actual, expected) <= tolerance, length
    assert padded._cache_size() == 1


def test_bfloat16_prefix_attention_is_as_accurate_as_the_unsplit_bfloat16_attention():
  """bfloat16 inputs: the prefix products run in bfloat16 (scores in bfloat16 as the unsplit attention's,
  values accumulated in float32), the softmax in float32. Against a float64 reference on the
  bfloat16-rounded inputs, its error is within 2x of the unsplit bfloat16 attention's, and under 1e-2."""
  rng = np.random.default_rng(3)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  q, k, v = normal(2, 8, 6, 64), normal(2, 8, 3, 64), normal(2, 8, 3, 64)
  prefix_k, prefix_v = normal(1, 300, 3, 64), normal(1, 300, 3, 64)
  actual = jax.jit(attention.prefix_attention)(q, k, v, prefix_k, prefix_v)
  assert actual.dtype == jnp.bfloat16
  full_k = jnp.concatenate([jnp.broadcast_to(prefix_k, (2, 300, 3, 64)), k], axis=1)
  full_v = jnp.concatenate([jnp.broadcast_to(prefix_v, (2, 300, 3, 64)), v], axis=1)
  mask = attention.causal_mask(8, 308)
  as64 = lambda a: np.asarray(a, np.float64)
  reference = numpy_attention(as64(q), as64(full_k), as64(full_v), np.asarray(mask), None, "softmax")
  unsplit = attention.attention(q, full_k, full_v, mask=mask)
  split_error, unsplit_error = relative_error(actual, reference), relative_error(unsplit, reference)
  assert split_error <= 2 * unsplit_error and split_error <= 1e-2, (split_error, unsplit_error)


def test_prefix_attention_rejects_momentum_and_bad_prefixes():
  q, k, v = (jnp.ones((2, 3, 4, 5)), jnp.ones((2, 3, 2, 5)), jnp.ones((2, 3, 2, 5)))
  with pytest.raises(ValueError, match="not 'momentum'"):
    attention.prefix_attention(q, k, v, k[:1], v[:1], kind="momentum")
  with pytest.raises(ValueError, match=r"prefix keys/values must be \[1, C, 2, 5\]"):
    attention.prefix_attention(q, k, v, k, v)


def _flash_prefix_block(q, prefix_k, prefix_v, length, scale):
  """What a flash kernel returns for the prefix block, in numpy float64: (out normalised over the valid
  prefix keys [B, T, N, H], log-sum-exp [B, N, T])."""
  q, prefix_k, prefix_v = (np.asarray(a, np.float64) for a in (q, prefix_k, prefix_v))
  group = q.shape[2] // prefix_k.shape[2]
  keys, values = np.repeat(prefix_k[0, :length], group, axis=1), np.repeat(prefix_v[0, :length], group, axis=1)
  scores = scale * np.einsum("btnh,snh->bnts", q, keys)
  top = scores.max(-1, keepdims=True)
  lse = top[..., 0] + np.log(np.exp(scores - top).sum(-1))
  out = np.einsum("bnts,snh->btnh", np.exp(scores - lse[..., None]), values)
  return out, lse


@pytest.mark.parametrize("name", PRECISIONS)
@HYPOTHESIS
@given(batch=st.integers(1, 3), seq=st.integers(1, 5), prefix=st.integers(1, 9), kv_heads=st.integers(1, 3),
       group=st.integers(1, 3), head_dim=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_merging_a_flash_prefix_block_equals_attention_over_the_concatenated_keys(
    name, batch, seq, prefix, kv_heads, group, head_dim, seed):
  """The cuDNN path's merge: the prefix block's normalised output and log-sum-exp, combined with the
  own-token block, give causal softmax attention over [prefix[:length]; own tokens]."""
  with precision(name) as (dtype, tolerance):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(3 * rng.standard_normal(shape), dtype)
    q, k, v = normal(batch, seq, kv_heads * group, head_dim), normal(batch, seq, kv_heads, head_dim), \
        normal(batch, seq, kv_heads, head_dim)
    prefix_k, prefix_v = normal(1, prefix, kv_heads, head_dim), normal(1, prefix, kv_heads, head_dim)
    length = int(rng.integers(1, prefix + 1))
    scale = head_dim ** -0.5
    block_out, block_lse = _flash_prefix_block(q, prefix_k, prefix_v, length, scale)
    actual = jax.jit(functools.partial(attention.merge_prefix_block, scale=scale))(
        jnp.asarray(block_out, dtype), jnp.asarray(block_lse, dtype), q, k, v)
    full_k = jnp.concatenate([jnp.broadcast_to(prefix_k[:, :length], (batch, length, kv_heads, head_dim)), k], 1)
    full_v = jnp.concatenate([jnp.broadcast_to(prefix_v[:, :length], (batch, length, kv_heads, head_dim)), v], 1)
    expected = numpy_attention(q, full_k, full_v, attention.causal_mask(seq, length + seq), scale, "softmax")
    assert actual.dtype == dtype and actual.shape == q.shape
    assert relative_error(actual, expected) <= tolerance


def test_cudnn_prefix_attention_refuses_what_it_cannot_run():
  """One-line errors: an unknown implementation; cuDNN for relaxed attention, off a GPU, or in float32."""
  q, k, v = (jnp.ones((2, 3, 4, 8), jnp.bfloat16), jnp.ones((2, 3, 2, 8), jnp.bfloat16),
             jnp.ones((2, 3, 2, 8), jnp.bfloat16))
  with pytest.raises(ValueError, match="unknown prefix attention implementation 'flash'"):
    attention.prefix_attention(q, k, v, k[:1], v[:1], implementation="flash")
  with pytest.raises(ValueError, match="computes softmax attention, not 'linear_relaxed'"):
    attention.prefix_attention(q, k, v, k[:1], v[:1], kind="linear_relaxed", implementation="cudnn")
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="needs a CUDA GPU; use 'xla'"):
      attention.prefix_attention(q, k, v, k[:1], v[:1], implementation="cudnn")
  else:
    with pytest.raises(ValueError, match="needs bfloat16 or float16 inputs"):
      attention.prefix_block_cudnn(q.astype(jnp.float32), k[:1], v[:1], scale=0.3)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN fused attention needs a CUDA GPU")
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_cudnn_prefix_attention_is_as_accurate_as_the_xla_path_on_a_gpu(kv_heads):
  """bfloat16, a padded prefix: against a float64 reference on the rounded inputs, the cuDNN path's error
  is within 2x of the XLA path's and under 1e-2 (its log-sum-exp is float32, not rounded to bfloat16)."""
  rng = np.random.default_rng(11)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  batch, seq, heads, dim, prefix, length = 6, 16, 4, 80, 256, 201
  q, k, v = normal(batch, seq, heads, dim), normal(batch, seq, kv_heads, dim), normal(batch, seq, kv_heads, dim)
  prefix_k, prefix_v = normal(1, prefix, kv_heads, dim), normal(1, prefix, kv_heads, dim)
  run = lambda implementation: jax.jit(functools.partial(attention.prefix_attention, implementation=implementation))(
      q, k, v, prefix_k, prefix_v, prefix_length=length)
  as64 = lambda a: np.asarray(a, np.float64)
  full_k = np.concatenate([np.broadcast_to(as64(prefix_k)[:, :length], (batch, length, kv_heads, dim)), as64(k)], 1)
  full_v = np.concatenate([np.broadcast_to(as64(prefix_v)[:, :length], (batch, length, kv_heads, dim)), as64(v)], 1)
  reference = numpy_attention(as64(q), full_k, full_v, np.asarray(attention.causal_mask(seq, length + seq)), None,
                              "softmax")
  fused, xla = run("cudnn"), run("xla")
  assert fused.dtype == jnp.bfloat16
  fused_error, xla_error = relative_error(fused, reference), relative_error(xla, reference)
  assert fused_error <= 2 * xla_error and fused_error <= 1e-2, (fused_error, xla_error)
