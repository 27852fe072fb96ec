"""Label prediction and analysis records for one setting (ZSL, ICL or FT), cached and batched.

Prediction (PROTOCOL.md §5): one forward pass over ``context + query_input + [label_0]``; with ``t`` the
last position (the candidate-0 label token) the label scores are ``s_j = log_softmax(z_{t-1})[y_j]`` over
the full vocabulary, and ``pred = argmax_j s_j`` (ties to the lowest j).

Fast path: the shared context is encoded once (:meth:`Transformer.encode_prefix`) and the continuations
``query_input + [label_0]`` run against that cache in right-padded batches whose length is rounded up to a
power of two or its 1.5x midpoint (a handful of shapes per run, so jit traces a handful of times, never once
per example).
Logits are computed only at ``t - 1``. Records (§8) come from the same pass, at ``pred_pos = t - 1`` and
``label_pos = t`` (axis ``POSITIONS``):

* ``attn_out`` [N, L, 2, D]: attention block output (after the output projection, bias included);
* ``query_scores`` [N, L, 2, heads, Q]: pre-softmax scores against the query-part keys ``c .. t`` per head,
  zero beyond each example's ``query_lengths`` (Q = longest continuation);
* ``context_scores`` [N, L, 2, C]: head-summed pre-softmax scores against the C context keys (ICL);
* ``queries`` [N, L, 2, heads * head_dim]: scaled pre-RoPE queries ``q_proj(norm(x)) / sqrt(H)`` (FT eval).

Compiling ahead: :func:`precompile` starts, on worker threads, the compiles of every batch shape an
:func:`evaluate` call will run, so they overlap earlier device work (GPU runs; ``--compile_workers``).

Public names: :data:`POSITIONS`, :class:`EvalRecordSpec`, :class:`EvalResult`, :func:`evaluate`, :func:`precompile`,
:func:`evaluate_full_sequences` (the slow reference: batch 1, full sequence per example, as the original),
:func:`bucket_length`, :func:`_single_label_ids`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dualform.models.transformer import KVCache, RecordSpec, Transformer
from dualform.static import Hashed, interned

POSITIONS: tuple[str, str] = ("pred_pos", "label_pos")


@dataclasses.dataclass(frozen=True)
class EvalRecordSpec:
  """Which analysis records one evaluation keeps (all at both POSITIONS)."""

  attn_out: bool = False
  query_scores: bool = False
  context_scores: bool = False
  queries: bool = False

  @property
  def any(self) -> bool:
    return self.attn_out or self.query_scores or self.context_scores or self.queries

  def model_spec(self) -> RecordSpec:
    return RecordSpec(attn_out=self.attn_out, scores=self.query_scores or self.context_scores,
                      queries=self.queries)


NO_RECORDS = EvalRecordSpec()


@dataclasses.dataclass
class EvalResult:
  """Scores, predictions and records of one setting over N evaluated examples.

  label_scores: [N, C] float32 log-probabilities of the C label candidates.
  predictions: [N] int, argmax of label_scores (ties to the lowest index).
  query_lengths: [N] int, length of ``query_input + [label_0]`` (the query part of the scores).
  context_length: c, tokens before the query.
  records: name -> array (numpy; ``jax.Array`` with ``records_on_device``), see the module docstring.
  seconds: wall time of the evaluation; traces: distinct (bucket, batch) shapes run.
  """

  label_scores: np.ndarray
  predictions: np.ndarray
  query_lengths: np.ndarray
  context_length: int
  records: dict[str, np.ndarray]
  seconds: float = 0.0
  traces: int = 0

  def accuracy(self, gold: np.ndarray) -> float:
    return float(100.0 * np.mean(self.predictions == np.asarray(gold)))


def bucket_length(length: int, minimum: int = 16, maximum: int | None = None, midpoints: bool = True) -> int:
  """Padded length of a batch: the smallest of ``minimum * {1, 1.5, 2, 3, 4, 6, ...}`` >= ``length``
  (``minimum * {1, 2, 4, ...}`` without ``midpoints``), capped at ``maximum`` (the room left in the model's
  context after the shared prefix) when given and ``length`` fits (a longer sequence keeps its bucket: the
  model then reports it as too long).

  Powers of two with their 1.5x midpoints waste at most a third of a batch on padding while keeping the
  number of compiled shapes logarithmic in the longest prompt; powers of two alone halve the shapes
  (GPUs, where a shape costs seconds to compile) for up to half a batch of padding.
  """
  size = minimum
  while size < length:
    if midpoints and size * 3 // 2 >= length and (size * 3) % 2 == 0:
      size = size * 3 // 2
      break
    size *= 2
  return size if maximum is None or length > maximum else min(size, maximum)


def _single_label_ids(label_tokens: Sequence[Sequence[int]]) -> tuple[bool, np.ndarray | None]:
  """(single_token, ids [C]) of the candidates' token lists; ids is None when some label is multi-token."""
  if not label_tokens or any(len(tokens) == 0 for tokens in label_tokens):
    raise ValueError("every label needs at least one token; check the label words and the tokenizer")
  single = all(len(tokens) == 1 for tokens in label_tokens)
  return single, (np.asarray([tokens[0] for tokens in label_tokens], np.int32) if single else None)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _encode_prefix(graphdef: Hashed, state, tokens, valid_length=None) -> KVCache:
  """Jitted :meth:`Transformer.encode_prefix` of one context [1, C] (one compile per C), optionally padded."""
  return nnx.merge(graphdef.value, state).encode_prefix(tokens, valid_length)


def padded_prefix_length(length: int, multiple: int | None, max_len: int) -> int:
  """C of a context of ``length`` tokens cached right-padded up to a multiple of ``multiple`` (at most
  ``max_len``, at least ``length``); ``length`` when ``multiple`` is None or 0. ``multiple = max_len``
  gives every context one cache length."""
  if not multiple:
    return length
  return max(length, min(-(-length // multiple) * multiple, max_len))


_TRACES: dict[str, int] = {"score": 0}  # traces of _score_batch (tests: no trace per example, none twice)


@functools.partial(jax.jit, static_argnames=("graphdef", "record"))
def _score_batch(graphdef: Hashed, state, cache: KVCache | None, tokens, lengths, label_ids, *,
                 record: EvalRecordSpec):
  """One right-padded batch [B, T] against an optional shared cache: label scores [B, C] and records.
  ``graphdef``: the model's interned (hash-once) GraphDef."""
  _TRACES["score"] += 1
  model = nnx.merge(graphdef.value, state)
  batch, seq = tokens.shape
  context = 0 if cache is None else cache.length
  pred_pos = lengths - 2
  positions = jnp.stack([pred_pos, lengths - 1], axis=1)  # [B, 2]: t-1, t
  out = model.forward(tokens, cache=cache, logit_positions=pred_pos[:, None],
                      record=record.model_spec() if record.any else None,
                      record_positions=positions if record.any else None)
  # [batch, candidates]: log_softmax over the full vocabulary at t-1, read at the label ids
  log_probs = jax.nn.log_softmax(out.logits[:, 0].astype(jnp.float32), axis=-1)
  result = {"label_scores": log_probs[:, label_ids]}
  if record.any:
    stack = lambda name: jnp.stack([layer[name] for layer in out.records], axis=1).astype(jnp.float32)
    if record.attn_out:
      result["attn_out"] = stack("attn_out")  # [B, L, 2, D]
    if record.query_scores or record.context_scores:
      scores = stack("scores")  # [B, L, 2, heads, C + T]
      if record.query_scores:
        result["query_scores"] = scores[..., context:]  # [B, L, 2, heads, T]
      if record.context_scores and context:
        result["context_scores"] = scores[..., :context].sum(axis=3)  # [B, L, 2, C]
    if record.queries:
      queries = stack("queries")  # [B, L, 2, heads, H]
      result["queries"] = queries.reshape(queries.shape[:3] + (-1,))
  return result


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _token_log_probs(graphdef: Hashed, state, cache: KVCache | None, tokens):
  """Teacher-forced log p(tokens[:, 1:]) [B, T-1] of a right-padded batch (multi-token label path)."""
  model = nnx.merge(graphdef.value, state)
  logits = model.forward(tokens, cache=cache).logits.astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  return jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]


def _batches(lengths: np.ndarray, tokens_per_batch: int, row_multiple: int, bucketing: Callable[[int], int],
             fixed_rows: bool = False, scores_per_row: Callable[[int], int] | None = None,
             score_budget: int | None = None):
  """Groups example indices by bucket length: yields (bucket, rows, indices) with len(indices) <= rows.

  Full rows are ``tokens_per_batch // bucket``, at most ``score_budget // scores_per_row(bucket)`` when given
  (so a bucket's rows do not depend on the other buckets, and shapes repeat across tasks). Without
  ``fixed_rows`` a bucket with fewer examples gets exactly as many rows (rounded to ``row_multiple``) and
  every batch of a bucket has the same rows (one compiled shape per bucket and example count). With
  ``fixed_rows`` the full rows are kept and only the last batch of a bucket is rounded up to half of them or
  to all (two shapes per bucket at most, shared by every task and setting: on a GPU a shape costs seconds to
  compile and about half a second to load from the persistent cache, more than the padding rows cost).
  """
  buckets = np.asarray([bucketing(int(n)) for n in lengths])
  for bucket in sorted(set(buckets.tolist())):
    indices = np.flatnonzero(buckets == bucket)
    rows = max(1, tokens_per_batch // bucket)
    if score_budget is not None:
      rows = max(1, min(rows, score_budget // scores_per_row(bucket)))
    rows = max(row_multiple, rows // row_multiple * row_multiple)
    if not fixed_rows:
      rows = min(rows, -(-len(indices) // row_multiple) * row_multiple)
    grain = max(row_multiple, rows // 2 // row_multiple * row_multiple)
    for start in range(0, len(indices), rows):
      left = len(indices) - start
      batch_rows = rows if left >= rows or not fixed_rows else -(-left // grain) * grain
      yield bucket, batch_rows, indices[start:start + batch_rows]


def _pad_rows(sequences: list[Sequence[int]], bucket: int, rows: int, pad_id: int):
  """[rows, bucket] int32 tokens (right-padded; missing rows repeat row 0) and their lengths [rows]."""
  tokens = np.full((rows, bucket), pad_id, np.int32)
  lengths = np.empty((rows,), np.int32)
  for row in range(rows):
    sequence = sequences[row] if row < len(sequences) else sequences[0]
    tokens[row, :len(sequence)] = sequence
    lengths[row] = len(sequence)
  return tokens, lengths


_EVAL_OPTIONS_DOC = """
    record: which records to keep (requires single-token labels).
    tokens_per_batch: rows per batch = tokens_per_batch // bucket length (rounded to row_multiple).
    score_budget: cap on rows * heads * T * (C + T) attention scores per batch (T the bucket length).
    bucket_midpoints: whether the bucket ladder has the 1.5x midpoints (:func:`bucket_length`).
    minimum_bucket: smallest padded length; padded lengths follow :func:`bucket_length`, capped at the
      model context left after ``context`` (not capped with ``prefix_multiple``).
    allow_multitoken_labels: score multi-token labels by mean teacher-forced log-prob, one pass per candidate.
    shard_batch: optional function placing a host batch on the mesh (``dualform.sharding.shard_batch``).
    row_multiple: rows per batch are a multiple of this (the data-parallel device count).
    fixed_rows: round the rows of a bucket's last batch up to half or all of the full rows instead of to the
      exact count (at most two compiled shapes per bucket, shared by every task; GPU).
    prefix_multiple: cache the context right-padded to a multiple of this (at most the model context),
      with the padding masked, so contexts of different lengths share compiled shapes (GPU); same results.
    split: ``nnx.split(model)`` when the caller already has it (a graph walk saved per call; the caller
      guarantees it is the model's current one).
"""


@dataclasses.dataclass
class _Setup:
  """What one evaluation needs before its batches: the split model, the encoded context, the batching.

  ``cache_signature``: None without a context, else (cached length C, padded?), which with the graphdef fixes
  the cache's shapes; ``encode_cache()`` encodes the context (``cache`` holds it once encoded)."""

  graphdef: Hashed
  state: object
  cache: KVCache | None
  single: bool
  label_ids: np.ndarray | None
  batching: Callable
  place: Callable
  context_length: int
  cache_signature: tuple[int, bool] | None
  encode_cache: Callable[[], KVCache | None]


def _setup(model: Transformer, context: Sequence[int], query_inputs: Sequence[Sequence[int]],
           label_tokens: Sequence[Sequence[int]], *, record: EvalRecordSpec = NO_RECORDS,
           tokens_per_batch: int = 4096, score_budget: int | None = None, minimum_bucket: int = 16,
           bucket_midpoints: bool = True, pad_id: int = 0, allow_multitoken_labels: bool = False,
           shard_batch: Callable | None = None, row_multiple: int = 1, fixed_rows: bool = False,
           prefix_multiple: int | None = None, split: tuple | None = None, encode: bool = True) -> _Setup:
  """Validates the inputs, splits the model, encodes the context once (``encode``) and fixes the batching."""
  single, label_ids = _single_label_ids(label_tokens)
  if not single and not allow_multitoken_labels:
    raise ValueError("a label word is several tokens; set allow_multitoken_labels=True (analysis is then skipped)")
  if not single and record.any:
    raise ValueError("analysis records need single-token labels; evaluate multi-token labels with no records")
  if not query_inputs:
    raise ValueError("no examples to evaluate")
  if any(len(query) == 0 for query in query_inputs):
    raise ValueError("an empty query input; every example needs at least one prompt token")
  graphdef, state = split if split is not None else nnx.split(model)
  graphdef = interned(graphdef)
  context = list(context)
  cached_length = padded_prefix_length(len(context), prefix_multiple, model.config.max_len)
  longest = len(context) + max(len(query) for query in query_inputs) + max(len(label) for label in label_tokens)
  if prefix_multiple and longest > model.config.max_len:  # (unpadded, the model itself refuses it)
    raise ValueError(f"sequence of {longest} tokens exceeds the model context of {model.config.max_len}")
  signature = (cached_length, bool(prefix_multiple)) if context else None

  def encode_cache() -> KVCache | None:
    if not context:
      return None
    if not prefix_multiple:
      return _encode_prefix(graphdef, state, jnp.asarray([context], jnp.int32))
    padded = context + [pad_id] * (cached_length - len(context))
    return _encode_prefix(graphdef, state, jnp.asarray([padded], jnp.int32), jnp.asarray(len(context), jnp.int32))

  cache = None
  if encode:
    _wait_ahead(("encode", graphdef, signature))  # a precompile may be compiling the same encoder
    cache = encode_cache()
  # Positions left for a query after the context cap the buckets; a padded cache needs no cap (its
  # continuations start at the valid length and only padding rows reach past the model context), so every
  # context shares the same bucket ladder.
  room = None if prefix_multiple else model.config.max_len - len(context)
  heads = model.config.num_heads
  batching = functools.partial(_batches, tokens_per_batch=tokens_per_batch, row_multiple=row_multiple,
                               bucketing=functools.partial(bucket_length, minimum=minimum_bucket, maximum=room,
                                                           midpoints=bucket_midpoints),
                               fixed_rows=fixed_rows, score_budget=score_budget,
                               scores_per_row=lambda bucket: heads * bucket * (cached_length + bucket))
  return _Setup(graphdef=graphdef, state=state, cache=cache, single=single, label_ids=label_ids,
                batching=batching, place=shard_batch or jax.device_put, context_length=len(context),
                cache_signature=signature, encode_cache=encode_cache)


def evaluate(model: Transformer, context: Sequence[int], query_inputs: Sequence[Sequence[int]],
             label_tokens: Sequence[Sequence[int]], *, record: EvalRecordSpec = NO_RECORDS,
             records_on_device: bool = False, progress: Callable[[int], None] | None = None,
             pad_id: int = 0, **options) -> EvalResult:
  """Scores every query after one shared context (PROTOCOL.md §5), with records from the same pass.

  Args:
    model: the model (pretrained for ZSL/ICL, finetuned for FT).
    context: token ids before every query (ICL demonstrations, or just ``<s>``/BOS, or empty); encoded once.
    query_inputs: per example the filled input template's ids (without the label).
    label_tokens: per candidate class its label token ids (one id each on the fast path).
    records_on_device: keep the records as device arrays (``jax.Array``, for :mod:`dualform.metrics_device`)
      instead of copying them to host numpy; label scores and predictions are numpy either way.
    progress: called with the number of examples finished (read back) after each batch.
    pad_id: the id padding rows and the padded context.
    **options: the batching options below (also taken by :func:`precompile`).
  """
  start = time.perf_counter()
  setup = _setup(model, context, query_inputs, label_tokens, record=record, pad_id=pad_id, **options)
  if setup.single:
    sequences = [list(query) + [int(setup.label_ids[0])] for query in query_inputs]
    result = _evaluate_single(setup, sequences, record, pad_id, progress, records_on_device)
  else:
    result = _evaluate_multitoken(setup, query_inputs, label_tokens, pad_id, progress)
  result.context_length = setup.context_length
  result.seconds = time.perf_counter() - start
  return result


evaluate.__doc__ += _EVAL_OPTIONS_DOC


# Compiles started by :func:`precompile`, by what the evaluation loop calls: (graphdef, record, cache shapes,
# tokens shape, label slots) -> Future (kept when done: a later precompile skips the shape). Only the main
# thread reads and writes it.
_AHEAD: dict[tuple, concurrent.futures.Future] = {}


def _ahead_key(setup: _Setup, record: EvalRecordSpec, tokens_shape: tuple[int, int], slots: int) -> tuple:
  return (setup.graphdef, record, setup.cache_signature, tuple(tokens_shape), slots)


def _wait_ahead(key: tuple) -> None:
  """Waits for a compile :func:`precompile` started for this call; its failure is left to the call itself."""
  future = _AHEAD.get(key)
  if future is not None:
    try:
      future.result()
    except Exception:  # pylint: disable=broad-except
      pass


def precompile(model: Transformer, context: Sequence[int], query_inputs: Sequence[Sequence[int]],
               label_tokens: Sequence[Sequence[int]], *, executor: concurrent.futures.Executor,
               record: EvalRecordSpec = NO_RECORDS, pad_id: int = 0, **options) -> int:
  """Starts compiling, on ``executor``'s threads, every batch shape that :func:`evaluate` with the same
  arguments will run; returns how many compiles it started (shapes started before are skipped).

  ``jit(f).lower(...).compile()`` fills the same caches as the first call of ``jit(f)``, so the evaluation
  later finds its programs ready (it waits for a shape still compiling instead of compiling it twice).
  Tracing, lowering and compiling (or reading the persistent compilation cache) then overlap the device work
  of what runs before: on a GPU that first use costs about half a second per shape warm and seconds cold.
  Multi-token labels are not precompiled. The context is encoded on a worker too (the first use of the
  encoder, ~1-2 s on a GPU host, stays off the caller's thread; that cache is dropped once the batch shapes
  have compiled, and the evaluation encodes its own).
  """
  setup = _setup(model, context, query_inputs, label_tokens, record=record, pad_id=pad_id, encode=False,
                 **options)
  if not setup.single:
    return 0
  lengths = np.asarray([len(query) + 1 for query in query_inputs])
  label_ids = _label_slots(setup.label_ids)
  # Thread-local settings the worker must trace under, as the evaluation will.
  precision, x64 = jax.config.jax_default_matmul_precision, jax.config.jax_enable_x64
  shapes = [(bucket, rows) for bucket, rows, _ in setup.batching(lengths)
            if _ahead_key(setup, record, (rows, bucket), len(label_ids)) not in _AHEAD]
  if not shapes:
    return 0
  encoded = concurrent.futures.Future()  # the cache, for this call's compiles only (no reference kept after)
  encode_key = ("encode", setup.graphdef, setup.cache_signature)

  def encode():
    with jax.default_matmul_precision(precision), jax.enable_x64(x64):
      try:
        encoded.set_result(setup.encode_cache())
      except BaseException as error:  # the compiles report it; the evaluation raises it itself
        encoded.set_exception(error)
        raise

  done = executor.submit(encode)
  _AHEAD.setdefault(encode_key, done)
  for bucket, rows in dict.fromkeys(shapes):

    def compile_batch(bucket=bucket, rows=rows):
      cache = encoded.result()
      tokens = setup.place(np.full((rows, bucket), pad_id, np.int32))
      batch_lengths = setup.place(np.full((rows,), bucket, np.int32))
      with jax.default_matmul_precision(precision), jax.enable_x64(x64):
        return _score_batch.lower(setup.graphdef, setup.state, cache, tokens, batch_lengths, label_ids,
                                  record=record).compile()

    _AHEAD[_ahead_key(setup, record, (rows, bucket), len(label_ids))] = executor.submit(compile_batch)
  return len(dict.fromkeys(shapes))


precompile.__doc__ += "\n  Args: as :func:`evaluate`, plus ``executor`` (e.g. a ``ThreadPoolExecutor``).\n" + _EVAL_OPTIONS_DOC


def _fit_last_axis(array, length: int):
  """``array`` (numpy or jax) cut or zero-padded to ``length`` on its last axis."""
  if array.shape[-1] >= length:
    return array[..., :length]
  pad = jnp.pad if isinstance(array, jax.Array) else np.pad
  return pad(array, [(0, 0)] * (array.ndim - 1) + [(0, length - array.shape[-1])])


@functools.partial(jax.jit, static_argnames=("width", "mask_queries"))
def _assemble_record(parts: tuple, rows, lengths, *, width: int | None, mask_queries: bool):
  """One record's whole batches (in batch order, their last axes may differ) -> example order [N, ...]:
  every part's last axis cut or zero-padded to ``width`` (when given), concatenated, gathered at ``rows``
  [N]; with ``mask_queries`` the keys at or past each example's length ``lengths`` [N] are zeroed."""
  if width is not None:
    parts = [_fit_last_axis(part, width) for part in parts]
  out = jnp.concatenate(parts)[rows]
  if mask_queries:
    out = out * (jnp.arange(out.shape[-1]) < lengths[:, None])[:, None, None, None, :]
  return out


def _label_slots(label_ids: np.ndarray) -> jax.Array:
  """Label ids padded to a power of two (at least 8) slots by repeating label 0, so tasks with 2, 3, 4 or 5
  labels share compiled shapes; the padding columns are dropped on the host."""
  slots = max(8, 1 << (len(label_ids) - 1).bit_length())
  return jnp.asarray(np.concatenate([label_ids, np.full(slots - len(label_ids), label_ids[0])]))


def _evaluate_single(setup: _Setup, sequences, record, pad_id, progress,
                     records_on_device: bool = False) -> EvalResult:
  graphdef, state, cache, label_ids, place = setup.graphdef, setup.state, setup.cache, setup.label_ids, setup.place
  context_length = setup.context_length
  lengths = np.asarray([len(sequence) for sequence in sequences])
  count, query_max = len(sequences), int(lengths.max())
  label_ids_device = _label_slots(label_ids)
  collected: dict[str, np.ndarray] = {}
  on_device: dict[str, list] = {}  # records_on_device: name -> whole batches as computed, in batch order
  example_rows = np.empty((count,), np.int64)  # records_on_device: row of each example in those batches
  pending, shapes, done, rows_so_far = [], set(), 0, 0

  # Last-axis widths of the records with padding keys: a padded cache's context keys, query keys past query_max.
  widths = {"context_scores": context_length, "query_scores": query_max}

  def trim(name, value):
    return _fit_last_axis(value, widths[name]) if name in widths else value

  def collect(indices, outputs):
    """Copies one finished batch into the per-example arrays (blocks until the device is done with it);
    with records_on_device only the label scores are copied and the records stay whole on the device."""
    nonlocal rows_so_far
    for name, value in outputs.items():
      if records_on_device and name != "label_scores":
        on_device.setdefault(name, []).append(value)
        continue
      value = trim(name, np.asarray(value)[:len(indices)])
      if name == "label_scores":
        value = value[:, :len(label_ids)]
      if name not in collected:
        collected[name] = np.zeros((count,) + value.shape[1:], np.float32)
      collected[name][indices] = value
    example_rows[indices] = rows_so_far + np.arange(len(indices))
    rows_so_far += len(outputs["label_scores"])

  for bucket, rows, indices in setup.batching(lengths):
    tokens, batch_lengths = _pad_rows([sequences[i] for i in indices], bucket, rows, pad_id)
    if (bucket, rows) not in shapes:
      _wait_ahead(_ahead_key(setup, record, (rows, bucket), len(label_ids_device)))
    outputs = _score_batch(graphdef, state, cache, place(tokens), place(batch_lengths), label_ids_device,
                           record=record)  # dispatched asynchronously
    pending.append((indices, outputs))
    shapes.add((bucket, rows))
    while len(pending) > 2:  # keep two batches in flight; read back the oldest
      finished, outputs = pending.pop(0)
      collect(finished, outputs)
      done += len(finished)
      if progress is not None:
        progress(done)
  for finished, outputs in pending:
    collect(finished, outputs)
    done += len(finished)
    if progress is not None:
      progress(done)
  if on_device:  # whole batches -> example order: one jitted program per record (not a chain of eager ops)
    gather, device_lengths = jax.device_put(example_rows.astype(np.int32)), jax.device_put(lengths.astype(np.int32))
    for name, parts in on_device.items():
      collected[name] = _assemble_record(tuple(parts), gather, device_lengths, width=widths.get(name),
                                         mask_queries=name == "query_scores")
  elif "query_scores" in collected:  # zero the keys beyond each example's query part
    valid = np.arange(query_max)[None, :] < lengths[:, None]
    collected["query_scores"] = collected["query_scores"] * valid[:, None, None, None, :]
  label_scores = collected.pop("label_scores")
  return EvalResult(label_scores=label_scores, predictions=np.argmax(label_scores, axis=1),
                    query_lengths=lengths, context_length=0, records=collected, traces=len(shapes))


def _evaluate_multitoken(setup: _Setup, query_inputs, label_tokens, pad_id, progress) -> EvalResult:
  """Mean teacher-forced log-prob of each candidate's tokens, one batched pass per candidate."""
  graphdef, state, cache, batching, place = setup.graphdef, setup.state, setup.cache, setup.batching, setup.place
  count = len(query_inputs)
  label_scores = np.zeros((count, len(label_tokens)), np.float32)
  shapes = set()
  for candidate, label in enumerate(label_tokens):
    sequences = [list(query) + list(label) for query in query_inputs]
    lengths = np.asarray([len(sequence) for sequence in sequences])
    for bucket, rows, indices in batching(lengths):
      tokens, _ = _pad_rows([sequences[i] for i in indices], bucket, rows, pad_id)
      log_probs = np.asarray(_token_log_probs(graphdef, state, cache, place(tokens)))[:len(indices)]
      shapes.add((bucket, rows))
      for row, index in enumerate(indices):
        query_length = len(query_inputs[index])  # label tokens sit at query_length .. +len(label)-1
        label_scores[index, candidate] = log_probs[row, query_length - 1:query_length - 1 + len(label)].mean()
    if progress is not None:
      progress(count * (candidate + 1) // len(label_tokens))
  lengths = np.asarray([len(query) + 1 for query in query_inputs])
  return EvalResult(label_scores=label_scores, predictions=np.argmax(label_scores, axis=1),
                    query_lengths=lengths, context_length=0, records={}, traces=len(shapes))


def evaluate_full_sequences(model: Transformer, context: Sequence[int], query_inputs: Sequence[Sequence[int]],
                            label_tokens: Sequence[Sequence[int]], *, record: EvalRecordSpec = NO_RECORDS,
                            bucket_multiple: int = 64, pad_id: int = 0) -> EvalResult:
  """The slow reference, as the original code: one full forward of ``context + query + [label_0]`` per
  example (batch 1, no cache; lengths padded to a multiple of ``bucket_multiple`` so jit is reused)."""
  start = time.perf_counter()
  single, label_ids = _single_label_ids(label_tokens)
  if not single:
    raise ValueError("the full-sequence reference supports single-token labels only")
  graphdef, state = nnx.split(model)
  graphdef = interned(graphdef)
  context = list(context)
  label_ids_device = jnp.asarray(label_ids)
  rows, shapes = [], set()
  for query in query_inputs:
    sequence = context + list(query) + [int(label_ids[0])]
    bucket = -(-len(sequence) // bucket_multiple) * bucket_multiple
    tokens, lengths = _pad_rows([sequence], bucket, 1, pad_id)
    outputs = _score_batch(graphdef, state, None, jnp.asarray(tokens), jnp.asarray(lengths), label_ids_device,
                           record=dataclasses.replace(record, context_scores=False,
                                                                  query_scores=record.query_scores or record.context_scores))
    outputs = {name: np.asarray(value)[0] for name, value in outputs.items()}
    if "query_scores" in outputs:  # scores over the full sequence: split into context and query part
      full = outputs.pop("query_scores")  # [L, 2, heads, bucket]
      if record.context_scores and context:
        outputs["context_scores"] = full[..., :len(context)].sum(axis=2)
      if record.query_scores:
        outputs["query_scores"] = full[..., len(context):len(sequence)]
    rows.append(outputs)
    shapes.add(tokens.shape)
  lengths = np.asarray([len(query) + 1 for query in query_inputs])
  query_max = int(lengths.max())
  records: dict[str, np.ndarray] = {}
  for name in rows[0]:
    if name == "label_scores":
      continue
    if name == "query_scores":
      records[name] = np.stack([np.pad(row[name], [(0, 0)] * 3 + [(0, query_max - row[name].shape[-1])])
                                for row in rows])
    else:
      records[name] = np.stack([row[name] for row in rows])
  label_scores = np.stack([row["label_scores"] for row in rows])
  return EvalResult(label_scores=label_scores, predictions=np.argmax(label_scores, axis=1), query_lengths=lengths,
                    context_length=len(context), records=records, seconds=time.perf_counter() - start,
                    traces=len(shapes))


logging.getLogger(__name__).addHandler(logging.NullHandler())
