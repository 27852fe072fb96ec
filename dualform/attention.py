"""The attention core: softmax, relaxed linear and momentum attention, tokens as rows.

Dimension letters used in every einsum and shape comment:

  B batch, T query positions, S key positions, N query heads, K key/value heads,
  G = N // K query heads per key/value head (grouped-query attention), H head dim.

Query head ``n`` reads key/value head ``n // G`` (the Hugging Face ``repeat_kv`` order).

Equations (per head, one query ``q_t``; ``mask[t, s]`` says which keys the query may see):

  softmax         Attn(V, K, q_t)   = sum_s softmax_s(scale * q_t . k_s) v_s          (scale = H**-0.5)
  linear_relaxed  LinAttn(V, K, q_t) = sum_s (q_t . k_s) v_s = V K^T q_t               (Dai et al. eq. 6:
                                                                                   softmax and scale dropped)
  momentum        MoAttn(V, K, q_t) = Attn(V, K, q_t) + sum_{i<t} eta**(t-i) v_i      (Dai et al. eq. 13)

For momentum attention the T queries are the *last* T of the S keys (self-attention, possibly after a
cached prefix of S - T tokens), so query ``t`` sits at key index ``S - T + t``; the momentum sum runs over
the key indices before it. It is computed in O(S) with ``jax.lax.scan`` through the recurrence
``m_0 = 0, m_j = eta * (m_{j-1} + v_{j-1})`` (:func:`momentum_values`), whose closed form is
:func:`momentum_values_closed_form`; :func:`momentum_values_associative` computes the same sum with
``jax.lax.associative_scan`` (``add_momentum(..., method="associative_scan")``), for accelerators.

The pieces (:func:`attention_scores`, :func:`attention_weights`, :func:`weighted_values`,
:func:`momentum_values`) are public so that models can record intermediates without a second code path;
:func:`attention` composes them. :func:`prefix_attention` is the same causal attention for a batch of
continuations of one shared (cached) prefix, without materialising the full score tensor.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

AttentionKind = Literal["softmax", "linear_relaxed", "momentum"]
ATTENTION_KINDS: tuple[str, ...] = ("softmax", "linear_relaxed", "momentum")


def _check_shapes(q: Array, k: Array, v: Array | None = None) -> tuple[int, int]:
  """Checks [B, T, N, H] / [B, S, K, H] shapes and returns (K, G)."""
  if q.ndim != 4 or k.ndim != 4:
    raise ValueError(f"q and k must be [batch, seq, heads, head_dim]; got q{q.shape}, k{k.shape}")
  num_heads, num_kv_heads = q.shape[2], k.shape[2]
  if num_heads % num_kv_heads:
    raise ValueError(
        f"query heads ({num_heads}) must be a multiple of key/value heads ({num_kv_heads})")
  if q.shape[-1] != k.shape[-1]:
    raise ValueError(f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
  if v is not None and (v.shape[:3] != k.shape[:3]):
    raise ValueError(f"k and v must agree in [batch, seq, heads]; got k{k.shape}, v{v.shape}")
  if k.shape[0] not in (1, q.shape[0]):
    raise ValueError(f"k batch must be 1 (shared) or equal q's batch {q.shape[0]}; got {k.shape[0]}")
  return num_kv_heads, num_heads // num_kv_heads


def causal_mask(num_queries: int, num_keys: int) -> Bool[Array, "T S"]:
  """[T, S] bool mask where query t (key index S - T + t) sees keys s <= S - T + t."""
  if num_keys < num_queries:
    raise ValueError(f"causal mask needs num_keys >= num_queries; got {num_keys} < {num_queries}")
  query_index = jnp.arange(num_queries)[:, None] + (num_keys - num_queries)
  return jnp.arange(num_keys)[None, :] <= query_index


def attention_scores(q: Float[Array, "B T N H"], k: Float[Array, "B S K H"],
                     *, scale: float | None = None) -> Float[Array, "B N T S"]:
  """Pre-softmax, pre-mask scores ``scale * q_t . k_s`` per query head: [B, N, T, S].

  ``k`` may have batch 1: one shared set of keys (a prefix cache) scored by every row without a copy.
  """
  num_kv_heads, group = _check_shapes(q, k)
  if scale is None:
    scale = q.shape[-1] ** -0.5
  batch, num_queries, _, head_dim = q.shape
  # [batch, query_seq, kv_heads, group, head_dim]
  grouped_q = q.reshape(batch, num_queries, num_kv_heads, group, head_dim)
  # [batch, kv_heads, group, query_seq, key_seq]
  if k.shape[0] == batch:
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", grouped_q * scale, k)
  else:
    scores = jnp.einsum("BTKGH,SKH->BKGTS", grouped_q * scale, k[0])
  return scores.reshape(batch, num_kv_heads * group, num_queries, k.shape[1])


def attention_weights(scores: Float[Array, "B N T S"], mask: Bool[Array, "... T S"] | None,
                      kind: AttentionKind) -> Float[Array, "B N T S"]:
  """Turns scores into mixing weights: masked softmax (in at least float32), or masked scores.

  ``softmax`` and ``momentum`` use the softmax; ``linear_relaxed`` uses the raw scores with masked
  entries set to 0. ``mask`` broadcasts against [B, T, S] (a head axis is inserted).
  """
  if kind not in ATTENTION_KINDS:
    raise ValueError(f"unknown attention kind {kind!r}; choose one of {ATTENTION_KINDS}")
  if mask is not None:
    mask = jnp.expand_dims(mask, -3)  # [..., 1, T, S] broadcasts over heads
  if kind == "linear_relaxed":
    return scores if mask is None else jnp.where(mask, scores, jnp.zeros((), scores.dtype))
  softmax_dtype = jnp.promote_types(scores.dtype, jnp.float32)
  logits = scores.astype(softmax_dtype)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(softmax_dtype).min)
  return jax.nn.softmax(logits, axis=-1).astype(scores.dtype)


def weighted_values(weights: Float[Array, "B N T S"], v: Float[Array, "B S K H"]) -> Float[Array, "B T N H"]:
  """``out_t = sum_s weights[t, s] v_s`` per query head, grouped-query aware: [B, T, N, H].

  ``v`` may have batch 1: one shared set of values (a prefix cache) used by every row without a copy.
  """
  batch, num_heads, num_queries, num_keys = weights.shape
  num_kv_heads = v.shape[2]
  group = num_heads // num_kv_heads
  # [batch, kv_heads, group, query_seq, key_seq]
  grouped = weights.reshape(batch, num_kv_heads, group, num_queries, num_keys)
  # [batch, query_seq, kv_heads, group, head_dim]
  if v.shape[0] == batch:
    out = jnp.einsum("BKGTS,BSKH->BTKGH", grouped, v.astype(weights.dtype))
  else:
    out = jnp.einsum("BKGTS,SKH->BTKGH", grouped, v[0].astype(weights.dtype))
  return out.reshape(batch, num_queries, num_heads, v.shape[-1])


PrefixImplementation = Literal["xla", "cudnn"]
PREFIX_IMPLEMENTATIONS: tuple[str, ...] = ("xla", "cudnn")


def prefix_block_cudnn(q: Float[Array, "B T N H"], prefix_k: Float[Array, "1 C K H"],
                       prefix_v: Float[Array, "1 C K H"], *, scale: float,
                       prefix_length: Int[Array, ""] | int | None = None
                       ) -> tuple[Float[Array, "B T N H"], Float[Array, "B N T"]]:
  """Softmax attention of every query over the shared prefix alone, by cuDNN's fused (flash) kernel:
  (out_t = sum_s softmax_s(a_ts) pv_s [B, T, N, H] in q's dtype, lse_t = log sum_s e^{a_ts} [B, N, T] float32),
  with a_ts = scale * q_t . pk_s over the keys s < ``prefix_length``.

  The B*T queries are one sequence of one batch row (every query sees every valid prefix key, so no mask
  but the padding), so the [B, N, T, C] scores never reach memory. Needs a CUDA GPU and bfloat16 or
  float16 inputs. The log-sum-exp comes from jax's cuDNN wrapper itself: ``jax.nn.dot_product_attention``
  returns it rounded to q's dtype, too coarse to merge with another key block (bfloat16 spacing is 1/16 at
  lse ~ 10).
  """
  try:  # private: the public wrapper rounds the log-sum-exp to q's dtype (BUILD_NOTES.md, Decisions)
    from jax._src.cudnn import fused_attention_stablehlo as cudnn  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ValueError(f"prefix attention implementation 'cudnn' needs jax's cuDNN attention module, which jax "
                     f"{jax.__version__} does not have; use 'xla'") from None
  if jax.default_backend() != "gpu":
    raise ValueError("prefix attention implementation 'cudnn' needs a CUDA GPU; use 'xla' on "
                     f"{jax.default_backend()}")
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"prefix attention implementation 'cudnn' needs bfloat16 or float16 inputs; got {q.dtype}")
  batch, seq, num_heads, head_dim = q.shape
  keys = prefix_k.shape[1]
  valid = keys if prefix_length is None else prefix_length
  rows = q.reshape(1, batch * seq, num_heads, head_dim)
  out, lse = cudnn.dot_product_attention(
      rows, prefix_k.astype(q.dtype), prefix_v.astype(q.dtype),
      q_seqlen=jnp.full((1,), batch * seq, jnp.int32),
      kv_seqlen=jnp.reshape(jnp.asarray(valid, jnp.int32), (1,)),
      scale=scale, mask_type=cudnn.MaskType.PADDING, return_residual=True)
  # the residual is [1, N, B*T] whatever the layout
  lse = jnp.transpose(lse.astype(jnp.float32).reshape(num_heads, batch, seq), (1, 0, 2))
  return out.reshape(batch, seq, num_heads, head_dim), lse


def merge_prefix_block(prefix_out: Float[Array, "B T N H"], prefix_lse: Float[Array, "B N T"],
                       q: Float[Array, "B T N H"], k: Float[Array, "B T K H"], v: Float[Array, "B T K H"], *,
                       scale: float) -> Float[Array, "B T N H"]:
  """Completes causal softmax attention over [prefix; own tokens] from the prefix block's normalised
  output and log-sum-exp (as a flash kernel returns them) and the own-token block [B, N, T, T]:

    lse_t = logaddexp(lse^p_t, log sum_{j<=t} e^{b_tj}),
    out_t = e^{lse^p_t - lse_t} out^p_t + sum_{j<=t} e^{b_tj - lse_t} v_j        (b: own-token scores)

  in at least float32. Returns q's dtype."""
  dtype = jnp.promote_types(q.dtype, jnp.float32)
  seq = q.shape[1]
  own = attention_scores(q.astype(dtype), k.astype(dtype), scale=scale)  # [B, N, T, T]
  own = jnp.where(causal_mask(seq, seq), own, jnp.finfo(dtype).min)
  total = jnp.logaddexp(prefix_lse.astype(dtype), jax.nn.logsumexp(own, axis=-1))  # [B, N, T]
  prefix_weight = jnp.swapaxes(jnp.exp(prefix_lse.astype(dtype) - total), 1, 2)[..., None]  # [B, T, N, 1]
  out = prefix_out.astype(dtype) * prefix_weight + weighted_values(jnp.exp(own - total[..., None]),
                                                                    v.astype(dtype))
  return out.astype(q.dtype)


def prefix_attention(q: Float[Array, "B T N H"], k: Float[Array, "B T K H"], v: Float[Array, "B T K H"],
                     prefix_k: Float[Array, "1 C K H"], prefix_v: Float[Array, "1 C K H"], *,
                     kind: AttentionKind = "softmax", scale: float | None = None,
                     prefix_length: Int[Array, ""] | int | None = None,
                     implementation: PrefixImplementation = "xla") -> Float[Array, "B T N H"]:
  """Causal attention of B rows of T new tokens over one shared prefix of C tokens and over themselves.

  ``prefix_length`` (optional, may be traced): only prefix keys ``s < prefix_length`` are attended to; the
  rest is padding, so prefixes of different lengths padded to one C share one compiled shape.

  Equals ``attention(q, [prefix_k; k], [prefix_v; v], mask=causal_mask(T, C + T), kind=kind)`` with the
  prefix broadcast to every row (softmax or ``linear_relaxed``; momentum needs the row's values in order,
  so it is not offered), without building the [B, N, T, C + T] score tensor: the prefix scores are one
  matrix product per key/value head, [K, B*T*G, H] x [C, K, H] -> [K, B*T*G, C], in the layout the
  product produces, and the softmax is split over the two key blocks:

    m_t = max(max_s a_ts, max_{j<=t} b_tj),   out_t = (sum_s e^{a_ts - m_t} pv_s + sum_{j<=t} e^{b_tj - m_t} v_j)
                                                       / (sum_s e^{a_ts - m_t} + sum_{j<=t} e^{b_tj - m_t})

  (a: prefix scores, b: scores over the new tokens). The prefix scores are products in q's dtype, as the
  unsplit attention's (:func:`attention_scores`); the softmax and the normalisation are in at least float32,
  and the weighted prefix values multiply in q's dtype with at least float32 accumulation (bfloat16 models:
  tensor-core products, and no float32 [K, M, C] tensor in memory). Returns q's dtype.

  ``implementation="cudnn"`` (softmax, CUDA GPU, bfloat16/float16): the prefix block by cuDNN's fused
  kernel (:func:`prefix_block_cudnn`), so the [K, M, C] scores are never written, merged with the
  own-token block by its log-sum-exp (:func:`merge_prefix_block`); same attention, other rounding.
  """
  if kind not in ("softmax", "linear_relaxed"):
    raise ValueError(f"prefix_attention supports softmax and linear_relaxed, not {kind!r}")
  if implementation not in PREFIX_IMPLEMENTATIONS:
    raise ValueError(f"unknown prefix attention implementation {implementation!r}; choose one of "
                     f"{PREFIX_IMPLEMENTATIONS}")
  num_kv_heads, group = _check_shapes(q, k, v)
  if prefix_k.shape[0] != 1 or prefix_k.shape[2:] != k.shape[2:] or prefix_v.shape != prefix_k.shape:
    raise ValueError(f"prefix keys/values must be [1, C, {k.shape[2]}, {k.shape[3]}]; got "
                     f"{prefix_k.shape} and {prefix_v.shape}")
  batch, seq, num_heads, head_dim = q.shape
  if scale is None:
    scale = head_dim ** -0.5
  if implementation == "cudnn":
    if kind != "softmax":
      raise ValueError(f"prefix attention implementation 'cudnn' computes softmax attention, not {kind!r}; "
                       "use 'xla'")
    prefix_out, prefix_lse = prefix_block_cudnn(q, prefix_k, prefix_v, scale=scale, prefix_length=prefix_length)
    return merge_prefix_block(prefix_out, prefix_lse, q, k, v, scale=scale)
  dtype = jnp.promote_types(q.dtype, jnp.float32)
  # [K, M, H] with M = (batch, seq, group): every query of one key/value head in one matrix.
  rows = jnp.transpose(q.reshape(batch, seq, num_kv_heads, group, head_dim), (2, 0, 1, 3, 4))
  rows = rows.reshape(num_kv_heads, batch * seq * group, head_dim) * jnp.asarray(scale, q.dtype)
  prefix_scores = jnp.einsum("KMH,CKH->KMC", rows, prefix_k[0].astype(q.dtype)).astype(dtype)  # [K, M, C]
  own_scores = attention_scores(q.astype(dtype), k.astype(dtype), scale=scale)  # [B, N, T, T]
  mask = causal_mask(seq, seq)

  def to_rows(x):  # [B, N, T] -> [K, M, 1]
    x = jnp.transpose(x.reshape(batch, num_kv_heads, group, seq), (1, 0, 3, 2))
    return x.reshape(num_kv_heads, batch * seq * group, 1)

  def from_rows(x):  # [K, M, H] -> [B, T, N, H]
    x = jnp.transpose(x.reshape(num_kv_heads, batch, seq, group, -1), (1, 2, 0, 3, 4))
    return x.reshape(batch, seq, num_heads, -1)

  if prefix_length is not None:  # padding keys of the prefix: masked like future keys
    prefix_scores = jnp.where(jnp.arange(prefix_k.shape[1]) < prefix_length, prefix_scores,
                              0.0 if kind == "linear_relaxed" else jnp.finfo(dtype).min)
  if kind == "linear_relaxed":
    prefix_weights, own_weights, norm = prefix_scores, jnp.where(mask, own_scores, 0.0), None
  else:
    own_logits = jnp.where(mask, own_scores, jnp.finfo(dtype).min)
    top = jnp.maximum(to_rows(own_logits.max(axis=-1)), prefix_scores.max(axis=-1, keepdims=True))  # [K, M, 1]
    prefix_weights = jnp.exp(prefix_scores - top)
    own_top = from_rows(top)[..., 0]  # [B, T, N]
    own_weights = jnp.exp(own_logits - jnp.transpose(own_top, (0, 2, 1))[..., None])
    norm = from_rows(prefix_weights.sum(axis=-1, keepdims=True)) + jnp.swapaxes(own_weights.sum(-1), 1, 2)[..., None]
  out = from_rows(jnp.einsum("KMC,CKH->KMH", prefix_weights.astype(q.dtype), prefix_v[0].astype(q.dtype),
                             preferred_element_type=dtype))
  out = out + weighted_values(own_weights, v.astype(dtype))
  if norm is not None:
    out = out / norm
  return out.astype(q.dtype)


def momentum_values(v: Float[Array, "B S K H"], eta: float | Array) -> Float[Array, "B S K H"]:
  """``m_j = sum_{i<j} eta**(j-i) v_i`` by the O(S) scan ``m_0 = 0, m_j = eta (m_{j-1} + v_{j-1})``.

  ``eta`` is a scalar or broadcasts against [K] (one value per key/value head).
  """
  eta = jnp.asarray(eta, dtype=v.dtype)
  # [seq, batch, kv_heads, head_dim]
  values_by_step = jnp.swapaxes(v, 0, 1)
  eta_b = eta[..., None] if eta.ndim else eta  # [K, 1] broadcasts over head_dim

  def step(carry, value):
    momentum = carry  # m_j, emitted for position j
    return eta_b * (momentum + value), momentum

  _, momenta = jax.lax.scan(step, jnp.zeros_like(values_by_step[0]), values_by_step)
  return jnp.swapaxes(momenta, 0, 1)


def momentum_values_associative(v: Float[Array, "B S K H"], eta: float | Array) -> Float[Array, "B S K H"]:
  """The same ``m_j`` as :func:`momentum_values`, by ``jax.lax.associative_scan`` (O(log S) depth).

  The recurrence ``m_j = eta m_{j-1} + eta v_{j-1}`` is the linear map ``x -> a x + b`` with
  ``(a_j, b_j) = (eta, eta v_{j-1})``; composing maps is associative,
  ``(a_1, b_1) then (a_2, b_2) = (a_1 a_2, a_2 b_1 + b_2)``, so a parallel prefix scan yields every ``m_j``.
  On a GPU this avoids the S sequential steps of ``lax.scan`` (measured 7x slower than softmax attention
  in training at S = 1024 on an H200, while this form costs about the same as softmax attention).
  """
  eta = jnp.asarray(eta, dtype=v.dtype)
  eta_b = eta[..., None] if eta.ndim else eta  # [K, 1] broadcasts over head_dim
  # [batch, seq, kv_heads, head_dim]: v_{j-1}, with v_{-1} = 0
  previous = jnp.concatenate([jnp.zeros_like(v[:, :1]), v[:, :-1]], axis=1)
  decay = jnp.broadcast_to(eta_b, v.shape).astype(v.dtype)

  def compose(first, second):
    decay_first, value_first = first
    decay_second, value_second = second
    return decay_first * decay_second, decay_second * value_first + value_second

  _, momenta = jax.lax.associative_scan(compose, (decay, decay * previous), axis=1)
  return momenta


MOMENTUM_METHODS: tuple[str, ...] = ("scan", "associative_scan")


def momentum_values_closed_form(v: Float[Array, "B S K H"], eta: float | Array) -> Float[Array, "B S K H"]:
  """The closed form ``m_j = sum_{i<j} eta**(j-i) v_i`` as an explicit [S, S] weighted sum (O(S^2))."""
  eta = jnp.asarray(eta, dtype=v.dtype)
  num_keys = v.shape[1]
  gap = jnp.arange(num_keys)[:, None] - jnp.arange(num_keys)[None, :]  # j - i, [S, S]
  eta_k = eta.reshape((-1,) + (1, 1)) if eta.ndim else eta[None, None, None]  # [K or 1, 1, 1]
  # [kv_heads or 1, seq_j, seq_i]; 0 ** 0 never occurs because the diagonal is masked out
  decay = jnp.where(gap > 0, eta_k ** jnp.maximum(gap, 1).astype(v.dtype), 0.0)
  return jnp.einsum("KJI,BIKH->BJKH", jnp.broadcast_to(decay, (v.shape[2], num_keys, num_keys)), v)


def add_momentum(out: Float[Array, "B T N H"], v: Float[Array, "B S K H"],
                 eta: float | Array, *, method: str = "scan") -> Float[Array, "B T N H"]:
  """Adds ``sum_{i<t} eta**(t-i) v_i`` to each query head; queries are the last T of the S keys.

  ``method``: ``"scan"`` (:func:`momentum_values`, the default) or ``"associative_scan"``
  (:func:`momentum_values_associative`, the same sum with parallel depth; faster on GPUs).
  """
  if method not in MOMENTUM_METHODS:
    raise ValueError(f"unknown momentum method {method!r}; choose one of {MOMENTUM_METHODS}")
  batch, num_queries, num_heads, head_dim = out.shape
  num_kv_heads = v.shape[2]
  values_fn = momentum_values if method == "scan" else momentum_values_associative
  # [batch, query_seq, kv_heads, head_dim]
  momenta = values_fn(v, eta)[:, v.shape[1] - num_queries:]
  grouped = out.reshape(batch, num_queries, num_kv_heads, num_heads // num_kv_heads, head_dim)
  return (grouped + momenta[:, :, :, None, :].astype(out.dtype)).reshape(out.shape)


def attention(q: Float[Array, "B T N H"], k: Float[Array, "B S K H"], v: Float[Array, "B S K H"],
              *, kind: AttentionKind = "softmax", mask: Bool[Array, "... T S"] | None = None,
              eta: float | Array | None = None, scale: float | None = None) -> Float[Array, "B T N H"]:
  """Multi-head (grouped-query) attention of the given ``kind``: [B, T, N, H].

  Args:
    q: queries [B, T, N, H].
    k, v: keys and values [B, S, K, H] with N % K == 0.
    kind: ``"softmax"``, ``"linear_relaxed"`` (no softmax, no scaling) or ``"momentum"``.
    mask: bool, broadcastable to [B, T, S]; True where the query may attend. ``None`` attends to all.
    eta: momentum coefficient, required for ``kind="momentum"`` (scalar or one per kv head).
    scale: score scale; default ``H**-0.5`` for softmax/momentum and ``1`` for ``linear_relaxed``.
  """
  _check_shapes(q, k, v)
  if kind not in ATTENTION_KINDS:
    raise ValueError(f"unknown attention kind {kind!r}; choose one of {ATTENTION_KINDS}")
  if kind == "momentum" and eta is None:
    raise ValueError("momentum attention needs eta (e.g. eta=0.5); it has no default")
  if kind == "linear_relaxed" and scale is None:
    scale = 1.0
  scores = attention_scores(q, k, scale=scale)
  weights = attention_weights(scores, mask, kind)
  out = weighted_values(weights, v)
  if kind == "momentum":
    out = add_momentum(out, v, eta)
  return out.astype(q.dtype)


def softmax_attention(q, k, v, *, mask=None, scale=None):
  """Scaled dot-product softmax attention, [B, T, N, H]; see :func:`attention`."""
  return attention(q, k, v, kind="softmax", mask=mask, scale=scale)


def linear_attention(q, k, v, *, mask=None):
  """Relaxed linear attention ``sum_s (q_t . k_s) v_s`` (no softmax, no scaling), [B, T, N, H]."""
  return attention(q, k, v, kind="linear_relaxed", mask=mask)


def momentum_attention(q, k, v, *, eta, mask=None, scale=None):
  """``Attn(V, K, q_t) + sum_{i<t} eta**(t-i) v_i`` (Dai et al. eq. 13), [B, T, N, H]."""
  return attention(q, k, v, kind="momentum", mask=mask, eta=eta, scale=scale)
