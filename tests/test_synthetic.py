"""Tests for dualform.synthetic: constructed LSA weights == one GD step (von Oswald et al.), and the
alignment measures score 1 on them and clearly less on random weights."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dualform import synthetic as syn


def relative_error(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-300))


def test_generator_defaults_layout_and_seeding():
  config = syn.RegressionConfig()
  assert (config.input_size, config.output_size, config.context_size) == (10, 1, 10)
  batch = syn.sample_regression_tasks(jax.random.key(0), 4)
  assert batch.tokens.shape == (4, 11, 11) and batch.targets.shape == (4, 1) and batch.weights.shape == (4, 1, 10)
  x, y = batch.tokens[:, :-1, :10], batch.tokens[:, :-1, 10:]
  np.testing.assert_allclose(y, jnp.einsum("boi,bci->bco", batch.weights, x), rtol=1e-6)
  np.testing.assert_array_equal(batch.tokens[:, -1, 10:], 0.0)  # the query's y-slot starts at 0
  assert float(jnp.max(jnp.abs(batch.tokens[:, :, :10]))) <= 0.5  # x ~ U(-1/2, 1/2)
  again = syn.sample_regression_tasks(jax.random.key(0), 4)
  np.testing.assert_array_equal(batch.tokens, again.tokens)
  other = syn.sample_regression_tasks(jax.random.key(1), 4)
  assert not np.array_equal(batch.tokens, other.tokens)


def test_one_step_hand_sized():
  # I = O = 1, C = 2, lr = 1: context (1, 2), (2, 4) (W = 2), query x = 1.
  # GD from 0: W_1 = (1/2) (2*1 + 4*2) = 5, so the prediction is 5.
  tokens = jnp.array([[[1.0, 2.0], [2.0, 4.0], [1.0, 0.0]]])
  weights = syn.create_weights(1, 1, 2, 1.0)
  np.testing.assert_array_equal(weights.query, [[1.0, 0.0], [0.0, 0.0]])
  np.testing.assert_array_equal(weights.value, [[0.0, 0.0], [0.0, -1.0]])
  np.testing.assert_array_equal(weights.projection, [[0.0, 0.0], [0.0, 0.5]])
  np.testing.assert_allclose(syn.gradient_descent_predict(tokens, 1.0), [[5.0]], rtol=1e-6)
  np.testing.assert_allclose(syn.lsa_predict(weights, tokens), [[5.0]], rtol=1e-6)


@functools.partial(jax.jit, static_argnames="sizes")
def one_step_sides(tokens, learning_rate, initial, sizes):
  input_size, output_size, context_size = sizes
  weights = syn.create_weights(input_size, output_size, context_size, learning_rate, initial, tokens.dtype)
  gd = syn.gradient_descent_predict(tokens, learning_rate, output_size, initial)
  query = tokens[:, -1, :input_size]
  start = jnp.zeros_like(gd) if initial is None else query @ initial.T  # W_0 x_q
  shifted = tokens.at[:, -1, input_size:].set(-start)
  return (syn.lsa_predict(weights, tokens, output_size), gd, gd - start,
          syn.lsa_predict(weights, shifted, output_size))


@settings(max_examples=10, deadline=None)
@given(sizes=st.sampled_from([(10, 1, 10), (4, 2, 7), (1, 3, 2)]), learning_rate=st.floats(0.01, 2.0),
       seed=st.integers(0, 2**31 - 1), from_zero=st.booleans())
def test_constructed_lsa_equals_one_gd_step(sizes, learning_rate, seed, from_zero):
  input_size, output_size, context_size = sizes
  config = syn.RegressionConfig(input_size=input_size, output_size=output_size, context_size=context_size)
  with jax.enable_x64(True):
    key, weight_key = jax.random.split(jax.random.key(seed))
    batch = syn.sample_regression_tasks(key, 16, config, dtype=jnp.float64)
    initial = None if from_zero else jax.random.normal(weight_key, (output_size, input_size), jnp.float64)
    lsa, gd, gd_update, shifted_lsa = one_step_sides(batch.tokens, learning_rate, initial, sizes)
    # From W_0 the layer writes the GD update (W_1 - W_0) x_q; from W_0 = 0 that is GD's prediction.
    assert relative_error(lsa, gd_update) <= 1e-10
    # With the query's y-slot started at -W_0 x_q, the read-out is the full prediction W_1 x_q.
    assert relative_error(shifted_lsa, gd) <= 1e-10


def test_gd_weight_is_the_closed_form_step():
  with jax.enable_x64(True):
    batch = syn.sample_regression_tasks(jax.random.key(3), 32, dtype=jnp.float64)
    inputs, outputs = batch.tokens[:, :-1, :10], batch.tokens[:, :-1, 10:]
    weight = syn.gradient_descent_weight(inputs, outputs, 0.3)
    expected = 0.3 / 10 * jnp.einsum("bco,bci->boi", outputs, inputs)  # -lr dL/dW at W = 0
    assert relative_error(weight, expected) <= 1e-12


def test_alignment_is_one_for_constructed_weights_and_below_for_random():
  learning_rate = 0.5
  with jax.enable_x64(True):
    batch = syn.sample_regression_tasks(jax.random.key(0), 32, dtype=jnp.float64)
    gd = functools.partial(syn.gradient_descent_predict, learning_rate=learning_rate)
    # One compilation for every set of weights (they are an argument, not a constant).
    measure = jax.jit(lambda weights, tokens: syn.alignment(functools.partial(syn.lsa_predict, weights), gd, tokens))
    constructed = syn.create_weights(10, 1, 10, learning_rate, dtype=jnp.float64)
    exact = measure(constructed, batch.tokens)
    np.testing.assert_allclose(exact.prediction_update_cosine, 1.0, rtol=1e-10)
    np.testing.assert_allclose(exact.sensitivity_cosine, 1.0, rtol=1e-10)
    assert float(exact.prediction_distance) <= 1e-12 and float(exact.sensitivity_distance) <= 1e-12
    for seed in range(2):
      random = syn.random_weights(jax.random.key(100 + seed), 11, dtype=jnp.float64)
      measures = measure(random, batch.tokens)
      assert float(measures.prediction_update_cosine) < 0.9
      assert float(measures.sensitivity_cosine) < 0.9
      assert float(measures.sensitivity_distance) > 0.01


def test_setting_states_give_unit_update_cosines_for_constructed_weights():
  learning_rate = 0.5
  with jax.enable_x64(True):
    batch = syn.sample_regression_tasks(jax.random.key(1), 32, dtype=jnp.float64)
    constructed = syn.create_weights(10, 1, 10, learning_rate, dtype=jnp.float64)
    states_of = jax.jit(lambda weights, tokens: syn.setting_states(weights, tokens, learning_rate))
    states = states_of(constructed, batch.tokens)
    assert states.zero_shot.shape == states.in_context.shape == states.finetuned.shape == (32, 11)
    assert relative_error(states.in_context, states.finetuned) <= 1e-10
    np.testing.assert_allclose(syn.update_cosines(states), 1.0, rtol=1e-10)
    random = syn.random_weights(jax.random.key(7), 11, dtype=jnp.float64)
    assert float(jnp.mean(syn.update_cosines(states_of(random, batch.tokens)))) < 0.9


def test_float32_highest_precision_and_jit():
  with jax.default_matmul_precision("highest"):
    batch = syn.sample_regression_tasks(jax.random.key(2), 16)
    weights = syn.create_weights(10, 1, 10, 0.1)
    lsa = jax.jit(syn.lsa_predict)(weights, batch.tokens)
    assert relative_error(lsa, syn.lsa_predict(weights, batch.tokens)) <= 1e-5  # jit == eager
    assert relative_error(lsa, jax.jit(syn.gradient_descent_predict)(batch.tokens, 0.1)) <= 1e-5
    gradient = jax.jit(jax.grad(lambda w: jnp.sum(syn.lsa_predict(w, batch.tokens))))(weights)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in gradient)


def test_bad_inputs_raise_one_line_value_errors():
  cases = [
      lambda: syn.RegressionConfig(input_size=0),
      lambda: syn.RegressionConfig(input_range=-1.0),
      lambda: syn.sample_regression_tasks(jax.random.key(0), 0),
      lambda: syn.create_weights(3, 1, 4, 0.1, jnp.ones((2, 3))),
      lambda: syn.lsa_forward(syn.create_weights(3, 1, 4, 0.1), jnp.ones((2, 5, 5))),
      lambda: syn.gradient_descent_predict(jnp.ones((2, 5, 4)), 0.1, output_size=4),
  ]
  for case in cases:
    with pytest.raises(ValueError) as error:
      case()
    assert "\n" not in str(error.value)
