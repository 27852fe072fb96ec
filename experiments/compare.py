r"""ICL vs finetuning on one task (or all six): ``python -m experiments.compare --task cb``.

Thin absl main: parses flags into the task's locked config (experiments/configs/<task>.py), prints the
resolved config, sets up JAX (and the mesh), and calls :func:`dualform.compare.run`, which writes the run
folder (config.json, results.json, records/*.npz, summary.md) and then the plots (experiments/plot.py).

Examples::

  python -m experiments.compare --task cb                       # SmolLM2-135M-Instruct (Q4_1), all 56
  python -m experiments.compare --task all                      # the six tasks, one folder each
  python -m experiments.compare --task sst2 --seeds 1,2,3 --perm_ids 0,1,2
  python -m experiments.compare --task cb --model random:tiny-llama --max_examples 6 --k 4
  python -m experiments.compare --task all --model random:fairseq-dense-2.7b --dtype bfloat16 --mesh data=1

Bad inputs (unknown task or model, bad data file, k larger than the pool, prompt longer than the context,
an existing run folder without --overwrite) print one ``error: ...`` line on stderr, exit with status 2
and write nothing.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import pathlib
import signal
import sys

from absl import app, flags, logging

_TASKS = ("sst2", "sst5", "mr", "subj", "agnews", "cb")

FLAGS = flags.FLAGS
flags.DEFINE_string("task", None, f"one of {', '.join(_TASKS)}, or all")
flags.DEFINE_string("model", None, "model name (default smollm2-135m): smollm2-135m, random:<config>, a path")
flags.DEFINE_integer("k", None, "nominal number of demonstrations (default 32)")
flags.DEFINE_integer("seed", None, "run seed (default: the task's seed of PROTOCOL.md §7)")
flags.DEFINE_string("seeds", None, "comma list of seeds for a multi-seed run, e.g. 1,2,3")
flags.DEFINE_integer("perm_id", None, "demonstration order: 0 drawn order, p > 0 a seeded permutation")
flags.DEFINE_string("perm_ids", None, "comma list of perm_ids paired with --seeds")
flags.DEFINE_float("lr", None, "FT learning rate (default: the per-family table in experiments/configs/base.py)")
flags.DEFINE_bool("lr_sweep", None, "choose the FT learning rate by a sweep on a held-out pool slice")
flags.DEFINE_list("lr_grid", None, "learning rates of the sweep, e.g. 1e-4,1e-3,1e-2 (default: a 7-point log grid)")
flags.DEFINE_integer("lr_heldout_examples", None, "size of the held-out pool slice of the sweep (default 200)")
flags.DEFINE_integer("max_examples", None, "evaluate only the first N examples (0: all)")
flags.DEFINE_enum("position", None, ["pred_pos", "label_pos"], "position of the headline metrics")
flags.DEFINE_string("settings", None, "comma list of settings (default zsl,ft,icl; also ft_lcgd, icl_perm)")
flags.DEFINE_enum("model_init", None, ["pretrained", "untrained"], "untrained: the control of §15.3")
flags.DEFINE_integer("kendall_max_examples", None, "Kendall over the first N examples (0: all; 100: original)")
flags.DEFINE_string("data_dir", None, "data folder (default $DUALFORM_DATA_DIR or ../shared/data)")
flags.DEFINE_string("workdir", None, "run folder (default runs/<task>-<model>-seed<seed>)")
flags.DEFINE_bool("overwrite", False, "replace an existing run folder")
flags.DEFINE_bool("trust_pickle", None, "fairseq model.pt: allow full unpickling of a trusted checkpoint (logged)")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "parameter and compute dtype (default float32)")
flags.DEFINE_string("matmul_precision", None, "jax matmul precision during the run (default highest)")
flags.DEFINE_string("mesh", None, "data-parallel mesh, e.g. data=8 (default: one device)")
flags.DEFINE_integer("eval_tokens_per_batch", None, "evaluation batch size in padded tokens (default 4096)")
flags.DEFINE_integer("eval_score_budget", None, "cap on rows * heads * T * (C + T) score elements per batch")
flags.DEFINE_integer("eval_minimum_bucket", None, "smallest padded query length (default 16; larger on GPUs: fewer compiled shapes)")
flags.DEFINE_bool("eval_fixed_rows", None, "give a bucket's last evaluation batch half or all the full rows (GPU: at most two shapes per bucket)")
flags.DEFINE_bool("eval_bucket_midpoints", None, "bucket ladder with 1.5x midpoints (default); --noeval_bucket_midpoints: powers of two (GPU: half the shapes)")
flags.DEFINE_integer("ft_bucket_multiple", None, "FT sequences padded to a multiple of this (default 32)")
flags.DEFINE_integer("eval_prefix_multiple", None, "cache ICL contexts right-padded to a multiple of this (0: off; GPU: one shape for every task)")
flags.DEFINE_bool("save_records", None, "write records/*.npz, the per-example analysis arrays (default true)")
flags.DEFINE_integer("compile_workers", None, "threads compiling every evaluation's batch shapes ahead, overlapping device work (default 0: on first use; GPU: 4)")
flags.DEFINE_bool("scan_layers", None, "run the layers as one lax.scan (same results; the program holds one layer body whatever the depth)")
flags.DEFINE_enum("prefix_attention", None, ["xla", "cudnn"], "ICL prefix attention: xla (default, any device) or cudnn (fused kernel; one CUDA GPU, bfloat16)")
flags.DEFINE_enum("analysis", None, ["host", "device"], "metrics in float64 numpy on the host (default) or in float32 jax on the device (GPU: records stay there)")
flags.DEFINE_bool("dry_run", False, "validate, load data, pack contexts and print the plan; write nothing")

_OVERRIDES = ("model", "k", "seed", "seeds", "perm_id", "perm_ids", "lr", "lr_sweep", "lr_heldout_examples",
              "max_examples", "position",
              "settings", "model_init", "kendall_max_examples", "data_dir", "dtype", "matmul_precision", "mesh",
              "eval_tokens_per_batch", "eval_score_budget", "eval_minimum_bucket", "eval_fixed_rows", "eval_bucket_midpoints",
              "ft_bucket_multiple", "eval_prefix_multiple", "scan_layers", "save_records", "analysis", "trust_pickle",
              "compile_workers", "prefix_attention")


def _model_slug(model: str) -> str:
  return pathlib.Path(model.replace(":", "-")).name.replace("/", "-")


def build_configs() -> list[tuple[object, pathlib.Path]]:
  """The (config, workdir) of every requested task, with the flag overrides applied."""
  from experiments import configs

  if FLAGS.task is None:
    raise ValueError(f"--task is required: one of {', '.join(_TASKS)}, or all")
  # `all` runs CB (the smallest) first, then the protocol's order.
  task_names = ["cb", "sst2", "sst5", "mr", "subj", "agnews"] if FLAGS.task == "all" else [FLAGS.task]
  result = []
  for task in task_names:
    config = configs.get_config(task)
    for name in _OVERRIDES:
      value = getattr(FLAGS, name)
      if value is not None:
        setattr(config, name, value)
    if FLAGS.lr_grid is not None:
      try:
        config.lr_grid = tuple(float(value) for value in FLAGS.lr_grid)
      except ValueError:
        raise ValueError(f"--lr_grid must be a comma list of numbers; got {','.join(FLAGS.lr_grid)}") from None
    if FLAGS.workdir is None:
      workdir = pathlib.Path("runs") / f"{task}-{_model_slug(config.model)}-seed{config.seed}"
    else:
      workdir = pathlib.Path(FLAGS.workdir) / task if FLAGS.task == "all" else pathlib.Path(FLAGS.workdir)
    result.append((config, workdir))
  return result


def _loader_once():
  """``load_pretrained`` remembering what it loaded: ``--task all`` reads (or initialises) the model once.

  Safe because a run never modifies the loaded model (FT trains a copy; the untrained control is a clone).
  """
  from dualform.loading import load_pretrained
  loaded = {}

  def load(name, **kwargs):
    key = (str(name), tuple(sorted(kwargs.items())))
    if key not in loaded:
      loaded[key] = load_pretrained(name, **kwargs)
    return loaded[key]

  return load


def _plot_run(folder) -> None:
  """experiments.plot.plot_run, imported on first use (matplotlib is not imported before any work starts)."""
  from experiments import plot
  plot.plot_run(folder)


def _import_plot() -> None:
  """Run first in the plotting process: matplotlib's import there overlaps this process's start."""
  from experiments import plot  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel


def _plotting_process() -> concurrent.futures.ProcessPoolExecutor:
  """One spawned process that draws the plots of ``--task all``: matplotlib's work (seconds per task on a
  slow host) then does not hold this process's GIL while the next task dispatches device work. Spawned,
  not forked: this process has threads and may hold a GPU."""
  pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
  pool.submit(_import_plot)
  return pool


def _dry_run(config, workdir) -> None:
  from dualform import compare
  plan = compare.plan(config)
  print(json.dumps({"workdir": str(workdir), **plan}, indent=1))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax

  jax.config.update("jax_threefry_partitionable", True)
  logging.set_verbosity(logging.INFO)
  # SIGTERM unwinds like an error, so the temporary run folder is removed (nothing half-written remains).
  signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
  from dualform import compare, runs

  # Several tasks: a task's results files, plots and folder commit run on this thread while the next task
  # computes (the first error among them is raised at the end, like any other).
  finishing = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dualform-finish")
  plotting = None
  pending = []
  try:
    jobs = build_configs()
    load = _loader_once()
    for config, workdir in jobs:  # refuse existing folders before any work
      compare.validate_config(config)
      if not FLAGS.dry_run:
        runs.check_run_folder(workdir, FLAGS.overwrite)
    defer = (lambda finish: pending.append(finishing.submit(finish))) if len(jobs) > 1 else None
    finalize = [_plot_run]
    if defer is not None and not FLAGS.dry_run:
      plotting = _plotting_process()
      finalize = [lambda folder: plotting.submit(_plot_run, str(folder)).result()]
    for config, workdir in jobs:
      print(f"# config of {config.task} -> {workdir}\n{config}", flush=True)
      if FLAGS.dry_run:
        _dry_run(config, workdir)
        continue
      results = compare.run(config, workdir, overwrite=FLAGS.overwrite, finalize=finalize,
                            log=logging.info, load_pretrained=load, defer=defer)
      print(compare.summary_markdown(results), flush=True)
    for future in pending:
      future.result()
  except (ValueError, FileNotFoundError, KeyError) as error:
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)
  finally:
    finishing.shutdown(wait=True)  # earlier tasks' folders are still committed when a later one fails
    if plotting is not None:
      plotting.shutdown(wait=True)


if __name__ == "__main__":
  app.run(main)
