"""The finetuning baseline of Dai et al. (PROTOCOL.md §7): K/V-only SGD, one step per demonstration.

Only the parameters whose path matches ``FinetuneConfig.trainable`` (default: attention key and value
projections, weights and biases, every layer) are updated, with plain ``optax.sgd(lr)`` (no momentum,
weight decay, warmup or clipping), batch 1, one step per demonstration in ICL order, float32, no dropout.

Objectives (``FinetuneConfig.objective``):

* ``"causal_lm"``: ``loss = (1/|M|) sum_{t in M} -log p(x_{t+1} | x_{<=t})``, the mean NLL over every demo
  target token M (all tokens after ``<s>``/BOS; without BOS, every token from the second on);
* ``"lcgd"``: layer-causal GD (Deutch et al., PROTOCOL.md §15.1): every layer's input is
  ``stop_gradient(x)``, every layer's output goes through the final norm and the tied unembedding, and the
  loss is the sum over layers of those per-layer mean NLLs.

In each step's forward pass, before its update, the scaled pre-RoPE queries ``q_proj(norm(x)) / sqrt(H)``
of every demo token are recorded (concatenated over heads) for the Kendall analysis (§8).

All sequences are right-padded to one bucket length with a loss mask, so one jitted step serves every
demonstration (``chex.assert_max_traces`` guards it in tests).

Public names: :data:`KV_PATTERN`, :data:`OBJECTIVES`, :class:`FinetuneConfig`, :class:`FinetuneResult`,
:func:`finetune`, :func:`sequence_loss`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dualform import params as params_lib
from dualform.models.transformer import RecordSpec, Transformer
from dualform.static import interned

KV_PATTERN = params_lib.TRAINABLE_KV
OBJECTIVES: tuple[str, ...] = ("causal_lm", "lcgd")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """One finetuning run.

  Attributes:
    learning_rate: constant SGD step size.
    trainable: anchored regex over parameter paths (``layers/3/attn/k_proj/kernel``); the rest is frozen.
    objective: ``"causal_lm"`` (§7) or ``"lcgd"`` (§15.1).
    record_queries: record the demo tokens' scaled pre-RoPE queries before each update.
    queries_on_device: return those queries as a device array (for :mod:`dualform.metrics_device`) instead of
      copying them to host numpy.
    bucket_multiple: sequences are padded to the longest one rounded up to a multiple of this.
  """

  learning_rate: float
  trainable: str = KV_PATTERN
  objective: str = "causal_lm"
  record_queries: bool = True
  queries_on_device: bool = False
  bucket_multiple: int = 32

  def __post_init__(self):
    if not self.learning_rate > 0:
      raise ValueError(f"learning_rate must be positive; got {self.learning_rate}")
    if self.objective not in OBJECTIVES:
      raise ValueError(f"unknown finetuning objective {self.objective!r}; choose one of {OBJECTIVES}")
    if self.bucket_multiple <= 0:
      raise ValueError(f"bucket_multiple must be positive; got {self.bucket_multiple}")


@dataclasses.dataclass
class FinetuneResult:
  """Outcome of :func:`finetune`.

  model: the finetuned model (a new object; the input model is not modified).
  losses: [k] loss of each step (before its update).
  queries: [T, L, heads * head_dim] (>= float32) queries of every demo token, demos in order (None if off;
    a ``jax.Array`` with ``queries_on_device``).
  demo_token_counts: [k] number of demo tokens (query rows) of each demonstration.
  trainable_names: resolved trainable parameter paths; trainable_count: their number of values.
  seconds: wall time; traces: how many times the step was traced.
  """

  model: Transformer
  losses: np.ndarray
  queries: np.ndarray | jax.Array | None
  demo_token_counts: np.ndarray
  trainable_names: list[str]
  trainable_count: int
  seconds: float
  traces: int


def sequence_loss(logits, tokens, loss_mask):
  """Mean NLL of ``tokens[:, 1:]`` under ``logits[:, :-1]`` over ``loss_mask[:, 1:]`` (targets) [scalar]."""
  log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
  nll = -jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]
  mask = loss_mask[:, 1:].astype(nll.dtype)
  return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _lcgd_forward(model: Transformer, tokens, record: RecordSpec | None, record_positions):
  """Layer-causal forward: per-layer logits [L, B, T, V] with stop_gradient on every layer's input."""
  positions = model.default_positions(*tokens.shape)
  x = model.embed_tokens(tokens, positions)
  logits, records = [], []
  for block in model.layers:
    x, _, layer_records = block(jax.lax.stop_gradient(x), positions, None, record, record_positions)
    logits.append(model.unembed(x))
    records.append(layer_records)
  return logits, records


_TRACES: dict[str, int] = {"step": 0}


# Plain SGD (no momentum, weight decay, warmup or clipping) with the learning rate held in the optimizer
# state, so one trace serves every learning rate of a sweep.
_SGD = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)


@functools.partial(jax.jit, static_argnames=("graphdef", "objective", "record_queries"))
def _train_step(graphdef, trainable, frozen, optimizer_state, tokens, loss_mask, *, objective: str,
                record_queries: bool):
  """One SGD step on one right-padded sequence [1, T]: (trainable, optimizer_state, loss, queries [T, L, D]).
  ``graphdef``: the model's interned (hash-once) GraphDef."""
  _TRACES["step"] += 1
  seq = tokens.shape[1]
  record = RecordSpec(queries=True) if record_queries else None
  record_positions = jnp.arange(seq, dtype=jnp.int32)[None] if record_queries else None

  def loss_fn(trainable_params):
    model = nnx.merge(graphdef.value, trainable_params, frozen)
    if objective == "lcgd":
      layer_logits, records = _lcgd_forward(model, tokens, record, record_positions)
      loss = sum(sequence_loss(logits, tokens, loss_mask) for logits in layer_logits)
    else:
      out = model.forward(tokens, record=record, record_positions=record_positions)
      loss, records = sequence_loss(out.logits, tokens, loss_mask), out.records
    if record_queries:
      # [L, T, heads, head_dim] -> [T, L, heads * head_dim]
      queries = jnp.stack([layer["queries"][0] for layer in records], axis=1)
      queries = queries.reshape(seq, len(records), -1)
      queries = jax.lax.stop_gradient(queries.astype(jnp.promote_types(queries.dtype, jnp.float32)))
    else:
      queries = jnp.zeros((0,), jnp.float32)
    return loss, queries

  (loss, queries), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
  updates, optimizer_state = _SGD.update(grads, optimizer_state, trainable)
  trainable = optax.apply_updates(trainable, updates)
  return trainable, optimizer_state, loss, queries


@jax.jit
def _demo_token_queries(step_queries: tuple, rows):
  """The steps' recorded queries ([bucket, L, D] each) stacked to [steps * bucket, L, D] and gathered at
  ``rows`` [T]: [T, L, D] (one program instead of an eager stack and gather)."""
  stacked = jnp.stack(step_queries)
  return stacked.reshape((-1,) + stacked.shape[2:])[rows]


def finetune(model: Transformer, sequences: Sequence[Sequence[int]], config: FinetuneConfig, *,
             has_bos: bool, pad_id: int = 0, log: Callable[[str], None] | None = None) -> FinetuneResult:
  """Finetunes a copy of ``model`` on ``sequences`` (one SGD step each, in order; PROTOCOL.md §7).

  Args:
    model: the pretrained model; it is not modified.
    sequences: per demonstration ``[BOS/<s> if used] + input + [label]`` token ids (§3).
    config: learning rate, trainable pattern, objective.
    has_bos: whether every sequence starts with ``<s>``/BOS; that token is neither a demo token (no query
      recorded) nor a target. Without BOS every token is a demo token and targets start at the second.
    log: where the resolved trainable set is reported (default: the module logger).
  """
  log = log or logging.getLogger(__name__).info
  start = time.perf_counter()
  if not sequences:
    raise ValueError("no finetuning sequences; the ICL context holds no demonstration")
  for index, sequence in enumerate(sequences):
    if len(sequence) < 2:
      raise ValueError(f"finetuning sequence {index} has {len(sequence)} tokens; it needs at least 2")
  selection = params_lib.select_params(model, config.trainable)  # raises when nothing matches
  if selection.count <= 0:
    raise ValueError(f"trainable pattern {config.trainable!r} selects no values; fix the pattern")
  log(f"finetune: trainable {selection.describe()}: {', '.join(selection.paths)}")

  # The input model is left untouched: updates create new arrays and a new model is merged at the end.
  graphdef, trainable, frozen = nnx.split(model, params_lib.param_filter(config.trainable), ...)
  optimizer_state = _SGD.init(trainable)
  # A strongly typed scalar (float64 under x64), so the first and later steps share one trace.
  optimizer_state.hyperparams["learning_rate"] = jnp.asarray(config.learning_rate, dtype=float)

  static_graph = interned(graphdef)
  longest = max(len(sequence) for sequence in sequences)
  bucket = -(-longest // config.bucket_multiple) * config.bucket_multiple
  first_demo_token = 1 if has_bos else 0
  losses, queries, counts = [], [], []
  traces_before = _TRACES["step"]
  for sequence in sequences:
    tokens = np.full((1, bucket), pad_id, np.int32)
    tokens[0, :len(sequence)] = sequence
    loss_mask = np.zeros((1, bucket), np.int32)
    loss_mask[0, 1:len(sequence)] = 1  # targets: every token after the first (after <s>/BOS when present)
    trainable, optimizer_state, loss, step_queries = _train_step(
        static_graph, trainable, frozen, optimizer_state, jax.device_put(tokens), jax.device_put(loss_mask),
        objective=config.objective, record_queries=config.record_queries)
    losses.append(loss)
    if config.record_queries:
      queries.append(step_queries)  # [bucket, L, D]: cut to the demo tokens after the loop, in one gather
    counts.append(len(sequence) - first_demo_token)
  model = nnx.merge(graphdef, trainable, frozen)
  losses = np.asarray(jax.device_get(losses), np.float64)  # one transfer per scalar, no program per step count
  if not np.all(np.isfinite(losses)):
    raise FloatingPointError(f"finetuning loss is not finite at step {int(np.argmin(np.isfinite(losses)))}; "
                             "lower the learning rate")
  all_queries = None
  if config.record_queries:  # rows step * bucket + position of every demo token, gathered on the device
    rows = np.concatenate([step * bucket + np.arange(first_demo_token, len(sequence))
                           for step, sequence in enumerate(sequences)])
    all_queries = _demo_token_queries(tuple(queries), jax.device_put(rows.astype(np.int32)))
    if not config.queries_on_device:
      all_queries = np.asarray(all_queries)
  return FinetuneResult(model=model, losses=losses, queries=all_queries, demo_token_counts=np.asarray(counts),
                        trainable_names=list(selection.paths), trainable_count=int(selection.count),
                        seconds=time.perf_counter() - start, traces=_TRACES["step"] - traces_before)
