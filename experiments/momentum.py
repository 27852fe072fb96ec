r"""Momentum attention (Dai et al. §5, PROTOCOL.md §11): matched pretraining pairs, and an inference ablation.

``MoAttn(V, K, q_t) = Attn(V, K, q_t) + sum_{i<t} eta^(t-i) v_i`` in every layer, per head, on the values.

Modes::

  python -m experiments.momentum                                   # CPU study (experiments/configs/momentum.py)
  python -m experiments.momentum --config=experiments/configs/momentum_gpu.py   # GPU study (see its docstring)
  python -m experiments.momentum --mode=inference_ablation         # SmolLM2-135M, eta swept without retraining
  python -m experiments.momentum --mode=bundle --bundle_dir=.carry/momentum     # offline inputs for the GPU
  python -m experiments.momentum --mode=aggregate --inputs=a/results.json,b/eval.json ...  # merge partial runs

``study``: for every seed, a vanilla model and one momentum model per eta (optionally one with eta learned
per head) are trained with the same initialisation seed, block order, parameter count and steps
(:mod:`dualform.pretrain`); each is scored on held-out perplexity at several input lengths and on ICL
accuracy (ZSL too) through :mod:`dualform.evaluate` with demonstrations packed by
:mod:`dualform.data.packing`. Results are aggregated over seeds as mean and 95% t-intervals, and as paired
differences against the vanilla model of the same seed. Every (variant, seed) writes ``eval.json`` when it
is done, so an interrupted study resumes (finished runs are skipped, unfinished ones resume from their
checkpoint).

Run folder: ``config.json``, ``results.json``, ``summary.md``, ``ppl_vs_length.png``, ``icl_accuracy.png``,
``train_loss.png`` and ``runs/<variant>-seed<s>/`` (pretrain workdirs). An existing folder with a different
config is refused unless ``--overwrite``.

Public names: variants, study_model_config, pretrain_config, mean_confidence_interval, prepare_icl,
icl_scores, run_study, aggregate, aggregate_files, summary_markdown, plot_study, run_inference_ablation,
build_bundle, main.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shutil
import sys
import time
from typing import Any, Callable

import numpy as np

_MODES = ("study", "inference_ablation", "bundle", "aggregate")


# ----------------------------------------------------------------------------------------------- variants


@dataclasses.dataclass(frozen=True)
class Variant:
  """One attention setting of the study: ``softmax`` or ``momentum`` with a fixed or learned eta."""

  name: str
  kind: str
  eta: float | None = None
  learned: bool = False


def variants(config) -> list[Variant]:
  """Vanilla first, then one momentum variant per eta, then the learned-eta variant when asked for."""
  result = [Variant("vanilla", "softmax")]
  result += [Variant(f"eta{eta:g}", "momentum", float(eta)) for eta in config.etas]
  if config.learned_eta:
    result.append(Variant("eta_learned", "momentum", float(config.learned_eta_init), learned=True))
  return result


def study_model_config(config, variant: Variant):
  """The Llama-style TransformerConfig of one variant (identical shapes for every variant)."""
  from dualform.models.config import TransformerConfig
  model = config.model
  base = TransformerConfig(name=f"{config.name}-{variant.name}", family="llama", vocab_size=model.vocab_size,
                           num_layers=model.num_layers, embed_dim=model.embed_dim, num_heads=model.num_heads,
                           num_kv_heads=model.num_kv_heads, head_dim=model.head_dim, mlp_dim=model.mlp_dim,
                           max_len=model.max_len, rope_theta=model.rope_theta, tie_embeddings=True)
  if variant.kind == "momentum":
    base = base.with_attention("momentum", variant.eta).replace(learn_momentum_eta=variant.learned,
                                                               momentum_method=model.momentum_method)
  return base


def pretrain_config(config, variant: Variant, seed: int):
  """The PretrainConfig of one (variant, seed): init seed and data seed are both ``seed``."""
  from dualform import pretrain
  train = config.train
  return pretrain.PretrainConfig(
      model=study_model_config(config, variant), steps=train.steps, batch_size=train.batch_size,
      seq_len=train.seq_len, learning_rate=train.learning_rate, warmup_steps=train.warmup_steps,
      min_learning_rate_ratio=train.min_learning_rate_ratio, weight_decay=train.weight_decay,
      grad_clip_norm=train.grad_clip_norm, seed=seed, data_seed=seed, compute_dtype=train.compute_dtype,
      log_every=train.log_every, checkpoint_every=train.checkpoint_every,
      keep_checkpoints=train.keep_checkpoints)


# --------------------------------------------------------------------------------------------- statistics


def mean_confidence_interval(values, confidence: float = 0.95) -> dict[str, Any]:
  """Mean, sample std and the Student-t interval ``mean +- t_{(1+c)/2, n-1} s / sqrt(n)`` (n >= 2)."""
  from scipy import stats
  values = np.asarray([value for value in values if value is not None and np.isfinite(value)], np.float64)
  count = len(values)
  if count == 0:
    return dict(mean=None, std=None, low=None, high=None, n=0)
  mean = float(values.mean())
  if count < 2:
    return dict(mean=mean, std=None, low=None, high=None, n=1)
  std = float(values.std(ddof=1))
  half = float(stats.t.ppf((1 + confidence) / 2, count - 1)) * std / math.sqrt(count)
  return dict(mean=mean, std=std, low=mean - half, high=mean + half, n=count)


def _format_interval(summary: dict, digits: int = 2) -> str:
  if summary["mean"] is None:
    return "n/a"
  if summary["low"] is None:
    return f"{summary['mean']:.{digits}f}"
  return f"{summary['mean']:.{digits}f} [{summary['low']:.{digits}f}, {summary['high']:.{digits}f}]"


# -------------------------------------------------------------------------------------------------- ICL


@dataclasses.dataclass
class IclInputs:
  """One task's evaluated queries and the packed contexts (ICL per demonstration seed, and ZSL)."""

  task: str
  query_inputs: list[list[int]]
  label_tokens: tuple[tuple[int, ...], ...]
  gold: np.ndarray
  zero_shot_context: list[int]
  icl_contexts: dict[int, list[int]]
  k_eff: dict[int, int]
  chance: float


def prepare_icl(tokenizer, tasks, seeds, *, max_examples: int, k: int, max_len: int) -> dict[str, IclInputs]:
  """Encodes the first ``max_examples`` evaluated examples and packs one ICL context per seed (§3-§4).

  A context that cannot hold even one demonstration gives ``k_eff = 0`` (ICL then equals ZSL).
  """
  from dualform.data import packing, tasks as task_lib
  prepared = {}
  for task in tasks:
    spec = task_lib.get_task(task)
    examples = task_lib.load_eval_set(task)
    if max_examples:
      examples = examples[:max_examples]
    queries = [packing.encode_query(tokenizer, task, example) for example in examples]
    longest = packing.max_query_length(tokenizer, task, queries)
    if longest >= max_len:
      raise ValueError(f"task {task}: a query of {longest} tokens does not fit max_len {max_len}; raise "
                       "icl.max_len or drop the task")
    pool = task_lib.load_pool(task)
    contexts, k_eff = {}, {}
    for seed in seeds:
      try:
        packed = packing.pack_context(tokenizer, task, pool, max_query_len=longest, max_len=max_len,
                                      k=min(k, len(pool)), seed=int(seed))
        contexts[int(seed)], k_eff[int(seed)] = list(packed.token_ids), int(packed.k_eff)
      except ValueError as error:  # nothing fits: report k_eff = 0 rather than fail the study
        if "fit" not in str(error):
          raise
        contexts[int(seed)], k_eff[int(seed)] = packing.zero_shot_context(tokenizer), 0
    gold = np.asarray([query.gold for query in queries])
    prepared[task] = IclInputs(task=task, query_inputs=[query.input_ids for query in queries],
                               label_tokens=queries[0].label_ids, gold=gold,
                               zero_shot_context=packing.zero_shot_context(tokenizer), icl_contexts=contexts,
                               k_eff=k_eff, chance=100.0 * float(np.max(np.bincount(gold)) / len(gold)))
  return prepared


def icl_scores(model, inputs: dict[str, IclInputs], seed: int, *, tokens_per_batch: int,
               minimum_bucket: int = 16) -> dict[str, dict]:
  """ICL and ZSL accuracy (%) per task for one model, demonstrations of ``seed``."""
  from dualform import evaluate
  scores = {}
  batching = dict(tokens_per_batch=tokens_per_batch, minimum_bucket=minimum_bucket)
  for task, data in inputs.items():
    zero_shot = evaluate.evaluate(model, data.zero_shot_context, data.query_inputs, data.label_tokens, **batching)
    in_context = evaluate.evaluate(model, data.icl_contexts[seed], data.query_inputs, data.label_tokens,
                                   **batching)
    scores[task] = dict(icl=in_context.accuracy(data.gold), zsl=zero_shot.accuracy(data.gold),
                        k_eff=data.k_eff[seed], context_length=len(data.icl_contexts[seed]),
                        examples=int(len(data.gold)), majority_class=data.chance,
                        icl_prediction_counts=np.bincount(in_context.predictions,
                                                          minlength=len(data.label_tokens)).tolist())
  return scores


# ------------------------------------------------------------------------------------------------- study


def _cache_dir(config, workdir: pathlib.Path) -> pathlib.Path:
  from dualform.data import corpus
  return pathlib.Path(config.data.cache_dir) if config.data.cache_dir else corpus.default_cache_dir(workdir)


def _learned_etas(model) -> list[list[float]] | None:
  import jax
  etas = [np.asarray(jax.nn.sigmoid(block.attn.eta_logit[...])).tolist()
          for block in model.layers if hasattr(block.attn, "eta_logit")]
  return etas or None


def _prepare_workdir(workdir: pathlib.Path, config_json: dict, overwrite: bool) -> None:
  from dualform.runs import atomic_write_json
  config_path = workdir / "config.json"
  if config_path.exists():
    if json.loads(config_path.read_text()) != json.loads(json.dumps(config_json)):
      if not overwrite:
        raise ValueError(f"{workdir} holds a study with a different config; pass --overwrite or another --workdir")
      shutil.rmtree(workdir)
  elif workdir.exists() and any(workdir.iterdir()) and not overwrite:
    raise ValueError(f"{workdir} exists and is not a momentum study folder; pass --overwrite or another --workdir")
  workdir.mkdir(parents=True, exist_ok=True)
  if not config_path.exists():
    atomic_write_json(config_path, config_json)


def run_study(config, workdir: str | os.PathLike, *, overwrite: bool = False,
              log: Callable[[str], None] = lambda line: print(line, flush=True)) -> dict:
  """Trains and evaluates every (variant, seed), then writes results.json, summary.md and the plots."""
  from dualform import pretrain
  from dualform.data import corpus
  from dualform.runs import atomic_write_json, environment
  from dualform.tokenizer import load_tokenizer

  workdir = pathlib.Path(workdir)
  config_json = json.loads(config.to_json_best_effort())
  _prepare_workdir(workdir, config_json, overwrite)
  cache = _cache_dir(config, workdir)
  tokenizer = None
  get_tokenizer = lambda name: tokenizer if tokenizer is not None else load_tokenizer(name)
  train_tokens = corpus.corpus_tokens(config.data.train_corpus, "train", cache_dir=cache,
                                      tokenizer_name=config.icl.tokenizer, tokenizer_factory=get_tokenizer)
  valid_tokens = {name: corpus.corpus_tokens(name, "valid", cache_dir=cache, tokenizer_name=config.icl.tokenizer,
                                             tokenizer_factory=get_tokenizer)
                  for name in config.data.valid_corpora}
  log(f"train tokens: {len(train_tokens):,} ({config.data.train_corpus}); valid: "
      + ", ".join(f"{name} {len(tokens):,}" for name, tokens in valid_tokens.items()))
  icl_inputs = {}
  if config.icl.tasks:
    tokenizer = load_tokenizer(config.icl.tokenizer)
    icl_inputs = prepare_icl(tokenizer, config.icl.tasks, config.seeds, max_examples=config.icl.max_examples,
                             k=config.icl.k, max_len=config.icl.max_len)
    for task, data in icl_inputs.items():
      log(f"ICL {task}: {len(data.gold)} examples, k_eff per seed {data.k_eff}")

  start = time.perf_counter()
  records = []
  all_variants = variants(config)
  total = len(all_variants) * len(config.seeds)
  for seed in config.seeds:
    for variant in all_variants:
      run_dir = workdir / "runs" / f"{variant.name}-seed{seed}"
      eval_path = run_dir / "eval.json"
      if eval_path.exists():
        records.append(json.loads(eval_path.read_text()))
        log(f"[{len(records)}/{total}] {variant.name} seed {seed}: done earlier, skipped")
        continue
      train_config = pretrain_config(config, variant, int(seed))
      prefix = f"[{len(records) + 1}/{total}] {variant.name} seed {seed}"
      result = pretrain.train(train_config, run_dir, train_tokens, log=lambda line: log(f"{prefix} {line}"))
      model = result.model
      perplexity = {}
      for name, tokens in valid_tokens.items():
        perplexity[name] = {str(length): pretrain.evaluate_perplexity(
            model, tokens, int(length), max_tokens=config.data.eval_tokens,
            batch_size=config.data.eval_batch_size) for length in config.data.eval_lengths}
      icl = icl_scores(model, icl_inputs, int(seed), tokens_per_batch=config.icl.tokens_per_batch,
                       minimum_bucket=config.icl.minimum_bucket) if icl_inputs else {}
      metrics = [json.loads(line) for line in (run_dir / pretrain.METRICS_FILE).read_text().splitlines()]
      record = dict(variant=variant.name, kind=variant.kind, eta=variant.eta, learned=variant.learned,
                    seed=int(seed), steps=train_config.steps, param_count=_param_count(model),
                    train_tokens_seen=train_config.steps * train_config.batch_size * train_config.seq_len,
                    final_train_loss=metrics[-1]["loss"], train_loss_curve=[(m["step"], m["loss"]) for m in metrics],
                    tokens_per_second=float(np.median([m["tokens_per_second"] for m in metrics[1:]] or
                                                      [metrics[-1]["tokens_per_second"]])),
                    perplexity=perplexity, icl=icl, learned_eta=_learned_etas(model))
      atomic_write_json(eval_path, record)
      records.append(record)
      ppl_text = ", ".join(f"{name}@{length} {value['perplexity']:.1f}" for name, by_length in perplexity.items()
                           for length, value in by_length.items())
      icl_text = ", ".join(f"{task} icl {value['icl']:.1f} zsl {value['zsl']:.1f}" for task, value in icl.items())
      log(f"{prefix}: ppl {ppl_text}; {icl_text}")
  results = aggregate(config, records)
  results.update(environment=environment(), seconds=time.perf_counter() - start, workdir=str(workdir),
                 token_cache=str(cache), tokenizer=config.icl.tokenizer)
  atomic_write_json(workdir / "results.json", results)
  (workdir / "summary.md").write_text(summary_markdown(config, results))
  plot_study(results, workdir)
  log(f"wrote {workdir / 'results.json'}, summary.md and plots in {time.perf_counter() - start:.0f} s")
  return results


def _param_count(model) -> int:
  from dualform.models.transformer import param_count
  return int(param_count(model))


def aggregate(config, records: list[dict]) -> dict:
  """Per variant: mean and 95% CI over seeds; per momentum variant: paired differences with vanilla."""
  by_variant: dict[str, list[dict]] = {variant.name: [] for variant in variants(config)}
  for record in records:
    by_variant.setdefault(record["variant"], []).append(record)
  vanilla = {record["seed"]: record for record in by_variant.get("vanilla", [])}
  tasks = list(config.icl.tasks)
  summary = {}
  for name, runs in by_variant.items():
    if not runs:
      continue
    entry = dict(kind=runs[0]["kind"], eta=runs[0]["eta"], learned=runs[0]["learned"],
                 seeds=[run["seed"] for run in runs], param_count=runs[0]["param_count"],
                 final_train_loss=mean_confidence_interval([run["final_train_loss"] for run in runs]),
                 perplexity={}, perplexity_difference_vs_vanilla={}, icl={}, zsl={},
                 icl_difference_vs_vanilla={})
    for corpus_name in config.data.valid_corpora:
      for length in config.data.eval_lengths:
        key = f"{corpus_name}@{length}"
        values = [run["perplexity"][corpus_name][str(length)]["perplexity"] for run in runs]
        entry["perplexity"][key] = mean_confidence_interval(values)
        entry["perplexity_difference_vs_vanilla"][key] = mean_confidence_interval(
            [run["perplexity"][corpus_name][str(length)]["perplexity"]
             - vanilla[run["seed"]]["perplexity"][corpus_name][str(length)]["perplexity"]
             for run in runs if run["seed"] in vanilla])
    for task in tasks + (["average"] if tasks else []):
      pick = (lambda run, setting: float(np.mean([run["icl"][t][setting] for t in tasks]))) if task == "average" \
          else (lambda run, setting, task=task: run["icl"][task][setting])
      entry["icl"][task] = mean_confidence_interval([pick(run, "icl") for run in runs])
      entry["zsl"][task] = mean_confidence_interval([pick(run, "zsl") for run in runs])
      entry["icl_difference_vs_vanilla"][task] = mean_confidence_interval(
          [pick(run, "icl") - pick(vanilla[run["seed"]], "icl") for run in runs if run["seed"] in vanilla])
    if runs[0]["learned_eta"] is not None:
      entry["learned_eta_mean_per_layer"] = np.mean([run["learned_eta"] for run in runs], axis=(0, 2)).tolist()
    summary[name] = entry
  k_eff = {task: {str(run["seed"]): run["icl"][task]["k_eff"] for run in records} for task in tasks}
  return dict(variants=summary, runs=records, seeds=list(config.seeds), eval_lengths=list(config.data.eval_lengths),
              icl_k_eff=k_eff,
              valid_corpora=list(config.data.valid_corpora), tasks=tasks,
              paper=dict(perplexity_at_1024=dict(vanilla=15.14, momentum=15.02, status="C"),
                         icl_average_6_tasks=dict(vanilla=51.9, momentum=54.7, status="C")))


def summary_markdown(config, results: dict) -> str:
  """The run's tables as Markdown (also pasted into docs/momentum.md)."""
  lines = [f"# Momentum attention study: {config.name}", ""]
  some_run = results["runs"][0]
  learned_counts = {run["param_count"] for run in results["runs"] if run["learned"]}
  learned_note = f"; learned eta: {max(learned_counts):,}" if learned_counts else ""
  lines += [f"Model: {config.model.num_layers} layers, d={config.model.embed_dim}, {config.model.num_heads} heads, "
            f"vocab {config.model.vocab_size} (SmolLM2 tokenizer), {some_run['param_count']:,} parameters "
            f"(every fixed-eta variant identical{learned_note}). Training: {config.train.steps} steps x "
            f"{config.train.batch_size} x {config.train.seq_len} tokens = {some_run['train_tokens_seen']:,} tokens "
            f"of {config.data.train_corpus}; seeds {sorted({run['seed'] for run in results['runs']})} "
            "(init = data order = demonstrations).",
            "", "Values: mean [95% t-interval] over seeds. Differences are paired with the vanilla model of the "
            "same seed (negative perplexity difference = momentum better).", ""]
  if results.get("missing_runs"):
    lines += [f"**Incomplete:** {len(results['missing_runs'])} (variant, seed) runs of the config are missing: "
              f"{results['missing_runs']}.", ""]
  for corpus_name in results["valid_corpora"]:
    lengths = results["eval_lengths"]
    lines += [f"## Held-out perplexity: {corpus_name} (valid)", "",
              "| variant | " + " | ".join(f"ppl @ {length}" for length in lengths) + " | "
              + " | ".join(f"diff @ {length}" for length in lengths) + " |",
              "|---|" + "---:|" * (2 * len(lengths))]
    for name, entry in results["variants"].items():
      cells = [_format_interval(entry["perplexity"][f"{corpus_name}@{length}"]) for length in lengths]
      differences = entry["perplexity_difference_vs_vanilla"]
      cells += ["" if name == "vanilla" else _format_interval(differences[f"{corpus_name}@{length}"])
                for length in lengths]
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
  if results["tasks"]:
    tasks = results["tasks"] + ["average"]
    lines += ["## ICL accuracy (%)", "", "| variant | " + " | ".join(tasks) + " | ZSL average | ICL diff (average) |",
              "|---|" + "---:|" * (len(tasks) + 2)]
    for name, entry in results["variants"].items():
      cells = [_format_interval(entry["icl"][task], 1) for task in tasks]
      cells.append(_format_interval(entry["zsl"]["average"], 1))
      cells.append("" if name == "vanilla" else _format_interval(entry["icl_difference_vs_vanilla"]["average"], 1))
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
    majority = {task: run["majority_class"] for task, run in results["runs"][0]["icl"].items()}
    lines += ["", "Majority-class accuracy of the evaluated subsets: "
              + ", ".join(f"{task} {value:.1f}" for task, value in majority.items())
              + f". k_eff per task and seed: {results.get('icl_k_eff', {})}.", ""]
  learned = {name: entry["learned_eta_mean_per_layer"] for name, entry in results["variants"].items()
             if "learned_eta_mean_per_layer" in entry}
  if learned:
    per_variant = [f"{name}: " + ", ".join(f"{value:.3f}" for value in values) for name, values in learned.items()]
    lines += ["Learned eta (mean over heads and seeds, per layer): " + "; ".join(per_variant), ""]
  lines += ["Paper (PROTOCOL.md §14, 350M models, status C): perplexity at 1024 tokens 15.14 (vanilla) -> 15.02 "
            "(MoAttn); six-task ICL average 51.9 -> 54.7.", ""]
  return "\n".join(lines)


def plot_study(results: dict, workdir: pathlib.Path) -> None:
  """ppl_vs_length.png, icl_accuracy.png and train_loss.png, drawn from ``results`` only."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = list(results["variants"])
  lengths = results["eval_lengths"]
  corpora = results["valid_corpora"]
  figure, axes = plt.subplots(1, len(corpora), figsize=(5 * len(corpora), 4), squeeze=False)
  for axis, corpus_name in zip(axes[0], corpora):
    for offset, name in enumerate(names):
      stats = [results["variants"][name]["perplexity"][f"{corpus_name}@{length}"] for length in lengths]
      means = np.array([s["mean"] for s in stats])
      errors = np.array([0.0 if s["low"] is None else s["mean"] - s["low"] for s in stats])
      x = np.array(lengths) * (1 + 0.03 * (offset - len(names) / 2))
      axis.errorbar(x, means, yerr=errors, marker="o", capsize=3, label=name)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("input length (tokens)")
    axis.set_ylabel("perplexity")
    axis.set_title(f"{corpus_name} valid (mean, 95% CI)")
    axis.legend()
  figure.tight_layout()
  figure.savefig(workdir / "ppl_vs_length.png", dpi=120)
  plt.close(figure)

  if results["tasks"]:
    tasks = results["tasks"] + ["average"]
    figure, axis = plt.subplots(figsize=(1.6 * len(tasks) * max(1, len(names) / 3), 4))
    width = 0.8 / len(names)
    for offset, name in enumerate(names):
      stats = [results["variants"][name]["icl"][task] for task in tasks]
      means = np.array([s["mean"] for s in stats])
      errors = np.array([0.0 if s["low"] is None else s["mean"] - s["low"] for s in stats])
      axis.bar(np.arange(len(tasks)) + offset * width, means, width, yerr=errors, capsize=2, label=name)
    majority = [results["runs"][0]["icl"][task]["majority_class"] for task in results["tasks"]]
    for index, value in enumerate(majority):
      axis.hlines(value, index - 0.1, index + 0.9, colors="k", linestyles="dotted")
    axis.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2)
    axis.set_xticklabels(tasks)
    axis.set_ylabel("ICL accuracy (%)")
    axis.set_title("ICL accuracy (mean, 95% CI; dotted: majority class)")
    axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(workdir / "icl_accuracy.png", dpi=120)
    plt.close(figure)

  figure, axis = plt.subplots(figsize=(6, 4))
  for name in names:
    curves = [run["train_loss_curve"] for run in results["runs"] if run["variant"] == name]
    steps = [step for step, _ in curves[0]]
    mean_curve = np.mean([[loss for _, loss in curve] for curve in curves], axis=0)
    axis.plot(steps, mean_curve, marker=".", label=name)
  axis.set_xlabel("step")
  axis.set_ylabel("training loss (logged steps, mean over seeds)")
  axis.legend()
  figure.tight_layout()
  figure.savefig(workdir / "train_loss.png", dpi=120)
  plt.close(figure)


def aggregate_files(config, inputs, workdir: str | os.PathLike, *, overwrite: bool = False,
                    log: Callable[[str], None] = print) -> dict:
  """Merges per-run records from several partial studies (``results.json`` or ``eval.json`` files, or study
  folders) of the same config, e.g. seeds run in separate GPU jobs, and writes the study outputs."""
  from dualform.runs import atomic_write_json
  records: dict[tuple[str, int], dict] = {}
  for item in inputs:
    path = pathlib.Path(item)
    files = sorted(path.glob("runs/*/eval.json")) if path.is_dir() else [path]
    if not files:
      raise ValueError(f"{path} holds no runs/*/eval.json; pass results.json, eval.json files or study folders")
    for file in files:
      payload = json.loads(file.read_text())
      for record in payload.get("runs", [payload]):
        if "variant" not in record or "seed" not in record:
          raise ValueError(f"{file} is not a momentum-study results.json or eval.json")
        records[(record["variant"], int(record["seed"]))] = record
  wanted = {(variant.name, int(seed)) for variant in variants(config) for seed in config.seeds}
  missing = sorted(wanted - set(records))
  if missing:
    log(f"warning: {len(missing)} (variant, seed) runs missing: {missing}")
  order = {variant.name: index for index, variant in enumerate(variants(config))}
  ordered = [records[key] for key in sorted(records, key=lambda key: (key[1], order.get(key[0], -1))) if key in wanted]
  workdir = pathlib.Path(workdir)
  _prepare_workdir(workdir, json.loads(config.to_json_best_effort()), overwrite)
  results = aggregate(config, ordered)
  results.update(merged_from=[str(item) for item in inputs], missing_runs=missing)
  atomic_write_json(workdir / "results.json", results)
  (workdir / "summary.md").write_text(summary_markdown(config, results))
  plot_study(results, workdir)
  log(f"merged {len(ordered)} runs into {workdir}")
  return results


# ------------------------------------------------------------------------------------ inference ablation


def run_inference_ablation(config, workdir: str | os.PathLike, *, overwrite: bool = False,
                           log: Callable[[str], None] = lambda line: print(line, flush=True)) -> dict:
  """Switches every layer of a pretrained model to momentum attention for each eta (no retraining)."""
  from dualform import pretrain
  from dualform.data import corpus
  from dualform.loading import load_pretrained
  from dualform.models.transformer import set_attention
  from dualform.runs import atomic_write_json, environment

  ablation = config.ablation
  workdir = pathlib.Path(workdir)
  _prepare_workdir(workdir, json.loads(ablation.to_json_best_effort()), overwrite)
  start = time.perf_counter()
  pretrained = load_pretrained(ablation.model)
  model, tokenizer = pretrained.model, pretrained.tokenizer
  cache = _cache_dir(config, workdir)
  tokens = corpus.corpus_tokens(ablation.ppl_corpus, "valid", cache_dir=cache, tokenizer=tokenizer,
                                tokenizer_name=config.icl.tokenizer)
  inputs = prepare_icl(tokenizer, ablation.tasks, (ablation.seed,), max_examples=ablation.max_examples,
                       k=ablation.k, max_len=ablation.max_len) if ablation.tasks else {}
  rows = []
  for eta in ablation.etas:
    set_attention(model, "momentum", float(eta))
    perplexity = pretrain.evaluate_perplexity(model, tokens, ablation.ppl_block_len, max_tokens=ablation.ppl_tokens,
                                              batch_size=ablation.ppl_batch_size)
    icl = icl_scores(model, inputs, ablation.seed, tokens_per_batch=ablation.tokens_per_batch) if inputs else {}
    rows.append(dict(eta=float(eta), perplexity=perplexity, icl=icl))
    log(f"eta {eta}: ppl {perplexity['perplexity']:.2f}; "
        + ", ".join(f"{task} icl {v['icl']:.1f} zsl {v['zsl']:.1f} (k_eff {v['k_eff']})" for task, v in icl.items()))
  results = dict(model=ablation.model, model_info={k: v for k, v in pretrained.info.items() if k != "config"},
                 rows=rows, environment=environment(), seconds=time.perf_counter() - start)
  atomic_write_json(workdir / "results.json", results)
  (workdir / "summary.md").write_text(ablation_markdown(ablation, results))
  _plot_ablation(results, workdir)
  log(f"wrote {workdir / 'results.json'} in {results['seconds']:.0f} s")
  return results


def ablation_markdown(ablation, results: dict) -> str:
  tasks = list(ablation.tasks)
  lines = [f"# Momentum attention at inference: {ablation.model} (no retraining)", "",
           f"Perplexity: first {ablation.ppl_tokens} tokens of {ablation.ppl_corpus} valid in blocks of "
           f"{ablation.ppl_block_len}. ICL/ZSL: first {ablation.max_examples} evaluated examples per task, "
           f"k = {ablation.k} packed into {ablation.max_len} tokens, demonstration seed {ablation.seed}.", "",
           "| eta | perplexity | " + " | ".join(f"{t} ICL | {t} ZSL" for t in tasks) + " |",
           "|---:|---:|" + "---:|---:|" * len(tasks)]
  for row in results["rows"]:
    cells = [f"{row['eta']:g}", f"{row['perplexity']['perplexity']:.2f}"]
    for task in tasks:
      cells += [f"{row['icl'][task]['icl']:.1f}", f"{row['icl'][task]['zsl']:.1f}"]
    lines.append("| " + " | ".join(cells) + " |")
  if tasks:
    first = results["rows"][0]["icl"]
    lines += ["", "k_eff: " + ", ".join(f"{t} {first[t]['k_eff']}" for t in tasks) + "; examples: "
              + ", ".join(f"{t} {first[t]['examples']}" for t in tasks) + "; majority class: "
              + ", ".join(f"{t} {first[t]['majority_class']:.1f}" for t in tasks) + "."]
  return "\n".join(lines) + "\n"


def _plot_ablation(results: dict, workdir: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  etas = [row["eta"] for row in results["rows"]]
  figure, axes = plt.subplots(1, 2, figsize=(10, 4))
  axes[0].plot(etas, [row["perplexity"]["perplexity"] for row in results["rows"]], marker="o")
  axes[0].set_yscale("log")
  axes[0].set_xlabel("eta")
  axes[0].set_ylabel("perplexity")
  tasks = list(results["rows"][0]["icl"])
  for task in tasks:
    axes[1].plot(etas, [row["icl"][task]["icl"] for row in results["rows"]], marker="o", label=f"{task} ICL")
    axes[1].plot(etas, [row["icl"][task]["zsl"] for row in results["rows"]], marker="x", linestyle="--",
                 label=f"{task} ZSL")
  axes[1].set_xlabel("eta")
  axes[1].set_ylabel("accuracy (%)")
  if tasks:
    axes[1].legend(fontsize="small")
  figure.suptitle(f"{results['model']}: momentum switched on at inference")
  figure.tight_layout()
  figure.savefig(workdir / "ablation.png", dpi=120)
  plt.close(figure)


# ------------------------------------------------------------------------------------------------ bundle


def build_bundle(config, bundle_dir: str | os.PathLike, log: Callable[[str], None] = print) -> pathlib.Path:
  """Writes what an offline GPU machine needs: token caches, the tokenizer and the ICL task files.

  Layout: ``token_cache/*.npy`` (+ sidecars), ``tokenizer/`` (``Tokenizer.save``), ``data/<task>/`` (pool and
  evaluated files). Point ``config.data.cache_dir``, ``$DUALFORM_TOKENIZER`` and ``$DUALFORM_DATA_DIR`` at them.
  """
  from dualform.data import corpus, tasks as task_lib
  from dualform.tokenizer import load_tokenizer
  bundle = pathlib.Path(bundle_dir)
  tokenizer = load_tokenizer(config.icl.tokenizer)
  cache = bundle / "token_cache"
  corpus.corpus_tokens(config.data.train_corpus, "train", cache_dir=cache, tokenizer=tokenizer,
                       tokenizer_name=config.icl.tokenizer)
  for name in config.data.valid_corpora:
    corpus.corpus_tokens(name, "valid", cache_dir=cache, tokenizer=tokenizer, tokenizer_name=config.icl.tokenizer)
  tokenizer.save(bundle / "tokenizer")
  data_root = task_lib.default_data_dir()
  for task in config.icl.tasks:
    spec = task_lib.get_task(task)
    for relative in filter(None, (spec.pool_file, spec.eval_file, spec.eval_index_file)):
      target = bundle / "data" / relative
      target.parent.mkdir(parents=True, exist_ok=True)
      shutil.copyfile(data_root / relative, target)
  size = sum(path.stat().st_size for path in bundle.rglob("*") if path.is_file())
  log(f"bundle {bundle}: {size / 2**20:.1f} MiB")
  return bundle


# -------------------------------------------------------------------------------------------------- main


def main(argv):
  del argv
  import jax
  from absl import flags, logging as absl_logging
  jax.config.update("jax_threefry_partitionable", True)
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every checkpoint step at INFO
  FLAGS = flags.FLAGS
  config = FLAGS.config
  mode = FLAGS.mode
  default_name = config.name if mode == "study" else f"{config.name}-ablation"
  workdir = FLAGS.workdir or os.path.join("runs", default_name)
  print(f"mode {mode}; workdir {workdir}; devices {jax.devices()}")
  print(config)
  try:
    if mode == "study":
      run_study(config, workdir, overwrite=FLAGS.overwrite)
    elif mode == "inference_ablation":
      run_inference_ablation(config, workdir, overwrite=FLAGS.overwrite)
    elif mode == "aggregate":
      aggregate_files(config, [item for item in FLAGS.inputs.split(",") if item], workdir, overwrite=FLAGS.overwrite)
    else:
      build_bundle(config, FLAGS.bundle_dir)
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", "experiments/configs/momentum.py",
                                  "config file[:preset]; GPU: experiments/configs/momentum_gpu.py", lock_config=True)
  flags.DEFINE_enum("mode", "study", list(_MODES), "study, inference_ablation or bundle")
  flags.DEFINE_string("workdir", None, "run folder (default runs/<config.name>[-ablation])")
  flags.DEFINE_bool("overwrite", False, "replace a run folder that holds a different config")
  flags.DEFINE_string("bundle_dir", ".carry/momentum", "where --mode=bundle writes the offline inputs")
  flags.DEFINE_string("inputs", "", "--mode=aggregate: comma list of results.json / eval.json files or study folders")


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
