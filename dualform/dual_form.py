"""Attention's dual form: relaxed linear attention as a linear layer plus a meta-gradient update.

Dai et al. (arXiv 2212.10559, §3) and PROTOCOL.md §10. The package keeps **tokens as rows**:

* token sequences are [..., S, D] (one token per row), as in :mod:`dualform.attention`;
* projection kernels use the Flax layout [D, K, H] (input, heads, head dim), so that
  ``keys = tokens @ key_kernel`` per head; a model kernel [D, K*H] becomes [D, K, H] with
  :func:`split_heads`;
* every *weight* this module returns is in the paper's orientation [H_out, H_in] and acts on a column
  vector: ``out = W @ q``. In the paper's column notation (tokens as columns) ``W_V = value_kernel.T``
  and ``W_K = key_kernel.T``, so ``W_V X (W_K X)^T`` reads ``value_kernel.T @ X.T @ X @ key_kernel`` here.

Equations (one head; ``k_s = W_K x_s``, ``v_s = W_V x_s``, ``q = W_Q x``; PROTOCOL §10):

  W_ZSL    = W_V X (W_K X)^T   = sum_{s in X}  v_s k_s^T                   :func:`zero_shot_weight`
  dW_ICL   = W_V X' (W_K X')^T = sum_{i in X'} v'_i k'_i^T                 :func:`icl_meta_gradient`
  F~_ICL(q) = W_V [X';X] (W_K [X';X])^T q = (W_ZSL + dW_ICL) q            :func:`dual_form_output`
  dW_FT    = dW_V X X^T W_K^T + W_V X X^T dW_K^T + dW_V X X^T dW_K^T       :func:`finetune_delta`
  F~_FT(q) = (W_V + dW_V) X X^T (W_K + dW_K)^T q = (W_ZSL + dW_FT) q

The shared primitive is :func:`meta_gradient` ``sum_s v_s k_s^T`` over projected keys and values
[..., S, K, H]; it works on anything already projected (biases included, keys after RoPE, a model's
:class:`~dualform.models.transformer.KVCache`), which is how ``dW_ICL`` is materialised per layer and
key/value head (:func:`layer_meta_gradients`) and compared with ``dW_FT`` (:func:`finetune_delta_from_keys_values`,
:func:`weight_cosine`). Grouped-query attention: query head ``n`` uses the weight of key/value head
``n // G`` (:func:`apply_weight`), as in :mod:`dualform.attention`.

Dual form of gradient descent on a linear layer ``y = W x`` (Irie, Csordas & Schmidhuber, ICML 2022).
After SGD steps on inputs ``x_i`` with output gradients ``g_i = dL_i/d(W x_i)`` (each taken at that
step's weights), ``W = W_0 + sum_i e_i x_i^T`` with ``e_i = -lr g_i``, hence

  W x = W_0 x + sum_i e_i (x_i . x) = W_0 x + LinearAttn(E, X, x)      :func:`error_signals`,
                                                                        :func:`gradient_descent_dual_output`

and :func:`meta_gradient_loss` is the loss whose single SGD step (learning rate ``lr``) adds exactly
``sum_i e_i x_i^T``: one SGD step from ``W_ZSL`` with the demonstration keys as inputs and the
demonstration values as error signals lands on ``W_ZSL + dW_ICL``.

Public names: :func:`split_heads`, :func:`project`, :func:`meta_gradient`, :func:`causal_meta_gradients`,
:func:`zero_shot_weight`, :func:`icl_meta_gradient`, :func:`apply_weight`, :func:`dual_form_output`,
:func:`finetune_delta`, :func:`finetune_delta_from_keys_values`, :func:`layer_meta_gradients`,
:func:`weight_cosine`, :func:`error_signals`, :func:`linear_attention_single`,
:func:`gradient_descent_dual_output`, :func:`meta_gradient_loss`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float


def _check_kernel(name: str, kernel: Array) -> None:
  if kernel.ndim != 3:
    raise ValueError(f"{name} must be [input_dim, heads, head_dim]; got shape {kernel.shape} "
                     "(reshape a [D, heads*H] kernel with split_heads(kernel, heads))")


def _check_tokens(name: str, tokens: Array, kernel: Array) -> None:
  if tokens.ndim < 2 or tokens.shape[-1] != kernel.shape[0]:
    raise ValueError(f"{name} must be [..., seq, {kernel.shape[0]}] to match the kernel's input dim; "
                     f"got shape {tokens.shape}")


def split_heads(x: Float[Array, "... F"], num_heads: int) -> Float[Array, "... M H"]:
  """Splits the last axis ``heads * head_dim`` into [heads, head_dim] (kernel [D, K*H] -> [D, K, H]).

  The order is the model's: feature ``m * H + h`` is head ``m``, coordinate ``h``.
  """
  if num_heads <= 0 or x.shape[-1] % num_heads:
    raise ValueError(f"last axis {x.shape[-1]} is not divisible by num_heads={num_heads}; pass the "
                     "model's head count for this projection")
  return x.reshape(x.shape[:-1] + (num_heads, x.shape[-1] // num_heads))


def project(tokens: Float[Array, "... S D"], kernel: Float[Array, "D K H"],
            bias: Float[Array, "K H"] | None = None) -> Float[Array, "... S K H"]:
  """Per-head projection ``tokens @ kernel (+ bias)``: [..., S, D] x [D, K, H] -> [..., S, K, H]."""
  _check_kernel("kernel", kernel)
  _check_tokens("tokens", tokens, kernel)
  # [..., seq, heads, head_dim]
  projected = jnp.einsum("...SD,DKH->...SKH", tokens, kernel)
  return projected if bias is None else projected + bias


def meta_gradient(keys: Float[Array, "... S K H"], values: Float[Array, "... S K V"],
                  mask: Bool[Array, "... S"] | None = None) -> Float[Array, "... K V H"]:
  """The outer-product sum ``sum_s v_s k_s^T`` per key/value head: [..., K, V, H] (acts as ``W @ q``).

  This is the weight that relaxed linear attention applies to a query: ``sum_s v_s (k_s . q) = W q``.

  Args:
    keys: [..., S, K, H] projected keys (after biases and RoPE, if any).
    values: [..., S, K, V] projected values.
    mask: optional bool [..., S]; False drops token ``s`` from the sum (e.g. padding).
  """
  if keys.ndim < 3 or keys.shape[:-1] != values.shape[:-1]:
    raise ValueError(f"keys and values must be [..., seq, heads, dim] with equal leading axes; "
                     f"got keys{keys.shape}, values{values.shape}")
  if mask is not None:
    values = jnp.where(mask[..., None, None], values, jnp.zeros((), values.dtype))
  return jnp.einsum("...SKV,...SKH->...KVH", values, keys)


def causal_meta_gradients(keys: Float[Array, "... S K H"],
                          values: Float[Array, "... S K V"]) -> Float[Array, "... S K V H"]:
  """Prefix sums ``W_t = sum_{s<=t} v_s k_s^T`` for every position t: [..., S, K, V, H].

  ``W_t`` is the zero-shot weight seen by the query at position ``t`` under a causal mask.
  Memory is O(S K V H); meant for analysis-sized inputs.
  """
  if keys.ndim < 3 or keys.shape[:-1] != values.shape[:-1]:
    raise ValueError(f"keys and values must be [..., seq, heads, dim] with equal leading axes; "
                     f"got keys{keys.shape}, values{values.shape}")
  # [..., seq, kv_heads, value_dim, key_dim]
  outer = jnp.einsum("...SKV,...SKH->...SKVH", values, keys)
  return jnp.cumsum(outer, axis=-4)


def zero_shot_weight(key_kernel: Float[Array, "D K H"], value_kernel: Float[Array, "D K V"],
                     tokens: Float[Array, "... S D"], *, key_bias: Float[Array, "K H"] | None = None,
                     value_bias: Float[Array, "K V"] | None = None) -> Float[Array, "... K V H"]:
  """``W_ZSL = W_V X (W_K X)^T = sum_s v_s k_s^T`` from the query-side tokens X [..., S, D]: [..., K, V, H]."""
  _check_kernel("value_kernel", value_kernel)
  return meta_gradient(project(tokens, key_kernel, key_bias), project(tokens, value_kernel, value_bias))


def icl_meta_gradient(key_kernel: Float[Array, "D K H"], value_kernel: Float[Array, "D K V"],
                      demo_tokens: Float[Array, "... S D"], *, key_bias: Float[Array, "K H"] | None = None,
                      value_bias: Float[Array, "K V"] | None = None) -> Float[Array, "... K V H"]:
  """``dW_ICL = sum_i (W_V x'_i)(W_K x'_i)^T`` from the demonstration tokens X' [..., S', D]: [..., K, V, H].

  The same sum as :func:`zero_shot_weight`, over the demonstrations: their values act as meta-gradients
  and their keys as the inputs those gradients pair with.
  """
  return zero_shot_weight(key_kernel, value_kernel, demo_tokens, key_bias=key_bias, value_bias=value_bias)


def apply_weight(weight: Float[Array, "... K V H"], queries: Float[Array, "... T N H"]) -> Float[Array, "... T N V"]:
  """``out_t = W q_t`` per query head, grouped-query aware (head ``n`` uses ``weight[n // G]``): [..., T, N, V].

  ``weight`` is one matrix per key/value head [..., K, V, H], or per position [..., T, K, V, H]
  (e.g. from :func:`causal_meta_gradients`).
  """
  num_heads, num_kv_heads = queries.shape[-2], weight.shape[-3]
  if num_heads % num_kv_heads or queries.shape[-1] != weight.shape[-1]:
    raise ValueError(f"queries [..., T, N, H] must have N a multiple of the weight's K and H equal to its "
                     f"last axis; got queries{queries.shape}, weight{weight.shape}")
  group = num_heads // num_kv_heads
  # [..., query_seq, kv_heads, group, head_dim]
  grouped = queries.reshape(queries.shape[:-2] + (num_kv_heads, group, queries.shape[-1]))
  per_position = weight.ndim == queries.ndim + 1
  equation = "...TKVH,...TKGH->...TKGV" if per_position else "...KVH,...TKGH->...TKGV"
  out = jnp.einsum(equation, weight, grouped)
  return out.reshape(queries.shape[:-2] + (num_heads, weight.shape[-2]))


def dual_form_output(query_kernel: Float[Array, "D N H"], key_kernel: Float[Array, "D K H"],
                     value_kernel: Float[Array, "D K V"], demo_tokens: Float[Array, "... S D"],
                     tokens: Float[Array, "... T D"], *, causal: bool = True,
                     query_bias: Float[Array, "N H"] | None = None, key_bias: Float[Array, "K H"] | None = None,
                     value_bias: Float[Array, "K V"] | None = None) -> Float[Array, "... T N V"]:
  """``(W_ZSL + dW_ICL) q_t`` for every query-side token ``x_t``, with ``q_t = W_Q x_t``: [..., T, N, V].

  Equals relaxed linear attention (no softmax, no scaling) of the queries over the keys and values of
  ``[X'; X]`` (:func:`dualform.attention.linear_attention`). With ``causal=True``, ``W_ZSL`` for token
  ``t`` sums over ``x_1..x_t`` (PROTOCOL §10: "X, the query-example tokens up to the current one"), which
  matches a causal mask over ``[X'; X]`` whose demonstrations all precede X; with ``causal=False`` every
  token sees all of X.

  Args:
    query_kernel, key_kernel, value_kernel: [D, N, H], [D, K, H], [D, K, V]; N % K == 0.
    demo_tokens: X' [..., S, D], the demonstration tokens.
    tokens: X [..., T, D], the query-side tokens; leading axes must match ``demo_tokens``.
  """
  _check_kernel("query_kernel", query_kernel)
  queries = project(tokens, query_kernel, query_bias)
  keys, values = project(tokens, key_kernel, key_bias), project(tokens, value_kernel, value_bias)
  if causal:
    zero_shot = causal_meta_gradients(keys, values)  # [..., T, K, V, H]
  else:
    zero_shot = meta_gradient(keys, values)[..., None, :, :, :]  # [..., 1, K, V, H]
  icl = icl_meta_gradient(key_kernel, value_kernel, demo_tokens, key_bias=key_bias, value_bias=value_bias)
  # [..., T or 1, K, V, H]
  total = zero_shot + icl[..., None, :, :, :]
  total = jnp.broadcast_to(total, queries.shape[:-2] + total.shape[-3:])
  return apply_weight(total, queries)


def finetune_delta(key_kernel: Float[Array, "D K H"], value_kernel: Float[Array, "D K V"],
                   key_kernel_delta: Float[Array, "D K H"], value_kernel_delta: Float[Array, "D K V"],
                   tokens: Float[Array, "... S D"]) -> Float[Array, "... K V H"]:
  """``dW_FT = dW_V X X^T W_K^T + W_V X X^T dW_K^T + dW_V X X^T dW_K^T``: [..., K, V, H].

  With finetuned kernels ``W + dW`` (only K and V trained, no biases),
  ``(W_V + dW_V) X X^T (W_K + dW_K)^T q = (W_ZSL + dW_FT) q``. Written here as the three terms of the
  paper, with ``k_s = W_K x_s``, ``dk_s = dW_K x_s`` (and the same for values):
  ``sum_s dv_s k_s^T + v_s dk_s^T + dv_s dk_s^T``. With biases or RoPE use
  :func:`finetune_delta_from_keys_values`.
  """
  for name, kernel in (("value_kernel", value_kernel), ("key_kernel_delta", key_kernel_delta),
                       ("value_kernel_delta", value_kernel_delta)):
    _check_kernel(name, kernel)
  keys, values = project(tokens, key_kernel), project(tokens, value_kernel)
  key_deltas, value_deltas = project(tokens, key_kernel_delta), project(tokens, value_kernel_delta)
  return (meta_gradient(keys, value_deltas) + meta_gradient(key_deltas, values)
          + meta_gradient(key_deltas, value_deltas))


def finetune_delta_from_keys_values(keys: Float[Array, "... S K H"], values: Float[Array, "... S K V"],
                                    finetuned_keys: Float[Array, "... S K H"],
                                    finetuned_values: Float[Array, "... S K V"],
                                    mask: Bool[Array, "... S"] | None = None) -> Float[Array, "... K V H"]:
  """``dW_FT = sum_s v~_s k~_s^T - sum_s v_s k_s^T`` from keys/values before (k, v) and after (k~, v~) FT.

  The general form of :func:`finetune_delta`: it holds with biases and with keys after RoPE, because it
  only needs the projected vectors. Shapes as in :func:`meta_gradient`; result [..., K, V, H].

  In a multi-layer model, keys/values taken from each model's own forward pass (e.g. two prefix caches of
  X) also carry the changes of earlier layers; the paper's layer-local ``dW_FT`` holds the layer input X
  fixed: project the zero-shot model's layer input with the kernels before and after FT.
  """
  return meta_gradient(finetuned_keys, finetuned_values, mask) - meta_gradient(keys, values, mask)


def layer_meta_gradients(keys: Sequence[Float[Array, "... S K H"]], values: Sequence[Float[Array, "... S K V"]],
                         mask: Bool[Array, "... S"] | None = None) -> Float[Array, "L ... K V H"]:
  """``dW_ICL`` per layer and key/value head from per-layer demonstration keys and values: [L, ..., K, V, H].

  Pass a model's prefix cache directly: ``layer_meta_gradients(cache.keys, cache.values)`` with the
  demonstrations encoded by ``model.encode_prefix`` (keys after RoPE, biases included). For RoPE models
  the resulting weight acts on queries after RoPE at their own positions.
  """
  if len(keys) != len(values) or not keys:
    raise ValueError(f"need one keys and one values array per layer; got {len(keys)} and {len(values)}")
  return jnp.stack([meta_gradient(k, v, mask) for k, v in zip(keys, values)])


def weight_cosine(a: Float[Array, "... V H"], b: Float[Array, "... V H"],
                  eps: float = 1e-20) -> Float[Array, "..."]:
  """Cosine between two weights over their flattened last two axes, e.g. ``dW_ICL`` vs ``dW_FT`` per head."""
  if a.shape[-2:] != b.shape[-2:]:
    raise ValueError(f"weights must share their last two axes; got {a.shape} and {b.shape}")
  dot = jnp.sum(a * b, axis=(-2, -1))
  norms = jnp.sqrt(jnp.sum(a * a, axis=(-2, -1))) * jnp.sqrt(jnp.sum(b * b, axis=(-2, -1)))
  return dot / (norms + eps)


def error_signals(output_gradients: Float[Array, "... S O"], learning_rate: float | Array) -> Float[Array, "... S O"]:
  """``e_i = -lr * g_i``, where ``g_i = dL_i/dy_i`` is step i's gradient w.r.t. the layer output ``y_i = W x_i``."""
  return -jnp.asarray(learning_rate, output_gradients.dtype) * output_gradients


def linear_attention_single(values: Float[Array, "... S O"], keys: Float[Array, "... S I"],
                            queries: Float[Array, "... T I"]) -> Float[Array, "... T O"]:
  """``LinearAttn(V, K, q) = sum_i v_i (k_i . q) = V^T K q`` for one head, tokens as rows: [..., T, O]."""
  if keys.shape[:-1] != values.shape[:-1] or keys.shape[-1] != queries.shape[-1]:
    raise ValueError(f"need values [..., S, O], keys [..., S, I], queries [..., T, I]; got "
                     f"values{values.shape}, keys{keys.shape}, queries{queries.shape}")
  # [..., query_seq, key_seq]
  scores = jnp.einsum("...TI,...SI->...TS", queries, keys)
  return jnp.einsum("...TS,...SO->...TO", scores, values)


def gradient_descent_dual_output(initial_weight: Float[Array, "O I"], errors: Float[Array, "S O"],
                                 inputs: Float[Array, "S I"], x: Float[Array, "... I"]) -> Float[Array, "... O"]:
  """``W x = W_0 x + LinearAttn(E, X, x)``: a GD-trained linear layer's output through its dual form.

  Args:
    initial_weight: W_0 [O, I], the weight before training (``y = W x``).
    errors: E [S, O], error signals ``e_i = -lr * dL_i/dy_i`` of the S training steps
      (:func:`error_signals`).
    inputs: X [S, I], the inputs ``x_i`` of those steps.
    x: test inputs [..., I].
  """
  if initial_weight.ndim != 2 or initial_weight.shape != (errors.shape[-1], inputs.shape[-1]):
    raise ValueError(f"initial_weight must be [O, I] = [{errors.shape[-1]}, {inputs.shape[-1]}] to match "
                     f"errors [S, O] and inputs [S, I]; got {initial_weight.shape}")
  flat = x.reshape((-1, x.shape[-1]))
  out = flat @ initial_weight.T + linear_attention_single(errors, inputs, flat)
  return out.reshape(x.shape[:-1] + (initial_weight.shape[0],))


def meta_gradient_loss(weight: Float[Array, "O I"], inputs: Float[Array, "S I"], errors: Float[Array, "S O"],
                       learning_rate: float | Array) -> Float[Array, ""]:
  """``L(W) = -(1/lr) sum_i e_i . (W x_i)``: its gradient w.r.t. ``y_i = W x_i`` is ``-e_i / lr``.

  One SGD step of learning rate ``lr`` on this loss therefore adds ``sum_i e_i x_i^T`` to W. With
  ``W = W_ZSL``, ``inputs`` the demonstration keys and ``errors`` the demonstration values, the step lands
  on ``W_ZSL + dW_ICL``: attention to the demonstrations is this one explicit SGD step.
  """
  outputs = inputs @ weight.T  # [steps, out]
  return -jnp.sum(errors * outputs) / learning_rate
