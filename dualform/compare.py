"""The ICL-vs-FT comparison of Dai et al. (PROTOCOL.md §6): settings, metrics, one run folder.

For each (task, seed, perm_id) :func:`run` executes, in the protocol's order:

1. FT (K/V-only SGD on the packed demonstrations, §7), which also records the training-token queries;
2. FT evaluation, 3. ZSL, 4. ICL (all batched against a shared prefix cache, :mod:`dualform.evaluate`);

then the metrics of §9 and §15 at the configured position (``pred_pos`` by default, ``label_pos`` one flag
away; every number names its position): accuracy per setting; Rec2FTP with its counts, chance Rec2FTP,
Rec2ICLP, regressions and Cohen's kappa; SimAOU per layer with a seeded random baseline; SimAM, ZSL-SimAM and
SimAM_Δ; Kendall τ at token and example level with a random baseline; and, with ``shuffled_pairing``, the same
similarity metrics with a seeded derangement of the examples.

Settings are data (:data:`SETTINGS`): a setting is (weights, context, records). Extra settings are one
registry entry each: ``ft_lcgd`` (layer-causal GD, §15.1) and ``icl_perm`` (ICL with another order of the
same demonstrations, the ICL-vs-ICL ceiling of §15.7). Comparisons are data too (:data:`COMPARISONS`):
(ICL-like setting, FT-like setting), always against ZSL. The untrained-model control (§15.3) is the config
field ``model_init="untrained"``; multi-seed runs (§15.6) are ``config.seeds`` (mean ± std in ``aggregate``).

Public names: :class:`Setting`, :data:`SETTINGS`, :data:`COMPARISONS`, :func:`run`, :func:`prepare`,
:func:`plan` (dry run), :func:`resolve_runs`, :func:`setting_names`, :func:`untrained_control`,
:func:`default_learning_rate`, :func:`validate_config`, :func:`summary_markdown`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import os
import pathlib
import time
import zlib
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx

from dualform import evaluate as evaluate_lib
from dualform import finetune as finetune_lib
from dualform import metrics
from dualform import metrics_device
from dualform import params as params_lib
from dualform import runs
from dualform.data import packing, tasks
from dualform.attention import PREFIX_IMPLEMENTATIONS
from dualform.data.templates import format_input
from dualform.evaluate import EvalRecordSpec
from dualform.models.transformer import Transformer, build_model, param_count, set_prefix_attention

logger = logging.getLogger(__name__)

POSITION_NAMES = evaluate_lib.POSITIONS  # ("pred_pos", "label_pos"): axis 2 of every record


@dataclasses.dataclass(frozen=True)
class Setting:
  """One evaluated setting.

  Attributes:
    name: registry key, also the records file stem.
    weights: ``"pretrained"`` or ``"finetuned"`` (the FT run of §7 on the packed demonstrations).
    context: ``"zero_shot"`` (``<s>``/BOS or nothing), ``"demonstrations"`` (the packed ICL context) or
      ``"demonstrations_permuted"`` (the same demonstrations in another order).
    record: the analysis records kept (at both positions).
    description: one line for summaries.
    objective: FT objective of a finetuned setting (None: the config's ``objective``).
  """

  name: str
  weights: str
  context: str
  record: EvalRecordSpec
  description: str
  objective: str | None = None

  @property
  def is_icl(self) -> bool:
    return self.context != "zero_shot"


_ZERO_SHOT_RECORD = EvalRecordSpec(attn_out=True, query_scores=True, queries=True)
_ICL_RECORD = EvalRecordSpec(attn_out=True, query_scores=True, context_scores=True)

SETTINGS: dict[str, Setting] = {
    "zsl": Setting("zsl", "pretrained", "zero_shot", _ZERO_SHOT_RECORD, "zero-shot, pretrained weights"),
    "ft": Setting("ft", "finetuned", "zero_shot", _ZERO_SHOT_RECORD,
                  "zero-shot after K/V finetuning on the demonstrations (§7)"),
    "ft_lcgd": Setting("ft_lcgd", "finetuned", "zero_shot", _ZERO_SHOT_RECORD,
                       "zero-shot after layer-causal GD on the demonstrations (§15.1)", objective="lcgd"),
    "icl": Setting("icl", "pretrained", "demonstrations", _ICL_RECORD, "the packed demonstrations in context"),
    "icl_perm": Setting("icl_perm", "pretrained", "demonstrations_permuted", _ICL_RECORD,
                        "the same demonstrations in another order (ICL-vs-ICL ceiling, §15.7)"),
}

# Run order of the protocol: FT (+ FT eval), ZSL, ICL; extra settings after their kin.
_ORDER = ("ft", "ft_lcgd", "zsl", "icl", "icl_perm")

# (name, ICL-like setting, FT-like setting): every metric compares the two against ZSL.
COMPARISONS: tuple[tuple[str, str, str], ...] = (
    ("icl_vs_ft", "icl", "ft"),
    ("icl_vs_ft_lcgd", "icl", "ft_lcgd"),
    ("icl_vs_icl_perm", "icl", "icl_perm"),
)

MODEL_INITS = ("pretrained", "untrained")
ANALYSES = ("host", "device")  # where the metrics are computed: float64 numpy, or float32 jax on the device
LR_SELECT_ON = ("heldout", "eval")


def _split_ints(text: str, what: str) -> list[int]:
  if not str(text).strip():
    return []
  try:
    values = [int(part) for part in str(text).split(",") if part.strip()]
  except ValueError:
    raise ValueError(f"{what} must be a comma list of integers like 1,2,3; got {text!r}") from None
  if any(value < 0 for value in values):
    raise ValueError(f"{what} must be non-negative integers; got {text!r}")
  return values


def resolve_runs(config) -> list[tuple[int, int]]:
  """The (seed, perm_id) pairs of a config: ``seeds`` paired with ``perm_ids`` (or ``perm_id``)."""
  seeds = _split_ints(config.seeds, "seeds") or [int(config.seed)]
  perm_ids = _split_ints(config.perm_ids, "perm_ids") or [int(config.perm_id)] * len(seeds)
  if len(perm_ids) != len(seeds):
    raise ValueError(f"perm_ids has {len(perm_ids)} entries for {len(seeds)} seeds; give one per seed")
  if len(set(zip(seeds, perm_ids))) != len(seeds):
    raise ValueError(f"(seed, perm_id) pairs repeat in seeds={config.seeds!r} perm_ids={config.perm_ids!r}")
  return list(zip(seeds, perm_ids))


def setting_names(config) -> list[str]:
  names = [name.strip() for name in str(config.settings).split(",") if name.strip()]
  unknown = [name for name in names if name not in SETTINGS]
  if unknown:
    raise ValueError(f"unknown settings {unknown}; choose from {', '.join(SETTINGS)}")
  for required in ("zsl", "icl"):
    if required not in names:
      raise ValueError(f"settings must include {required!r} (every comparison is against ZSL and ICL)")
  return [name for name in _ORDER if name in names]


def validate_config(config) -> None:
  """One-line ValueErrors for bad config values (before anything is loaded or written)."""
  tasks.get_task(config.task)
  if config.position not in POSITION_NAMES:
    raise ValueError(f"unknown position {config.position!r}; choose pred_pos or label_pos")
  if config.model_init not in MODEL_INITS:
    raise ValueError(f"unknown model_init {config.model_init!r}; choose one of {MODEL_INITS}")
  if config.lr_select_on not in LR_SELECT_ON:
    raise ValueError(f"unknown lr_select_on {config.lr_select_on!r}; choose one of {LR_SELECT_ON}")
  if config.objective not in finetune_lib.OBJECTIVES:
    raise ValueError(f"unknown objective {config.objective!r}; choose one of {finetune_lib.OBJECTIVES}")
  if config.k < 1:
    raise ValueError(f"k must be at least 1; got {config.k}")
  if config.max_examples < 0:
    raise ValueError(f"max_examples must be >= 0 (0 = all); got {config.max_examples}")
  if config.lr is not None and not config.lr > 0:
    raise ValueError(f"lr must be positive; got {config.lr}")
  if int(config.get("compile_workers", 0)) < 0:
    raise ValueError(f"compile_workers must be >= 0 (0: compile on first use); got {config.compile_workers}")
  prefix_attention = config.get("prefix_attention", "xla")
  if prefix_attention not in PREFIX_IMPLEMENTATIONS:
    raise ValueError(f"unknown prefix_attention {prefix_attention!r}; choose one of {PREFIX_IMPLEMENTATIONS}")
  if prefix_attention == "cudnn" and config.dtype not in ("bfloat16", "float16"):
    raise ValueError(f"prefix_attention cudnn needs --dtype bfloat16 (cuDNN has no {config.dtype} fused attention)")
  if prefix_attention == "cudnn" and config.get("mesh"):
    raise ValueError("prefix_attention cudnn runs on one device (its sharded form is not built or tested); "
                     "drop --mesh or use xla")
  if prefix_attention == "cudnn" and jax.default_backend() != "gpu":
    raise ValueError(f"prefix_attention cudnn needs a CUDA GPU; this run's backend is {jax.default_backend()}: "
                     "use xla")
  if config.get("analysis", "host") not in ANALYSES:
    raise ValueError(f"unknown analysis {config.analysis!r}; choose host (float64 numpy) or device (float32 jax)")
  if config.random_baseline not in ("normal", "uniform01"):
    raise ValueError(f"unknown random_baseline {config.random_baseline!r}; choose normal or uniform01")
  if config.dtype not in ("float32", "bfloat16", "float16", "float64"):
    raise ValueError(f"unsupported dtype {config.dtype!r}; choose float32 or bfloat16")
  if config.matmul_precision not in ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32"):
    raise ValueError(f"unknown matmul_precision {config.matmul_precision!r}; use default, high or highest")
  resolve_runs(config)
  setting_names(config)


def default_learning_rate(family: str, task: str, table: dict[str, dict[str, float]]) -> float:
  try:
    return float(table[family][task])
  except KeyError:
    raise ValueError(f"no default learning rate for family {family!r} and task {task!r}; pass --lr") from None


def _other_order(pack: Callable[[int], Any], context, perm_id: int, attempts: int = 100):
  """The packed context of the first ``perm_id' > perm_id`` whose demonstration order differs from ``context``.

  For the ICL-vs-ICL ceiling (§15.7): a seeded permutation can be the identity (1 in k_eff! draws), which would
  compare ICL with itself and report a ceiling of exactly 1.
  """
  if context.k_eff < 2:
    raise ValueError(f"the ICL-vs-ICL ceiling (icl_perm) needs at least 2 demonstrations; k_eff is {context.k_eff}")
  for candidate in range(perm_id + 1, perm_id + 1 + attempts):
    alternative = pack(candidate)
    if list(alternative.demo_pool_indices) != list(context.demo_pool_indices):
      return alternative
  raise ValueError(f"no other demonstration order found in {attempts} permutations; raise k")


def untrained_control(model: Transformer, seed: int) -> Transformer:
  """§15.3: keeps token embeddings, every norm and the unembedding; attention and MLP weights get the
  seeded default initialisation. Returns a new model (the input is not modified)."""
  fresh = build_model(model.config, seed)
  reinitialised = nnx.state(fresh, params_lib.param_filter(r"^layers/\d+/(attn|mlp)/.*$"))
  control = nnx.clone(model)  # new Variables: updating them leaves the pretrained model untouched
  nnx.update(control, reinitialised)
  return control


# ----------------------------------------------------------------------------------------------------------
# One (seed, perm_id) run.


@dataclasses.dataclass
class _Prepared:
  """Everything loaded and encoded before the run folder is created (bad inputs fail here)."""

  config: Any
  task: tasks.TaskSpec
  model: Transformer
  tokenizer: Any
  model_info: dict
  eval_examples: list
  queries: list
  label_tokens: tuple
  single_token: bool
  max_query_len: int
  pool: list
  contexts: dict  # (seed, perm_id) -> (PackedContext, PackedContext | None for icl_perm)
  settings: list[str]
  runs: list[tuple[int, int]]


def prepare(config, *, load_pretrained: Callable | None = None) -> _Prepared:
  """Validates the config, loads data and model, encodes queries and packs every context."""
  validate_config(config)
  task = tasks.get_task(config.task)
  data_dir = config.data_dir or None
  pool = tasks.load_pool(task, data_dir)
  eval_all = tasks.load_eval_set(task, data_dir)
  if load_pretrained is None:
    from dualform.loading import load_pretrained
  extra = {"trust_pickle": True} if config.get("trust_pickle") else {}
  pretrained = load_pretrained(config.model, dtype=config.dtype, **extra)
  model, tokenizer, info = pretrained.model, pretrained.tokenizer, dict(pretrained.info)
  if config.get("scan_layers"):
    model.config = model.config.replace(scan_layers=True)
  if config.get("prefix_attention", "xla") != model.config.prefix_attention:
    set_prefix_attention(model, config.prefix_attention)
  single_token = packing.labels_are_single_tokens(tokenizer, task, config.template_index)
  all_queries = packing.encode_queries(tokenizer, task, eval_all, template_index=config.template_index,
                                       allow_multitoken_labels=config.allow_multitoken_labels)
  max_query_len = packing.max_query_length(tokenizer, task, all_queries)
  count = len(eval_all) if not config.max_examples else min(config.max_examples, len(eval_all))
  eval_examples, queries = eval_all[:count], all_queries[:count]
  zero_shot = packing.zero_shot_context(tokenizer)
  if len(zero_shot) + max_query_len > model.config.max_len:
    raise ValueError(f"the longest prompt ({max_query_len} tokens) is longer than the model context "
                     f"({model.config.max_len}); lower max_len or drop long examples")
  settings = setting_names(config)
  run_pairs = resolve_runs(config)
  contexts = {}
  for seed, perm_id in run_pairs:
    pack = lambda perm: packing.pack_context(tokenizer, task, pool, max_query_len=max_query_len,
                                             max_len=config.max_len, k=config.k, perm_id=perm, seed=seed,
                                             template_index=config.template_index,
                                             allow_multitoken_labels=config.allow_multitoken_labels)
    context = pack(perm_id)
    if context.context_length + max_query_len > model.config.max_len:
      raise ValueError(f"the ICL context ({context.context_length} tokens) plus the longest prompt exceeds "
                       f"the model context ({model.config.max_len}); lower max_len")
    alternative = _other_order(pack, context, perm_id) if "icl_perm" in settings else None
    contexts[(seed, perm_id)] = (context, alternative)
  if config.model_init == "untrained":
    model = untrained_control(model, config.untrained_seed)
    info["model_init"] = f"untrained control (attention and MLP re-initialised, seed {config.untrained_seed})"
  label_tokens = queries[0].label_ids
  return _Prepared(config=config, task=task, model=model, tokenizer=tokenizer, model_info=info,
                   eval_examples=eval_examples, queries=queries, label_tokens=label_tokens,
                   single_token=single_token, max_query_len=max_query_len, pool=pool, contexts=contexts,
                   settings=settings, runs=run_pairs)


class _Evaluator:
  """Evaluates settings with the config's batching, mesh and progress reporting."""

  def __init__(self, prepared: _Prepared, mesh=None, executor: concurrent.futures.Executor | None = None):
    self.prepared = prepared
    self.config = prepared.config
    self.mesh = mesh
    self.executor = executor  # compile_workers > 0: threads that compile batch shapes ahead
    self.pad_id = 0
    self._splits: dict[int, tuple] = {}  # id(model) -> (model, nnx.split(model)); models are not changed here

  def _split(self, model) -> tuple:
    """``nnx.split(model)``, once per model of this run (a graph walk of every layer costs ~0.1 s per call
    for the 2.7B config on a GPU host, and each task evaluates the pretrained model up to six times);
    :meth:`forget` drops a finetuned copy's."""
    if id(model) not in self._splits:
      self._splits[id(model)] = (model, nnx.split(model))
    return self._splits[id(model)][1]

  def _options(self, pad_context: bool) -> dict:
    """The batching options of :func:`evaluate_lib.evaluate` (and ``precompile``) under this config.

    ``pad_context``: cache the context padded per ``eval_prefix_multiple`` (ICL demonstrations only: a
    zero-shot ``<s>`` would grow from one token to a whole multiple).
    """
    config = self.config
    shard, rows = None, 1
    if self.mesh is not None:
      from dualform import sharding
      shard = lambda array: sharding.shard_batch(array, self.mesh)
      rows = int(self.mesh.shape.get("data", 1))
    # Rows per batch: eval_tokens_per_batch over the padded length, capped per bucket by the score budget.
    return dict(tokens_per_batch=config.eval_tokens_per_batch, score_budget=config.eval_score_budget,
                minimum_bucket=config.eval_minimum_bucket, bucket_midpoints=config.get("eval_bucket_midpoints", True),
                pad_id=self.pad_id, allow_multitoken_labels=config.allow_multitoken_labels, shard_batch=shard,
                row_multiple=rows, fixed_rows=config.eval_fixed_rows,
                prefix_multiple=config.get("eval_prefix_multiple") if pad_context else None)

  def forget(self, model) -> None:
    """Drops the split of a model no longer evaluated (a finetuned copy), so it can be freed."""
    self._splits.pop(id(model), None)

  def __call__(self, model, context, queries, label_tokens, record, prefix, pad_context: bool = False):
    progress = runs.Progress(len(queries), prefix, self.config.log_every_seconds)
    result = evaluate_lib.evaluate(model, context, queries, label_tokens, record=record,
                                   records_on_device=_analysis_ops(self.config) is metrics_device,
                                   progress=progress.update, split=self._split(model), **self._options(pad_context))
    progress.close()
    return result

  def precompile(self, model, context, queries, label_tokens, record, pad_context: bool = False) -> int:
    """Starts compiling the batch shapes of that evaluation on the executor (none without one)."""
    if self.executor is None:
      return 0
    return evaluate_lib.precompile(model, context, queries, label_tokens, record=record, executor=self.executor,
                                   split=self._split(model), **self._options(pad_context))


def _sweep_learning_rate(prepared: _Prepared, context: packing.PackedContext, seed: int, evaluator,
                         log) -> dict:
  """§7 re-tuning: FT at every grid LR, accuracy of the FT model on a held-out slice of the pool that
  excludes the demonstrations (or on the evaluated split with ``lr_select_on="eval"``); the best accuracy
  wins, ties go to the higher mean gold log-prob, then to the smaller LR."""
  config, task, tokenizer = prepared.config, prepared.task, prepared.tokenizer
  if config.lr_select_on == "heldout":
    order = packing.demonstration_order(len(prepared.pool), seed)
    demos = set(context.demo_pool_indices)
    candidates = [int(index) for index in order[len(context.drawn_pool_indices):] if int(index) not in demos]
    selected = candidates[:config.lr_heldout_examples]
    if not selected:
      raise ValueError("the pool has no examples left for the held-out LR selection; use lr_select_on=eval")
    examples = [prepared.pool[index] for index in selected]
    queries = packing.encode_queries(tokenizer, task, examples, template_index=config.template_index,
                                     allow_multitoken_labels=config.allow_multitoken_labels)
    where = f"held-out pool slice ({len(queries)} examples after the drawn demonstrations, seed {seed})"
  else:
    queries = prepared.queries
    selected = None
    where = f"the evaluated split ({len(queries)} examples; tuning on test data, as the original is believed to)"
  gold = np.asarray([query.gold for query in queries])
  sequences = packing.finetune_sequences(tokenizer, task, context)
  zero_shot = packing.zero_shot_context(tokenizer)
  rows = []
  for lr in config.lr_grid:
    ft_config = finetune_lib.FinetuneConfig(learning_rate=float(lr), trainable=config.trainable,
                                            objective=config.objective, record_queries=False,
                                            bucket_multiple=config.ft_bucket_multiple)
    try:
      trained = finetune_lib.finetune(prepared.model, list(sequences), ft_config, has_bos=sequences.bos,
                                      log=lambda message: None)
    except FloatingPointError:
      rows.append({"lr": float(lr), "accuracy": None, "mean_gold_log_prob": None, "diverged": True})
      continue
    result = evaluator(trained.model, zero_shot, [query.input_ids for query in queries], prepared.label_tokens,
                       evaluate_lib.NO_RECORDS, f"lr sweep {lr:g}")
    evaluator.forget(trained.model)
    gold_log_prob = float(np.mean(result.label_scores[np.arange(len(gold)), gold]))
    rows.append({"lr": float(lr), "accuracy": result.accuracy(gold), "mean_gold_log_prob": gold_log_prob,
                 "diverged": False})
    log(f"lr sweep: lr={lr:g} accuracy={rows[-1]['accuracy']:.2f} mean gold log-prob={gold_log_prob:.4f}")
  valid = [row for row in rows if not row["diverged"]]
  if not valid:
    raise FloatingPointError("every learning rate of the sweep diverged; give a smaller lr_grid")
  best = max(valid, key=lambda row: (row["accuracy"], row["mean_gold_log_prob"], -row["lr"]))
  return {"grid": [float(lr) for lr in config.lr_grid], "select_on": config.lr_select_on, "where": where,
          "criterion": "accuracy of the FT model (zero-shot layout); ties: higher mean gold log-prob, then "
                       "smaller lr", "heldout_pool_indices": selected, "results": rows, "chosen": best["lr"]}


def _records_npz(result: evaluate_lib.EvalResult) -> dict[str, np.ndarray]:
  arrays = {"label_scores": result.label_scores, "predictions": result.predictions,
            "query_lengths": result.query_lengths, "context_length": np.asarray(result.context_length)}
  arrays.update(result.records)
  return arrays


def _position_index(position: str) -> int:
  return POSITION_NAMES.index(position)



def _metric_key(seed: int, salt: str) -> jax.Array:
  """The PRNG key of one random baseline: ``fold_in(key(seed), crc32(salt))`` (recorded with the value)."""
  return jax.random.fold_in(jax.random.key(int(seed)), zlib.crc32(salt.encode()) & 0x7FFFFFFF)


def _layer_record(per_layer: np.ndarray) -> dict:
  per_layer = np.asarray(per_layer, np.float64)
  return {"per_layer": [float(value) for value in per_layer], "mean": float(per_layer.mean())}


def _analysis_ops(config):
  """The metric functions of ``config.analysis``: :mod:`dualform.metrics` (host, float64 numpy) or
  :mod:`dualform.metrics_device` (device, float32 jax; records stay on the accelerator)."""
  return metrics_device if config.get("analysis", "host") == "device" else metrics


def _query_scores(result: evaluate_lib.EvalResult, position: int, ops) -> list[np.ndarray] | jax.Array:
  """Query-part scores (keys c..t) at one position: per example [L, heads, Tq_i] (host), or one
  right-aligned [N, L, heads, Q] array (device)."""
  scores = result.records["query_scores"]
  if ops is metrics_device:
    return metrics_device.right_align(scores[:, :, position], result.query_lengths)
  return [scores[i, :, position, :, :length] for i, length in enumerate(result.query_lengths)]


def _aligned_positions(reference: packing.PackedContext, other: packing.PackedContext) -> np.ndarray:
  """Positions in ``other``'s context of ``reference``'s demo tokens, in ``reference``'s token order."""
  spans = dict(zip(other.demo_pool_indices, other.demo_spans))
  return np.concatenate([np.arange(*spans[pool_index]) for pool_index in reference.demo_pool_indices])


def _similarity(zsl, icl, other, position: int, *, seed: int, salt: str, config, pairing) -> dict:
  """SimAOU (+ random), SimAM, ZSL-SimAM and SimAM_Δ of one comparison at one position."""
  ops = _analysis_ops(config)
  # [N, L, D] at this position, sliced once (on the device each slice is a copy of the records)
  zsl_out, icl_out, other_out = (result.records["attn_out"][:, :, position] for result in (zsl, icl, other))
  icl_scores, other_scores, zsl_scores = (_query_scores(result, position, ops) for result in (icl, other, zsl))
  block = {
      "simaou": _layer_record(ops.simaou_per_layer(zsl_out, icl_out, other_out)),
      "random_simaou": ops.random_simaou_per_layer(zsl_out, icl_out, _metric_key(seed, salt + "/simaou"),
                                                   config.random_baseline).to_record(),
      "simam": _layer_record(ops.simam_per_layer(icl_scores, other_scores)),
      "zsl_simam": _layer_record(ops.zsl_simam_per_layer(icl_scores, zsl_scores)),
      "simam_delta": _layer_record(ops.simam_delta_per_layer(icl_scores, other_scores, zsl_scores)),
  }
  if pairing is not None:
    block["shuffled"] = {
        "pairing": "derangement", "derangement_seed": int(seed),
        "simaou": _layer_record(ops.simaou_per_layer(zsl_out, icl_out, other_out, pairing=pairing)),
        "simam": _layer_record(ops.simam_per_layer(icl_scores, other_scores, pairing=pairing)),
        "simam_delta": _layer_record(ops.simam_delta_per_layer(icl_scores, other_scores, zsl_scores,
                                                               pairing=pairing)),
    }
  return block


def _kendall(icl, other, position: int, *, contexts, icl_name: str, other_name: str, train_queries, seed: int,
             salt: str, config) -> dict:
  """Kendall τ (token and example level, with random baselines and top-k recall) of one comparison."""
  ops = _analysis_ops(config)
  reference = contexts[icl_name]
  icl_context_scores = icl.records["context_scores"][:, :, position]  # [N, L, C]
  max_examples = config.kendall_max_examples or None
  count = min(len(icl.predictions), max_examples or len(icl.predictions))
  pairing = metrics.derangement(count, seed) if config.shuffled_pairing and count >= 2 else None
  if not SETTINGS[other_name].is_icl:
    test_queries = other.records["queries"][:, :, position]  # [N, L, Dq]
    train = train_queries[other_name].swapaxes(0, 1)  # [T, L, Dq] -> [L, T, Dq] (numpy, or on the device)
    report = lambda pairing, salt, baselines: metrics.training_attention_report(
        icl_context_scores, reference.demo_token_positions, reference.demo_lengths, test_queries, train,
        _metric_key(seed, salt), max_examples=max_examples, pairing=pairing, baselines=baselines, ops=ops)
    block = {"kendall_source": "w_FT = softmax_j(q_test . q_j) over the FT-run queries of the demo tokens",
             **report(None, salt + "/kendall", True)}
    if pairing is not None:  # the random baselines do not depend on the pairing: computed once, above
      block["shuffled"] = report(pairing, salt + "/kendall_shuffled", False)
    return block
  # ICL-vs-ICL ceiling: the other run's attention to the same demo tokens, in the reference token order.
  other_context = contexts[other_name]
  w_icl = ops.icl_training_attention(icl_context_scores, reference.demo_token_positions)
  w_other = ops.icl_training_attention(other.records["context_scores"][:, :, position],
                                       _aligned_positions(reference, other_context))
  lengths = reference.demo_lengths
  block = {"kendall_source": "w_other = softmax over the same demo tokens in the other ICL run's context",
           "max_examples": max_examples, "num_examples": count}
  for level, (first, second) in {"token": (w_icl, w_other),
                                 "example": (ops.example_level(w_icl, lengths),
                                             ops.example_level(w_other, lengths))}.items():
    block[level] = {
        "kendall": _layer_record(ops.kendall_per_layer(first, second, max_examples)),
        "random_kendall": ops.random_kendall_per_layer(first, _metric_key(seed, f"{salt}/{level}"),
                                                       max_examples).to_record()}
  return block


def _headline(run_record: dict, position: str) -> dict[str, float | None]:
  """Flat scalar metrics of one run at ``position`` (for aggregation and summaries)."""
  flat: dict[str, float | None] = {}
  for name, value in run_record["accuracy"].items():
    flat[f"accuracy/{name}"] = value
  for comparison, block in run_record.get("correctness", {}).items():
    for name in ("rec2ftp", "chance_rec2ftp", "rec2iclp"):
      flat[f"{comparison}/{name}"] = block[name]["value"]
    flat[f"{comparison}/cohen_kappa"] = block.get("cohen_kappa_icl_ft")
  for comparison, by_position in run_record.get("metrics", {}).items():
    block = by_position.get(position)
    if not block:
      continue
    for name in ("simaou", "simam", "zsl_simam", "simam_delta"):
      flat[f"{comparison}/{name}"] = block[name]["mean"]
    flat[f"{comparison}/random_simaou"] = block["random_simaou"]["mean"]
    for name in ("simaou", "simam", "simam_delta"):
      if "shuffled" in block:
        flat[f"{comparison}/shuffled/{name}"] = block["shuffled"][name]["mean"]
    kendall = block.get("kendall")
    if kendall:
      for level in ("token", "example"):
        flat[f"{comparison}/kendall_{level}"] = kendall[level]["kendall"]["mean"]
        flat[f"{comparison}/random_kendall_{level}"] = kendall[level]["random_kendall"]["mean"]
        if "shuffled" in kendall:
          flat[f"{comparison}/shuffled/kendall_{level}"] = kendall["shuffled"][level]["kendall"]["mean"]
  return flat


def _forward_flops(model_config, new_tokens: int, context_tokens: float, logit_positions: int) -> float:
  """Model FLOPs of a forward pass: 2 * (non-embedding params) per token, attention scores and mixing
  (4 * L * N * H per query-key pair) and the unembedding at the computed logit positions."""
  c = model_config
  attention = c.embed_dim * c.num_heads * c.head_dim * 2 + c.embed_dim * c.num_kv_heads * c.head_dim * 2
  mlp = (3 if c.family == "llama" else 2) * c.embed_dim * c.mlp_dim
  per_token = 2 * c.num_layers * (attention + mlp)
  mixing = 4 * c.num_layers * c.num_heads * c.head_dim * new_tokens * context_tokens
  return float(per_token * new_tokens + mixing + 2 * c.embed_dim * c.vocab_size * logit_positions)


# Dense peak FLOP/s per device for the MFU estimate (bf16 tensor cores; f32 without TF32). Unknown: None.
_PEAK_FLOPS = {"H200": {"bfloat16": 989e12, "float32": 67e12}, "H100": {"bfloat16": 989e12, "float32": 67e12},
               "A100": {"bfloat16": 312e12, "float32": 19.5e12}}


def _peak_flops(device_kind: str | None, dtype: str, devices: int) -> float | None:
  override = os.environ.get("DUALFORM_PEAK_FLOPS")
  if override:
    return float(override) * devices
  for name, table in _PEAK_FLOPS.items():
    if device_kind and name in device_kind:
      return table.get(dtype, table["float32"]) * devices
  return None


def _run_one(prepared: _Prepared, seed: int, perm_id: int, learning_rate: dict, evaluator: _Evaluator,
             folder: runs.RunFolder, log) -> dict:
  """Settings in protocol order for one (seed, perm_id), then every metric; records go to .npz."""
  config, tokenizer, task = prepared.config, prepared.tokenizer, prepared.task
  run_id = f"seed{seed}-perm{perm_id}"
  context, alternative = prepared.contexts[(seed, perm_id)]
  contexts = {"icl": context, "icl_perm": alternative}
  sequences = packing.finetune_sequences(tokenizer, task, context)
  zero_shot = packing.zero_shot_context(tokenizer)
  query_inputs = [query.input_ids for query in prepared.queries]
  count = len(query_inputs)
  gold = np.asarray([query.gold for query in prepared.queries])
  timings: dict[str, float] = {}
  flops: dict[str, float] = {}
  results: dict[str, evaluate_lib.EvalResult] = {}
  train_queries: dict[str, np.ndarray] = {}
  finetune_records: dict[str, dict] = {}
  new_tokens = int(sum(len(query) + 1 for query in query_inputs))
  context_ids = lambda setting: {"zero_shot": zero_shot, "demonstrations": context.token_ids,
                                 "demonstrations_permuted": alternative.token_ids if alternative else None
                                 }[setting.context]
  record_of = lambda setting: setting.record if prepared.single_token else evaluate_lib.NO_RECORDS
  # With compile workers, every evaluation's batch shapes start compiling now (a finetuned setting runs the
  # pretrained model's programs), overlapping the FT steps and the evaluations before them.
  started = sum(evaluator.precompile(prepared.model, context_ids(SETTINGS[name]), query_inputs,
                                     prepared.label_tokens, record_of(SETTINGS[name]),
                                     pad_context=SETTINGS[name].is_icl) for name in prepared.settings)
  if started:
    log(f"[{run_id}] compiling {started} batch shapes ahead on {config.get('compile_workers')} threads")
  for name in prepared.settings:
    setting = SETTINGS[name]
    model = prepared.model
    if setting.weights == "finetuned":
      objective = setting.objective or config.objective
      ft_config = finetune_lib.FinetuneConfig(learning_rate=learning_rate["value"], trainable=config.trainable,
                                              objective=objective, bucket_multiple=config.ft_bucket_multiple,
                                              queries_on_device=_analysis_ops(config) is metrics_device)
      log(f"[{run_id}] {name}: finetuning on {len(sequences)} demonstrations ({objective}, "
          f"lr {learning_rate['value']:g})")
      trained = finetune_lib.finetune(prepared.model, list(sequences), ft_config, has_bos=sequences.bos, log=log)
      if trained.queries.shape[0] != sequences.num_demo_tokens or sequences.num_demo_tokens != len(
          context.demo_token_positions):
        raise RuntimeError(f"FT recorded {trained.queries.shape[0]} demo-token queries but the context holds "
                           f"{len(context.demo_token_positions)} demo tokens")
      model = trained.model
      train_queries[name] = trained.queries
      timings[f"{name}_train"] = trained.seconds
      train_tokens = sum(len(sequence) for sequence in sequences)
      flops[f"{name}_train"] = 3 * _forward_flops(model.config, train_tokens, train_tokens / len(sequences) / 2,
                                                  train_tokens)
      finetune_records[name] = {"objective": objective, "learning_rate": learning_rate["value"],
                                "losses": trained.losses, "trainable_pattern": config.trainable,
                                "trainable_paths": trained.trainable_names,
                                "trainable_count": trained.trainable_count, "steps": len(sequences),
                                "batch_size": 1, "optimizer": "optax.sgd (no momentum, weight decay, warmup, "
                                "clipping)", "dtype": config.dtype, "seconds": trained.seconds,
                                "traces": trained.traces}
      if config.get("save_records", True):
        runs.atomic_save_npz(folder / "records" / f"{run_id}_{name}_train.npz", queries=trained.queries,
                             demo_token_counts=trained.demo_token_counts, losses=trained.losses)
    result = evaluator(model, context_ids(setting), query_inputs, prepared.label_tokens, record_of(setting),
                       f"[{run_id}] {name}", pad_context=setting.is_icl)
    if len(result.predictions) != count or any(len(array) != count for array in result.records.values()):
      raise RuntimeError(f"{name}: {len(result.predictions)} predictions for {count} evaluated examples")
    results[name] = result
    timings[name] = result.seconds
    flops[name] = _forward_flops(model.config, new_tokens, len(context_ids(setting)) + new_tokens / count / 2, count)
    if config.get("save_records", True):  # off for benchmarks: the 2.7B records are gigabytes per task
      runs.atomic_save_npz(folder / "records" / f"{run_id}_{name}.npz", **_records_npz(result))
    log(f"[{run_id}] {name}: accuracy {result.accuracy(gold):.2f} ({count} examples, {result.seconds:.1f} s, "
        f"{result.traces} shapes)")
    if model is not prepared.model:
      evaluator.forget(model)
    del model

  record: dict[str, Any] = {"run_id": run_id, "seed": seed, "perm_id": perm_id, "learning_rate": learning_rate,
                            "k_eff": context.k_eff, "context": {**context.to_record(),
                                                                "token_ids": list(context.token_ids)}}
  if alternative is not None:
    record["icl_perm_context"] = {**alternative.to_record(), "token_ids": list(alternative.token_ids)}
  record["finetune"] = finetune_records
  record["accuracy"] = {name: metrics.accuracy(result.predictions, gold) for name, result in results.items()}
  correct = {name: result.predictions == gold for name, result in results.items()}
  record["correctness"], record["output_divergence"], record["metrics"] = {}, {}, {}
  analysis_start = time.perf_counter()
  for comparison, icl_name, other_name in COMPARISONS:
    if icl_name not in results or other_name not in results:
      continue
    icl, other, zsl = results[icl_name], results[other_name], results["zsl"]
    record["correctness"][comparison] = metrics.correctness_report(
        correct["zsl"], correct[other_name], correct[icl_name], icl_predictions=icl.predictions,
        ft_predictions=other.predictions, num_classes=task.num_classes)
    record["output_divergence"][comparison] = metrics.output_divergence(icl.label_scores, other.label_scores)
    if not prepared.single_token:
      record["metrics"][comparison] = {"skipped": "multi-token labels: analysis needs single-token labels"}
      continue
    pairing = metrics.derangement(count, seed) if config.shuffled_pairing and count >= 2 else None
    by_position = {}
    for position in (config.position,) + tuple(p for p in POSITION_NAMES if p != config.position):
      index = _position_index(position)
      salt = f"{run_id}/{comparison}/{position}"
      block = {"position": position, "icl_setting": icl_name, "other_setting": other_name,
               "reference_setting": "zsl", **_similarity(zsl, icl, other, index, seed=seed, salt=salt,
                                                         config=config, pairing=pairing)}
      if position == config.position:  # Kendall (the costly metric) at the configured position only
        block["kendall"] = _kendall(icl, other, index, contexts=contexts, icl_name=icl_name,
                                    other_name=other_name, train_queries=train_queries, seed=seed, salt=salt,
                                    config=config)
      by_position[position] = block
    record["metrics"][comparison] = by_position
  timings["analysis"] = time.perf_counter() - analysis_start
  record["timings"] = timings
  record["model_flops"] = flops
  record["predictions"] = {name: result.predictions for name, result in results.items()}
  record["label_scores"] = {name: result.label_scores for name, result in results.items()}
  record["headline"] = _headline(record, config.position)
  return record


def _parse_mesh(text: str) -> dict[str, int] | None:
  if not text:
    return None
  spec = {}
  for part in text.split(","):
    name, _, size = part.partition("=")
    try:
      spec[name.strip()] = int(size)
    except ValueError:
      raise ValueError(f"mesh must look like data=8 (axis=size, comma separated); got {text!r}") from None
  return spec


def _aggregate(run_records: list[dict]) -> dict:
  """Mean ± std over runs of every headline scalar (and of the per-layer lists at the configured position)."""
  names = sorted({name for record in run_records for name in record["headline"]})
  aggregate = {}
  for name in names:
    values = [record["headline"].get(name) for record in run_records]
    values = [math.nan if value is None else value for value in values]
    aggregate[name] = metrics.mean_std(np.asarray(values, np.float64))
  return aggregate


def _examples(prepared: _Prepared, run_records: list[dict]) -> list[dict]:
  """Per example: pool/eval index, prompt text, gold, and every run's and setting's prediction and scores."""
  rows = []
  for i, (example, query) in enumerate(zip(prepared.eval_examples, prepared.queries)):
    row = {"index": example.index, "prompt": format_input(prepared.task, example, prepared.config.template_index),
           "gold": query.gold, "predictions": {}, "label_scores": {}}
    for record in run_records:
      row["predictions"][record["run_id"]] = {name: int(pred[i]) for name, pred in record["predictions"].items()}
      row["label_scores"][record["run_id"]] = {name: [float(v) for v in scores[i]]
                                               for name, scores in record["label_scores"].items()}
    rows.append(row)
  return rows


def run(config, workdir: str | os.PathLike, *, overwrite: bool = False, load_pretrained: Callable | None = None,
        finalize: Sequence[Callable[[pathlib.Path], None]] = (), log: Callable[[str], None] | None = None,
        defer: Callable[[Callable[[], pathlib.Path]], None] | None = None) -> dict:
  """Runs the comparison of ``config`` into ``workdir`` (PROTOCOL.md §6); returns the results dict.

  Every input is validated and the model and data are loaded before anything is written. The run folder is
  assembled in a temporary folder (config.json first, then records/*.npz, results.json, summary.md and
  whatever the ``finalize`` callables add, e.g. plots) and renamed into place at the end; on any error
  nothing remains. An existing ``workdir`` is refused unless ``overwrite``.

  ``defer``: called with the step that writes results.json, summary.md and the ``finalize`` outputs and
  commits the folder (returning its path; on error it removes the temporary folder and raises), instead of
  running that step here: ``--task all`` runs it on a thread while the next task computes.
  """
  log = log or logger.info
  wall_start = time.perf_counter()
  runs.check_run_folder(workdir, overwrite)
  with jax.default_matmul_precision(config.matmul_precision):
    load_start = time.perf_counter()
    prepared = prepare(config, load_pretrained=load_pretrained)
    load_seconds = time.perf_counter() - load_start
    mesh = None
    mesh_spec = _parse_mesh(config.mesh)
    if mesh_spec:
      from dualform import sharding
      mesh = sharding.make_mesh(mesh_spec)
      prepared.model = sharding.shard_model(prepared.model, mesh)
    workers = int(config.get("compile_workers", 0))
    executor = (concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="dualform-compile")
                if workers else None)
    evaluator = _Evaluator(prepared, mesh, executor)
    model_config = prepared.model.config
    log(f"{config.task}: {len(prepared.queries)} evaluated examples, model {config.model} "
        f"({param_count(prepared.model):,} parameters, {model_config.family}), settings {prepared.settings}, "
        f"runs {prepared.runs}")
    folder = runs.RunFolder(workdir, overwrite=overwrite)
    try:
      runs.atomic_write_json(folder / "config.json", config.to_dict())
      (folder / "records").mkdir()
      learning_rate = _learning_rate(prepared, evaluator, log)
      run_records = [_run_one(prepared, seed, perm_id, learning_rate, evaluator, folder, log)
                     for seed, perm_id in prepared.runs]
      environment = runs.environment(config.matmul_precision)
      wall = time.perf_counter() - wall_start
      results = _results(prepared, run_records, learning_rate, environment, wall, load_seconds)
    except BaseException:
      folder.abort()
      raise
    finally:
      if executor is not None:
        executor.shutdown(wait=True, cancel_futures=True)

  def finish() -> pathlib.Path:
    try:
      runs.atomic_write_json(folder / "results.json", results)
      runs.atomic_write_text(folder / "summary.md", summary_markdown(results))
      for callback in finalize:
        callback(folder.path)
      final = folder.commit()
    except BaseException:
      folder.abort()
      raise
    log(f"{config.task}: done in {time.perf_counter() - wall_start:.1f} s -> {final}")
    return final

  if defer is None:
    finish()
  else:
    defer(finish)
  return results


def _learning_rate(prepared: _Prepared, evaluator: _Evaluator, log) -> dict:
  """The FT learning rate: --lr, else a sweep (--lr_sweep, on the first run's demonstrations), else the
  per-family table of the configs."""
  config = prepared.config
  if not any(SETTINGS[name].weights == "finetuned" for name in prepared.settings):
    return {"value": None, "source": "no finetuned setting"}
  if config.lr is not None:
    return {"value": float(config.lr), "source": "config.lr"}
  if config.lr_sweep:
    seed, perm_id = prepared.runs[0]
    sweep = _sweep_learning_rate(prepared, prepared.contexts[(seed, perm_id)][0], seed, evaluator, log)
    log(f"lr sweep: chose {sweep['chosen']:g} on {sweep['where']}")
    return {"value": sweep["chosen"], "source": "lr_sweep", "sweep": sweep}
  from experiments.configs.base import LEARNING_RATES  # the per-family table lives with the configs
  value = default_learning_rate(prepared.model.config.family, config.task, LEARNING_RATES)
  return {"value": value, "source": f"LEARNING_RATES[{prepared.model.config.family!r}][{config.task!r}] "
                                    "(experiments/configs/base.py)"}


def _results(prepared: _Prepared, run_records: list[dict], learning_rate: dict, environment: dict, wall: float,
             load_seconds: float) -> dict:
  config, tokenizer, model_config = prepared.config, prepared.tokenizer, prepared.model.config
  total_flops = sum(sum(record["model_flops"].values()) for record in run_records)
  compute_seconds = sum(sum(v for k, v in record["timings"].items() if k != "analysis") for record in run_records)
  peak = _peak_flops(environment.get("device_kind"), config.dtype, environment.get("device_count", 1))
  achieved = total_flops / compute_seconds if compute_seconds else None
  examples = _examples(prepared, run_records)
  for record in run_records:  # per-example arrays live in `examples` (and records/*.npz), not twice
    record.pop("label_scores")
    record.pop("predictions")
  return {
      "task": config.task, "model": config.model, "position": config.position,
      "positions_recorded": list(POSITION_NAMES), "settings": prepared.settings,
      "setting_descriptions": {name: SETTINGS[name].description for name in prepared.settings},
      "num_examples": len(prepared.queries), "num_examples_available": prepared.task.expected_eval_size,
      "max_examples": config.max_examples, "eval_indices": [example.index for example in prepared.eval_examples],
      "label_words": list(prepared.task.template(config.template_index).label_words),
      "label_token_ids": [list(ids) for ids in prepared.label_tokens],
      "single_token_labels": prepared.single_token,
      "analysis": "computed" if prepared.single_token else "skipped: multi-token labels",
      "separator_id": tokenizer.separator_id, "bos": tokenizer.bos_id is not None, "bos_id": tokenizer.bos_id,
      "tokenizer": tokenizer.name, "max_query_len": prepared.max_query_len,
      "model_info": {**prepared.model_info, "config_name": model_config.name, "family": model_config.family,
                     "num_layers": model_config.num_layers, "parameters": param_count(prepared.model)},
      "dtype": config.dtype, "matmul_precision": config.matmul_precision,
      "precision_note": "float32 parameters and compute (project default)" if config.dtype == "float32" else
                        f"{config.dtype} parameters and compute: a deviation from the f32 default (§5, §7)",
      "random_baseline": config.random_baseline, "learning_rate": learning_rate,
      "analysis_backend": config.get("analysis", "host"),
      "runs": run_records, "aggregate": _aggregate(run_records),
      "environment": environment,
      "timings": {"wall_seconds": wall, "load_seconds": load_seconds, "compute_seconds": compute_seconds,
                  "model_flops": total_flops, "achieved_flops_per_second": achieved,
                  "peak_flops_per_second": peak, "mfu": (achieved / peak) if (achieved and peak) else None,
                  "mfu_note": "model FLOPs (2 * non-embedding params per token + attention + unembedding at the "
                              "scored position; FT = 3x forward) over FT + evaluation seconds (compile included)"},
      "examples": examples,
  }


def _format(aggregate: dict, name: str, digits: int = 3) -> str:
  entry = aggregate.get(name)
  if entry is None or entry["mean"] is None or (isinstance(entry["mean"], float) and math.isnan(entry["mean"])):
    return "n/a"
  text = f"{entry['mean']:.{digits}f}"
  if entry["n"] > 1 and entry["std"] is not None and not math.isnan(entry["std"]):
    text += f" ± {entry['std']:.{digits}f}"
  return text


def summary_markdown(results: dict) -> str:
  """Paper-style tables of one run folder: accuracy ZSL/FT/ICL, Rec2FTP, SimAOU vs random, SimAM vs
  ZSL-SimAM, Kendall vs random (mean ± std over runs when there are several)."""
  aggregate, position = results["aggregate"], results["position"]
  run_ids = ", ".join(f"{record['run_id']} (k_eff {record['k_eff']})" for record in results["runs"])
  lr = results["learning_rate"]
  lines = [
      f"# {results['task']} on {results['model']}: ICL vs FT",
      "",
      f"- runs: {run_ids}; {results['num_examples']} evaluated examples",
      f"- model: {results['model_info'].get('source')} ({results['model_info'].get('format')}, quantization "
      f"{(results['model_info'].get('quantization') or {}).get('file_type_name', 'none')}), dtype {results['dtype']}, "
      f"matmul precision {results['matmul_precision']}",
      f"- FT learning rate: {lr.get('value')} ({lr.get('source')})",
      f"- metrics at **{position}** (the other position is in results.json); random SimAOU baseline: "
      f"{results['random_baseline']}",
      f"- wall time {results['timings']['wall_seconds']:.1f} s",
      "",
      "## Accuracy (%)",
      "",
      "| " + " | ".join(results["settings"]) + " |",
      "|" + "---:|" * len(results["settings"]),
      "| " + " | ".join(_format(aggregate, f"accuracy/{name}", 2) for name in results["settings"]) + " |",
  ]
  comparisons = sorted({name.split("/")[0] for name in aggregate if "_vs_" in name.split("/")[0]},
                       key=lambda name: [c[0] for c in COMPARISONS].index(name))
  if comparisons:
    lines += ["", "## Prediction-level agreement (%)", "",
              "| comparison | Rec2FTP | chance Rec2FTP | Rec2ICLP | Cohen's κ | Rec2FTP counts (run 1) |",
              "|---|---:|---:|---:|---:|---|"]
    for comparison in comparisons:
      first = results["runs"][0]["correctness"].get(comparison, {}).get("rec2ftp", {})
      lines.append(f"| {comparison} | {_format(aggregate, comparison + '/rec2ftp', 2)} | "
                   f"{_format(aggregate, comparison + '/chance_rec2ftp', 2)} | "
                   f"{_format(aggregate, comparison + '/rec2iclp', 2)} | "
                   f"{_format(aggregate, comparison + '/cohen_kappa')} | "
                   f"{first.get('numerator')}/{first.get('denominator')} |")
    if results["analysis"] == "computed":
      lines += ["", f"## Similarity of updates at {position} (layer means)", "",
                "| comparison | SimAOU | random SimAOU | shuffled SimAOU | SimAM | ZSL-SimAM | SimAM_Δ | "
                "shuffled SimAM |",
                "|---|---:|---:|---:|---:|---:|---:|---:|"]
      for comparison in comparisons:
        cells = [_format(aggregate, f"{comparison}/{name}") for name in
                 ("simaou", "random_simaou", "shuffled/simaou", "simam", "zsl_simam", "simam_delta",
                  "shuffled/simam")]
        lines.append(f"| {comparison} | " + " | ".join(cells) + " |")
      lines += ["", f"## Kendall τ of attention to training tokens at {position}", "",
                "| comparison | token τ | random | shuffled | example τ | random | shuffled |",
                "|---|---:|---:|---:|---:|---:|---:|"]
      for comparison in comparisons:
        cells = [_format(aggregate, f"{comparison}/{name}") for name in
                 ("kendall_token", "random_kendall_token", "shuffled/kendall_token", "kendall_example",
                  "random_kendall_example", "shuffled/kendall_example")]
        lines.append(f"| {comparison} | " + " | ".join(cells) + " |")
    else:
      lines += ["", "Analysis metrics skipped: a label word is several tokens (allow_multitoken_labels)."]
  lines += ["", "Files: config.json, results.json (every number, per-layer lists, per-example predictions), "
            "records/*.npz (attn_out, scores, queries), plots (*.png).", ""]
  return "\n".join(lines)


def _abstract_loader(name: str, dtype: str = "float32", **kwargs):
  """For dry runs: the tokenizer and an abstract (eval_shape) model, without reading weights when the
  name is a named config (``random:<config>``, ``smollm2-135m``); other names load normally."""
  from dualform import loading
  from dualform import tokenizer as tokenizer_lib
  from dualform.models.config import NAMED_CONFIGS
  from dualform.models.transformer import abstract_model

  config_name = name[len("random:"):] if name.startswith("random:") else name
  if config_name not in NAMED_CONFIGS:
    return loading.load_pretrained(name, dtype=dtype, **kwargs)
  model_config = NAMED_CONFIGS[config_name].replace(dtype=dtype, param_dtype=dtype)
  tokenizer = tokenizer_lib.load_tokenizer("smollm2" if model_config.family == "llama" else "gpt2-fairseq")
  return loading.Pretrained(abstract_model(model_config), tokenizer,
                            {"source": name, "format": "abstract (dry run)", "dtype": dtype})


def plan(config) -> dict:
  """Dry run: validates the config, loads data, packs every context (abstract model, no weights read when
  possible) and returns what a run would do. Nothing is written."""
  dry = config.copy_and_resolve_references()
  with dry.unlocked():
    dry.model_init = "pretrained"
  prepared = prepare(dry, load_pretrained=_abstract_loader)
  lengths = [len(query.input_ids) + 1 for query in prepared.queries]
  max_len = prepared.model.config.max_len

  def buckets(context_length: int) -> list[int]:
    """Padded query lengths the evaluation will compile after a context of this many tokens."""
    return sorted({evaluate_lib.bucket_length(length, config.eval_minimum_bucket, maximum=max_len - context_length,
                                              midpoints=config.get("eval_bucket_midpoints", True))
                   for length in lengths})

  return {
      "task": config.task, "model": config.model, "model_init": config.model_init,
      "parameters": param_count(prepared.model), "settings": prepared.settings,
      "runs": [{"seed": seed, "perm_id": perm_id, "k_eff": context.k_eff,
                "context_length": context.context_length,
                "ft_sequences": context.k_eff, "demo_tokens": len(context.demo_token_positions),
                "icl_bucket_lengths": buckets(context.context_length)}
               for (seed, perm_id), (context, _) in prepared.contexts.items()],
      "num_examples": len(prepared.queries), "max_query_len": prepared.max_query_len,
      "single_token_labels": prepared.single_token, "bucket_lengths": buckets(0),
      "separator_id": prepared.tokenizer.separator_id, "bos_id": prepared.tokenizer.bos_id,
  }
