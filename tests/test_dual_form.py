"""Tests for dualform.dual_form: every identity of PROTOCOL §10, hand-sized and property-based.

Identities run in float64 (relative error <= 1e-10) and in float32 under matmul precision "highest"
(<= 1e-5). Relative error is ``max|a - b| / max|b|``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st
from jax.test_util import check_grads

from dualform import attention
from dualform import dual_form as df
from numerics import precision, relative_error

PRECISIONS = ("float64", "float32")
HYPOTHESIS = settings(max_examples=15, deadline=None)


def normal(rng, shape, dtype, scale=1.0):
  return jnp.asarray(rng.standard_normal(shape) * scale, dtype)


# A pool of shapes (batch, demos, queries, kv_heads, group, head_dim, value_dim, model_dim) covering single
# head, multi-head, grouped-query (G = 2, 3) and multi-query layouts; hypothesis draws a shape and a seed.
# A fixed pool keeps the number of distinct shapes, hence XLA compilations, small.
SHAPES = (
    (1, 1, 1, 1, 1, 1, 1, 1),
    (2, 4, 3, 1, 1, 3, 2, 5),
    (1, 5, 2, 2, 2, 2, 3, 4),
    (2, 3, 4, 1, 3, 4, 4, 3),
    (1, 6, 1, 2, 1, 3, 3, 6),
    (2, 2, 2, 2, 3, 2, 1, 4),
)
SHAPE_NAMES = ("batch", "demos", "queries", "kv_heads", "group", "head_dim", "value_dim", "model_dim")


@st.composite
def attention_shapes(draw):
  """One shape of SHAPES as a dict, plus a seed."""
  shape = dict(zip(SHAPE_NAMES, draw(st.sampled_from(SHAPES))))
  return dict(shape, seed=draw(st.integers(0, 2**31 - 1)))


def random_problem(shape, dtype, biases=False):
  rng = np.random.default_rng(shape["seed"])
  d, k, n = shape["model_dim"], shape["kv_heads"], shape["kv_heads"] * shape["group"]
  h, v = shape["head_dim"], shape["value_dim"]
  problem = dict(
      query_kernel=normal(rng, (d, n, h), dtype), key_kernel=normal(rng, (d, k, h), dtype),
      value_kernel=normal(rng, (d, k, v), dtype),
      demo_tokens=normal(rng, (shape["batch"], shape["demos"], d), dtype),
      tokens=normal(rng, (shape["batch"], shape["queries"], d), dtype))
  if biases:
    problem.update(query_bias=normal(rng, (n, h), dtype), key_bias=normal(rng, (k, h), dtype),
                   value_bias=normal(rng, (k, v), dtype))
  return problem


def linear_attention_over_concatenation(problem, causal):
  """The left-hand side: relaxed linear attention of W_Q x over [X'; X] via the attention core."""
  both = jnp.concatenate([problem["demo_tokens"], problem["tokens"]], axis=1)
  queries = df.project(problem["tokens"], problem["query_kernel"], problem.get("query_bias"))
  keys = df.project(both, problem["key_kernel"], problem.get("key_bias"))
  values = df.project(both, problem["value_kernel"], problem.get("value_bias"))
  mask = attention.causal_mask(queries.shape[1], keys.shape[1]) if causal else None
  return attention.linear_attention(queries, keys, values, mask=mask)


# ---------------------------------------------------------------------------------------------------
# Identity 1: relaxed linear attention over [X'; X] == (W_ZSL + dW_ICL) q.


def test_icl_identity_hand_sized():
  # Identity kernels (one head, D = H = 2): keys = values = queries = tokens.
  eye = jnp.eye(2)[:, None, :]  # [D, 1, H]
  demo_tokens = jnp.array([[[1.0, 2.0]]])  # X' = {(1, 2)}
  tokens = jnp.array([[[0.0, 1.0]]])  # X = {(0, 1)}, q = (0, 1)
  zero_shot = df.zero_shot_weight(eye, eye, tokens)[0, 0]
  icl = df.icl_meta_gradient(eye, eye, demo_tokens)[0, 0]
  np.testing.assert_array_equal(zero_shot, [[0.0, 0.0], [0.0, 1.0]])  # x x^T
  np.testing.assert_array_equal(icl, [[1.0, 2.0], [2.0, 4.0]])  # x' x'^T
  # (1, 2) * ((1, 2) . q) + (0, 1) * ((0, 1) . q) = (2, 5)
  expected = [[[[2.0, 5.0]]]]
  np.testing.assert_array_equal(df.dual_form_output(eye, eye, eye, demo_tokens, tokens), expected)
  problem = dict(query_kernel=eye, key_kernel=eye, value_kernel=eye, demo_tokens=demo_tokens, tokens=tokens)
  np.testing.assert_array_equal(linear_attention_over_concatenation(problem, causal=True), expected)


# Each randomized check computes both sides in one jitted function: one compilation per shape and precision
# (hypothesis repeats shapes from SHAPES), instead of one per eager operation.


@functools.partial(jax.jit, static_argnames="causal")
def icl_sides(problem, causal):
  return df.dual_form_output(**problem, causal=causal), linear_attention_over_concatenation(problem, causal)


@pytest.mark.parametrize("name", PRECISIONS)
@pytest.mark.parametrize("causal", [True, False])
@HYPOTHESIS
@given(shape=attention_shapes())
def test_icl_identity_random(name, causal, shape):
  with precision(name) as (dtype, tolerance):
    problem = random_problem(shape, dtype, biases=True)  # the hand-sized case has no biases
    actual, expected = icl_sides(problem, causal)
    assert actual.shape == expected.shape and actual.dtype == dtype
    assert relative_error(actual, expected) <= tolerance


@jax.jit
def prefix_sides(keys, values):
  direct = [df.meta_gradient(keys[:, :t + 1], values[:, :t + 1]) for t in range(keys.shape[1])]
  return df.causal_meta_gradients(keys, values), jnp.stack(direct, axis=1)


@pytest.mark.parametrize("name", PRECISIONS)
@HYPOTHESIS
@given(shape=attention_shapes())
def test_causal_meta_gradients_are_prefix_sums(name, shape):
  with precision(name) as (dtype, tolerance):
    problem = random_problem(shape, dtype)
    keys = df.project(problem["tokens"], problem["key_kernel"])
    values = df.project(problem["tokens"], problem["value_kernel"])
    prefix, direct = prefix_sides(keys, values)
    assert relative_error(prefix, direct) <= tolerance


def test_meta_gradient_mask_drops_tokens():
  rng = np.random.default_rng(0)
  keys, values = normal(rng, (2, 5, 2, 3), jnp.float32), normal(rng, (2, 5, 2, 4), jnp.float32)
  mask = jnp.array([[True, True, False, True, False]] * 2)
  keep = np.array([0, 1, 3])
  with jax.default_matmul_precision("highest"):
    masked = df.meta_gradient(keys, values, mask)
    kept = df.meta_gradient(keys[:, keep], values[:, keep])
  assert relative_error(masked, kept) <= 1e-6


def test_split_heads_matches_model_layout():
  """split_heads on a [D, K*H] kernel gives the heads the model gets by reshaping x @ kernel."""
  rng = np.random.default_rng(1)
  with jax.enable_x64(True):
    kernel, tokens = normal(rng, (6, 3 * 4), jnp.float64), normal(rng, (2, 5, 6), jnp.float64)
    model_heads = (tokens @ kernel).reshape(2, 5, 3, 4)  # as dualform.models.transformer does
    np.testing.assert_allclose(df.project(tokens, df.split_heads(kernel, 3)), model_heads, rtol=1e-12)
    bias = normal(rng, (12,), jnp.float64)
    np.testing.assert_array_equal(df.split_heads(bias, 3), bias.reshape(3, 4))


# ---------------------------------------------------------------------------------------------------
# Identity FT: (W_V + dW_V) X X^T (W_K + dW_K)^T q == (W_ZSL + dW_FT) q.


def test_finetune_identity_hand_sized():
  eye = jnp.eye(2)[:, None, :]  # [D, 1, H]
  key_delta = jnp.array([[0.0, 0.0], [1.0, 0.0]])[:, None, :]  # x2 = (0, 1) -> key (1, 1)
  value_delta = jnp.array([[0.0, 1.0], [0.0, 0.0]])[:, None, :]  # x1 = (1, 0) -> value (1, 1)
  tokens = jnp.eye(2)[None]  # X = {(1, 0), (0, 1)}
  delta = df.finetune_delta(eye, eye, key_delta, value_delta, tokens)[0, 0]
  # Finetuned sum_s v_s k_s^T = (1,1)(1,0)^T + (0,1)(1,1)^T = [[1,0],[2,1]]; W_ZSL = I.
  np.testing.assert_array_equal(delta, [[0.0, 0.0], [2.0, 0.0]])
  query = jnp.array([[[[1.0, 2.0]]]])  # [B, T, N, H]
  zero_shot = df.zero_shot_weight(eye, eye, tokens)
  # (1,1) * ((1,0).q) + (0,1) * ((1,1).q) = (1, 4)
  np.testing.assert_array_equal(df.apply_weight(zero_shot + delta, query), [[[[1.0, 4.0]]]])


@jax.jit
def finetune_sides(problem, key_delta, value_delta):
  """(W_ZSL + dW_FT) q; the finetuned layer's relaxed attention over X; dW_FT two ways; W_ZSL + dW_FT."""
  tokens, key_kernel, value_kernel = problem["tokens"], problem["key_kernel"], problem["value_kernel"]
  queries = df.project(tokens, problem["query_kernel"])
  finetuned = attention.linear_attention(queries, df.project(tokens, key_kernel + key_delta),
                                         df.project(tokens, value_kernel + value_delta))
  zero_shot = df.zero_shot_weight(key_kernel, value_kernel, tokens)
  delta = df.finetune_delta(key_kernel, value_kernel, key_delta, value_delta, tokens)
  general = df.finetune_delta_from_keys_values(
      df.project(tokens, key_kernel), df.project(tokens, value_kernel),
      df.project(tokens, key_kernel + key_delta), df.project(tokens, value_kernel + value_delta))
  return df.apply_weight(zero_shot + delta, queries), finetuned, delta, general, zero_shot + delta


@pytest.mark.parametrize("name", PRECISIONS)
@HYPOTHESIS
@given(shape=attention_shapes())
def test_finetune_identity_random(name, shape):
  with precision(name) as (dtype, tolerance):
    problem = random_problem(shape, dtype)
    rng = np.random.default_rng(shape["seed"] + 1)
    key_delta = normal(rng, problem["key_kernel"].shape, dtype, 0.3)
    value_delta = normal(rng, problem["value_kernel"].shape, dtype, 0.3)
    dual, finetuned, delta, general, finetuned_weight = finetune_sides(problem, key_delta, value_delta)
    assert relative_error(dual, finetuned) <= tolerance
    # The difference form cancels W_ZSL, so compare against the scale of the finetuned weight.
    scale = np.max(np.abs(np.asarray(finetuned_weight, np.float64)))
    assert np.max(np.abs(np.asarray(general - delta, np.float64))) <= tolerance * scale


def test_layer_meta_gradients_stack_per_layer_and_head():
  rng = np.random.default_rng(2)
  with jax.enable_x64(True):
    keys = [normal(rng, (1, 4, 2, 3), jnp.float64) for _ in range(3)]
    values = [normal(rng, (1, 4, 2, 3), jnp.float64) for _ in range(3)]
    stacked = df.layer_meta_gradients(keys, values)
    assert stacked.shape == (3, 1, 2, 3, 3)
    for layer in range(3):
      for head in range(2):
        expected = np.asarray(values[layer][0, :, head]).T @ np.asarray(keys[layer][0, :, head])
        np.testing.assert_allclose(stacked[layer, 0, head], expected, rtol=1e-12)


def test_weight_cosine_hand_sized():
  eye = jnp.eye(2)
  swap = jnp.array([[0.0, 1.0], [1.0, 0.0]])
  np.testing.assert_allclose(df.weight_cosine(jnp.stack([eye, eye, eye]), jnp.stack([2 * eye, -eye, swap])),
                             [1.0, -1.0, 0.0], atol=1e-7)


# ---------------------------------------------------------------------------------------------------
# Identity GD: SGD on a linear layer == W_0 x + LinearAttn(E, X, x), checked against a real optax run.


def squared_error(outputs, target):
  return 0.5 * jnp.sum((outputs - target) ** 2)


def softmax_cross_entropy(outputs, target):
  return optax.softmax_cross_entropy(outputs, jax.nn.softmax(target))


def run_sgd(initial_weight, inputs, targets, learning_rate, loss_of_output):
  """Real optax.sgd at batch 1 on ``y = W x``; returns the final weight and each step's dL/dy at that step."""
  optimizer = optax.sgd(learning_rate)
  params = {"weight": initial_weight}
  state = optimizer.init(params)
  loss = lambda p, x, y: loss_of_output(p["weight"] @ x, y)
  output_gradients = []
  for x, y in zip(inputs, targets):
    output_gradients.append(jax.grad(loss_of_output)(params["weight"] @ x, y))
    updates, state = optimizer.update(jax.grad(loss)(params, x, y), state, params)
    params = optax.apply_updates(params, updates)
  return params["weight"], jnp.stack(output_gradients)


def test_gradient_descent_dual_hand_sized():
  # W_0 = 0, lr = 0.5. Step 1: x=(1,0), y=2 -> g=-2, e=1, W=(1,0). Step 2: x=(1,1), y=0 -> g=1, e=-0.5.
  inputs, targets = jnp.array([[1.0, 0.0], [1.0, 1.0]]), jnp.array([[2.0], [0.0]])
  weight, gradients = run_sgd(jnp.zeros((1, 2)), inputs, targets, 0.5, squared_error)
  np.testing.assert_array_equal(gradients, [[-2.0], [1.0]])
  errors = df.error_signals(gradients, 0.5)
  np.testing.assert_array_equal(errors, [[1.0], [-0.5]])
  np.testing.assert_array_equal(weight, [[0.5, -0.5]])
  # W x at x = (2, 0): 0 + 1 * ((1,0).x) - 0.5 * ((1,1).x) = 1
  np.testing.assert_array_equal(df.gradient_descent_dual_output(jnp.zeros((1, 2)), errors, inputs,
                                                                jnp.array([2.0, 0.0])), [1.0])


@functools.partial(jax.jit, static_argnames="loss_of_output")
def gradient_descent_sides(initial, inputs, targets, test_inputs, learning_rate, loss_of_output):
  weight, gradients = run_sgd(initial, inputs, targets, learning_rate, loss_of_output)
  errors = df.error_signals(gradients, learning_rate)
  return df.gradient_descent_dual_output(initial, errors, inputs, test_inputs), test_inputs @ weight.T


@pytest.mark.parametrize("name", PRECISIONS)
@pytest.mark.parametrize("loss_of_output", [squared_error, softmax_cross_entropy])
@HYPOTHESIS
@given(sizes=st.sampled_from([(1, 1, 1), (1, 3, 4), (3, 2, 5), (4, 5, 3)]),
       learning_rate=st.floats(0.01, 0.5), seed=st.integers(0, 2**31 - 1))
def test_gradient_descent_dual_matches_optax_sgd(name, loss_of_output, sizes, learning_rate, seed):
  out_dim, in_dim, steps = sizes  # (output dim, input dim, SGD steps at batch 1)
  with precision(name) as (dtype, tolerance):
    rng = np.random.default_rng(seed)
    initial = normal(rng, (out_dim, in_dim), dtype)
    inputs, targets = normal(rng, (steps, in_dim), dtype), normal(rng, (steps, out_dim), dtype)
    test_inputs = normal(rng, (3, in_dim), dtype)
    dual, trained = gradient_descent_sides(initial, inputs, targets, test_inputs, learning_rate, loss_of_output)
    assert relative_error(dual, trained) <= tolerance


@jax.jit
def sgd_step_sides(problem, learning_rate):
  """One optax SGD step on meta_gradient_loss from W_ZSL (inputs: demo keys, errors: demo values)."""
  keys = df.project(problem["demo_tokens"], problem["key_kernel"])[0, :, 0]  # [S, H]
  values = df.project(problem["demo_tokens"], problem["value_kernel"])[0, :, 0]  # [S, V]
  zero_shot = df.zero_shot_weight(problem["key_kernel"], problem["value_kernel"], problem["tokens"])[0, 0]
  optimizer = optax.sgd(learning_rate)
  gradient = jax.grad(df.meta_gradient_loss)(zero_shot, keys, values, learning_rate)
  updates, _ = optimizer.update(gradient, optimizer.init(zero_shot))
  stepped = optax.apply_updates(zero_shot, updates)
  icl = df.icl_meta_gradient(problem["key_kernel"], problem["value_kernel"], problem["demo_tokens"])[0, 0]
  queries = df.project(problem["tokens"], problem["query_kernel"])[0, :, 0]  # [T, H]
  expected = linear_attention_over_concatenation(problem, causal=False)[0, :, 0]
  return stepped, zero_shot + icl, queries @ stepped.T, expected


@pytest.mark.parametrize("name", PRECISIONS)
@HYPOTHESIS
@given(shape=attention_shapes(), learning_rate=st.floats(0.01, 2.0))
def test_one_sgd_step_from_zero_shot_weight_is_attention(name, shape, learning_rate):
  shape = dict(shape, batch=1, kv_heads=1, group=1)
  with precision(name) as (dtype, tolerance):
    problem = random_problem(shape, dtype)
    stepped, summed, output, expected = sgd_step_sides(problem, learning_rate)
    assert relative_error(stepped, summed) <= tolerance
    assert relative_error(output, expected) <= tolerance


# ---------------------------------------------------------------------------------------------------
# jit == eager, gradients flow, errors.


@pytest.mark.parametrize("name", PRECISIONS)
def test_jit_matches_eager(name):
  shape = dict(batch=2, demos=5, queries=3, kv_heads=2, group=2, head_dim=3, value_dim=4, model_dim=6, seed=3)
  with precision(name) as (dtype, tolerance):
    problem = random_problem(shape, dtype, biases=True)
    for causal in (True, False):
      eager = df.dual_form_output(**problem, causal=causal)
      jitted = jax.jit(df.dual_form_output, static_argnames="causal")(**problem, causal=causal)
      assert relative_error(jitted, eager) <= tolerance
    args = (problem["key_kernel"], problem["value_kernel"], 0.1 * problem["key_kernel"],
            0.1 * problem["value_kernel"], problem["tokens"])
    assert relative_error(jax.jit(df.finetune_delta)(*args), df.finetune_delta(*args)) <= tolerance
    rng = np.random.default_rng(4)
    gd_args = (normal(rng, (2, 3), dtype), normal(rng, (4, 2), dtype), normal(rng, (4, 3), dtype),
               normal(rng, (5, 3), dtype))
    assert relative_error(jax.jit(df.gradient_descent_dual_output)(*gd_args),
                          df.gradient_descent_dual_output(*gd_args)) <= tolerance


def test_gradients_flow_through_every_function():
  shape = dict(batch=1, demos=3, queries=2, kv_heads=1, group=2, head_dim=2, value_dim=2, model_dim=3, seed=5)
  with jax.enable_x64(True):
    p = random_problem(shape, jnp.float64, biases=True)
    rng = np.random.default_rng(6)
    keys, values = df.project(p["tokens"], p["key_kernel"]), df.project(p["tokens"], p["value_kernel"])
    functions = {
        "split_heads": (lambda w: df.split_heads(w, 2), normal(rng, (3, 4), jnp.float64)),
        "project": (lambda x: df.project(x, p["key_kernel"], p["key_bias"]), p["tokens"]),
        "meta_gradient": (lambda k: df.meta_gradient(k, values), keys),
        "causal_meta_gradients": (lambda k: df.causal_meta_gradients(k, values), keys),
        "zero_shot_weight": (lambda w: df.zero_shot_weight(w, p["value_kernel"], p["tokens"]), p["key_kernel"]),
        "icl_meta_gradient": (lambda w: df.icl_meta_gradient(p["key_kernel"], w, p["demo_tokens"]),
                              p["value_kernel"]),
        "apply_weight": (lambda w: df.apply_weight(w, df.project(p["tokens"], p["query_kernel"])),
                         df.meta_gradient(keys, values)),
        "dual_form_output": (lambda x: df.dual_form_output(p["query_kernel"], p["key_kernel"], p["value_kernel"],
                                                           x, p["tokens"]), p["demo_tokens"]),
        "finetune_delta": (lambda d: df.finetune_delta(p["key_kernel"], p["value_kernel"], d, d, p["tokens"]),
                           0.1 * p["key_kernel"]),
        "finetune_delta_from_keys_values": (lambda k: df.finetune_delta_from_keys_values(keys, values, k, values),
                                            keys),
        "layer_meta_gradients": (lambda k: df.layer_meta_gradients([k, k], [values, values]), keys),
        "weight_cosine": (lambda w: df.weight_cosine(w, jnp.ones_like(w)), normal(rng, (2, 3, 3), jnp.float64)),
        "error_signals": (lambda g: df.error_signals(g, 0.3), normal(rng, (4, 2), jnp.float64)),
        "linear_attention_single": (lambda v: df.linear_attention_single(v, p["tokens"][0], p["tokens"][0]),
                                    normal(rng, (2, 4), jnp.float64)),
        "gradient_descent_dual_output": (
            lambda w: df.gradient_descent_dual_output(w, jnp.ones((4, 2)), jnp.ones((4, 3)), jnp.ones((3,))),
            normal(rng, (2, 3), jnp.float64)),
        "meta_gradient_loss": (lambda w: df.meta_gradient_loss(w, jnp.ones((4, 3)), jnp.ones((4, 2)), 0.5),
                               normal(rng, (2, 3), jnp.float64)),
    }
    for name, (function, argument) in functions.items():
      gradient = jax.jit(jax.grad(lambda a: jnp.sum(jnp.sin(function(a)))))(argument)
      assert gradient.shape == argument.shape and bool(jnp.all(jnp.isfinite(gradient))), name
    # Finite differences, and a closed form: d/dW of sum(W q) over queries q_t is sum_t 1 q_t^T.
    check_grads(jax.jit(lambda x: df.dual_form_output(p["query_kernel"], p["key_kernel"], p["value_kernel"], x,
                                                      p["tokens"])), (p["demo_tokens"],), order=1, modes=("rev",))
    queries = normal(rng, (1, 4, 1, 3), jnp.float64)
    gradient = jax.grad(lambda w: jnp.sum(df.apply_weight(w, queries)))(jnp.zeros((1, 2, 3)))
    np.testing.assert_allclose(gradient[0], np.ones((2, 1)) * np.asarray(queries).sum(axis=(0, 1, 2))[None],
                               rtol=1e-12)


def test_bad_inputs_raise_one_line_value_errors():
  tokens = jnp.ones((1, 3, 4))
  cases = [
      lambda: df.split_heads(jnp.ones((4, 6)), 4),
      lambda: df.project(tokens, jnp.ones((4, 6))),
      lambda: df.project(tokens, jnp.ones((5, 1, 6))),
      lambda: df.meta_gradient(jnp.ones((3, 1, 2)), jnp.ones((4, 1, 2))),
      lambda: df.apply_weight(jnp.ones((2, 3, 3)), jnp.ones((1, 2, 3, 3))),
      lambda: df.layer_meta_gradients([], []),
      lambda: df.weight_cosine(jnp.ones((2, 2)), jnp.ones((3, 3))),
      lambda: df.linear_attention_single(jnp.ones((3, 2)), jnp.ones((4, 2)), jnp.ones((1, 2))),
      lambda: df.gradient_descent_dual_output(jnp.ones((3, 3)), jnp.ones((4, 2)), jnp.ones((4, 3)),
                                              jnp.ones((3,))),
  ]
  for case in cases:
    with pytest.raises(ValueError) as error:
      case()
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------------
# Materialising dW_ICL from a model: a tiny Transformer whose layer 0 uses relaxed linear attention.


@pytest.mark.parametrize("family", ["fairseq_dense", "llama"])
def test_dual_form_reproduces_a_model_layer(family):
  """Layer 0's attention output over [demos; query] equals o_proj((W_ZSL + dW_ICL) q), with dW_ICL built from
  the model's K/V kernels (fairseq: biases) or from its prefix cache (llama: RoPE keys, GQA)."""
  from dualform.models import config as model_config
  from dualform.models import transformer

  with jax.enable_x64(True):
    config = model_config.tiny_config(family, dtype="float64", param_dtype="float64")
    model = transformer.set_attention(transformer.build_model(config, seed=0), "linear_relaxed", layers=(0,))
    rng = np.random.default_rng(0)
    demos = jnp.asarray(rng.integers(0, config.vocab_size, (1, 5)), jnp.int32)
    query_tokens = jnp.asarray(rng.integers(0, config.vocab_size, (1, 3)), jnp.int32)
    cache = model.encode_prefix(demos)
    recorded = model.forward(query_tokens, cache=cache, record=transformer.RecordSpec(attn_out=True),
                             record_positions=jnp.arange(3)[None], return_cache=True)
    attn = model.layers[0].attn
    heads, kv_heads = config.num_heads, config.num_kv_heads
    kernel = lambda projection, count: df.split_heads(projection.kernel[...], count)
    bias = lambda projection, count: df.split_heads(projection.bias[...], count) if config.use_bias else None
    positions = model.default_positions(1, 3, offset=5)
    normed = model.layers[0].attn_norm(model.embed_tokens(query_tokens, positions))
    queries = df.project(normed, kernel(attn.q_proj, heads), bias(attn.q_proj, heads))  # [1, T, N, H]
    icl = df.layer_meta_gradients(cache.keys, cache.values)[0]  # [1, K, H, H]
    if family == "fairseq_dense":  # no RoPE: rebuild everything from the K/V kernels and biases
      demo_normed = model.layers[0].attn_norm(model.embed_tokens(demos, model.default_positions(1, 5)))
      args = dict(key_bias=bias(attn.k_proj, kv_heads), value_bias=bias(attn.v_proj, kv_heads))
      from_kernels = df.icl_meta_gradient(kernel(attn.k_proj, kv_heads), kernel(attn.v_proj, kv_heads),
                                          demo_normed, **args)
      assert relative_error(from_kernels, icl) <= 1e-10
      out = df.dual_form_output(kernel(attn.q_proj, heads), kernel(attn.k_proj, kv_heads),
                                kernel(attn.v_proj, kv_heads), demo_normed, normed,
                                query_bias=bias(attn.q_proj, heads), **args)
    else:  # RoPE: keys and queries rotated at their positions; W_ZSL from this call's cached keys/values
      queries = transformer.apply_rope(queries, positions, config.rope_theta)
      zero_shot = df.causal_meta_gradients(recorded.cache.keys[0], recorded.cache.values[0])  # [1, T, K, H, H]
      out = df.apply_weight(zero_shot + icl[:, None], queries)
    flat = out.reshape(1, 3, heads * config.head_dim)
    attn_out = attn.o_proj(flat)
    assert relative_error(attn_out, recorded.records[0]["attn_out"]) <= 1e-10


def test_demo_runs_end_to_end(tmp_path, capsys):
  from experiments import dual_form_demo

  workdir = str(tmp_path / "demo")
  results = dual_form_demo.run(workdir, seed=0, sizes=((8, 4, 8, 4),))
  assert (tmp_path / "demo" / "residuals.png").stat().st_size > 0
  assert all(row["relative"] <= 1e-12 for row in results["differences"])
  assert {row["precision"] for row in results["sweep"]} == set(dual_form_demo.PRECISIONS)
  assert "SGD step from W_ZSL" in capsys.readouterr().out
  with pytest.raises(ValueError, match="--overwrite"):
    dual_form_demo.run(workdir, seed=0, sizes=((8, 4, 8, 4),))
