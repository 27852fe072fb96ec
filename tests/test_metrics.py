"""Tests of dualform.metrics on hand-computed cases (PROTOCOL §9, §15)."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
import scipy.special
import scipy.stats

from dualform import metrics

RTOL = 1e-12  # everything is float64 numpy


# ------------------------------------------------------------------------------------------------ predictions

def test_accuracy_and_predictions_by_hand():
  assert metrics.accuracy([0, 1, 2], [0, 1, 1]) == pytest.approx(200 / 3, rel=RTOL)
  # Ties go to the lowest class id.
  assert metrics.predictions_from_scores([[-1.0, -1.0], [-2.0, -0.5]]).tolist() == [0, 1]
  with pytest.raises(ValueError, match="differ in length"):
    metrics.accuracy([0, 1], [0])


ZSL = [0, 0, 0, 0, 1, 1]
FT = [1, 1, 1, 0, 1, 0]
ICL = [1, 0, 1, 1, 0, 1]


def test_recovery_ratios_by_hand():
  # ZSL✗ ∧ FT✓ = {0, 1, 2}; with ICL✓ = {0, 2}.
  assert metrics.rec2ftp(ZSL, FT, ICL) == metrics.Ratio(value=200 / 3, numerator=2, denominator=3)
  # ZSL✗ = {0, 1, 2, 3}; with ICL✓ = {0, 2, 3}.
  assert metrics.chance_rec2ftp(ZSL, ICL) == metrics.Ratio(value=75.0, numerator=3, denominator=4)
  # ZSL✗ ∧ ICL✓ = {0, 2, 3}; with FT✓ = {0, 2}.
  assert metrics.rec2iclp(ZSL, FT, ICL) == metrics.Ratio(value=200 / 3, numerator=2, denominator=3)
  # ZSL✓ = {4, 5}: FT loses 5, ICL loses 4.
  assert metrics.regressions(ZSL, FT) == metrics.Ratio(value=50.0, numerator=1, denominator=2)
  assert metrics.regressions(ZSL, ICL) == metrics.Ratio(value=50.0, numerator=1, denominator=2)


def test_zero_denominators_give_nan():
  everything_right = [True, True]
  ratio = metrics.rec2ftp(everything_right, everything_right, [False, True])
  assert math.isnan(ratio.value) and (ratio.numerator, ratio.denominator) == (0, 0)
  assert ratio.to_record() == {"value": None, "numerator": 0, "denominator": 0}
  assert math.isnan(metrics.chance_rec2ftp(everything_right, everything_right).value)
  assert math.isnan(metrics.regressions([False, False], [True, False]).value)


def test_boolean_inputs_are_checked():
  with pytest.raises(ValueError, match="booleans"):
    metrics.rec2ftp([0, 2], [1, 1], [1, 1])
  with pytest.raises(ValueError, match="differ in length"):
    metrics.rec2ftp([0, 1], [1, 1, 0], [1, 1])


def test_cohen_kappa_by_hand():
  # p_o = 3/4; marginals (1/2, 1/2) and (1/4, 3/4) give p_e = 1/2; kappa = (3/4 - 1/2) / (1/2) = 1/2.
  assert metrics.cohen_kappa([0, 0, 1, 1], [0, 1, 1, 1]) == pytest.approx(0.5, rel=RTOL)
  assert metrics.cohen_kappa([0, 1, 2, 2], [0, 1, 2, 2]) == pytest.approx(1.0, rel=RTOL)
  assert math.isnan(metrics.cohen_kappa([1, 1, 1], [1, 1, 1]))  # p_e = 1: undefined
  # Complete disagreement on a balanced binary set: p_o = 0, p_e = 1/2, kappa = -1.
  assert metrics.cohen_kappa([0, 1], [1, 0]) == pytest.approx(-1.0, rel=RTOL)


def test_outcome_counts_and_report():
  counts = metrics.outcome_counts(ZSL, FT, ICL)
  assert counts["n"] == 6 and counts["zsl_correct"] == 2 and counts["ft_correct"] == 4
  assert counts["zsl0_ft1_icl1"] == 2 and counts["zsl0_ft1_icl0"] == 1 and counts["zsl0_ft0_icl1"] == 1
  assert counts["zsl1_ft1_icl0"] == 1 and counts["zsl1_ft0_icl1"] == 1
  assert sum(value for key, value in counts.items() if key.count("_") == 2) == 6
  report = metrics.correctness_report(ZSL, FT, ICL, icl_predictions=[0, 0, 1, 1, 0, 0],
                                      ft_predictions=[0, 1, 1, 1, 0, 0])
  assert report["rec2ftp"] == {"value": 200 / 3, "numerator": 2, "denominator": 3}
  assert report["chance_rec2ftp"]["value"] == 75.0
  assert set(report) == {"rec2ftp", "chance_rec2ftp", "rec2iclp", "regressions", "counts", "cohen_kappa_icl_ft"}


# ------------------------------------------------------------------------------------------------ SimAOU

def test_cosine_and_normalize_by_hand():
  assert metrics.cosine([3.0, 4.0], [3.0, 4.0]) == pytest.approx(1.0, rel=RTOL)
  assert metrics.cosine([1.0, 0.0], [0.0, 2.0]) == 0.0
  assert metrics.cosine([0.0, 0.0], [1.0, 0.0]) == 0.0  # eps keeps a zero vector at 0, not NaN
  np.testing.assert_allclose(metrics.normalize([[3.0, 4.0]]), [[0.6, 0.8]], rtol=RTOL)


def test_simaou_by_hand():
  zsl = np.array([[[1.0, 0.0]]])  # [N=1, L=1, D=2]
  icl = np.array([[[0.0, 1.0]]])
  # Identical updates (after normalisation) give 1.
  np.testing.assert_allclose(metrics.simaou_per_layer(zsl, icl, 2 * icl), [1.0], rtol=RTOL)
  # ĥ_FT = (1, 1)/sqrt 2: Δ_ICL = (-1, 1), Δ_FT = (1/sqrt2 - 1, 1/sqrt2); the angle between them is pi/8.
  ft = np.array([[[1.0, 1.0]]])
  np.testing.assert_allclose(metrics.simaou_per_layer(zsl, icl, ft), [math.cos(math.pi / 8)], rtol=RTOL)
  # Updates (-1, 1, 0) and (-1, 0, 1): cos = 1/2. No ICL update gives 0.
  zsl3, icl3, ft3 = np.eye(3)[None, None, 0], np.eye(3)[None, None, 1], np.eye(3)[None, None, 2]
  np.testing.assert_allclose(metrics.simaou_per_layer(zsl3, icl3, ft3), [0.5], rtol=RTOL)
  np.testing.assert_allclose(metrics.simaou_per_layer(zsl, zsl, ft), [0.0], atol=0)


def test_simaou_averages_examples_per_layer():
  rng = np.random.default_rng(0)
  zsl, icl, ft = (rng.normal(size=(5, 3, 7)) for _ in range(3))
  per_layer = metrics.simaou_per_layer(zsl, icl, ft)
  expected = [[metrics.cosine(icl[i, l] / np.linalg.norm(icl[i, l]) - zsl[i, l] / np.linalg.norm(zsl[i, l]),
                              ft[i, l] / np.linalg.norm(ft[i, l]) - zsl[i, l] / np.linalg.norm(zsl[i, l]))
               for l in range(3)] for i in range(5)]
  np.testing.assert_allclose(per_layer, np.mean(expected, axis=0), rtol=1e-10)
  np.testing.assert_allclose(metrics.simaou_per_layer(zsl, icl, icl), np.ones(3), rtol=RTOL)
  # Shuffled pairing: example i against example pairing[i]'s own FT update.
  pairing = metrics.derangement(5, seed=1)
  shuffled = metrics.simaou_per_layer(zsl, icl, ft, pairing=pairing)
  manual = [[metrics.cosine(icl[i, l] / np.linalg.norm(icl[i, l]) - zsl[i, l] / np.linalg.norm(zsl[i, l]),
                            ft[j, l] / np.linalg.norm(ft[j, l]) - zsl[j, l] / np.linalg.norm(zsl[j, l]))
             for l in range(3)] for i, j in enumerate(pairing)]
  np.testing.assert_allclose(shuffled, np.mean(manual, axis=0), rtol=1e-10)
  with pytest.raises(ValueError, match="differ in shape"):
    metrics.simaou_per_layer(zsl, icl, ft[:, :2])


def test_random_simaou_is_seeded_and_centred():
  rng = np.random.default_rng(0)
  zsl = rng.normal(size=(400, 2, 32))
  icl = zsl + 1.0  # every ICL update points along (1, ..., 1) after normalisation differences
  first = metrics.random_simaou_per_layer(zsl, icl, key=3)
  again = metrics.random_simaou_per_layer(zsl, icl, key=jax.random.key(3))
  np.testing.assert_array_equal(first.per_layer, again.per_layer)
  assert first.key == np.asarray(jax.random.key_data(jax.random.key(3))).tolist()
  assert first.distribution == "normal"
  assert not np.array_equal(first.per_layer, metrics.random_simaou_per_layer(zsl, icl, key=4).per_layer)
  # Centred normal: each cosine has std about 1/sqrt(32); the mean of 400 is within 0.05 of 0 (~3.5 sigma).
  assert np.all(np.abs(first.per_layer) < 0.05)
  # The original's U[0, 1) is not centred: against updates along (1, ..., 1) it is far from 0.
  uniform = metrics.random_simaou_per_layer(np.zeros((400, 2, 32)), np.ones((400, 2, 32)), key=3,
                                            distribution="uniform01")
  assert np.all(uniform.per_layer > 0.8)  # expectation about sqrt(3)/2
  with pytest.raises(ValueError, match="distribution"):
    metrics.random_simaou_per_layer(zsl, icl, key=3, distribution="cauchy")


# ------------------------------------------------------------------------------------------------ SimAM

def test_simam_by_hand():
  icl = [np.array([[[1.0, 0.0], [1.0, 1.0]]])]  # one example, [L=1, H=2, Tq=2]
  ft = [np.array([[[2.0, 0.0], [0.0, 1.0]]])]
  # Head 0: cos = 1; head 1: cos = 1/sqrt 2; mean over heads.
  np.testing.assert_allclose(metrics.simam_per_layer(icl, ft), [(1 + 2 ** -0.5) / 2], rtol=RTOL)
  np.testing.assert_allclose(metrics.zsl_simam_per_layer(icl, icl), [1.0], rtol=RTOL)
  # Ragged query parts across examples are fine; a [N, L, H, Tq] array works too.
  ragged = [np.ones((2, 3, 4)), np.ones((2, 3, 6))]
  np.testing.assert_allclose(metrics.simam_per_layer(ragged, ragged), [1.0, 1.0], rtol=RTOL)
  np.testing.assert_allclose(metrics.simam_per_layer(np.ones((3, 2, 2, 5)), np.ones((3, 2, 2, 5))), [1.0, 1.0],
                             rtol=RTOL)
  with pytest.raises(ValueError, match="query parts differ in length"):
    metrics.simam_per_layer([np.ones((1, 1, 2))], [np.ones((1, 1, 3))])


def test_simam_softmax_variant_and_pairing_padding():
  # Post-softmax: softmax([0, 0]) = softmax([5, 5]), so cos = 1 although pre-softmax cos(0-vector) = 0.
  zeros, fives = [np.zeros((1, 1, 2))], [np.full((1, 1, 2), 5.0)]
  np.testing.assert_allclose(metrics.simam_per_layer(zeros, fives, softmax=True), [1.0], rtol=RTOL)
  np.testing.assert_allclose(metrics.simam_per_layer(zeros, fives), [0.0], atol=0)
  # Shuffled pairing with unequal lengths left-pads with zeros: (1, 2) vs (0, 3) -> 6 / (sqrt5 * 3).
  icl = [np.array([[[1.0, 2.0]]]), np.array([[[3.0]]])]
  ft = [np.array([[[1.0, 2.0]]]), np.array([[[3.0]]])]
  np.testing.assert_allclose(metrics.simam_per_layer(icl, ft, pairing=[1, 0]), [2 / math.sqrt(5)], rtol=RTOL)


def test_simam_delta_by_hand():
  rng = np.random.default_rng(1)
  zsl = [rng.normal(size=(2, 3, n)) for n in (3, 5)]
  update = [rng.normal(size=z.shape) for z in zsl]
  icl = [z + d for z, d in zip(zsl, update)]
  np.testing.assert_allclose(metrics.simam_delta_per_layer(icl, [z + 2 * d for z, d in zip(zsl, update)], zsl),
                             [1.0, 1.0], rtol=RTOL)
  np.testing.assert_allclose(metrics.simam_delta_per_layer(icl, [z - d for z, d in zip(zsl, update)], zsl),
                             [-1.0, -1.0], rtol=RTOL)
  # Paired: example i's ICL update against example pairing[i]'s FT update (its own ZSL reference); the
  # shorter update is left-padded with zeros.
  ft_update = [rng.normal(size=z.shape) for z in zsl]
  ft = [z + e for z, e in zip(zsl, ft_update)]
  pad = lambda a: np.concatenate([np.zeros((2, 3, 2)), a], axis=-1)
  manual_0 = metrics.cosine(pad(update[0]), ft_update[1]).mean(axis=-1)
  manual_1 = metrics.cosine(update[1], pad(ft_update[0])).mean(axis=-1)
  np.testing.assert_allclose(metrics.simam_delta_per_layer(icl, ft, zsl, pairing=[1, 0]),
                             (manual_0 + manual_1) / 2, rtol=1e-10)


# ------------------------------------------------------------------------------------------------ Kendall

def test_training_attention_by_hand():
  # Drop BOS (position 0) and the separator (position 3): softmax over (0, ln 3) = (1/4, 3/4).
  context_scores = np.array([[[5.0, 0.0, math.log(3.0), 9.0]]])
  w_icl = metrics.icl_training_attention(context_scores, np.array([1, 2]))
  np.testing.assert_allclose(w_icl, [[[0.25, 0.75]]], rtol=RTOL)
  # q_test . q_j = (ln 2, 0): softmax = (2/3, 1/3).
  w_ft = metrics.ft_training_attention(np.array([[[1.0, 0.0]]]), np.array([[[math.log(2.0), 7.0], [0.0, 1.0]]]))
  np.testing.assert_allclose(w_ft, [[[2 / 3, 1 / 3]]], rtol=RTOL)
  np.testing.assert_allclose(metrics.example_level(np.array([[[0.1, 0.2, 0.3, 0.4]]]), [1, 3]),
                             [[[0.1, 0.9]]], rtol=RTOL)
  with pytest.raises(ValueError, match="sum to 3"):
    metrics.example_level(np.ones((1, 1, 4)), [1, 2])


def test_kendall_by_hand():
  w_icl = np.array([[[0.1, 0.2, 0.3, 0.4]], [[0.1, 0.2, 0.3, 0.4]], [[0.1, 0.2, 0.3, 0.4]]])  # [N=3, L=1, 4]
  w_ft = np.array([[[0.1, 0.2, 0.3, 0.4]], [[0.4, 0.3, 0.2, 0.1]], [[0.1, 0.3, 0.2, 0.4]]])
  # taus: 1, -1 and (5 concordant - 1 discordant) / 6 = 2/3.
  np.testing.assert_allclose(metrics.kendall_per_layer(w_icl, w_ft), [(1 - 1 + 2 / 3) / 3], rtol=RTOL)
  np.testing.assert_allclose(metrics.kendall_per_layer(w_icl, w_ft, max_examples=2), [0.0], atol=1e-15)
  np.testing.assert_allclose(metrics.kendall_per_layer(w_icl, w_ft, pairing=[2, 0, 1]),
                             [(2 / 3 + 1 - 1) / 3], rtol=RTOL)
  # Tau-b with ties matches scipy's default.
  a, b = np.array([1.0, 1.0, 2.0, 3.0]), np.array([1.0, 2.0, 2.0, 3.0])
  np.testing.assert_allclose(metrics.kendall_per_layer(a[None, None], b[None, None]),
                             [scipy.stats.kendalltau(a, b).statistic], rtol=RTOL)


@pytest.mark.parametrize("items", [2, 7, 64, 65, 130])
def test_batched_tau_b_equals_scipy(items):
  rng = np.random.default_rng(items)
  first = rng.integers(0, 4, size=(12, items)).astype(float)  # many ties
  second = np.where(rng.random((12, items)) < 0.5, first, rng.integers(0, 4, size=(12, items)))
  first[0] = 1.0  # a constant row: tau-b undefined
  expected = [scipy.stats.kendalltau(a, b).statistic for a, b in zip(first[1:], second[1:])]
  taus = metrics.kendall_tau_b(first, second)
  np.testing.assert_allclose(taus[1:], expected, rtol=1e-12, atol=1e-15)
  assert math.isnan(taus[0])


def test_topk_recall_by_hand():
  w_icl = np.array([[[0.4, 0.3, 0.2, 0.1]]])
  w_ft = np.array([[[0.1, 0.3, 0.4, 0.2]]])
  # top-2 ICL = {0, 1}, top-2 FT = {2, 1}: one hit of two.
  np.testing.assert_allclose(metrics.topk_recall_per_layer(w_icl, w_ft, 2), [0.5], rtol=RTOL)
  np.testing.assert_allclose(metrics.topk_recall_per_layer(w_icl, w_icl, 3), [1.0], rtol=RTOL)
  with pytest.raises(ValueError, match="k=5"):
    metrics.topk_recall_per_layer(w_icl, w_ft, 5)


def test_random_baselines_of_training_attention():
  rng = np.random.default_rng(2)
  w = rng.random((300, 2, 50))
  random_tau = metrics.random_kendall_per_layer(w, key=0)
  np.testing.assert_array_equal(random_tau.per_layer, metrics.random_kendall_per_layer(w, key=0).per_layer)
  assert np.all(np.abs(random_tau.per_layer) < 0.03)  # tau of independent draws: std ~0.1 / sqrt(300)
  recall = metrics.random_topk_recall_per_layer(w, 5, key=1)
  np.testing.assert_allclose(recall.per_layer, 0.1, atol=0.03)  # k / T = 5 / 50 expected
  assert metrics.random_topk_recall_per_layer(w, 5, key=1, max_examples=10).per_layer.shape == (2,)


def test_training_attention_report_scores_one_when_icl_equals_ft():
  # Build ICL context scores whose demo-token softmax equals the FT softmax exactly.
  rng = np.random.default_rng(3)
  n, layers, dq = 6, 2, 4
  demo_lengths = [3, 2, 4]
  positions = np.array([1, 2, 3, 5, 6, 8, 9, 10, 11])  # BOS at 0, separators at 4, 7, 12
  test_queries = rng.normal(size=(n, layers, dq))
  train_queries = rng.normal(size=(layers, 9, dq))
  dots = np.einsum("nld,ltd->nlt", test_queries, train_queries)
  context_scores = rng.normal(size=(n, layers, 13))
  context_scores[..., positions] = dots + 3.0  # a shift does not change the softmax
  report = metrics.training_attention_report(context_scores, positions, demo_lengths, test_queries,
                                             train_queries, key=0, token_top_k=4, example_top_k=2)
  for level in ("token", "example"):
    assert report[level]["kendall"]["per_layer"] == pytest.approx([1.0, 1.0], rel=RTOL)
    assert report[level]["recall_topk"]["mean"] == pytest.approx(1.0, rel=RTOL)
    assert report[level]["random_kendall"]["distribution"] == "uniform01"
  assert report["token"]["top_k"] == 4 and report["example"]["top_k"] == 2
  assert report["num_examples"] == n and report["paired"] == "identity"
  # Shuffled pairing (a derangement) breaks the match: token-level tau drops well below 1.
  shuffled = metrics.training_attention_report(context_scores, positions, demo_lengths, test_queries,
                                               train_queries, key=0, pairing=metrics.derangement(n, 0),
                                               token_top_k=4, example_top_k=2)
  assert shuffled["paired"] == "shuffled" and shuffled["token"]["kendall"]["mean"] < 0.9
  with pytest.raises(ValueError, match="same packed demonstrations"):
    metrics.training_attention_report(context_scores, positions[:-1], demo_lengths, test_queries,
                                      train_queries, key=0)


def test_training_attention_report_uses_only_the_first_examples():
  """max_examples=m equals the report of the first m examples (the rest are never computed); without
  baselines the random keys are left out and the rest is unchanged."""
  rng = np.random.default_rng(4)
  n, layers, dq, m = 9, 2, 4, 5
  demo_lengths, positions = [3, 2, 4], np.array([1, 2, 3, 5, 6, 8, 9, 10, 11])
  test_queries, train_queries = rng.normal(size=(n, layers, dq)), rng.normal(size=(layers, 9, dq))
  context_scores = rng.normal(size=(n, layers, 13))
  report = lambda scores, queries, **kwargs: metrics.training_attention_report(
      scores, positions, demo_lengths, queries, train_queries, key=0, token_top_k=4, example_top_k=2, **kwargs)
  limited = report(context_scores, test_queries, max_examples=m)
  first = report(context_scores[:m], test_queries[:m])
  assert limited["num_examples"] == first["num_examples"] == m
  assert {level: limited[level] for level in ("token", "example")} == {
      level: first[level] for level in ("token", "example")}
  assert limited["token"]["kendall"]["mean"] != report(context_scores, test_queries)["token"]["kendall"]["mean"]
  pairing = metrics.derangement(m, 1)
  with_baselines = report(context_scores, test_queries, max_examples=m, pairing=pairing)
  without = report(context_scores, test_queries, max_examples=m, pairing=pairing, baselines=False)
  for level in ("token", "example"):
    assert set(with_baselines[level]) - set(without[level]) == {"random_kendall", "random_recall_topk"}
    assert all(without[level][name] == with_baselines[level][name] for name in without[level])
  with pytest.raises(ValueError, match="same evaluated examples"):
    report(context_scores, test_queries[:-1])


# ------------------------------------------------------------------------------------------------ controls

def test_derangement_and_pairing():
  for seed in range(20):
    permutation = metrics.derangement(7, seed)
    assert sorted(permutation.tolist()) == list(range(7))
    assert not np.any(permutation == np.arange(7))
  np.testing.assert_array_equal(metrics.derangement(7, 5), metrics.derangement(7, 5))
  assert metrics.derangement(2, 0).tolist() == [1, 0]
  with pytest.raises(ValueError, match="n >= 2"):
    metrics.derangement(1, 0)
  assert metrics.apply_pairing(["a", "b", "c"], [2, 0, 1]) == ["c", "a", "b"]
  np.testing.assert_array_equal(metrics.apply_pairing(np.array([10, 20, 30]), [1, 2, 0]), [20, 30, 10])
  with pytest.raises(ValueError, match="permutation"):
    metrics.apply_pairing([1, 2, 3], [0, 0, 1])


def test_output_divergence_by_hand():
  # Scores are log-probs over the full vocabulary; renormalising over the labels gives p and q.
  p_scores = np.log([[0.25, 0.25]])  # -> (1/2, 1/2)
  q_scores = np.log([[0.1, 0.3]])  # -> (1/4, 3/4)
  result = metrics.output_divergence(p_scores, q_scores)
  assert result["kl_icl_ft"] == pytest.approx(0.5 * math.log(4 / 3), rel=RTOL)
  assert result["kl_ft_icl"] == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=RTOL)
  m = np.array([3 / 8, 5 / 8])
  expected_js = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) + \
      0.5 * (0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1]))
  assert result["js"] == pytest.approx(expected_js, rel=RTOL)
  assert result["agreement"] == 0.0  # argmax 0 (tie) vs 1
  same = metrics.output_divergence(q_scores, q_scores)
  assert same["kl_icl_ft"] == 0.0 and same["js"] == 0.0 and same["agreement"] == 100.0


def test_aggregation():
  assert metrics.layer_mean([0.1, 0.2, 0.6]) == pytest.approx(0.3, rel=RTOL)
  assert metrics.mean_std([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
  single = metrics.mean_std([4.0])
  assert single["mean"] == 4.0 and math.isnan(single["std"])
  per_layer = metrics.mean_std([[1.0, 0.0], [3.0, 0.0]])
  assert per_layer["mean"] == [2.0, 0.0] and per_layer["std"] == pytest.approx([math.sqrt(2), 0.0], rel=RTOL)
  assert math.isnan(metrics.mean_std([1.0, float("nan")])["mean"])


def test_training_attention_matches_the_original_slicing():
  """Re-does compute_training_example_attn.py's steps by hand on a packed context with BOS and separators."""
  from dualform.data import packing
  from dualform.data.tasks import Example

  class Words:
    name, vocab_size, bos_id, separator_id = "words", 100, 0, 2

    def encode(self, text):  # one id per space-separated word; only its first letter matters
      return [5 + ord(piece[0]) % 90 for piece in text.split(" ") if piece]

  pool = [Example(fields={"text": " ".join(["w"] * count)}, label=count % 2, index=i)
          for i, count in enumerate([2, 5, 1, 3])]
  context = packing.pack_context(Words(), "sst2", pool, [3, 0, 2, 1], max_query_len=4, max_len=100, k=4)
  sequences = packing.finetune_sequences(Words(), "sst2", context)
  rng = np.random.default_rng(5)
  n, layers, dq = 7, 3, 4
  context_scores = rng.normal(size=(n, layers, context.context_length))
  test_queries = rng.normal(size=(n, layers, dq))
  # The FT run records one query per token of each sequence, BOS included; the original drops index 0.
  ft_queries = [rng.normal(size=(layers, len(ids), dq)) for ids in sequences]

  # Original: slice from cur_pos = 1, each demo len(ft) - 1 tokens, then skip one separator.
  slice_index, ranges, position, flat = [], [], 1, 0
  for ids in sequences:
    slice_index.extend(range(position, position + len(ids) - 1))
    ranges.append(list(range(flat, flat + len(ids) - 1)))
    position += len(ids)
    flat += len(ids) - 1
  icl_map = scipy.special.softmax(context_scores[:, :, slice_index], axis=-1)
  compact = np.concatenate([q[:, 1:] for q in ft_queries], axis=1)  # [L, T, Dq]
  ft_map = scipy.special.softmax((compact[None] * test_queries[:, :, None]).sum(-1), axis=-1)
  np.testing.assert_array_equal(slice_index, context.demo_token_positions)

  w_icl = metrics.icl_training_attention(context_scores, context.demo_token_positions)
  w_ft = metrics.ft_training_attention(test_queries, compact)
  np.testing.assert_allclose(w_icl, icl_map, rtol=1e-12)
  np.testing.assert_allclose(w_ft, ft_map, rtol=1e-12)
  example_icl = np.stack([icl_map[:, :, r].sum(-1) for r in ranges], axis=-1)
  np.testing.assert_allclose(metrics.example_level(w_icl, context.demo_lengths), example_icl, rtol=1e-12)
  expected_tau = [np.mean([scipy.stats.kendalltau(icl_map[i, l], ft_map[i, l]).statistic for i in range(n)])
                  for l in range(layers)]
  np.testing.assert_allclose(metrics.kendall_per_layer(w_icl, w_ft), expected_tau, rtol=1e-12)
  # recall_topk: for each of ICL's top-k indices, a hit when it is in FT's top k; divided by N * k.
  k = 3
  hits = [sum(int(index in np.argsort(-ft_map[i, l], kind="stable")[:k])
              for i in range(n) for index in np.argsort(-icl_map[i, l], kind="stable")[:k]) for l in range(layers)]
  np.testing.assert_allclose(metrics.topk_recall_per_layer(w_icl, w_ft, k), np.array(hits) / (n * k), rtol=1e-12)
