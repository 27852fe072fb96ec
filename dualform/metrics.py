"""Every comparison metric of PROTOCOL §9 and the critique controls of §15, one function per metric.

Notation: N evaluated examples, L layers, H query heads, D hidden size, T training (demonstration) tokens,
``cos(a, b) = a.b / (|a| |b| + eps)`` with ``eps = 1e-20`` (the original's ``cal_cos_sim``). "✓" is right,
"✗" wrong. Sources: ``LMOps:icl_ft/compute_sim.py`` and ``LMOps:icl_ft/compute_training_example_attn.py``.
All arithmetic is numpy float64. Random baselines take a ``jax.random`` key (or an int seed), record its raw
words, and draw layer l from ``np.random.default_rng(key_data(fold_in(key, l)))``.

Public names:

  Ratio                       value (%) with numerator and denominator; NaN when the denominator is 0.
  accuracy(predictions, gold)                       100 * #correct / N.
  predictions_from_scores(label_scores)             argmax_j s_j, ties to the lowest j (PROTOCOL §5).
  rec2ftp(zsl_correct, ft_correct, icl_correct)     100 * #{ZSL✗ ∧ FT✓ ∧ ICL✓} / #{ZSL✗ ∧ FT✓}.
  chance_rec2ftp(zsl_correct, icl_correct)          100 * #{ZSL✗ ∧ ICL✓} / #{ZSL✗}  (§15.5).
  rec2iclp(zsl_correct, ft_correct, icl_correct)    100 * #{ZSL✗ ∧ ICL✓ ∧ FT✓} / #{ZSL✗ ∧ ICL✓}  (§15.5).
  regressions(zsl_correct, setting_correct)         100 * #{ZSL✓ ∧ S✗} / #{ZSL✓}  (§15.5, per setting).
  cohen_kappa(predictions_a, predictions_b)         (p_o - p_e) / (1 - p_e) between two predictors.
  outcome_counts(zsl_correct, ft_correct, icl_correct)  raw counts of the 8 (ZSL, FT, ICL) outcomes.
  correctness_report(zsl_correct, ft_correct, icl_correct, ...)  all of the above in one JSON-ready dict.
  normalize(h)                 h / (|h| + eps) over the last axis (the original's ``norm_hidden``).
  cosine(a, b)                 cos(a, b) over the last axis.
  simaou_per_layer(zsl, icl, ft, pairing=None)      [L] SimAOU_l = (1/N) sum_i cos(ĥ_ICL - ĥ_ZSL, ĥ_FT - ĥ_ZSL).
  random_simaou_per_layer(zsl, icl, key, distribution="normal")  [L] (1/N) sum_i cos(Δ_ICL,i, r_i,l).
  RandomBaseline               per-layer values of a random baseline plus the distribution and key used.
  key_record(key) -> list[int]  the raw uint32 words of a key (an int seed is turned into ``jax.random.key``).
  simam_per_layer(icl_scores, ft_scores, pairing=None, softmax=False)  [L] (1/N) sum_i (1/H) sum_h cos(a_ICL, a_FT).
  zsl_simam_per_layer(icl_scores, zsl_scores, ...)  [L] the same against ZSL (the paper's baseline).
  simam_delta_per_layer(icl_scores, ft_scores, zsl_scores, pairing=None)  [L] cos(a_ICL - a_ZSL, a_FT - a_ZSL).
  icl_training_attention(context_scores, demo_token_positions)  [N, L, T] w_ICL: softmax over demo tokens.
  ft_training_attention(test_queries, train_queries)            [N, L, T] w_FT: softmax_j (q_test . q_j).
  example_level(weights, demo_lengths)               [N, L, k] per-demonstration sums of token weights.
  kendall_tau_b(first, second)  [B] Kendall tau-b of each row pair (scipy's definition, batched).
  kendall_per_layer(w_icl, w_ft, max_examples=None, pairing=None)  [L] mean_i Kendall tau-b.
  random_kendall_per_layer(w_icl, key, max_examples=None)          RandomBaseline of tau(w_ICL, u).
  topk_recall_per_layer(w_icl, w_ft, k, max_examples=None, pairing=None)  [L] |top_k(ICL) ∩ top_k(FT)| / k.
  random_topk_recall_per_layer(w_ft, k, key, max_examples=None)    RandomBaseline of the random-index recall.
  training_attention_report(context_scores, demo_token_positions, demo_lengths, test_queries,
                            train_queries, key, max_examples=None, pairing=None)
                               Kendall tau and top-k recall at token and example level with baselines.
  derangement(n, seed) -> np.ndarray   a seeded uniform permutation with no fixed point (§15.4).
  apply_pairing(per_example, pairing)  reorders per-example records: out[i] = per_example[pairing[i]].
  label_distributions(label_scores)    [N, C] softmax of the label scores (renormalised over the labels).
  kl_divergence(p, q), js_divergence(p, q)  per-row divergences in nats.
  output_divergence(icl_label_scores, ft_label_scores)  mean KL both ways, mean JS, agreement (§15 end).
  layer_mean(per_layer)                mean over layers, the headline number.
  mean_std(values, ddof=1)             mean ± std over seeds/runs, elementwise for per-layer lists.

Controls: the shuffled-pairing control (§15.4) passes ``pairing=derangement(N, seed)`` to the SimAOU, SimAM
and Kendall functions, which compare the ICL quantity of example i with the FT quantity of example
``pairing[i]`` (with that example's own ZSL reference). The ICL-vs-ICL ceiling (§15.7) passes a second ICL
run in place of FT. The untrained-model control (§15.3) reruns everything on other records.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import warnings
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special

EPS = 1e-20  # the original's epsilon in cal_cos_sim and norm_hidden.
RandomDistribution = Literal["normal", "uniform01"]
RANDOM_DISTRIBUTIONS: tuple[str, ...] = ("normal", "uniform01")


# ----------------------------------------------------------------------------------------------------------
# Helpers.

def _float_array(value, name: str, ndim: int | None = None) -> np.ndarray:
  array = np.asarray(value, dtype=np.float64)
  if ndim is not None and array.ndim != ndim:
    raise ValueError(f"{name} must have {ndim} dimensions, got shape {array.shape}")
  return array


def _bool_vector(value, name: str) -> np.ndarray:
  array = np.asarray(value)
  if array.ndim != 1:
    raise ValueError(f"{name} must be a 1-D vector of per-example booleans, got shape {array.shape}")
  if array.dtype != np.bool_:
    if not np.issubdtype(array.dtype, np.integer) or not np.isin(array, (0, 1)).all():
      raise ValueError(f"{name} must hold booleans (or 0/1), got dtype {array.dtype}")
    array = array.astype(bool)
  return array


def _same_length(**vectors: np.ndarray) -> int:
  lengths = {name: len(vector) for name, vector in vectors.items()}
  if len(set(lengths.values())) != 1:
    raise ValueError(f"per-example inputs differ in length: {lengths}; pass the same evaluated examples")
  (length,) = set(lengths.values())
  if length == 0:
    raise ValueError("no examples: the per-example inputs are empty")
  return length


def _as_key(key_or_seed) -> jax.Array:
  """A typed jax PRNG key from an int seed, a typed key or a raw uint32 key."""
  if isinstance(key_or_seed, (int, np.integer)) and not isinstance(key_or_seed, bool):
    return jax.random.key(int(key_or_seed))
  key = jnp.asarray(key_or_seed) if not isinstance(key_or_seed, jax.Array) else key_or_seed
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  if key.dtype == jnp.uint32 and key.shape == (2,):
    return jax.random.wrap_key_data(key)
  raise ValueError(f"key must be an int seed or a jax PRNG key, got {key.dtype} {key.shape}")


def key_record(key) -> list[int]:
  """The raw uint32 words of a PRNG key, for ``results.json``."""
  return [int(word) for word in np.asarray(jax.random.key_data(_as_key(key))).ravel()]


def _check_pairing(pairing, n: int) -> np.ndarray:
  pairing = np.asarray(pairing)
  if pairing.shape != (n,) or not np.issubdtype(pairing.dtype, np.integer):
    raise ValueError(f"pairing must be an integer permutation of length {n}, got {pairing.dtype} {pairing.shape}")
  if not np.array_equal(np.sort(pairing), np.arange(n)):
    raise ValueError(f"pairing must be a permutation of 0..{n - 1}; use derangement(n, seed)")
  return pairing


def _limit(n: int, max_examples: int | None) -> int:
  if max_examples is None:
    return n
  if isinstance(max_examples, bool) or not isinstance(max_examples, (int, np.integer)) or max_examples < 1:
    raise ValueError(f"max_examples must be a positive integer or None, got {max_examples!r}")
  return min(n, int(max_examples))


# ----------------------------------------------------------------------------------------------------------
# Prediction-level metrics (§9 Rec2FTP, §15.5).

@dataclasses.dataclass(frozen=True)
class Ratio:
  """``value = 100 * numerator / denominator`` (NaN when the denominator is 0)."""
  value: float
  numerator: int
  denominator: int

  @classmethod
  def of(cls, numerator: int, denominator: int) -> "Ratio":
    value = 100.0 * numerator / denominator if denominator else math.nan
    return cls(value=value, numerator=int(numerator), denominator=int(denominator))

  def to_record(self) -> dict:
    return {"value": None if math.isnan(self.value) else self.value,
            "numerator": self.numerator, "denominator": self.denominator}


def predictions_from_scores(label_scores) -> np.ndarray:
  """``pred_i = argmax_j s_ij`` over [N, C] label scores; ties go to the lowest j (PROTOCOL §5)."""
  scores = _float_array(label_scores, "label_scores", ndim=2)
  return np.argmax(scores, axis=-1)


def accuracy(predictions, gold) -> float:
  """``100 * #{i : pred_i = gold_i} / N``."""
  predictions, gold = np.asarray(predictions), np.asarray(gold)
  if predictions.ndim != 1 or gold.ndim != 1:
    raise ValueError(f"predictions and gold must be 1-D, got shapes {predictions.shape} and {gold.shape}")
  _same_length(predictions=predictions, gold=gold)
  return float(100.0 * np.mean(predictions == gold))


def rec2ftp(zsl_correct, ft_correct, icl_correct) -> Ratio:
  """Rec2FTP = 100 * #{ZSL✗ ∧ FT✓ ∧ ICL✓} / #{ZSL✗ ∧ FT✓} (``count_f2t``); NaN when no FT recovery."""
  zsl, ft, icl = (_bool_vector(v, n) for v, n in ((zsl_correct, "zsl_correct"), (ft_correct, "ft_correct"),
                                                 (icl_correct, "icl_correct")))
  _same_length(zsl_correct=zsl, ft_correct=ft, icl_correct=icl)
  recovered_by_ft = ~zsl & ft
  return Ratio.of(int(np.sum(recovered_by_ft & icl)), int(np.sum(recovered_by_ft)))


def chance_rec2ftp(zsl_correct, icl_correct) -> Ratio:
  """Chance-level Rec2FTP = 100 * #{ZSL✗ ∧ ICL✓} / #{ZSL✗}: Rec2FTP if ICL were independent of FT."""
  zsl, icl = _bool_vector(zsl_correct, "zsl_correct"), _bool_vector(icl_correct, "icl_correct")
  _same_length(zsl_correct=zsl, icl_correct=icl)
  return Ratio.of(int(np.sum(~zsl & icl)), int(np.sum(~zsl)))


def rec2iclp(zsl_correct, ft_correct, icl_correct) -> Ratio:
  """Rec2ICLP = 100 * #{ZSL✗ ∧ ICL✓ ∧ FT✓} / #{ZSL✗ ∧ ICL✓}: the converse of Rec2FTP."""
  zsl, ft, icl = (_bool_vector(v, n) for v, n in ((zsl_correct, "zsl_correct"), (ft_correct, "ft_correct"),
                                                 (icl_correct, "icl_correct")))
  _same_length(zsl_correct=zsl, ft_correct=ft, icl_correct=icl)
  recovered_by_icl = ~zsl & icl
  return Ratio.of(int(np.sum(recovered_by_icl & ft)), int(np.sum(recovered_by_icl)))


def regressions(zsl_correct, setting_correct) -> Ratio:
  """Regressions of a setting S: 100 * #{ZSL✓ ∧ S✗} / #{ZSL✓}."""
  zsl, setting = _bool_vector(zsl_correct, "zsl_correct"), _bool_vector(setting_correct, "setting_correct")
  _same_length(zsl_correct=zsl, setting_correct=setting)
  return Ratio.of(int(np.sum(zsl & ~setting)), int(np.sum(zsl)))


def cohen_kappa(predictions_a, predictions_b, num_classes: int | None = None) -> float:
  """Cohen's κ = (p_o - p_e) / (1 - p_e), p_o the agreement rate, p_e = sum_c p_a(c) p_b(c).

  NaN when p_e = 1 (both predictors constant on the same class: κ is undefined).
  """
  a, b = np.asarray(predictions_a), np.asarray(predictions_b)
  if a.ndim != 1 or b.ndim != 1:
    raise ValueError(f"predictions must be 1-D, got shapes {a.shape} and {b.shape}")
  n = _same_length(predictions_a=a, predictions_b=b)
  if not (np.issubdtype(a.dtype, np.integer) and np.issubdtype(b.dtype, np.integer)) or min(a.min(), b.min()) < 0:
    raise ValueError("predictions must be non-negative integer class ids")
  num_classes = int(max(a.max(), b.max())) + 1 if num_classes is None else int(num_classes)
  observed = float(np.mean(a == b))
  expected = float(np.dot(np.bincount(a, minlength=num_classes) / n, np.bincount(b, minlength=num_classes) / n))
  if expected == 1.0:
    return math.nan
  return (observed - expected) / (1.0 - expected)


def outcome_counts(zsl_correct, ft_correct, icl_correct) -> dict[str, int]:
  """Raw counts: ``n``, the 8 outcome cells ``"zsl{0,1}_ft{0,1}_icl{0,1}"`` (1 = right) and the marginals."""
  zsl, ft, icl = (_bool_vector(v, n) for v, n in ((zsl_correct, "zsl_correct"), (ft_correct, "ft_correct"),
                                                 (icl_correct, "icl_correct")))
  n = _same_length(zsl_correct=zsl, ft_correct=ft, icl_correct=icl)
  counts = {"n": n, "zsl_correct": int(zsl.sum()), "ft_correct": int(ft.sum()), "icl_correct": int(icl.sum())}
  for z in (0, 1):
    for f in (0, 1):
      for i in (0, 1):
        counts[f"zsl{z}_ft{f}_icl{i}"] = int(np.sum((zsl == z) & (ft == f) & (icl == i)))
  return counts


def correctness_report(zsl_correct, ft_correct, icl_correct, *, icl_predictions=None,
                       ft_predictions=None, num_classes: int | None = None) -> dict:
  """Rec2FTP with its chance level, Rec2ICLP, regressions, κ (when predictions are given) and raw counts."""
  report = {
      "rec2ftp": rec2ftp(zsl_correct, ft_correct, icl_correct).to_record(),
      "chance_rec2ftp": chance_rec2ftp(zsl_correct, icl_correct).to_record(),
      "rec2iclp": rec2iclp(zsl_correct, ft_correct, icl_correct).to_record(),
      "regressions": {"ft": regressions(zsl_correct, ft_correct).to_record(),
                      "icl": regressions(zsl_correct, icl_correct).to_record()},
      "counts": outcome_counts(zsl_correct, ft_correct, icl_correct),
  }
  if icl_predictions is not None and ft_predictions is not None:
    kappa = cohen_kappa(icl_predictions, ft_predictions, num_classes)
    report["cohen_kappa_icl_ft"] = None if math.isnan(kappa) else kappa
  return report


# ----------------------------------------------------------------------------------------------------------
# SimAOU (§9).

def normalize(h, eps: float = EPS) -> np.ndarray:
  """``ĥ = h / (|h| + eps)`` over the last axis (the original's ``norm_hidden``)."""
  h = _float_array(h, "h")
  return h / (np.linalg.norm(h, axis=-1, keepdims=True) + eps)


def cosine(a, b, eps: float = EPS) -> np.ndarray:
  """``cos(a, b) = a.b / (|a| |b| + eps)`` over the last axis (the original's ``cal_cos_sim``)."""
  a, b = _float_array(a, "a"), _float_array(b, "b")
  return np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + eps)


def _check_hidden(**arrays) -> tuple[int, int, int]:
  shapes = {}
  for name, array in arrays.items():
    if array.ndim != 3:
      raise ValueError(f"{name} must be [examples, layers, hidden], got shape {array.shape}")
    shapes[name] = array.shape
  if len(set(shapes.values())) != 1:
    raise ValueError(f"attn_out arrays differ in shape: {shapes}; record the same examples and layers")
  return next(iter(shapes.values()))


def _as_array(value, name: str) -> np.ndarray:
  array = np.asarray(value)
  if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
    raise ValueError(f"{name} must be a numeric array, got dtype {array.dtype}")
  return array


def simaou_per_layer(zsl, icl, ft, pairing=None) -> np.ndarray:
  """SimAOU_l = (1/N) sum_i cos(ĥ_ICL,i - ĥ_ZSL,i, ĥ_FT,π(i) - ĥ_ZSL,π(i)), π = pairing or identity.

  Args: ``zsl``, ``icl``, ``ft``: attn_out records [N, L, D] (any float dtype; computed per layer in
  float64 to bound memory). Returns [L].
  """
  zsl, icl, ft = (_as_array(v, n) for v, n in ((zsl, "zsl"), (icl, "icl"), (ft, "ft")))
  n, layers, _ = _check_hidden(zsl=zsl, icl=icl, ft=ft)
  order = np.arange(n) if pairing is None else _check_pairing(pairing, n)
  per_layer = np.empty(layers)
  for layer in range(layers):
    zsl_hat = normalize(zsl[:, layer])  # [N, D]
    icl_update = normalize(icl[:, layer]) - zsl_hat
    ft_update = normalize(ft[:, layer]) - zsl_hat
    per_layer[layer] = cosine(icl_update, ft_update[order]).mean()
  return per_layer


@dataclasses.dataclass(frozen=True)
class RandomBaseline:
  """A seeded random baseline: per-layer values, the distribution, the key (raw words) and the generator
  that drew from it (``"numpy"``: a Generator seeded with ``fold_in(key, l)``'s words; ``"jax.random"``)."""
  per_layer: np.ndarray
  distribution: str
  key: list[int]
  generator: str = "numpy"

  @property
  def mean(self) -> float:
    return layer_mean(self.per_layer)

  def to_record(self) -> dict:
    return {"per_layer": [float(v) for v in self.per_layer], "mean": self.mean,
            "distribution": self.distribution, "key": self.key, "generator": self.generator}


@jax.jit
def _layer_key_words(key: jax.Array, layer: jax.Array) -> jax.Array:
  return jax.random.key_data(jax.random.fold_in(key, layer))


def _random_vectors(key: jax.Array, layer: int, n: int, d: int, distribution: str) -> np.ndarray:
  """[n, d] draws for one layer; row i is example i's fresh draw.

  The layer's key is ``fold_in(key, layer)`` (a jax chain from the run seed); its raw words seed a numpy
  ``Generator`` that draws the [n, d] block, so only one small jax computation is ever compiled (a jax draw
  compiles anew for every shape, about a second each on CPU). ``distribution``: ``"normal"`` (N(0, 1)),
  ``"uniform01"`` (U[0, 1)) or ``"randint<m>"`` (integers 0..m-1).
  """
  words = np.asarray(_layer_key_words(key, jnp.asarray(layer, jnp.uint32))).ravel().tolist()
  generator = np.random.default_rng(words)
  if distribution == "normal":
    return generator.standard_normal((n, d))
  if distribution == "uniform01":
    return generator.random((n, d))
  return generator.integers(0, int(distribution.removeprefix("randint")), size=(n, d))


def random_simaou_per_layer(zsl, icl, key, distribution: RandomDistribution = "normal") -> RandomBaseline:
  """Random SimAOU_l = (1/N) sum_i cos(ĥ_ICL,i - ĥ_ZSL,i, r_i,l), a fresh r per example and layer.

  ``distribution="normal"`` (default): r ~ N(0, I_D), centred, so the expectation is 0 by symmetry.
  ``"uniform01"``: r ~ U[0, 1)^D as in the original (not centred; its expected cosine is not 0 in general).
  ``r_i,l`` is row i of a numpy draw seeded by ``fold_in(key, l)``; ``key`` is an int seed or a jax key.
  """
  if distribution not in RANDOM_DISTRIBUTIONS:
    raise ValueError(f"distribution must be one of {RANDOM_DISTRIBUTIONS}, got {distribution!r}")
  zsl, icl = _as_array(zsl, "zsl"), _as_array(icl, "icl")
  n, layers, d = _check_hidden(zsl=zsl, icl=icl)
  key = _as_key(key)
  per_layer = np.empty(layers)
  for layer in range(layers):
    icl_update = normalize(icl[:, layer]) - normalize(zsl[:, layer])  # [N, D]
    per_layer[layer] = cosine(icl_update, _random_vectors(key, layer, n, d, distribution)).mean()
  return RandomBaseline(per_layer=per_layer, distribution=distribution, key=key_record(key))


# ----------------------------------------------------------------------------------------------------------
# SimAM (§9) and SimAM_Δ (§15.2).

def _score_list(scores, name: str) -> list[np.ndarray]:
  """Per-example [L, H, Tq_i] pre-softmax query-part scores (a list, or an [N, L, H, Tq] array)."""
  if isinstance(scores, np.ndarray) or isinstance(scores, jax.Array):
    scores = list(np.asarray(scores))
  items = [_float_array(item, f"{name}[{i}]") for i, item in enumerate(scores)]
  if not items:
    raise ValueError(f"{name} is empty; pass one [layers, heads, query_len] array per example")
  for i, item in enumerate(items):
    if item.ndim != 3 or item.shape[-1] == 0:
      raise ValueError(f"{name}[{i}] must be [layers, heads, query_len] with query_len > 0, got {item.shape}")
    if item.shape[:2] != items[0].shape[:2]:
      raise ValueError(f"{name}[{i}] has [layers, heads] {item.shape[:2]} but {name}[0] has "
                       f"{items[0].shape[:2]}; record every example with the same model")
  return items


def _left_pad(a: np.ndarray, length: int, value: float) -> np.ndarray:
  pad = length - a.shape[-1]
  return a if pad == 0 else np.concatenate([np.full(a.shape[:-1] + (pad,), value), a], axis=-1)


def _softmax_last(a: np.ndarray) -> np.ndarray:
  return scipy.special.softmax(a, axis=-1)


def _paired_cosines(first: list[np.ndarray], second: list[np.ndarray], pairing, softmax: bool,
                    require_equal: bool) -> np.ndarray:
  """[N, L] head-mean cosines between first[i] and second[π(i)]; unequal lengths are left-padded."""
  n = len(first)
  if len(second) != n:
    raise ValueError(f"score lists differ in length: {n} vs {len(second)}; pass the same evaluated examples")
  order = np.arange(n) if pairing is None else _check_pairing(pairing, n)
  if first[0].shape[:2] != second[0].shape[:2]:
    raise ValueError(f"[layers, heads] differ between settings: {first[0].shape[:2]} vs {second[0].shape[:2]}")
  per_example = np.empty((n, first[0].shape[0]))
  for i in range(n):
    a, b = first[i], second[order[i]]
    if a.shape[-1] != b.shape[-1]:
      if require_equal:
        raise ValueError(f"example {i}: query parts differ in length ({a.shape[-1]} vs {b.shape[-1]}); "
                         f"record the same positions c..t in every setting")
      # The original stores all examples left-padded to one length (zeros; -1e20 before a softmax),
      # so comparing example i with example π(i) aligns the two query parts at their right ends.
      length = max(a.shape[-1], b.shape[-1])
      pad_value = -1e20 if softmax else 0.0
      a, b = _left_pad(a, length, pad_value), _left_pad(b, length, pad_value)
    if softmax:
      a, b = _softmax_last(a), _softmax_last(b)
    per_example[i] = cosine(a, b).mean(axis=-1)  # heads, then examples
  return per_example


def simam_per_layer(icl_scores, ft_scores, pairing=None, softmax: bool = False) -> np.ndarray:
  """SimAM_l = (1/N) sum_i (1/H) sum_h cos(a_ICL,l,h,i, a_FT,l,h,π(i)) over query-part scores.

  Args: per-example lists of [L, H, Tq_i] pre-softmax scores at keys c..t (or [N, L, H, Tq] arrays).
  ``softmax=True`` is the optional post-softmax variant (softmax over the query part). Returns [L].
  Unpaired, lengths must match per example; paired (``pairing``), the shorter part is left-padded with zeros
  as in the original's padded layout.
  """
  icl, ft = _score_list(icl_scores, "icl_scores"), _score_list(ft_scores, "ft_scores")
  return _paired_cosines(icl, ft, pairing, softmax, require_equal=pairing is None).mean(axis=0)


def zsl_simam_per_layer(icl_scores, zsl_scores, pairing=None, softmax: bool = False) -> np.ndarray:
  """ZSL-SimAM_l = (1/N) sum_i (1/H) sum_h cos(a_ICL, a_ZSL): the paper's baseline for SimAM. Returns [L]."""
  return simam_per_layer(icl_scores, zsl_scores, pairing=pairing, softmax=softmax)


def simam_delta_per_layer(icl_scores, ft_scores, zsl_scores, pairing=None) -> np.ndarray:
  """SimAM_Δ,l = mean_i mean_h cos(a_ICL,i - a_ZSL,i, a_FT,π(i) - a_ZSL,π(i)) on pre-softmax scores.

  ``GiilDe/ft-vs-icl:scripts/metrics.py`` (§15.2): heads, then examples (then layers via ``layer_mean``).
  Returns [L].
  """
  icl = _score_list(icl_scores, "icl_scores")
  ft = _score_list(ft_scores, "ft_scores")
  zsl = _score_list(zsl_scores, "zsl_scores")
  if not len(icl) == len(ft) == len(zsl):
    raise ValueError(f"score lists differ in length: {len(icl)}, {len(ft)}, {len(zsl)}; "
                     f"pass the same evaluated examples")
  icl_update, ft_update = [], []
  for i, (a_icl, a_ft, a_zsl) in enumerate(zip(icl, ft, zsl)):
    if not a_icl.shape == a_ft.shape == a_zsl.shape:
      raise ValueError(f"example {i}: score shapes differ ({a_icl.shape}, {a_ft.shape}, {a_zsl.shape}); "
                       f"record the same positions c..t in every setting")
    icl_update.append(a_icl - a_zsl)
    ft_update.append(a_ft - a_zsl)
  return _paired_cosines(icl_update, ft_update, pairing, softmax=False,
                         require_equal=pairing is None).mean(axis=0)


# ----------------------------------------------------------------------------------------------------------
# Attention to training tokens: Kendall tau and top-k recall (§9, compute_training_example_attn.py).

def icl_training_attention(context_scores, demo_token_positions) -> np.ndarray:
  """w_ICL = softmax over the demo tokens of the head-summed context scores at the recorded position.

  Args:
    context_scores: [N, L, S] head-summed pre-softmax scores to the context keys 0..c-1.
    demo_token_positions: [T] positions of the demo input/label tokens (BOS and separators dropped), e.g.
      ``PackedContext.demo_token_positions``.
  Returns [N, L, T].
  """
  scores = _float_array(context_scores, "context_scores", ndim=3)
  return _softmax_last(scores[..., _check_demo_positions(demo_token_positions, scores.shape[-1])])


def _check_demo_positions(demo_token_positions, num_keys: int) -> np.ndarray:
  """The demo token positions as a non-empty 1-D integer array inside the ``num_keys`` context keys."""
  positions = np.asarray(demo_token_positions)
  if positions.ndim != 1 or positions.size == 0 or not np.issubdtype(positions.dtype, np.integer):
    raise ValueError(f"demo_token_positions must be a non-empty 1-D integer array, got {positions.shape}")
  if positions.min() < 0 or positions.max() >= num_keys:
    raise ValueError(f"demo_token_positions reach {positions.max()} but the context has {num_keys} "
                     f"keys; pass the context scores of the same packed context")
  return positions


def _check_query_shapes(test_shape: tuple, train_shape: tuple) -> None:
  if len(test_shape) != 3 or len(train_shape) != 3 or test_shape[1] != train_shape[0] or \
      test_shape[2] != train_shape[2]:
    raise ValueError(f"test_queries {test_shape} and train_queries {train_shape} must be [N, L, Dq] and "
                     f"[L, T, Dq] with the same layers and query size")


def _check_demo_lengths(demo_lengths, num_items: int) -> np.ndarray:
  lengths = np.asarray(demo_lengths)
  if lengths.ndim != 1 or lengths.size == 0 or (lengths < 1).any():
    raise ValueError(f"demo_lengths must be a non-empty list of positive lengths, got {lengths.tolist()}")
  if int(lengths.sum()) != num_items:
    raise ValueError(f"demo_lengths sum to {int(lengths.sum())} but there are {num_items} training "
                     f"tokens; use the lengths of the same packed demonstrations")
  return lengths


def ft_training_attention(test_queries, train_queries) -> np.ndarray:
  """w_FT = softmax_j (q_test . q_j) over every training token j (§8 FT-run queries).

  Args:
    test_queries: [N, L, Dq] scaled queries of the FT evaluation at the recorded position.
    train_queries: [L, T, Dq] scaled queries of every demo token of the FT run, in ICL token order.
  Returns [N, L, T].
  """
  test, train = _as_array(test_queries, "test_queries"), _as_array(train_queries, "train_queries")
  _check_query_shapes(test.shape, train.shape)
  weights = np.empty((test.shape[0], test.shape[1], train.shape[1]))
  for layer in range(test.shape[1]):  # one [N, Dq] x [Dq, T] product per layer, in float64
    dots = np.asarray(test[:, layer], np.float64) @ np.asarray(train[layer], np.float64).T
    weights[:, layer] = _softmax_last(dots)
  return weights


def example_level(weights, demo_lengths) -> np.ndarray:
  """Per-demonstration sums of token weights: [N, L, T] -> [N, L, k_eff] (consecutive segments)."""
  weights = _float_array(weights, "weights", ndim=3)
  lengths = _check_demo_lengths(demo_lengths, weights.shape[-1])
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
  return np.add.reduceat(weights, starts, axis=-1)


def _check_weights(w_icl, w_ft=None) -> tuple[np.ndarray, np.ndarray | None]:
  w_icl = _float_array(w_icl, "w_icl", ndim=3)
  if w_ft is None:
    return w_icl, None
  w_ft = _float_array(w_ft, "w_ft", ndim=3)
  if w_icl.shape != w_ft.shape:
    raise ValueError(f"w_icl {w_icl.shape} and w_ft {w_ft.shape} must have the same [N, L, T] shape")
  return w_icl, w_ft


PAIRWISE_KENDALL_MAX_ITEMS = 64  # up to this many items, tau-b is computed from all pairs at once (exact)


def _kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
  import scipy.stats  # pylint: disable=import-outside-toplevel  # ~1 s to import; only this host path needs it
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # constant input: tau-b is undefined and scipy returns NaN.
    return float(scipy.stats.kendalltau(a, b).statistic)


def kendall_tau_b(first, second) -> np.ndarray:
  """Kendall's tau-b of each row pair of [B, n] arrays: sum_{i<j} s^a_ij s^b_ij / sqrt(sum (s^a)^2 sum (s^b)^2),
  s_ij = sign(x_j - x_i); equals ``scipy.stats.kendalltau`` (NaN when a row is constant).

  Rows of at most ``PAIRWISE_KENDALL_MAX_ITEMS`` items are done with all pairs in numpy; longer rows go
  through scipy's O(n log n) routine one by one.
  """
  first, second = _float_array(first, "first", ndim=2), _float_array(second, "second", ndim=2)
  if first.shape != second.shape:
    raise ValueError(f"tau-b needs equal shapes, got {first.shape} and {second.shape}")
  rows, items = first.shape
  if items > PAIRWISE_KENDALL_MAX_ITEMS:
    return np.array([_kendall_tau(first[row], second[row]) for row in range(rows)])
  upper_i, upper_j = np.triu_indices(items, k=1)
  out = np.empty(rows)
  chunk = max(1, 2_000_000 // max(1, len(upper_i)))
  for begin in range(0, rows, chunk):
    sign_a = np.sign(first[begin:begin + chunk, upper_j] - first[begin:begin + chunk, upper_i])
    sign_b = np.sign(second[begin:begin + chunk, upper_j] - second[begin:begin + chunk, upper_i])
    with np.errstate(invalid="ignore", divide="ignore"):
      out[begin:begin + chunk] = (sign_a * sign_b).sum(-1) / np.sqrt((sign_a ** 2).sum(-1) * (sign_b ** 2).sum(-1))
  return out


def kendall_per_layer(w_icl, w_ft, max_examples: int | None = None, pairing=None) -> np.ndarray:
  """tau_l = (1/N') sum_{i<N'} tau_b(w_ICL,i,l, w_FT,π(i),l), N' = min(N, max_examples). Returns [L].

  Kendall's tau-b (``scipy.stats.kendalltau``); with no ties it is (P_conc - P_disc) / C(n, 2).
  ``max_examples=100`` gives the original's ``debug_n`` parity; ``pairing`` (length N') the shuffled control.
  """
  w_icl, w_ft = _check_weights(w_icl, w_ft)
  n = _limit(w_icl.shape[0], max_examples)
  order = np.arange(n) if pairing is None else _check_pairing(pairing, n)
  layers, items = w_icl.shape[1], w_icl.shape[2]
  taus = kendall_tau_b(w_icl[:n].reshape(n * layers, items), w_ft[order].reshape(n * layers, items))
  return taus.reshape(n, layers).mean(axis=0)


def random_kendall_per_layer(w_icl, key, max_examples: int | None = None) -> RandomBaseline:
  """tau_b(w_ICL,i,l, u_i,l) averaged as ``kendall_per_layer``, u ~ U[0, 1)^T iid, seeded.

  ``u_i,l`` is row i of a numpy draw seeded by ``fold_in(key, l)``.
  """
  w_icl, _ = _check_weights(w_icl)
  n = _limit(w_icl.shape[0], max_examples)
  key = _as_key(key)
  layers, t = w_icl.shape[1], w_icl.shape[2]
  per_layer = []
  for layer in range(layers):
    draws = _random_vectors(key, layer, n, t, "uniform01")
    per_layer.append(np.mean(kendall_tau_b(w_icl[:n, layer], draws)))
  return RandomBaseline(per_layer=np.array(per_layer), distribution="uniform01", key=key_record(key))


def _top_k(values: np.ndarray, k: int) -> np.ndarray:
  """Indices of the k largest values, ties to the lowest index (a stable ``argsort(-x)[:k]``)."""
  return np.argsort(-values, kind="stable")[:k]


def topk_recall_per_layer(w_icl, w_ft, k: int, max_examples: int | None = None, pairing=None) -> np.ndarray:
  """recall_l = sum_{i<N'} |top_k(w_ICL,i,l) ∩ top_k(w_FT,π(i),l)| / (N' k). Returns [L].

  The original's ``recall_topk`` (k = 5 at example level, 100 at token level): for each of the k ICL top
  indices, count it when it is among the FT top k. Top-k uses a stable sort (ties to the lowest index).
  """
  w_icl, w_ft = _check_weights(w_icl, w_ft)
  n = _limit(w_icl.shape[0], max_examples)
  k = int(k)
  if not 1 <= k <= w_icl.shape[-1]:
    raise ValueError(f"k={k} must be in 1..{w_icl.shape[-1]} (the number of ranked items)")
  order = np.arange(n) if pairing is None else _check_pairing(pairing, n)
  hits = np.zeros(w_icl.shape[1])
  for i in range(n):
    for layer in range(w_icl.shape[1]):
      hits[layer] += np.isin(_top_k(w_icl[i, layer], k), _top_k(w_ft[order[i], layer], k)).sum()
  return hits / (n * k)


def random_topk_recall_per_layer(w_ft, k: int, key, max_examples: int | None = None) -> RandomBaseline:
  """The original's ``random_recall_topk``: k uniform random indices (with replacement) per example and
  layer, counted when among the FT top k; ``sum hits / (N' k)``. Draws: numpy, seeded by ``fold_in(key, l)``.
  """
  w_ft = _float_array(w_ft, "w_ft", ndim=3)
  n = _limit(w_ft.shape[0], max_examples)
  k = int(k)
  if not 1 <= k <= w_ft.shape[-1]:
    raise ValueError(f"k={k} must be in 1..{w_ft.shape[-1]} (the number of ranked items)")
  key = _as_key(key)
  hits = np.zeros(w_ft.shape[1])
  for layer in range(w_ft.shape[1]):
    indices = _random_vectors(key, layer, n, k, f"randint{w_ft.shape[-1]}")
    for i in range(n):
      hits[layer] += np.isin(indices[i], _top_k(w_ft[i, layer], k)).sum()
  return RandomBaseline(per_layer=hits / (n * k), distribution="randint", key=key_record(key))


def training_attention_report(context_scores, demo_token_positions, demo_lengths, test_queries,
                              train_queries, key, *, max_examples: int | None = None, pairing=None,
                              token_top_k: int = 100, example_top_k: int = 5, baselines: bool = True,
                              ops=None) -> dict:
  """Kendall tau and top-k recall between w_ICL and w_FT at token and example level, with baselines.

  Inputs as in ``icl_training_attention`` / ``ft_training_attention`` / ``example_level``; the example
  level sums softmax weights within each demonstration (softmax over all tokens first, as the original).
  Only the first N' = min(N, max_examples) examples are used (and computed). Returns a JSON-ready dict
  ``{"token": {...}, "example": {...}, "max_examples", "num_examples"}`` whose levels hold per-layer lists
  and means of ``kendall``, ``random_kendall``, ``recall_topk`` and ``random_recall_topk`` (k =
  ``token_top_k`` / ``example_top_k``, clipped to the number of items). ``baselines=False`` leaves out the
  two random baselines (they do not depend on ``pairing``: a shuffled report reuses the unshuffled ones).
  ``ops``: the module whose metric functions compute it (this one, or :mod:`dualform.metrics_device`).
  """
  ops = ops or _THIS_MODULE
  n = _limit(len(context_scores), max_examples)
  if len(test_queries) != len(context_scores):
    raise ValueError(f"context_scores has {len(context_scores)} examples but test_queries {len(test_queries)}; "
                     f"pass the same evaluated examples")
  first = lambda array: (array if hasattr(array, "shape") else np.asarray(array))[:n]
  w_icl_tokens = ops.icl_training_attention(first(context_scores), demo_token_positions)
  w_ft_tokens = ops.ft_training_attention(first(test_queries), train_queries)
  if w_icl_tokens.shape != w_ft_tokens.shape:
    raise ValueError(f"ICL sees {w_icl_tokens.shape[-1]} demo tokens but FT trained on "
                     f"{w_ft_tokens.shape[-1]}; use the same packed demonstrations for both")
  key = _as_key(key)
  report = {"max_examples": max_examples, "num_examples": n,
            "paired": "shuffled" if pairing is not None else "identity"}
  levels = {"token": (w_icl_tokens, w_ft_tokens, token_top_k),
            "example": (ops.example_level(w_icl_tokens, demo_lengths), ops.example_level(w_ft_tokens, demo_lengths),
                        example_top_k)}
  for level_index, (level, (w_icl, w_ft, top_k)) in enumerate(levels.items()):
    top_k = min(top_k, w_icl.shape[-1])
    level_key = jax.random.fold_in(key, level_index)
    kendall = ops.kendall_per_layer(w_icl, w_ft, max_examples, pairing)
    recall = ops.topk_recall_per_layer(w_icl, w_ft, top_k, max_examples, pairing)
    report[level] = {"kendall": _per_layer_record(kendall), "top_k": top_k, "recall_topk": _per_layer_record(recall)}
    if baselines:
      report[level]["random_kendall"] = ops.random_kendall_per_layer(w_icl, jax.random.fold_in(level_key, 0),
                                                                     max_examples).to_record()
      report[level]["random_recall_topk"] = ops.random_topk_recall_per_layer(
          w_ft, top_k, jax.random.fold_in(level_key, 1), max_examples).to_record()
  return report


# ----------------------------------------------------------------------------------------------------------
# Shuffled pairing (§15.4).

def derangement(n: int, seed: int) -> np.ndarray:
  """A uniformly random permutation of 0..n-1 with no fixed point, from ``np.random.default_rng(seed)``.

  Rejection sampling (about e tries on average). ``n >= 2``.
  """
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
    raise ValueError(f"a derangement needs n >= 2 examples, got {n!r}")
  rng = np.random.default_rng(seed)
  while True:
    permutation = rng.permutation(int(n))
    if not np.any(permutation == np.arange(n)):
      return permutation


def apply_pairing(per_example, pairing):
  """``out[i] = per_example[pairing[i]]`` for an array (first axis) or a list of per-example records."""
  n = len(per_example)
  pairing = _check_pairing(pairing, n)
  if isinstance(per_example, (np.ndarray, jax.Array)):
    return np.asarray(per_example)[pairing]
  return [per_example[j] for j in pairing]


# ----------------------------------------------------------------------------------------------------------
# Output-level divergence between ICL and FT (§15, last paragraph).

def label_distributions(label_scores) -> np.ndarray:
  """p_ij = exp(s_ij) / sum_j' exp(s_ij'): label log-probs renormalised over the label set. [N, C]."""
  return _softmax_last(_float_array(label_scores, "label_scores", ndim=2))


def kl_divergence(p, q) -> np.ndarray:
  """KL(p || q) = sum_j p_j (log p_j - log q_j) per row, in nats (0 log 0 = 0)."""
  p, q = _float_array(p, "p"), _float_array(q, "q")
  if p.shape != q.shape:
    raise ValueError(f"p {p.shape} and q {q.shape} must have the same shape")
  return scipy.special.rel_entr(p, q).sum(axis=-1)


def js_divergence(p, q) -> np.ndarray:
  """JS(p, q) = KL(p || m)/2 + KL(q || m)/2 with m = (p + q)/2, per row, in nats (at most log 2)."""
  p, q = _float_array(p, "p"), _float_array(q, "q")
  m = 0.5 * (p + q)
  return 0.5 * kl_divergence(p, m) + 0.5 * kl_divergence(q, m)


def output_divergence(icl_label_scores, ft_label_scores) -> dict[str, float]:
  """Mean over examples of KL(ICL || FT), KL(FT || ICL) and JS between label distributions, plus the
  prediction agreement rate (%). Inputs: [N, C] label log-probs of the two settings."""
  icl = label_distributions(icl_label_scores)
  ft = label_distributions(ft_label_scores)
  if icl.shape != ft.shape:
    raise ValueError(f"label score shapes differ: {icl.shape} vs {ft.shape}")
  return {"kl_icl_ft": float(kl_divergence(icl, ft).mean()), "kl_ft_icl": float(kl_divergence(ft, icl).mean()),
          "js": float(js_divergence(icl, ft).mean()),
          "agreement": float(100.0 * np.mean(icl.argmax(-1) == ft.argmax(-1)))}


# ----------------------------------------------------------------------------------------------------------
# Aggregation.

def layer_mean(per_layer) -> float:
  """The headline number: (1/L) sum_l metric_l."""
  values = _float_array(per_layer, "per_layer", ndim=1)
  if values.size == 0:
    raise ValueError("per_layer is empty")
  return float(values.mean())


def _per_layer_record(per_layer) -> dict:
  values = _float_array(per_layer, "per_layer", ndim=1)
  return {"per_layer": [float(v) for v in values], "mean": layer_mean(values)}


def mean_std(values, ddof: int = 1) -> dict:
  """Mean ± std over runs (seeds / perm ids): ``values`` is [R] or [R, L] (per-layer lists, elementwise).

  std uses ``ddof`` (1: the sample standard deviation; NaN for a single run). NaN values propagate.
  Returns ``{"mean", "std", "n"}`` (floats, or lists for per-layer input).
  """
  array = _float_array(values, "values")
  if array.ndim not in (1, 2) or array.shape[0] == 0:
    raise ValueError(f"values must be [runs] or [runs, layers] with at least one run, got {array.shape}")
  n = array.shape[0]
  mean = array.mean(axis=0)
  std = array.std(axis=0, ddof=ddof) if n > ddof else np.full_like(mean, np.nan)
  if array.ndim == 1:
    return {"mean": float(mean), "std": float(std), "n": n}
  return {"mean": mean.tolist(), "std": std.tolist(), "n": n}


_THIS_MODULE = sys.modules[__name__]
