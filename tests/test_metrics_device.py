"""dualform.metrics_device (float32 jax) against the float64 numpy reference of dualform.metrics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualform import metrics as host
from dualform import metrics_device as device

N, L, D, H, Q = 12, 3, 40, 4, 9
rng = np.random.default_rng(0)
ZSL, ICL, FT = (rng.standard_normal((N, L, D)).astype(np.float32) for _ in range(3))
LENGTHS = rng.integers(2, Q + 1, N)
PAIRING = host.derangement(N, 1)


def _scores(seed: int) -> np.ndarray:
  """[N, L, H, Q] query-part scores, zero beyond each example's length (the evaluate layout)."""
  scores = np.random.default_rng(seed).standard_normal((N, L, H, Q)).astype(np.float32)
  return scores * (np.arange(Q)[None, :] < LENGTHS[:, None])[:, None, None, :]


def _per_example(scores: np.ndarray) -> list[np.ndarray]:
  return [scores[i, :, :, :length] for i, length in enumerate(LENGTHS)]


@pytest.mark.parametrize("pairing", [None, PAIRING])
def test_simaou_matches_host(pairing):
  np.testing.assert_allclose(device.simaou_per_layer(ZSL, ICL, FT, pairing),
                             host.simaou_per_layer(ZSL, ICL, FT, pairing), atol=1e-6)


def test_right_align_is_the_left_padded_layout():
  scores = _scores(1)
  aligned = np.asarray(device.right_align(scores, LENGTHS))
  for i, length in enumerate(LENGTHS):
    np.testing.assert_array_equal(aligned[i, ..., Q - length:], scores[i, ..., :length])
    np.testing.assert_array_equal(aligned[i, ..., :Q - length], 0.0)


@pytest.mark.parametrize("pairing", [None, PAIRING])
def test_simam_variants_match_host(pairing):
  icl, ft, zsl = _scores(1), _scores(2), _scores(3)
  aligned = [device.right_align(s, LENGTHS) for s in (icl, ft, zsl)]
  lists = [_per_example(s) for s in (icl, ft, zsl)]
  np.testing.assert_allclose(device.simam_per_layer(aligned[0], aligned[1], pairing),
                             host.simam_per_layer(lists[0], lists[1], pairing), atol=1e-6)
  np.testing.assert_allclose(device.zsl_simam_per_layer(aligned[0], aligned[2], pairing),
                             host.zsl_simam_per_layer(lists[0], lists[2], pairing), atol=1e-6)
  np.testing.assert_allclose(device.simam_delta_per_layer(*aligned, pairing),
                             host.simam_delta_per_layer(*lists, pairing), atol=1e-6)


def test_kendall_tau_b_matches_scipy_with_and_without_ties():
  first = rng.standard_normal((20, 70)).astype(np.float32)
  second = rng.standard_normal((20, 70)).astype(np.float32)
  second[:5] = np.round(second[:5])  # ties
  first[6] = 1.0  # a constant row: NaN, as scipy
  expected = host.kendall_tau_b(first, second)
  np.testing.assert_allclose(device.kendall_tau_b(first, second), expected, atol=1e-6, equal_nan=True)
  assert np.isnan(expected[6])


def _attention_inputs():
  context, demo_tokens, dq = 30, 20, 16
  context_scores = rng.standard_normal((N, L, context)).astype(np.float32)
  positions = np.sort(rng.choice(context, demo_tokens, replace=False))
  test = rng.standard_normal((N, L, dq)).astype(np.float32)
  train = rng.standard_normal((L, demo_tokens, dq)).astype(np.float32)
  return context_scores, positions, np.array([5, 7, 8]), test, train


@pytest.mark.parametrize("pairing", [None, host.derangement(10, 2)])
def test_training_attention_report_matches_host(pairing):
  """Kendall and top-k recall equal the host's; the random baselines use jax.random draws (other values)."""
  context_scores, positions, lengths, test, train = _attention_inputs()
  kwargs = dict(max_examples=10, pairing=pairing, token_top_k=6, example_top_k=2)
  expected = host.training_attention_report(context_scores, positions, lengths, test, train, 5, **kwargs)
  got = device.training_attention_report(jnp.asarray(context_scores), positions, lengths, jnp.asarray(test),
                                         train, 5, **kwargs)
  assert got.keys() == expected.keys()
  for level in ("token", "example"):
    for name in ("kendall", "recall_topk"):
      np.testing.assert_allclose(got[level][name]["per_layer"], expected[level][name]["per_layer"], atol=1e-6)
    for name in ("random_kendall", "random_recall_topk"):
      assert got[level][name]["generator"] == "jax.random" and expected[level][name]["generator"] == "numpy"
      assert got[level][name]["key"] == expected[level][name]["key"]
      assert len(got[level][name]["per_layer"]) == L


def test_training_weights_match_host():
  context_scores, positions, lengths, test, train = _attention_inputs()
  w_icl = device.icl_training_attention(jnp.asarray(context_scores), positions)
  np.testing.assert_allclose(w_icl, host.icl_training_attention(context_scores, positions), atol=1e-6)
  w_ft = device.ft_training_attention(test, train)
  np.testing.assert_allclose(w_ft, host.ft_training_attention(test, train), atol=1e-6)
  np.testing.assert_allclose(device.example_level(w_ft, lengths), host.example_level(np.asarray(w_ft), lengths),
                             atol=1e-6)


def test_random_baselines_are_seeded_and_near_zero():
  """Same key, same values; another key, other values; the centred normal baseline averages near 0."""
  zsl, icl = (np.random.default_rng(s).standard_normal((400, 2, 64)).astype(np.float32) for s in (7, 8))
  first = device.random_simaou_per_layer(zsl, icl, 11)
  np.testing.assert_array_equal(first.per_layer, device.random_simaou_per_layer(zsl, icl, 11).per_layer)
  assert not np.array_equal(first.per_layer, device.random_simaou_per_layer(zsl, icl, 12).per_layer)
  assert np.all(np.abs(first.per_layer) < 4 / np.sqrt(400 * 64))  # std of the mean cosine is 1/sqrt(N D)
  assert first.to_record()["generator"] == "jax.random" and first.key == host.key_record(11)
  uniform = device.random_kendall_per_layer(jnp.asarray(icl[:, :, :20]), 3)
  assert np.all(np.abs(uniform.per_layer) < 0.05) and uniform.distribution == "uniform01"


def test_bad_inputs_are_refused():
  with pytest.raises(ValueError, match="one \\[examples, layers, hidden\\] shape"):
    device.simaou_per_layer(ZSL, ICL, FT[:, :2])
  with pytest.raises(ValueError, match="right-aligned"):
    device.simam_per_layer(_per_example(_scores(1)), _per_example(_scores(2)))
  with pytest.raises(ValueError, match="permutation"):
    device.simaou_per_layer(ZSL, ICL, FT, pairing=np.zeros(N, int))
  with pytest.raises(ValueError, match="distribution"):
    device.random_simaou_per_layer(ZSL, ICL, 0, distribution="cauchy")
  with pytest.raises(ValueError, match="k=0"):
    device.topk_recall_per_layer(jnp.asarray(ZSL), jnp.asarray(ICL), 0)
  with pytest.raises(ValueError, match="sum to"):
    device.example_level(jnp.ones((2, 1, 5)), [2, 2])


def test_jitted_once_per_shape():
  """The per-layer reductions are jitted: a second call of one shape does not trace again."""
  device.simaou_per_layer(ZSL, ICL, FT)
  before = device._simaou._cache_size()  # pylint: disable=protected-access
  device.simaou_per_layer(ZSL + 1, ICL, FT, PAIRING)
  assert device._simaou._cache_size() == before  # pylint: disable=protected-access
  assert isinstance(device.simaou_per_layer(ZSL, ICL, FT), jax.Array)
