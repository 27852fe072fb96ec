"""The similarity metrics of :mod:`dualform.metrics`, on accelerator arrays (float32, jitted).

For records that stay on the device (``evaluate(..., records_on_device=True)``, ``--analysis device``):
the 2.7B records of one task are gigabytes, and the float64 numpy path of :mod:`dualform.metrics` spends
most of a GPU run copying and reducing them on the host. The formulas are the same (see that module for the
notation); the differences are:

* arithmetic is float32 (matmuls at ``HIGHEST`` precision), so values agree with the host path to ~1e-6;
  a rank statistic (Kendall τ, top-k recall) can differ where two float32 values tie or nearly tie;
* random baselines draw with ``jax.random`` from ``fold_in(key, layer)`` (the host path seeds numpy with
  the same key's words), so their values differ from the host path's by sampling noise; the record says
  ``"generator": "jax.random"``;
* query-part scores come right-aligned (:func:`right_align`): [N, L, H, Q] with example i's ``len_i`` keys
  in the last ``len_i`` slots and zeros before. A cosine does not see zeros shared by both sides, so this one
  layout serves the unpaired case (equal lengths) and the shuffled pairing (the original's left padding).

Kendall τ-b here compares all pairs (O(T²) per row, in row blocks): fast on a GPU, slow on a CPU, where
the host path's O(T log T) scipy routine is the better choice.

Public names (signatures as in :mod:`dualform.metrics`): :func:`simaou_per_layer`,
:func:`random_simaou_per_layer`, :func:`right_align`, :func:`simam_per_layer`, :func:`zsl_simam_per_layer`,
:func:`simam_delta_per_layer`, :func:`icl_training_attention`, :func:`ft_training_attention`,
:func:`example_level`, :func:`kendall_tau_b`, :func:`kendall_per_layer`, :func:`random_kendall_per_layer`,
:func:`topk_recall_per_layer`, :func:`random_topk_recall_per_layer`, :func:`training_attention_report`.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from dualform import metrics as host
from dualform.metrics import EPS, RANDOM_DISTRIBUTIONS, RandomBaseline

GENERATOR = "jax.random"
KENDALL_ROWS_PER_BLOCK = 16  # rows of one all-pairs tau-b block: 16 x T^2 elements (T = 1,750: 49M)


def _f32(value) -> jax.Array:
  return jnp.asarray(value, jnp.float32)


def _pairing(pairing, n: int) -> jax.Array:
  order = np.arange(n) if pairing is None else host._check_pairing(pairing, n)  # pylint: disable=protected-access
  return jnp.asarray(order, jnp.int32)


def _hidden(zsl, icl, ft=None) -> tuple[int, int, int]:
  arrays = {"zsl": zsl, "icl": icl} if ft is None else {"zsl": zsl, "icl": icl, "ft": ft}
  shapes = {name: tuple(array.shape) for name, array in arrays.items()}
  if any(len(shape) != 3 for shape in shapes.values()) or len(set(shapes.values())) != 1:
    raise ValueError(f"attn_out arrays must share one [examples, layers, hidden] shape, got {shapes}")
  return next(iter(shapes.values()))


def _normalize(h: jax.Array) -> jax.Array:
  """ĥ = h / (|h| + eps) over the last axis."""
  return h / (jnp.linalg.norm(h, axis=-1, keepdims=True) + EPS)


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  """cos(a, b) = a.b / (|a| |b| + eps) over the last axis."""
  return jnp.sum(a * b, axis=-1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1) + EPS)


def _layer_keys(key: jax.Array, layers: int) -> jax.Array:
  """[layers] keys ``fold_in(key, l)`` (traced inside the jitted metrics; ``key`` a typed key)."""
  return jax.vmap(lambda layer: jax.random.fold_in(key, layer))(jnp.arange(layers, dtype=jnp.uint32))


def _baseline(per_layer: jax.Array, distribution: str, key) -> RandomBaseline:
  return RandomBaseline(per_layer=np.asarray(per_layer, np.float64), distribution=distribution,
                        key=host.key_record(key), generator=GENERATOR)


# ----------------------------------------------------------------------------------------------------------
# SimAOU.

@jax.jit
def _simaou(zsl, icl, ft, order):
  zsl_hat = _normalize(_f32(zsl))
  icl_update = _normalize(_f32(icl)) - zsl_hat  # [N, L, D]
  ft_update = _normalize(_f32(ft)) - zsl_hat
  return _cosine(icl_update, ft_update[order]).mean(axis=0)


def simaou_per_layer(zsl, icl, ft, pairing=None) -> jax.Array:
  """SimAOU_l = (1/N) sum_i cos(ĥ_ICL,i - ĥ_ZSL,i, ĥ_FT,π(i) - ĥ_ZSL,π(i)); attn_out [N, L, D] -> [L]."""
  n, _, _ = _hidden(zsl, icl, ft)
  return _simaou(zsl, icl, ft, _pairing(pairing, n))


@functools.partial(jax.jit, static_argnames=("distribution",))
def _random_simaou(zsl, icl, key, distribution: str):
  icl_update = _normalize(_f32(icl)) - _normalize(_f32(zsl))  # [N, L, D]
  n, layers, d = icl_update.shape
  keys = _layer_keys(key, layers)
  draw = {"normal": lambda key: jax.random.normal(key, (n, d)),
          "uniform01": lambda key: jax.random.uniform(key, (n, d))}[distribution]
  directions = jnp.swapaxes(jax.vmap(draw)(keys), 0, 1)  # [L, N, D] -> [N, L, D]
  return _cosine(icl_update, directions).mean(axis=0)


def random_simaou_per_layer(zsl, icl, key, distribution: str = "normal") -> RandomBaseline:
  """Random SimAOU_l = (1/N) sum_i cos(ĥ_ICL,i - ĥ_ZSL,i, r_i,l), r_·,l drawn from ``fold_in(key, l)``."""
  if distribution not in RANDOM_DISTRIBUTIONS:
    raise ValueError(f"distribution must be one of {RANDOM_DISTRIBUTIONS}, got {distribution!r}")
  _hidden(zsl, icl)
  return _baseline(_random_simaou(zsl, icl, host._as_key(key), distribution), distribution, key)  # pylint: disable=protected-access


# ----------------------------------------------------------------------------------------------------------
# SimAM and SimAM_Δ on right-aligned query-part scores.

@jax.jit
def right_align(scores, lengths) -> jax.Array:
  """[N, L, H, Q] scores whose example i fills keys 0..len_i-1 -> the same keys in the last len_i slots,
  zeros before (the original's left-padded layout)."""
  scores = _f32(scores)
  q = scores.shape[-1]
  source = jnp.arange(q)[None, :] - (q - jnp.asarray(lengths))[:, None]  # [N, Q]: key read into each slot
  gathered = jnp.take_along_axis(scores, jnp.clip(source, 0, q - 1)[:, None, None, :], axis=-1)
  return jnp.where((source >= 0)[:, None, None, :], gathered, 0.0)


def _aligned(scores, name: str) -> jax.Array:
  if getattr(scores, "ndim", None) != 4:
    raise ValueError(f"{name} must be right-aligned [examples, layers, heads, keys] scores (right_align), "
                     f"got {getattr(scores, 'shape', type(scores))}")
  return scores


@jax.jit
def _head_mean_cosines(first, second, order):
  return _cosine(_f32(first), _f32(second)[order]).mean(axis=(0, 2))  # heads, then examples: [L]


def simam_per_layer(icl_scores, ft_scores, pairing=None) -> jax.Array:
  """SimAM_l = (1/N) sum_i (1/H) sum_h cos(a_ICL,l,h,i, a_FT,l,h,π(i)), pre-softmax, right-aligned. [L]."""
  icl, ft = _aligned(icl_scores, "icl_scores"), _aligned(ft_scores, "ft_scores")
  if icl.shape != ft.shape:
    raise ValueError(f"score arrays differ in shape: {icl.shape} vs {ft.shape}; record the same examples")
  return _head_mean_cosines(icl, ft, _pairing(pairing, icl.shape[0]))


def zsl_simam_per_layer(icl_scores, zsl_scores, pairing=None) -> jax.Array:
  """ZSL-SimAM_l: :func:`simam_per_layer` against ZSL (the paper's baseline). [L]."""
  return simam_per_layer(icl_scores, zsl_scores, pairing)


def simam_delta_per_layer(icl_scores, ft_scores, zsl_scores, pairing=None) -> jax.Array:
  """SimAM_Δ,l = mean_i mean_h cos(a_ICL,i - a_ZSL,i, a_FT,π(i) - a_ZSL,π(i)), pre-softmax. [L]."""
  icl, ft, zsl = (_aligned(s, n) for s, n in ((icl_scores, "icl_scores"), (ft_scores, "ft_scores"),
                                               (zsl_scores, "zsl_scores")))
  if not icl.shape == ft.shape == zsl.shape:
    raise ValueError(f"score arrays differ in shape: {icl.shape}, {ft.shape}, {zsl.shape}")
  return _head_mean_cosines(_f32(icl) - _f32(zsl), _f32(ft) - _f32(zsl), _pairing(pairing, icl.shape[0]))


# ----------------------------------------------------------------------------------------------------------
# Attention to training tokens.

def icl_training_attention(context_scores, demo_token_positions) -> jax.Array:
  """w_ICL = softmax over the demo tokens of the head-summed context scores: [N, L, C] -> [N, L, T]."""
  if getattr(context_scores, "ndim", None) != 3:
    raise ValueError(f"context_scores must be [examples, layers, context], got {np.shape(context_scores)}")
  positions = host._check_demo_positions(demo_token_positions, context_scores.shape[-1])  # pylint: disable=protected-access
  return _icl_attention(context_scores, jnp.asarray(positions))


@jax.jit
def _icl_attention(context_scores, positions):
  return jax.nn.softmax(_f32(context_scores)[..., positions], axis=-1)


@jax.jit
def _ft_attention(test, train):
  dots = jnp.einsum("nld,ltd->nlt", _f32(test), _f32(train), precision=jax.lax.Precision.HIGHEST)
  return jax.nn.softmax(dots, axis=-1)


def ft_training_attention(test_queries, train_queries) -> jax.Array:
  """w_FT = softmax_j (q_test . q_j): test [N, L, Dq], train [L, T, Dq] -> [N, L, T]."""
  test, train = jnp.asarray(test_queries), jnp.asarray(train_queries)
  host._check_query_shapes(test.shape, train.shape)  # pylint: disable=protected-access
  return _ft_attention(test, train)


def example_level(weights, demo_lengths) -> jax.Array:
  """Per-demonstration sums of token weights: [N, L, T] -> [N, L, k_eff] (consecutive segments)."""
  lengths = host._check_demo_lengths(demo_lengths, weights.shape[-1])  # pylint: disable=protected-access
  return _example_sums(weights, jnp.asarray(np.repeat(np.arange(lengths.size), lengths)), lengths.size)


@functools.partial(jax.jit, static_argnames=("count",))
def _example_sums(weights, segments, count: int):
  # A product with the one-hot [T, k] segment matrix, not segment_sum: a GPU scatter-add accumulates in
  # an unspecified order, so near-tied demonstrations flipped Kendall's ranks from one run to the next.
  one_hot = jax.nn.one_hot(segments, count, dtype=jnp.float32)
  return jnp.einsum("nlt,tk->nlk", _f32(weights), one_hot, precision=jax.lax.Precision.HIGHEST)


@jax.jit
def _tau_b_rows(first, second):
  return _masked_tau_b_rows(_f32(first), _f32(second), first.shape[-1])  # every item valid


def kendall_tau_b(first, second) -> jax.Array:
  """Kendall tau-b of each row pair of [B, n] arrays from all pairs (NaN for a constant row). [B]."""
  if np.shape(first) != np.shape(second) or len(np.shape(first)) != 2:
    raise ValueError(f"tau-b needs two [rows, items] arrays of one shape, got {np.shape(first)} and "
                     f"{np.shape(second)}")
  return _tau_b_rows(first, second)


def _check_weights(w_icl, w_ft=None):
  if getattr(w_icl, "ndim", None) != 3 or (w_ft is not None and np.shape(w_ft) != np.shape(w_icl)):
    raise ValueError(f"w_icl {np.shape(w_icl)} and w_ft {np.shape(w_ft)} must be [N, L, T] of one shape")


def _width(items: int) -> int:
  """Items padded to a power of two (at least 8) inside the Kendall and top-k programs, so the tasks (whose
  demo-token and demonstration counts differ) share their compiled shapes: on a GPU each new shape of
  these programs cost ~0.15 s warm (lowering the random draws, reading the cache) and ~1 s cold."""
  return max(8, 1 << (int(items) - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("n", "width"))
def _padded_rows(w, n: int, width: int):
  """The first n rows of [N, L, T] weights, items zero-padded to ``width``: [n, L, width] float32."""
  return jnp.pad(_f32(w[:n]), ((0, 0), (0, 0), (0, width - w.shape[-1])))


def _prepared(w, n: int):
  """(padded first rows, valid item count as a device scalar) of [N, L, T] weights."""
  return _padded_rows(w, n, _width(w.shape[-1])), jnp.asarray(w.shape[-1], jnp.int32)


def _masked_tau_b_rows(first, second, items):
  """tau-b of each row pair of [B, width] arrays over their first ``items`` entries (padding pairs count
  zero, so the value is the unpadded one: the sums are of integers, exact in float32). [B]. Every pair is
  counted twice (i < j and j < i): the ratio is the one-sided tau-b."""
  valid = jnp.arange(first.shape[-1]) < items
  pairs = valid[:, None] & valid[None, :]

  def row(pair):
    a, b = pair
    sign_a = jnp.where(pairs, jnp.sign(a[:, None] - a[None, :]), 0.0)
    sign_b = jnp.where(pairs, jnp.sign(b[:, None] - b[None, :]), 0.0)
    return jnp.sum(sign_a * sign_b) / jnp.sqrt(jnp.sum(sign_a * sign_a) * jnp.sum(sign_b * sign_b))

  return jax.lax.map(row, (first, second), batch_size=KENDALL_ROWS_PER_BLOCK)


def kendall_per_layer(w_icl, w_ft, max_examples: int | None = None, pairing=None) -> jax.Array:
  """tau_l = (1/N') sum_{i<N'} tau_b(w_ICL,i,l, w_FT,π(i),l), N' = min(N, max_examples). [L]."""
  _check_weights(w_icl, w_ft)
  n = host._limit(w_icl.shape[0], max_examples)  # pylint: disable=protected-access
  (icl, items), (ft, _) = _prepared(w_icl, n), _prepared(w_ft, n)
  return _kendall_layers(icl, ft, _pairing(pairing, n), items)


@jax.jit
def _kendall_layers(w_icl, w_ft, order, items):
  n, layers, width = w_icl.shape
  taus = _masked_tau_b_rows(w_icl.reshape(n * layers, width), w_ft[order].reshape(n * layers, width), items)
  return taus.reshape(n, layers).mean(axis=0)


def random_kendall_per_layer(w_icl, key, max_examples: int | None = None) -> RandomBaseline:
  """tau_b(w_ICL,i,l, u_i,l), u ~ U[0, 1)^T drawn from ``fold_in(key, l)``, averaged as kendall_per_layer.
  (The draws fill the padded width; the first T of them are used.)"""
  _check_weights(w_icl)
  n = host._limit(w_icl.shape[0], max_examples)  # pylint: disable=protected-access
  icl, items = _prepared(w_icl, n)
  return _baseline(_random_kendall_layers(icl, host._as_key(key), items), "uniform01", key)  # pylint: disable=protected-access


@jax.jit
def _random_kendall_layers(w_icl, key, items):
  n, layers, width = w_icl.shape
  draws = jax.vmap(lambda layer_key: jax.random.uniform(layer_key, (n, width)))(_layer_keys(key, layers))
  taus = _masked_tau_b_rows(w_icl.reshape(n * layers, width), jnp.swapaxes(draws, 0, 1).reshape(n * layers, width),
                            items)
  return taus.reshape(n, layers).mean(axis=0)


def _check_k(k: int, items: int) -> int:
  k = int(k)
  if not 1 <= k <= items:
    raise ValueError(f"k={k} must be in 1..{items} (the number of ranked items)")
  return k


def _top(w, items, k: int):
  """Indices of the k largest of the first ``items`` entries (lax.top_k: ties to the lowest index, as a
  stable sort; padding is never chosen since k <= items)."""
  valid = jnp.arange(w.shape[-1]) < items
  return jax.lax.top_k(jnp.where(valid, w, -jnp.inf), k)[1]


def _topk_hits(candidates, top):
  """[N, L] counts of the candidate indices among the ``top`` indices."""
  return jnp.any(candidates[..., :, None] == top[..., None, :], axis=-1).sum(axis=-1)


def topk_recall_per_layer(w_icl, w_ft, k: int, max_examples: int | None = None, pairing=None) -> jax.Array:
  """recall_l = sum_{i<N'} |top_k(w_ICL,i,l) ∩ top_k(w_FT,π(i),l)| / (N' k). [L]."""
  _check_weights(w_icl, w_ft)
  n = host._limit(w_icl.shape[0], max_examples)  # pylint: disable=protected-access
  k = _check_k(k, w_icl.shape[-1])
  (icl, items), (ft, _) = _prepared(w_icl, n), _prepared(w_ft, n)
  return _topk_recall(icl, ft, _pairing(pairing, n), items, k)


@functools.partial(jax.jit, static_argnames=("k",))
def _topk_recall(w_icl, w_ft, order, items, k: int):
  n = w_icl.shape[0]
  return _topk_hits(_top(w_icl, items, k), _top(w_ft[order], items, k)).sum(axis=0) / (n * k)


def random_topk_recall_per_layer(w_ft, k: int, key, max_examples: int | None = None) -> RandomBaseline:
  """k uniform random indices (with replacement) per example and layer, counted when among the FT top k."""
  _check_weights(w_ft)
  n = host._limit(w_ft.shape[0], max_examples)  # pylint: disable=protected-access
  k = _check_k(k, w_ft.shape[2])
  ft, items = _prepared(w_ft, n)
  return _baseline(_random_topk_recall(ft, host._as_key(key), items, k), "randint", key)  # pylint: disable=protected-access


@functools.partial(jax.jit, static_argnames=("k",))
def _random_topk_recall(w_ft, key, items, k: int):
  n, layers, _ = w_ft.shape
  draws = jax.vmap(lambda layer_key: jax.random.randint(layer_key, (n, k), 0, items))(_layer_keys(key, layers))
  return _topk_hits(jnp.swapaxes(draws, 0, 1), _top(w_ft, items, k)).sum(axis=0) / (n * k)


def training_attention_report(*args, **kwargs) -> dict:
  """:func:`dualform.metrics.training_attention_report` computed with this module's functions (same dict)."""
  return host.training_attention_report(*args, **kwargs, ops=sys.modules[__name__])
