"""Tests for momentum attention (PROTOCOL §11): the lax.scan recurrence (and the associative scan)
against the closed form.

``MoAttn(V, K, q_t) = Attn(V, K, q_t) + sum_{i<t} eta**(t-i) v_i``, per key/value head, queries the last
T of the S keys. float64 at relative error <= 1e-10, float32 under matmul precision "highest" at <= 1e-5.
"""


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
# (batch, queries T, keys S >= T, kv heads K, group G, head dim H)
SHAPES = ((1, 1, 1, 1, 1, 1), (2, 4, 4, 1, 1, 3), (1, 2, 6, 2, 2, 2), (2, 3, 5, 2, 3, 4), (1, 5, 7, 1, 2, 3))


def random_inputs(shape, seed, dtype):
  batch, queries, keys, kv_heads, group, head_dim = shape
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((batch, queries, kv_heads * group, head_dim))
  k = rng.standard_normal((batch, keys, kv_heads, head_dim))
  v = rng.standard_normal((batch, keys, kv_heads, head_dim))
  return tuple(jnp.asarray(a, dtype) for a in (q, k, v))


def numpy_momenta(v, eta):
  """Direct double loop: m_j = sum_{i<j} eta_k**(j-i) v_i for each kv head k."""
  v = np.asarray(v, np.float64)
  eta = np.broadcast_to(np.asarray(eta, np.float64), (v.shape[2],))
  momenta = np.zeros_like(v)
  for j in range(v.shape[1]):
    for i in range(j):
      momenta[:, j] += eta[None, :, None] ** (j - i) * v[:, i]
  return momenta


def test_momentum_hand_sized():
  # v = (1, 2, 3), eta = 1/2: m_0 = 0, m_1 = 0.5 * 1, m_2 = 0.25 * 1 + 0.5 * 2 = 1.25.
  v = jnp.array([1.0, 2.0, 3.0]).reshape(1, 3, 1, 1)
  np.testing.assert_array_equal(attention.momentum_values(v, 0.5)[0, :, 0, 0], [0.0, 0.5, 1.25])
  np.testing.assert_array_equal(attention.momentum_values_closed_form(v, 0.5)[0, :, 0, 0], [0.0, 0.5, 1.25])
  np.testing.assert_array_equal(attention.momentum_values_associative(v, 0.5)[0, :, 0, 0], [0.0, 0.5, 1.25])
  # Two queries = the last two keys (positions 1 and 2); keys all zero, so softmax averages the visible values.
  q, k = jnp.ones((1, 2, 1, 1)), jnp.zeros((1, 3, 1, 1))
  out = attention.momentum_attention(q, k, v, eta=0.5, mask=attention.causal_mask(2, 3))
  np.testing.assert_allclose(out[0, :, 0, 0], [1.5 + 0.5, 2.0 + 1.25], rtol=1e-6)


@jax.jit
def all_momenta(v, eta):
  return (attention.momentum_values(v, eta), attention.momentum_values_closed_form(v, eta),
          attention.momentum_values_associative(v, eta))


@pytest.mark.parametrize("name", PRECISIONS)
@HYPOTHESIS
@given(shape=st.sampled_from(SHAPES), per_head=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_scan_matches_closed_form(name, shape, per_head, seed):
  with precision(name) as (dtype, tolerance):
    _, _, v = random_inputs(shape, seed, dtype)
    rng = np.random.default_rng(seed + 1)
    eta = jnp.asarray(rng.uniform(0.0, 0.99, shape[3]) if per_head else rng.uniform(0.0, 0.99), dtype)
    scanned, closed, associative = all_momenta(v, eta)
    assert scanned.dtype == dtype and associative.dtype == dtype
    assert relative_error(scanned, closed) <= tolerance
    assert relative_error(associative, closed) <= tolerance
    if shape[2] > 1:  # with one key every momentum is exactly zero
      assert relative_error(scanned, numpy_momenta(v, eta)) <= tolerance


@jax.jit
def momentum_sides(q, k, v, eta):
  mask = attention.causal_mask(q.shape[1], k.shape[1])
  softmax_out = attention.softmax_attention(q, k, v, mask=mask)
  return (attention.momentum_attention(q, k, v, eta=eta, mask=mask), softmax_out,
          attention.add_momentum(softmax_out, v, eta, method="associative_scan"))


@pytest.mark.parametrize("name", PRECISIONS)
@HYPOTHESIS
@given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**31 - 1))
def test_momentum_attention_adds_momenta_to_each_query_head(name, shape, seed):
  with precision(name) as (dtype, tolerance):
    q, k, v = random_inputs(shape, seed, dtype)
    eta = jnp.asarray(np.random.default_rng(seed + 2).uniform(0.1, 0.9, shape[3]), dtype)
    out, softmax_out, associative = momentum_sides(q, k, v, eta)
    assert relative_error(associative, out) <= tolerance
    # Query t sits at key index S - T + t; query head n reads kv head n // G.
    momenta = numpy_momenta(v, eta)[:, shape[2] - shape[1]:]
    expected = np.asarray(softmax_out, np.float64) + np.repeat(
        momenta, shape[4], axis=2)
    assert relative_error(out, expected) <= tolerance


@jax.jit
def zero_eta_sides(q, k, v):
  mask = attention.causal_mask(q.shape[1], k.shape[1])
  return (attention.momentum_attention(q, k, v, eta=0.0, mask=mask), attention.softmax_attention(q, k, v, mask=mask))


@HYPOTHESIS
@given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**31 - 1))
def test_zero_eta_is_plain_softmax_attention(shape, seed):
  q, k, v = random_inputs(shape, seed, jnp.float32)
  np.testing.assert_array_equal(*zero_eta_sides(q, k, v))


@pytest.mark.parametrize("name", PRECISIONS)
def test_jit_matches_eager(name):
  with precision(name) as (dtype, tolerance):
    _, _, v = random_inputs((2, 4, 6, 2, 2, 3), 3, dtype)
    eta = jnp.asarray([0.3, 0.8], dtype)
    for function in (attention.momentum_values, attention.momentum_values_closed_form,
                     attention.momentum_values_associative):
      assert relative_error(jax.jit(function)(v, eta), function(v, eta)) <= tolerance


def test_gradients_match_closed_form_and_finite_differences():
  with jax.enable_x64(True):
    _, _, v = random_inputs((1, 4, 5, 2, 1, 2), 4, jnp.float64)
    eta = 0.6
    # d m_j / d eta = sum_{i<j} (j - i) eta**(j-i-1) v_i; summed over everything.
    gradient = jax.grad(lambda e: jnp.sum(attention.momentum_values(v, e)))(eta)
    values = np.asarray(v)
    expected = sum((j - i) * eta ** (j - i - 1) * values[:, i].sum() for j in range(5) for i in range(j))
    np.testing.assert_allclose(gradient, expected, rtol=1e-12)
    gradient = jax.grad(lambda e: jnp.sum(attention.momentum_values_associative(v, e)))(eta)
    np.testing.assert_allclose(gradient, expected, rtol=1e-12)
    for function in (attention.momentum_values, attention.momentum_values_closed_form,
                     attention.momentum_values_associative):
      check_grads(jax.jit(function), (v, jnp.asarray([0.3, 0.7])), order=1, modes=("rev",))


def test_unknown_method_and_missing_eta_raise_one_line_value_errors():
  q, k, v = random_inputs((1, 2, 2, 1, 1, 2), 0, jnp.float32)
  for case in (lambda: attention.add_momentum(q, v, 0.5, method="fft"),
               lambda: attention.attention(q, k, v, kind="momentum")):
    with pytest.raises(ValueError) as error:
      case()
    assert "\n" not in str(error.value)
