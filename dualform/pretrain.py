"""Pretraining of the project's Transformer from scratch (vanilla or momentum attention), resumable.

Objective: next-token cross-entropy ``L = -mean_{b,t} log softmax(f(x_{b,<=t}))[x_{b,t+1}]`` over blocks of
``seq_len + 1`` tokens from a :class:`dualform.data.corpus.BlockStream`, computed in float32.

Optimizer: ``optax.adamw`` (decoupled weight decay on matrices only: parameters with ``ndim >= 2``) after
global-norm clipping, learning rate ``optax.warmup_cosine_decay_schedule`` (linear warmup from 0 to
``learning_rate`` in ``warmup_steps``, cosine decay to ``min_learning_rate_ratio * learning_rate`` at
``steps``). Compute dtype ``"auto"`` is bfloat16 on GPU/TPU and float32 on CPU; parameters and optimizer
state stay float32.

Workdir layout (one run per folder)::

  config.json          the PretrainConfig (written at start; a resume must match it)
  metrics.jsonl        one line per log step: step, loss, mean_loss, lr, tokens_per_second, epoch, elapsed
  checkpoints/<step>/  orbax CheckpointManager: params + optimizer state, and the data-stream position

A run restarted on the same workdir resumes from the latest checkpoint (parameters, optimizer state,
schedule and data position), drops metric lines past that step, and on CPU continues bit-exactly.

Public names: PretrainConfig, TrainResult, train, resolve_compute_dtype, make_optimizer, loss_fn,
evaluate_perplexity, restore_model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from dualform.data.corpus import BlockStream, evaluation_blocks
from dualform.models.config import TransformerConfig
from dualform.models.transformer import Transformer, build_model

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """One pretraining run.

  Attributes:
    model: the model shape and per-layer attention kinds (``model.dtype`` is replaced by the compute dtype).
    steps: optimizer steps of the whole run (the schedule's length).
    batch_size: blocks per step.
    seq_len: tokens per block (inputs; targets are shifted by one).
    learning_rate: peak learning rate.
    warmup_steps: linear warmup from 0.
    min_learning_rate_ratio: final learning rate as a fraction of the peak (cosine decay).
    weight_decay: AdamW decoupled weight decay, matrices only.
    adam_b1, adam_b2, adam_eps: Adam moments.
    grad_clip_norm: global gradient-norm clip (0 disables).
    seed: parameter initialisation seed (``build_model(model, seed)``).
    data_seed: block-order seed of the BlockStream.
    compute_dtype: ``"auto"`` (bfloat16 on accelerators, float32 on CPU), ``"float32"`` or ``"bfloat16"``.
    log_every: steps between metric lines (and progress lines).
    checkpoint_every: steps between checkpoints (the last step is always saved).
    keep_checkpoints: how many checkpoints to keep.
  """

  model: TransformerConfig
  steps: int
  batch_size: int
  seq_len: int
  learning_rate: float = 3e-3
  warmup_steps: int = 20
  min_learning_rate_ratio: float = 0.1
  weight_decay: float = 0.1
  adam_b1: float = 0.9
  adam_b2: float = 0.95
  adam_eps: float = 1e-8
  grad_clip_norm: float = 1.0
  seed: int = 0
  data_seed: int = 0
  compute_dtype: str = "auto"
  log_every: int = 10
  checkpoint_every: int = 100
  keep_checkpoints: int = 2

  def __post_init__(self):
    for field in ("steps", "batch_size", "seq_len", "log_every", "checkpoint_every", "keep_checkpoints"):
      if getattr(self, field) <= 0:
        raise ValueError(f"{field} must be positive; got {getattr(self, field)}")
    if not 0 <= self.warmup_steps < self.steps:
      raise ValueError(f"warmup_steps must be in [0, steps={self.steps}); got {self.warmup_steps}")
    if self.seq_len > self.model.max_len:
      raise ValueError(f"seq_len {self.seq_len} exceeds the model context {self.model.max_len}; raise max_len")
    if self.compute_dtype not in ("auto", "float32", "bfloat16"):
      raise ValueError(f"compute_dtype must be auto, float32 or bfloat16; got {self.compute_dtype!r}")

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class TrainResult:
  """What :func:`train` returns: the model, its final step, and this call's per-step losses."""

  model: Transformer
  step: int
  losses: dict[int, float]
  resumed_from: int | None
  seconds: float


def resolve_compute_dtype(compute_dtype: str) -> str:
  """``"auto"`` -> bfloat16 on GPU/TPU, float32 on CPU; explicit names pass through."""
  if compute_dtype != "auto":
    return compute_dtype
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def _model_config(config: PretrainConfig) -> TransformerConfig:
  return config.model.replace(dtype=resolve_compute_dtype(config.compute_dtype), param_dtype="float32")


def learning_rate_schedule(config: PretrainConfig) -> optax.Schedule:
  """Linear warmup to the peak, cosine decay to ``min_learning_rate_ratio`` of it at ``steps``."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
      decay_steps=config.steps, end_value=config.learning_rate * config.min_learning_rate_ratio)


def make_optimizer(config: PretrainConfig) -> optax.GradientTransformation:
  """Clip by global norm, then AdamW with weight decay on ``ndim >= 2`` parameters."""
  decay_mask = lambda params: jax.tree.map(lambda leaf: leaf.ndim >= 2, params)
  adamw = optax.adamw(learning_rate_schedule(config), b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                      weight_decay=config.weight_decay, mask=decay_mask)
  if config.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adamw)
  return adamw


def loss_fn(model: Transformer, tokens: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy of ``tokens`` [B, T + 1] (float32)."""
  logits = model(tokens[:, :-1]).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def _write_json_atomic(path: pathlib.Path, payload: Any) -> None:
  temporary = path.with_suffix(path.suffix + ".tmp")
  temporary.write_text(json.dumps(payload, indent=1, default=str))
  os.replace(temporary, path)


def _truncate_metrics(path: pathlib.Path, last_step: int) -> None:
  """Keeps only metric lines with ``step <= last_step`` (a resumed run rewrites what follows)."""
  if not path.exists():
    return
  kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
  temporary = path.with_suffix(".tmp")
  temporary.write_text("".join(line + "\n" for line in kept))
  os.replace(temporary, path)


def _format_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _checkpoint_manager(workdir: pathlib.Path, config: PretrainConfig) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True)
  return ocp.CheckpointManager((workdir / CHECKPOINT_DIR).absolute(), options=options)


def train(config: PretrainConfig, workdir: str | os.PathLike, train_tokens: np.ndarray, *,
          stop_after: int | None = None, log: Callable[[str], None] | None = None) -> TrainResult:
  """Trains (or resumes) a run in ``workdir`` up to ``config.steps`` (or ``stop_after``) steps.

  Args:
    config: the run; a resume refuses a workdir whose ``config.json`` differs.
    workdir: the run folder (created).
    train_tokens: 1-D token ids, cut into blocks by a seeded :class:`BlockStream`.
    stop_after: stop (and checkpoint) after this many total steps without changing the schedule, e.g. to
      split a run over several jobs with a time limit.
    log: progress sink (default: ``logging.info``).
  """
  log = log or logger.info
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  config_path = workdir / CONFIG_FILE
  if config_path.exists():
    saved = json.loads(config_path.read_text())
    if saved != json.loads(json.dumps(config.to_json(), default=str)):
      raise ValueError(f"{workdir} holds a run with a different config; use a new workdir or delete it")
  else:
    _write_json_atomic(config_path, config.to_json())

  stream = BlockStream(train_tokens, block_len=config.seq_len, batch_size=config.batch_size,
                       seed=config.data_seed)
  model = build_model(_model_config(config), config.seed)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  optimizer = make_optimizer(config)
  opt_state = optimizer.init(params)
  schedule = learning_rate_schedule(config)

  manager = _checkpoint_manager(workdir, config)
  start_step, resumed_from = 0, None
  if manager.latest_step() is not None:
    latest = manager.latest_step()
    abstract = jax.eval_shape(lambda: {"params": params, "opt_state": opt_state})
    restored = manager.restore(latest, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    params, opt_state = restored["state"]["params"], restored["state"]["opt_state"]
    start_step = stream.check_state(restored["data"])
    if start_step != latest:
      raise ValueError(f"checkpoint {latest} records data step {start_step}; the checkpoint is inconsistent")
    resumed_from = start_step
    log(f"resumed from step {start_step} in {workdir}")
  _truncate_metrics(workdir / METRICS_FILE, start_step)

  @jax.jit
  def train_step(params, opt_state, tokens):
    def objective(params):
      return loss_fn(nnx.merge(graphdef, params, rest), tokens)
    loss, grads = jax.value_and_grad(objective)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  end_step = config.steps if stop_after is None else min(stop_after, config.steps)
  tokens_per_step = config.batch_size * config.seq_len
  losses: dict[int, float] = {}
  begin = time.perf_counter()
  interval_start, interval_start_step = time.perf_counter(), start_step
  with open(workdir / METRICS_FILE, "a") as metrics_file:
    for step in range(start_step, end_step):
      batch = jnp.asarray(stream.batch(step))
      params, opt_state, loss = train_step(params, opt_state, batch)
      done = step + 1
      if done % config.log_every == 0 or done == end_step:
        loss_value = float(loss)  # synchronises, so the rate below is honest
        now = time.perf_counter()
        rate = (done - interval_start_step) * tokens_per_step / max(now - interval_start, 1e-9)
        record = dict(step=done, loss=loss_value, lr=float(schedule(step)), tokens_per_second=rate,
                      epoch=stream.epoch(done), elapsed=now - begin)
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        remaining = (end_step - done) * tokens_per_step / max(rate, 1e-9)
        log(f"step {done}/{config.steps} loss {loss_value:.4f} lr {record['lr']:.2e} "
            f"{rate:,.0f} tok/s ETA {_format_seconds(remaining)}")
        interval_start, interval_start_step = now, done
      losses[done] = loss  # device scalar; converted once at the end (no per-step sync)
      if done % config.checkpoint_every == 0 or done == end_step:
        manager.save(done, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
            data=ocp.args.JsonSave(stream.state(done))))
  manager.wait_until_finished()
  manager.close()
  final_step = max(start_step, end_step)
  model = nnx.merge(graphdef, params, rest)
  return TrainResult(model=model, step=final_step, losses={k: float(v) for k, v in losses.items()},
                     resumed_from=resumed_from, seconds=time.perf_counter() - begin)


def restore_model(config: PretrainConfig, workdir: str | os.PathLike, step: int | None = None) -> Transformer:
  """The model of a finished (or interrupted) run at ``step`` (default: latest checkpoint)."""
  model = build_model(_model_config(config), config.seed)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt_state = make_optimizer(config).init(params)
  manager = _checkpoint_manager(pathlib.Path(workdir), config)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise ValueError(f"no checkpoint in {workdir}; train the run first")
  abstract = jax.eval_shape(lambda: {"params": params, "opt_state": opt_state})
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
  manager.close()
  return nnx.merge(graphdef, restored["state"]["params"], rest)


def evaluate_perplexity(model: Transformer, tokens: np.ndarray, block_len: int, *, max_tokens: int | None = None,
                        batch_size: int = 8) -> dict[str, float]:
  """Perplexity ``exp(mean NLL)`` over non-overlapping blocks of ``block_len`` (every block starts fresh).

  Returns ``{"perplexity", "nll", "tokens", "blocks"}``; with ``max_tokens`` a multiple of every length, each
  length scores the same target tokens.
  """
  blocks = evaluation_blocks(tokens, block_len, max_tokens)
  graphdef, state = nnx.split(model)

  @jax.jit
  def row_nll(state, batch):
    logits = nnx.merge(graphdef, state)(batch[:, :-1]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).sum(axis=-1)

  total = 0.0
  for start in range(0, len(blocks), batch_size):
    batch = blocks[start:start + batch_size]
    rows = len(batch)
    if rows < batch_size:  # pad to the fixed shape (one trace) and drop the padded rows' sums
      batch = np.concatenate([batch, np.repeat(batch[:1], batch_size - rows, axis=0)])
    total += float(np.asarray(row_nll(state, jnp.asarray(batch)), np.float64)[:rows].sum())
  count = blocks.shape[0] * block_len
  nll = total / count
  return dict(perplexity=math.exp(nll), nll=nll, tokens=int(count), blocks=int(blocks.shape[0]))
