"""Tests of dualform.evaluate: cached + batched evaluation equals one full forward per example."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import nnx

from dualform import evaluate
from dualform.models import build_model, tiny_config

ALL_RECORDS = evaluate.EvalRecordSpec(attn_out=True, query_scores=True, context_scores=True, queries=True)


def _relative_error(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


_logits = nnx.jit(lambda model, tokens: model(tokens))


def _inputs(seed: int, count: int = 11):
  rng = np.random.default_rng(seed)
  context = rng.integers(3, 128, size=37).tolist()
  queries = [rng.integers(3, 128, size=n).tolist() for n in rng.integers(1, 30, size=count)]
  return context, queries


@pytest.mark.parametrize("family,context_kind", [("llama", "demos"), ("fairseq_dense", "demos"),
                                                 ("llama", "empty"), ("fairseq_dense", "bos")])
def test_cached_batched_equals_per_example_full_forward(family, context_kind):
  model = build_model(tiny_config(family), seed=2)
  context, queries = _inputs(seed=3)
  context = {"demos": context, "empty": [], "bos": [0]}[context_kind]
  labels = [[5], [9], [17]]
  record = ALL_RECORDS if context else evaluate.EvalRecordSpec(attn_out=True, query_scores=True, queries=True)
  with jax.default_matmul_precision("highest"):
    # Small batches: several buckets and a partial last batch are exercised.
    fast = evaluate.evaluate(model, context, queries, labels, record=record, tokens_per_batch=64)
    slow = evaluate.evaluate_full_sequences(model, context, queries, labels, record=record)
  assert fast.traces <= 4  # bucketed shapes, never one per example
  assert _relative_error(fast.label_scores, slow.label_scores) <= 1e-5
  np.testing.assert_array_equal(fast.predictions, slow.predictions)
  np.testing.assert_array_equal(fast.query_lengths, [len(q) + 1 for q in queries])
  assert fast.context_length == len(context)
  assert sorted(fast.records) == sorted(slow.records)
  layers, heads = model.config.num_layers, model.config.num_heads
  shapes = {"attn_out": (len(queries), layers, 2, model.config.embed_dim),
            "query_scores": (len(queries), layers, 2, heads, max(len(q) + 1 for q in queries)),
            "queries": (len(queries), layers, 2, heads * model.config.head_dim)}
  if context:
    shapes["context_scores"] = (len(queries), layers, 2, len(context))
  assert set(shapes) == set(fast.records)
  for name, shape in shapes.items():
    assert fast.records[name].shape == shape, name
    assert _relative_error(fast.records[name], slow.records[name]) <= 1e-5, name


def test_label_scores_are_full_vocabulary_log_probs_at_t_minus_1():
  model = build_model(tiny_config("llama"), seed=4)
  context, queries = _inputs(seed=5, count=4)
  labels = [[5], [9]]
  with jax.default_matmul_precision("highest"):
    result = evaluate.evaluate(model, context, queries, labels)
    for i, query in enumerate(queries):
      tokens = jnp.asarray([context + query + [labels[0][0]]])
      log_probs = jax.nn.log_softmax(_logits(model, tokens)[0, len(context) + len(query) - 1])
      expected = np.asarray(log_probs)[[5, 9]]
      assert _relative_error(result.label_scores[i], expected) <= 1e-5


def test_ties_go_to_the_lowest_label():
  model = build_model(tiny_config("llama"), seed=0)
  _, queries = _inputs(seed=1, count=3)
  result = evaluate.evaluate(model, [], queries, [[7], [7], [7]])
  np.testing.assert_array_equal(result.predictions, [0, 0, 0])


def test_multitoken_labels_mean_teacher_forced_log_prob():
  model = build_model(tiny_config("fairseq_dense"), seed=6)
  context, queries = _inputs(seed=7, count=5)
  labels = [[5, 6], [9], [17, 18, 19]]
  with pytest.raises(ValueError, match="allow_multitoken_labels"):
    evaluate.evaluate(model, context, queries, labels)
  with pytest.raises(ValueError, match="single-token"):
    evaluate.evaluate(model, context, queries, labels, allow_multitoken_labels=True, record=ALL_RECORDS)
  with jax.default_matmul_precision("highest"):
    result = evaluate.evaluate(model, context, queries, labels, allow_multitoken_labels=True)
    for i, query in enumerate(queries):
      for j, label in enumerate(labels):
        tokens = context + query + label
        log_probs = np.asarray(jax.nn.log_softmax(_logits(model, jnp.asarray([tokens]))[0], axis=-1))
        start = len(context) + len(query)
        expected = np.mean([log_probs[start - 1 + n, token] for n, token in enumerate(label)])
        assert abs(result.label_scores[i, j] - expected) <= 1e-5 * abs(expected)
  assert result.records == {}


def test_bad_inputs():
  model = build_model(tiny_config("llama"), seed=0)
  with pytest.raises(ValueError, match="no examples"):
    evaluate.evaluate(model, [], [], [[5], [6]])
  with pytest.raises(ValueError, match="empty query"):
    evaluate.evaluate(model, [], [[4], []], [[5], [6]])
  with pytest.raises(ValueError, match="at least one token"):
    evaluate.evaluate(model, [], [[4]], [[5], []])


def test_bucket_lengths_are_powers_of_two_and_their_midpoints():
  lengths = (1, 16, 17, 24, 25, 33, 90, 97, 100, 300)
  assert [evaluate.bucket_length(n) for n in lengths] == [16, 16, 24, 24, 32, 48, 96, 128, 128, 384]
  assert [evaluate.bucket_length(n, minimum=64) for n in (1, 65, 97)] == [64, 96, 128]
  assert [evaluate.bucket_length(n, midpoints=False) for n in lengths] == [16, 16, 32, 32, 32, 64, 128, 128, 128, 512]


def test_buckets_are_capped_at_the_room_left_in_the_context():
  assert evaluate.bucket_length(300, minimum=64, maximum=314) == 314  # the ladder's 384 would not fit
  assert evaluate.bucket_length(65, minimum=64, maximum=314) == 96
  assert evaluate.bucket_length(400, minimum=64, maximum=314) == 512  # too long: left for the model to reject


@pytest.mark.parametrize("family", ["llama", "fairseq_dense"])
def test_queries_that_fill_the_context_are_not_padded_past_it(family):
  """Context + longest query = max_len exactly, so the bucket ladder's next size would overflow."""
  config = tiny_config(family)
  model = build_model(config, seed=4)
  rng = np.random.default_rng(5)
  context = rng.integers(3, 128, size=config.max_len - 40).tolist()
  queries = [rng.integers(3, 128, size=n).tolist() for n in (39, 20, 3)]  # 39 + label = 40 positions
  labels = [[5], [9]]
  with jax.default_matmul_precision("highest"):
    fast = evaluate.evaluate(model, context, queries, labels, minimum_bucket=32)
    slow = evaluate.evaluate_full_sequences(model, context, queries, labels)
  assert _relative_error(fast.label_scores, slow.label_scores) <= 1e-5
  np.testing.assert_array_equal(fast.predictions, slow.predictions)


def test_padded_prefix_changes_shapes_not_results():
  """Contexts cached right-padded to a multiple give the results of the exact cache, and two contexts of
  different lengths then share every compiled query shape."""
  model = build_model(tiny_config("fairseq_dense"), seed=8)
  context, queries = _inputs(seed=9, count=13)
  labels = [[5], [9], [17]]
  assert evaluate.padded_prefix_length(37, 32, 256) == 64 and evaluate.padded_prefix_length(37, 0, 256) == 37
  assert evaluate.padded_prefix_length(250, 32, 256) == 256 and evaluate.padded_prefix_length(37, None, 256) == 37
  assert [evaluate.padded_prefix_length(n, 512, 2048) for n in (1, 20, 512, 513, 1734, 2040)] == [
      512, 512, 512, 1024, 2048, 2048]
  assert {evaluate.padded_prefix_length(n, 2048, 2048) for n in (595, 1734, 2048)} == {2048}
  with jax.default_matmul_precision("highest"):
    exact = evaluate.evaluate(model, context, queries, labels, record=ALL_RECORDS, tokens_per_batch=128)
    padded = evaluate.evaluate(model, context, queries, labels, record=ALL_RECORDS, tokens_per_batch=128,
                               prefix_multiple=32)
    compiled = evaluate._score_batch._cache_size()
    evaluate.evaluate(model, context[:-3], queries, labels, record=ALL_RECORDS, tokens_per_batch=128,
                      prefix_multiple=32)  # 34 tokens: also cached as 64
    assert evaluate._score_batch._cache_size() == compiled
  np.testing.assert_array_equal(padded.predictions, exact.predictions)
  assert padded.context_length == exact.context_length == len(context)
  # A context that leaves less room than a bucket: the exact cache caps the bucket, the padded one does
  # not (only padding rows pass the model context), and the results agree.
  long_context = np.random.default_rng(10).integers(3, 128, size=model.config.max_len - 31).tolist()
  with jax.default_matmul_precision("highest"):
    capped = evaluate.evaluate(model, long_context, queries, labels, record=ALL_RECORDS, tokens_per_batch=128)
    uncapped = evaluate.evaluate(model, long_context, queries, labels, record=ALL_RECORDS, tokens_per_batch=128,
                                 prefix_multiple=32)
  assert _relative_error(uncapped.label_scores, capped.label_scores) <= 1e-5
  for name in capped.records:
    assert _relative_error(uncapped.records[name], capped.records[name]) <= 1e-5, name
  with pytest.raises(ValueError, match="exceeds the model context"):  # padded or not, too long is refused
    evaluate.evaluate(model, long_context, [list(range(3, 40))], labels, prefix_multiple=32)
  assert _relative_error(padded.label_scores, exact.label_scores) <= 1e-5
  assert sorted(padded.records) == sorted(exact.records)
  for name in exact.records:
    assert padded.records[name].shape == exact.records[name].shape, name
    assert _relative_error(padded.records[name], exact.records[name]) <= 1e-5, name


def test_fixed_rows_and_score_budget_change_batching_not_results():
  model = build_model(tiny_config("llama"), seed=6)
  context, queries = _inputs(seed=7, count=23)
  labels = [[5], [9], [17]]
  with jax.default_matmul_precision("highest"):
    plain = evaluate.evaluate(model, context, queries, labels, record=ALL_RECORDS, tokens_per_batch=128)
    fixed = evaluate.evaluate(model, context, queries, labels, record=ALL_RECORDS, tokens_per_batch=128,
                              fixed_rows=True)
    budget = evaluate.evaluate(model, context, queries, labels, record=ALL_RECORDS, tokens_per_batch=128,
                               score_budget=model.config.num_heads * 16 * (len(context) + 16) * 3)
  buckets = {evaluate.bucket_length(len(q) + 1) for q in queries}
  assert fixed.traces <= 2 * len(buckets)  # per bucket: full batches and a last batch of half the rows
  np.testing.assert_array_equal(fixed.predictions, plain.predictions)
  np.testing.assert_array_equal(budget.predictions, plain.predictions)
  for other in (fixed, budget):
    assert _relative_error(other.label_scores, plain.label_scores) <= 1e-5
    for name in plain.records:
      assert _relative_error(other.records[name], plain.records[name]) <= 1e-5, name


def test_rows_per_bucket_follow_the_token_and_score_budgets():
  lengths = np.asarray([10] * 9 + [40] * 3)
  bucketing = lambda n: evaluate.bucket_length(n, minimum=16)
  plain = list(evaluate._batches(lengths, 64, 1, bucketing))  # pylint: disable=protected-access
  assert [(bucket, rows, len(indices)) for bucket, rows, indices in plain] == [(16, 4, 4), (16, 4, 4),
                                                                               (16, 4, 1), (48, 1, 1),
                                                                               (48, 1, 1), (48, 1, 1)]
  fixed = list(evaluate._batches(lengths, 128, 1, bucketing, fixed_rows=True))  # pylint: disable=protected-access
  assert [(bucket, rows) for bucket, rows, _ in fixed] == [(16, 8), (16, 4), (48, 2), (48, 1)]
  # The last batch of a bucket gets half the full rows when that holds it, else all of them.
  small = list(evaluate._batches(np.asarray([10] * 3 + [40] * 5), 256, 1, bucketing, fixed_rows=True))  # pylint: disable=protected-access
  assert [(bucket, rows, len(indices)) for bucket, rows, indices in small] == [(16, 8, 3), (48, 5, 5)]
  many = list(evaluate._batches(np.asarray([10] * 41), 256, 1, bucketing, fixed_rows=True))  # pylint: disable=protected-access
  assert [(rows, len(indices)) for _, rows, indices in many] == [(16, 16), (16, 16), (16, 9)]
  paired = list(evaluate._batches(np.asarray([10] * 3), 192, 2, bucketing, fixed_rows=True))  # pylint: disable=protected-access
  assert [(bucket, rows) for bucket, rows, _ in paired] == [(16, 6)]  # half of 12 rows, a multiple of 2 devices
  capped = list(evaluate._batches(lengths, 128, 1, bucketing, scores_per_row=lambda bucket: bucket * 10,
                                  score_budget=480))  # pylint: disable=protected-access
  assert [(bucket, rows) for bucket, rows, _ in capped][:1] == [(16, 3)]
  assert {rows for bucket, rows, _ in capped if bucket == 48} == {1}


@pytest.mark.parametrize("prefix_multiple", [None, 32])
def test_records_on_device_equal_the_host_copies(prefix_multiple):
  """records_on_device keeps every record as a jax.Array in example order; the values are the host copies'
  (the same batches, only gathered on the device)."""
  model = build_model(tiny_config("llama"), seed=6)
  context, queries = _inputs(seed=7, count=23)
  labels = [[5], [9], [17]]
  kwargs = dict(record=ALL_RECORDS, tokens_per_batch=128, prefix_multiple=prefix_multiple)
  on_host = evaluate.evaluate(model, context, queries, labels, **kwargs)
  on_device = evaluate.evaluate(model, context, queries, labels, records_on_device=True, **kwargs)
  np.testing.assert_array_equal(on_device.label_scores, on_host.label_scores)
  assert isinstance(on_device.label_scores, np.ndarray) and sorted(on_device.records) == sorted(on_host.records)
  for name, value in on_host.records.items():
    assert isinstance(on_device.records[name], jax.Array), name
    np.testing.assert_array_equal(np.asarray(on_device.records[name]), value, err_msg=name)


def test_tasks_with_different_label_counts_share_compiled_batches():
  """Label ids are padded to 8 slots: 2, 3 or 5 labels run the same compiled batch, and the scores of each
  label are the ones of a run with that label alone."""
  model = build_model(tiny_config("llama"), seed=6)
  context, queries = _inputs(seed=7, count=5)
  three = evaluate.evaluate(model, context, queries, [[5], [9], [17]], tokens_per_batch=128)
  compiled = evaluate._score_batch._cache_size()  # pylint: disable=protected-access
  two = evaluate.evaluate(model, context, queries, [[9], [17]], tokens_per_batch=128)
  five = evaluate.evaluate(model, context, queries, [[5], [9], [17], [3], [4]], tokens_per_batch=128)
  assert evaluate._score_batch._cache_size() == compiled  # pylint: disable=protected-access
  assert two.label_scores.shape == (5, 2) and five.label_scores.shape == (5, 5)
  np.testing.assert_array_equal(two.label_scores, three.label_scores[:, 1:])
  np.testing.assert_array_equal(five.label_scores[:, :3], three.label_scores)


def test_precompile_traces_on_worker_threads_and_the_evaluation_reuses_it(monkeypatch):
  """precompile encodes the context and traces and compiles every batch shape of an evaluation on the
  executor's threads (none of it on the caller's), under the caller's matmul precision; the evaluation then
  traces nothing and gives the reference's scores."""
  import concurrent.futures
  import threading

  encoders = []
  original = evaluate._encode_prefix  # pylint: disable=protected-access

  def recording_encoder(*args):
    encoders.append(threading.get_ident())
    return original(*args)

  monkeypatch.setattr(evaluate, "_encode_prefix", recording_encoder)
  model = build_model(tiny_config("fairseq_dense"), seed=8)
  context, queries = _inputs(seed=9, count=19)
  labels = [[5], [9], [17]]
  kwargs = dict(record=ALL_RECORDS, tokens_per_batch=96, prefix_multiple=64, fixed_rows=True)
  jax.clear_caches()  # earlier tests may have compiled these shapes already
  evaluate._AHEAD.clear()  # pylint: disable=protected-access
  with jax.default_matmul_precision("highest"), concurrent.futures.ThreadPoolExecutor(2) as executor:
    before = evaluate._TRACES["score"]  # pylint: disable=protected-access
    started = evaluate.precompile(model, context, queries, labels, executor=executor, **kwargs)
    assert evaluate.precompile(model, context, queries, labels, executor=executor, **kwargs) == 0  # started
    for future in list(evaluate._AHEAD.values()):  # pylint: disable=protected-access
      future.result()
    assert started >= 2 and evaluate._TRACES["score"] - before == started  # pylint: disable=protected-access
    assert len(encoders) == 1 and encoders[0] != threading.get_ident()
    fast = evaluate.evaluate(model, context, queries, labels, **kwargs)
    assert evaluate._TRACES["score"] - before == started and fast.traces == started  # pylint: disable=protected-access
    slow = evaluate.evaluate_full_sequences(model, context, queries, labels)
  assert all(future.done() for future in evaluate._AHEAD.values())  # pylint: disable=protected-access
  assert _relative_error(fast.label_scores, slow.label_scores) <= 1e-5
  np.testing.assert_array_equal(fast.predictions, slow.predictions)
