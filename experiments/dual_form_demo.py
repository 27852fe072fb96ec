r"""Attention's dual form on one small example, three ways, plus residuals across sizes and precisions.

  python -m experiments.dual_form_demo [--workdir=runs/dual_form_demo] [--seed=0] [--overwrite]

On random projections (one head) and random tokens, the output of the *current* (last) query token is
computed three ways:

  1. relaxed linear attention over [X'; X] with a causal mask (:func:`dualform.attention.linear_attention`);
  2. the dual form ``(W_ZSL + dW_ICL) q`` (:func:`dualform.dual_form.dual_form_output`);
  3. one explicit SGD step with optax on a linear layer initialised at ``W_ZSL``, whose inputs are the
     demonstration keys and whose error signals are the demonstration values
     (:func:`dualform.dual_form.meta_gradient_loss`), then applied to ``q``.

It prints the vectors and a table of their differences (float64), then sweeps sizes in float32 (default
matmul precision), float32 with precision "highest", and float64, and saves ``residuals.png`` and
``results.json`` in the workdir (written atomically). Runs in well under a minute on a CPU. On CPUs the
default float32 matmul is already full float32, so the two float32 curves coincide; on GPUs the default
may use TF32 and the "highest" curve is the one to trust.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from absl import app, flags, logging

from dualform import attention
from dualform import dual_form

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after selecting the Agg backend)

LEARNING_RATE = 0.1  # the SGD step's rate; meta_gradient_loss makes the step independent of it
EXAMPLE = dict(model_dim=6, head_dim=4, demos=4, queries=3)  # the printed example
# (model dim D, head dim H, demonstrations S', query tokens T) for the residual sweep
SWEEP = ((8, 4, 8, 4), (32, 16, 32, 8), (128, 64, 128, 16), (512, 128, 512, 32))
PRECISIONS = ("float32", "float32 highest", "float64")
METHODS = ("linear attention over [X'; X]", "(W_ZSL + dW_ICL) q", "SGD step from W_ZSL")


def make_problem(seed: int, model_dim: int, head_dim: int, demos: int, queries: int, dtype) -> dict:
  """Random one-head kernels [D, 1, H] (entries N(0, 1/D)) and tokens X' [1, S', D], X [1, T, D]."""
  rng = np.random.default_rng(seed)
  kernel = lambda: jnp.asarray(rng.standard_normal((model_dim, 1, head_dim)) / np.sqrt(model_dim), dtype)
  return dict(query_kernel=kernel(), key_kernel=kernel(), value_kernel=kernel(),
              demo_tokens=jnp.asarray(rng.standard_normal((1, demos, model_dim)), dtype),
              tokens=jnp.asarray(rng.standard_normal((1, queries, model_dim)), dtype))


def three_ways(problem: dict) -> dict[str, jax.Array]:
  """The current (last) query token's output three ways, plus the zero-shot and meta-gradient parts: each [H]."""
  both = jnp.concatenate([problem["demo_tokens"], problem["tokens"]], axis=1)
  queries = dual_form.project(problem["tokens"], problem["query_kernel"])  # [1, T, 1, H]
  keys = dual_form.project(both, problem["key_kernel"])  # [1, S'+T, 1, H]
  values = dual_form.project(both, problem["value_kernel"])
  mask = attention.causal_mask(queries.shape[1], keys.shape[1])
  attended = attention.linear_attention(queries, keys, values, mask=mask)[0, -1, 0]

  dual = dual_form.dual_form_output(**problem)[0, -1, 0]

  # The current token sees all of X, so its zero-shot weight is W_ZSL over X; one SGD step adds dW_ICL.
  zero_shot = dual_form.zero_shot_weight(problem["key_kernel"], problem["value_kernel"], problem["tokens"])[0, 0]
  demos = problem["demo_tokens"].shape[1]
  demo_keys, demo_values = keys[0, :demos, 0], values[0, :demos, 0]  # [S', H]
  optimizer = optax.sgd(LEARNING_RATE)
  gradient = jax.grad(dual_form.meta_gradient_loss)(zero_shot, demo_keys, demo_values, LEARNING_RATE)
  updates, _ = optimizer.update(gradient, optimizer.init(zero_shot))
  stepped = optax.apply_updates(zero_shot, updates)
  query = queries[0, -1, 0]
  icl = dual_form.icl_meta_gradient(problem["key_kernel"], problem["value_kernel"], problem["demo_tokens"])[0, 0]
  return {METHODS[0]: attended, METHODS[1]: dual, METHODS[2]: stepped @ query,
          "W_ZSL q": zero_shot @ query, "dW_ICL q": icl @ query}


def relative_difference(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def sweep(seed: int, sizes=SWEEP) -> list[dict]:
  """Residuals of methods 2 and 3 against method 1 for every size (D, H, S', T) and precision."""
  rows = []
  for model_dim, head_dim, demos, queries in sizes:
    for name in PRECISIONS:
      x64 = name == "float64"
      matmul = "highest" if name == "float32 highest" else None
      with jax.enable_x64(x64), jax.default_matmul_precision(matmul):
        problem = make_problem(seed, model_dim, head_dim, demos, queries, jnp.float64 if x64 else jnp.float32)
        outputs = jax.jit(three_ways)(problem)
        rows.append(dict(model_dim=model_dim, head_dim=head_dim, demos=demos, queries=queries, precision=name,
                         dual_form=relative_difference(outputs[METHODS[1]], outputs[METHODS[0]]),
                         sgd_step=relative_difference(outputs[METHODS[2]], outputs[METHODS[0]])))
  return rows


def atomic_write(path: str, write) -> None:
  """Writes through a temporary file in the same folder, then renames it over ``path``."""
  folder, name = os.path.split(path)
  descriptor, temporary = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=os.path.splitext(name)[1])
  os.close(descriptor)
  try:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
    write(temporary)
    os.replace(temporary, path)
  except BaseException:
    os.unlink(temporary)
    raise


def plot(rows: list[dict], path: str, sizes=SWEEP) -> None:
  figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  styles = {"float32": ("C0", "o", "-"), "float32 highest": ("C1", "s", "--"), "float64": ("C2", "^", "-")}
  sizes = [f"D={d}\nH={h}\nS'={s}" for d, h, s, _ in sizes]
  for axis, key, title in zip(axes, ("dual_form", "sgd_step"), METHODS[1:]):
    for name in PRECISIONS:
      color, marker, line = styles[name]
      values = [max(row[key], 1e-18) for row in rows if row["precision"] == name]  # 0 drawn at the floor
      axis.semilogy(range(len(sizes)), values, color=color, marker=marker, linestyle=line, label=name)
    axis.set_xticks(range(len(sizes)), sizes)
    axis.set_title(f"{title}\nvs linear attention over [X'; X]")
    axis.grid(True, which="both", alpha=0.3)
  axes[0].set_ylabel("max |difference| / max |attention output|")
  axes[1].legend()
  figure.tight_layout()
  atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=120, format="png"))
  plt.close(figure)


def format_vector(vector) -> str:
  return "[" + ", ".join(f"{value:+.6f}" for value in np.asarray(vector, np.float64)) + "]"


def run(workdir: str, seed: int, overwrite: bool = False, sizes=SWEEP) -> dict:
  """Runs the demo, prints its tables and writes ``results.json`` and ``residuals.png`` to ``workdir``.

  ``sizes``: the (D, H, S', T) of the residual sweep (tests pass a smaller one).
  """
  outputs_exist = any(os.path.exists(os.path.join(workdir, name)) for name in ("results.json", "residuals.png"))
  if outputs_exist and not overwrite:
    raise ValueError(f"{workdir} already holds demo outputs; pass --overwrite or choose another --workdir")
  os.makedirs(workdir, exist_ok=True)
  start = time.perf_counter()
  with jax.enable_x64(True):
    outputs = three_ways(make_problem(seed, **EXAMPLE, dtype=jnp.float64))
  print(f"Example (float64, seed {seed}): D={EXAMPLE['model_dim']}, H={EXAMPLE['head_dim']}, "
        f"{EXAMPLE['demos']} demonstrations X', {EXAMPLE['queries']} query tokens X; output of the last query token.")
  for name in ("W_ZSL q", "dW_ICL q") + METHODS:
    print(f"  {name:<31} {format_vector(outputs[name])}")
  print("  (each of the last three rows is the sum of the first two: W_ZSL q + dW_ICL q)\n")
  print(f"  {'difference':<64} {'max abs':>9} {'relative':>9}")
  pairs = ((METHODS[1], METHODS[0]), (METHODS[2], METHODS[0]), (METHODS[2], METHODS[1]))
  table = []
  for first, second in pairs:
    absolute = float(np.max(np.abs(np.asarray(outputs[first]) - np.asarray(outputs[second]))))
    relative = relative_difference(outputs[first], outputs[second])
    table.append(dict(first=first, second=second, max_abs=absolute, relative=relative))
    print(f"  {first + '  vs  ' + second:<64} {absolute:9.1e} {relative:9.1e}")

  rows = sweep(seed, sizes)
  print(f"\nResidual sweep (relative to linear attention over [X'; X]; device {jax.devices()[0].platform}):")
  print(f"  {'D':>4} {'H':>4} {'S_demo':>6} {'T':>3}  {'precision':<16} {'dual form':>10} {'SGD step':>10}")
  for row in rows:
    print(f"  {row['model_dim']:>4} {row['head_dim']:>4} {row['demos']:>6} {row['queries']:>3}  "
          f"{row['precision']:<16} {row['dual_form']:10.1e} {row['sgd_step']:10.1e}")
  plot(rows, os.path.join(workdir, "residuals.png"), sizes)
  results = dict(seed=seed, example=EXAMPLE, learning_rate=LEARNING_RATE,
                 example_outputs={name: np.asarray(value, np.float64).tolist() for name, value in outputs.items()},
                 differences=table, sweep=rows, device=str(jax.devices()[0]), jax_version=jax.__version__,
                 python=platform.python_version(), seconds=time.perf_counter() - start)

  def write_json(temporary):
    with open(temporary, "w") as handle:
      json.dump(results, handle, indent=2)

  atomic_write(os.path.join(workdir, "results.json"), write_json)
  print(f"\nWrote {os.path.join(workdir, 'results.json')} and residuals.png in {results['seconds']:.1f} s.")
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  jax.config.update("jax_threefry_partitionable", True)
  FLAGS = flags.FLAGS
  logging.info("dual form demo: workdir=%s seed=%d", FLAGS.workdir, FLAGS.seed)
  try:
    run(FLAGS.workdir, FLAGS.seed, FLAGS.overwrite)
  except ValueError as error:
    sys.exit(f"error: {error}")


if __name__ == "__main__":
  # Flags are defined only when run as a program, so that importing this module next to another experiment
  # (as the tests do) does not define --workdir twice.
  flags.DEFINE_string("workdir", "runs/dual_form_demo", "Output folder for results.json and residuals.png.")
  flags.DEFINE_integer("seed", 0, "Seed of the random weights and tokens.")
  flags.DEFINE_bool("overwrite", False, "Replace the outputs of an earlier run in --workdir.")
  app.run(main)
