"""Synthetic in-context regression where one linear self-attention layer *is* one step of gradient descent.

von Oswald et al., "Transformers learn in-context by gradient descent" (arXiv 2212.07677); reference code
``google-research/self-organising-systems:transformers_learn_icl_by_gd`` (``src/data.py``:
``create_reg_data``, ``create_weights``; ``src/train.py``: ``analyse``); PROTOCOL.md §15.8. This is the
control on which the ICL-vs-FT metrics must score about 1 before they are trusted on language models.

Task (tokens as rows, E = I + O): draw ``W ~ N(0, weight_scale^2)`` [O, I] and inputs
``x ~ U(-input_range/2, input_range/2)`` [I]; the C context tokens are ``e_j = (x_j, y_j)`` with
``y_j = W x_j``, and the query token is ``e_q = (x_q, 0)`` (:func:`sample_regression_tasks`).

GD on the in-context loss ``L(W) = 1/(2C) sum_j |W x_j - y_j|^2`` from ``W_0`` takes one step
``W_1 = W_0 - lr dL/dW = W_0 - (lr/C) sum_j (W_0 x_j - y_j) x_j^T`` (:func:`gradient_descent_weight`,
computed with ``jax.grad``), and predicts ``W_1 x_q`` (:func:`gradient_descent_predict`).

One linear self-attention (LSA) layer, no softmax, no LayerNorm, no bias, one head (:func:`lsa_forward`):
``e_t <- e_t + P^T sum_j (W_V^T e_j)((W_K^T e_j) . (W_Q^T e_t))`` over the C context tokens (the query token is
not a key, as in the reference's ``include_query=False``); its prediction is ``-(y-slot of e_q)``
(:func:`lsa_predict`, the reference's sign convention). With the constructed weights of
:func:`create_weights` (row layout, ``token @ W``):

  W_Q = W_K = [[I_I, 0], [0, 0]]        query/key read x:            k_j . q = x_j . x_q
  W_V = [[0, W_0^T], [0, -I_O]]          value writes (0, W_0 x_j - y_j)
  P   = [[0, 0], [0, (lr/C) I_O]]        projection scales the y-slot

so the query's y-slot becomes ``0 + (lr/C) sum_j (W_0 x_j - y_j)(x_j . x_q) = -(W_1 - W_0) x_q`` and the
prediction is the GD update ``(W_1 - W_0) x_q``: from ``W_0 = 0`` exactly GD's prediction.

Alignment (:func:`alignment`, the reference's ``analyse``): cosine of prediction updates, cosine and L2 distance
of the sensitivities ``d y_hat / d x_q``, and the L2 distance of predictions; they score 1, 1, 0, 0 when the
two predictors are equal. :func:`setting_states` gives zero-shot / in-context / "finetuned" (GD) query-token
states in the [N, d] form the project's SimAOU-style metrics consume; :func:`update_cosines` is the
PROTOCOL §9 formula on them, as a self-contained sanity check.

Public names: :class:`RegressionConfig`, :class:`RegressionBatch`, :class:`LinearSelfAttentionWeights`,
:class:`Alignment`, :class:`SettingStates`, :func:`sample_regression_tasks`, :func:`create_weights`,
:func:`random_weights`, :func:`lsa_forward`, :func:`lsa_predict`, :func:`in_context_loss`,
:func:`gradient_descent_weight`, :func:`gradient_descent_predict`, :func:`without_context`,
:func:`alignment`, :func:`setting_states`, :func:`update_cosines`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from dualform import attention

Predictor = Callable[[Array], Array]  # tokens [B, C+1, E] -> predictions [B, O]


@dataclasses.dataclass(frozen=True)
class RegressionConfig:
  """Task distribution; defaults are the reference's ``src/config.py``."""

  input_size: int = 10  # I, dimension of x (config.input_size)
  output_size: int = 1  # O, dimension of y (config.output_size)
  context_size: int = 10  # C, in-context examples per task (config.dataset_size)
  input_range: float = 1.0  # x ~ U(-input_range/2, input_range/2) (config.input_range)
  weight_scale: float = 1.0  # W ~ N(0, weight_scale^2) (config.weight_scale)

  def __post_init__(self):
    for name in ("input_size", "output_size", "context_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
    if self.input_range <= 0 or self.weight_scale <= 0:
      raise ValueError(f"input_range and weight_scale must be > 0; got {self.input_range}, {self.weight_scale}")

  @property
  def token_size(self) -> int:
    """E = I + O."""
    return self.input_size + self.output_size


class RegressionBatch(NamedTuple):
  """A batch of B regression tasks.

  tokens: [B, C+1, E]; rows 0..C-1 are ``(x_j, y_j)``, row C is the query ``(x_q, 0)``.
  targets: [B, O], the true ``W x_q``.
  weights: [B, O, I], each task's ``W``.
  """

  tokens: Array
  targets: Array
  weights: Array


class LinearSelfAttentionWeights(NamedTuple):
  """One LSA layer in row layout (``token @ W``), each [E, E]."""

  query: Array
  key: Array
  value: Array
  projection: Array


@functools.partial(jax.jit, static_argnames=("num_tasks", "config", "dtype"))
def sample_regression_tasks(key: Array, num_tasks: int, config: RegressionConfig = RegressionConfig(),
                            dtype=jnp.float32) -> RegressionBatch:
  """Draws ``num_tasks`` seeded tasks (the reference's ``create_reg_data`` without distractors)."""
  if num_tasks < 1:
    raise ValueError(f"num_tasks must be >= 1; got {num_tasks}")
  # jitted with num_tasks, config and dtype static: one compilation per batch layout.
  weight_key, input_key, query_key = jax.random.split(key, 3)
  half = config.input_range / 2
  # [tasks, out, in]
  weights = config.weight_scale * jax.random.normal(
      weight_key, (num_tasks, config.output_size, config.input_size), dtype)
  # [tasks, context, in] and [tasks, in]
  inputs = jax.random.uniform(input_key, (num_tasks, config.context_size, config.input_size), dtype, -half, half)
  query = jax.random.uniform(query_key, (num_tasks, config.input_size), dtype, -half, half)
  outputs = jnp.einsum("BOI,BCI->BCO", weights, inputs)
  context_tokens = jnp.concatenate([inputs, outputs], axis=-1)
  query_token = jnp.concatenate([query, jnp.zeros((num_tasks, config.output_size), dtype)], axis=-1)
  tokens = jnp.concatenate([context_tokens, query_token[:, None]], axis=1)
  return RegressionBatch(tokens, jnp.einsum("BOI,BI->BO", weights, query), weights)


def create_weights(input_size: int, output_size: int, context_size: int, learning_rate: float,
                   initial_weight: Float[Array, "O I"] | None = None, dtype=jnp.float32) -> LinearSelfAttentionWeights:
  """LSA weights whose forward pass is one GD step of rate ``learning_rate`` from ``initial_weight`` (default 0).

  A port of the reference ``create_weights`` (``lin_diag=False, second_zero=False``); see the module
  docstring for the block structure.
  """
  if initial_weight is None:
    initial_weight = jnp.zeros((output_size, input_size), dtype)
  if initial_weight.shape != (output_size, input_size):
    raise ValueError(f"initial_weight must be [output_size, input_size] = [{output_size}, {input_size}]; "
                     f"got {initial_weight.shape}")
  zeros = lambda rows, columns: jnp.zeros((rows, columns), dtype)
  eye_in, eye_out = jnp.eye(input_size, dtype=dtype), jnp.eye(output_size, dtype=dtype)
  read_x = jnp.block([[eye_in, zeros(input_size, output_size)],
                      [zeros(output_size, input_size), zeros(output_size, output_size)]])
  # Column form [[0, 0], [W_0, -I]] maps (x, y) to (0, W_0 x - y); the row layout stores its transpose.
  value_columns = jnp.block([[zeros(input_size, input_size), zeros(input_size, output_size)],
                             [initial_weight.astype(dtype), -eye_out]])
  projection = jnp.block([[zeros(input_size, input_size), zeros(input_size, output_size)],
                          [zeros(output_size, input_size), eye_out * (learning_rate / context_size)]])
  return LinearSelfAttentionWeights(query=read_x, key=read_x, value=value_columns.T, projection=projection)


def random_weights(key: Array, token_size: int, scale: float = 1.0, dtype=jnp.float32) -> LinearSelfAttentionWeights:
  """Random LSA weights, each entry ``N(0, scale^2 / E)``: the control that must score clearly below 1."""
  keys = jax.random.split(key, 4)
  draw = lambda k: scale * jax.random.normal(k, (token_size, token_size), dtype) / jnp.sqrt(token_size)
  return LinearSelfAttentionWeights(*(draw(k) for k in keys))


def lsa_forward(weights: LinearSelfAttentionWeights, tokens: Float[Array, "B T E"]) -> Float[Array, "B T E"]:
  """One LSA layer with a residual: every token attends (relaxed linear attention) to the T-1 context tokens."""
  if tokens.ndim != 3 or tokens.shape[-1] != weights.query.shape[0] or tokens.shape[1] < 2:
    raise ValueError(f"tokens must be [batch, context+1 >= 2, {weights.query.shape[0]}]; got {tokens.shape}")
  context = tokens[:, :-1]
  # [batch, seq, heads=1, token] for the attention core
  queries = (tokens @ weights.query)[:, :, None]
  keys = (context @ weights.key)[:, :, None]
  values = (context @ weights.value)[:, :, None]
  mixed = attention.linear_attention(queries, keys, values)[:, :, 0]
  return tokens + mixed @ weights.projection


def lsa_predict(weights: LinearSelfAttentionWeights, tokens: Float[Array, "B T E"],
                output_size: int = 1) -> Float[Array, "B O"]:
  """``-(y-slot of the query token)`` after :func:`lsa_forward` (the reference's read-out): [B, O]."""
  return -lsa_forward(weights, tokens)[:, -1, tokens.shape[-1] - output_size:]


def in_context_loss(weight: Float[Array, "O I"], inputs: Float[Array, "C I"], outputs: Float[Array, "C O"]) -> Array:
  """``L(W) = 1/(2C) sum_j |W x_j - y_j|^2`` for one task."""
  residuals = inputs @ weight.T - outputs
  return 0.5 * jnp.sum(residuals ** 2) / inputs.shape[0]


def gradient_descent_weight(inputs: Float[Array, "B C I"], outputs: Float[Array, "B C O"], learning_rate: float,
                            initial_weight: Float[Array, "O I"] | None = None) -> Float[Array, "B O I"]:
  """``W_1 = W_0 - lr dL/dW`` per task, with the gradient from ``jax.grad`` of :func:`in_context_loss`."""
  if initial_weight is None:
    initial_weight = jnp.zeros((outputs.shape[-1], inputs.shape[-1]), inputs.dtype)
  gradients = jax.vmap(jax.grad(in_context_loss), in_axes=(None, 0, 0))(initial_weight, inputs, outputs)
  return initial_weight - learning_rate * gradients


def _split_tokens(tokens: Array, output_size: int) -> tuple[Array, Array, Array]:
  """tokens [B, C+1, E] -> context inputs [B, C, I], context outputs [B, C, O], query inputs [B, I]."""
  if tokens.ndim != 3 or tokens.shape[1] < 2 or not 0 < output_size < tokens.shape[-1]:
    raise ValueError(f"tokens must be [batch, context+1 >= 2, input+output] with output_size={output_size} "
                     f"< token size; got {tokens.shape}")
  input_size = tokens.shape[-1] - output_size
  return tokens[:, :-1, :input_size], tokens[:, :-1, input_size:], tokens[:, -1, :input_size]


def gradient_descent_predict(tokens: Float[Array, "B T E"], learning_rate: float, output_size: int = 1,
                             initial_weight: Float[Array, "O I"] | None = None) -> Float[Array, "B O"]:
  """``W_1 x_q`` after one GD step on each task's context (:func:`gradient_descent_weight`): [B, O]."""
  inputs, outputs, query = _split_tokens(tokens, output_size)
  weight = gradient_descent_weight(inputs, outputs, learning_rate, initial_weight)
  return jnp.einsum("BOI,BI->BO", weight, query)


def without_context(tokens: Float[Array, "B T E"]) -> Float[Array, "B T E"]:
  """Zeroes the context tokens: the zero-shot input (no demonstrations contribute to attention or to GD)."""
  return tokens.at[:, :-1].set(0)


class Alignment(NamedTuple):
  """Agreement of a model with a reference predictor on one batch (scalars).

  prediction_update_cosine: cosine between the flattened [B*O] prediction updates ``y_hat - y_hat_zero_shot``
    (per task a scalar output has only a sign, so the cosine runs over the batch).
  sensitivity_cosine: mean over tasks of the cosine of ``d y_hat / d x_q`` ([O, I] flattened).
  prediction_distance: mean over tasks of ``|y_hat_model - y_hat_reference|``.
  sensitivity_distance: mean over tasks of ``|d y_hat_model/d x_q - d y_hat_reference/d x_q|``.
  """

  prediction_update_cosine: Array
  sensitivity_cosine: Array
  prediction_distance: Array
  sensitivity_distance: Array


def _cosine(a: Array, b: Array, eps: float) -> Array:
  """``a . b / (|a| |b| + eps)`` over the last axis."""
  return jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1) + eps)


def _sensitivities(predict: Predictor, tokens: Array, input_size: int) -> Array:
  """``d y_hat / d x_q`` per task: [B, O, I]."""

  def predict_one(query_input, task_tokens):
    return predict(task_tokens.at[-1, :input_size].set(query_input)[None])[0]

  return jax.vmap(jax.jacrev(predict_one))(tokens[:, -1, :input_size], tokens)


def alignment(model: Predictor, reference: Predictor, tokens: Float[Array, "B T E"], output_size: int = 1,
              eps: float = 1e-20) -> Alignment:
  """The reference's ``analyse`` measures between two predictors (tokens [B, C+1, E] -> [B, O]).

  Typical use: ``alignment(partial(lsa_predict, weights), partial(gradient_descent_predict,
  learning_rate=lr), batch.tokens)``. Equal predictors give (1, 1, 0, 0).
  """
  input_size = tokens.shape[-1] - output_size
  updates = [predict(tokens) - predict(without_context(tokens)) for predict in (model, reference)]
  predictions = [model(tokens), reference(tokens)]
  sensitivities = [_sensitivities(predict, tokens, input_size).reshape(tokens.shape[0], -1)
                   for predict in (model, reference)]
  return Alignment(
      prediction_update_cosine=_cosine(updates[0].reshape(-1), updates[1].reshape(-1), eps),
      sensitivity_cosine=jnp.mean(_cosine(sensitivities[0], sensitivities[1], eps)),
      prediction_distance=jnp.mean(jnp.linalg.norm(predictions[0] - predictions[1], axis=-1)),
      sensitivity_distance=jnp.mean(jnp.linalg.norm(sensitivities[0] - sensitivities[1], axis=-1)))


class SettingStates(NamedTuple):
  """The query token's state in three settings, each [B, E]; feed these to SimAOU-style metrics.

  zero_shot: the LSA layer's output with the context zeroed (no demonstrations; ``W_0 = 0``).
  in_context: the LSA layer's output with the demonstrations (ICL).
  finetuned: ``(x_q, -W_1 x_q)``: the query token as one GD step on the context writes it (FT).
  """

  zero_shot: Array
  in_context: Array
  finetuned: Array


def setting_states(weights: LinearSelfAttentionWeights, tokens: Float[Array, "B T E"], learning_rate: float,
                   output_size: int = 1) -> SettingStates:
  """Zero-shot / in-context (LSA) / finetuned (GD) query-token states for ICL-vs-FT metrics: each [B, E].

  With :func:`create_weights` (``W_0 = 0``) ``in_context == finetuned``, so SimAOU computed on these states
  (PROTOCOL §9: normalise, subtract the zero-shot state, cosine) must be 1 up to rounding; with
  :func:`random_weights` it is clearly below 1.
  """
  zero_shot = lsa_forward(weights, without_context(tokens))[:, -1]
  in_context = lsa_forward(weights, tokens)[:, -1]
  prediction = gradient_descent_predict(tokens, learning_rate, output_size)
  finetuned = jnp.concatenate([tokens[:, -1, :tokens.shape[-1] - output_size], -prediction], axis=-1)
  return SettingStates(zero_shot, in_context, finetuned)


def update_cosines(states: SettingStates, eps: float = 1e-20) -> Float[Array, "B"]:
  """PROTOCOL §9 SimAOU per example: ``cos(h_ICL/|h_ICL| - h_ZSL/|h_ZSL|, h_FT/|h_FT| - h_ZSL/|h_ZSL|)``: [B]."""
  unit = lambda h: h / jnp.linalg.norm(h, axis=-1, keepdims=True)
  zero_shot = unit(states.zero_shot)
  return _cosine(unit(states.in_context) - zero_shot, unit(states.finetuned) - zero_shot, eps)
