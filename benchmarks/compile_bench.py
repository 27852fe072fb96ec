r"""Compile time against run time of one evaluation batch, under XLA flag variants (GPU).

On the H200 the six-task comparison with the 2.7B config spends most of a cold run compiling: XLA
autotunes every large fused kernel of every new shape (6-21 s per ``_score_batch`` shape, measured in
session 3; ``--xla_gpu_autotune_level=0`` compiled in 4.5 s but ran 5-10x slower). This benchmark measures,
for one ICL-shaped batch (a ``--cache``-token padded prefix, ``--rows`` x ``--bucket`` query tokens, every
record of the comparison), the compile seconds of the prefix encoder and of ``_score_batch`` and the
median run time of the compiled batch, once per variant of ``XLA_FLAGS``, each in a fresh subprocess (XLA
reads its flags once per process; no persistent cache). Ratios are against the first variant.

Command (H200)::

  python3 -m benchmarks.compile_bench --variants default,no_triton_gemm,autotune_2

CPU check (seconds): ``python -m benchmarks.compile_bench --model tiny-fairseq --dtype float32 --cache 64
--bucket 16 --rows 4 --variants default``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

from benchmarks.model_flags import define_model_flags

FLAGS = flags.FLAGS
define_model_flags(prefix=True, cache_help="padded prefix length")
flags.DEFINE_integer("bucket", 128, "padded query length")
flags.DEFINE_integer("rows", 124, "rows per batch (the GPU run's rows at bucket 64 under its score budget)")
flags.DEFINE_integer("repeats", 5, "timed calls of the compiled batch; the median is reported")
flags.DEFINE_list("variants", ["default", "no_triton_gemm", "autotune_2"], f"XLA_FLAGS variants")
flags.DEFINE_string("worker", None, "internal: run one variant in this process and print one JSON line")

VARIANTS = {
    "default": "",
    "no_triton_gemm": "--xla_gpu_enable_triton_gemm=false",
    "autotune_2": "--xla_gpu_autotune_level=2",
    "autotune_0": "--xla_gpu_autotune_level=0",
}


def _worker() -> dict:
  import jax
  import jax.numpy as jnp

  from benchmarks.random_batch import random_batch_setup
  from dualform import evaluate
  from dualform.compare import SETTINGS

  setup = random_batch_setup(FLAGS.model, FLAGS.dtype, FLAGS.scan_layers, FLAGS.cache,
                             prefix_attention=FLAGS.prefix_attention)
  graphdef, state, prefix, valid, rng = setup.graphdef, setup.state, setup.prefix, setup.valid, setup.rng
  start = time.perf_counter()
  encoder = evaluate._encode_prefix.lower(graphdef, state, prefix, valid).compile()  # pylint: disable=protected-access
  prefix_compile = time.perf_counter() - start
  cache = encoder(state, prefix, valid)
  tokens = jnp.asarray(rng.integers(4, 1000, (FLAGS.rows, FLAGS.bucket)), jnp.int32)
  lengths = jnp.asarray(rng.integers(FLAGS.bucket // 2, FLAGS.bucket + 1, FLAGS.rows), jnp.int32)
  labels = jnp.asarray([5, 9], jnp.int32)
  record = SETTINGS["icl"].record
  start = time.perf_counter()
  scorer = evaluate._score_batch.lower(graphdef, state, cache, tokens, lengths, labels,  # pylint: disable=protected-access
                                       record=record).compile()
  score_compile = time.perf_counter() - start
  jax.block_until_ready(scorer(state, cache, tokens, lengths, labels))
  times = []
  for _ in range(FLAGS.repeats):
    start = time.perf_counter()
    jax.block_until_ready(scorer(state, cache, tokens, lengths, labels))
    times.append(time.perf_counter() - start)
  return {"variant": FLAGS.worker, "xla_flags": os.environ.get("XLA_FLAGS", ""), "device": jax.devices()[0].device_kind,
          "prefix_compile_s": prefix_compile, "score_compile_s": score_compile,
          "score_run_ms": 1e3 * statistics.median(times)}


def main(argv):
  del argv
  if FLAGS.worker:
    print("RESULT " + json.dumps(_worker()), flush=True)
    return
  unknown = [name for name in FLAGS.variants if name not in VARIANTS]
  if unknown:
    raise app.UsageError(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
  rows = []
  for name in FLAGS.variants:
    environment = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + VARIANTS[name]).strip()}
    environment.pop("JAX_COMPILATION_CACHE_DIR", None)
    argv = [sys.executable, "-m", "benchmarks.compile_bench", "--worker", name] + [
        f"--{flag}={getattr(FLAGS, flag)}" for flag in ("model", "dtype", "cache", "bucket", "rows", "repeats")] + [
        "--scan_layers" if FLAGS.scan_layers else "--noscan_layers"]
    completed = subprocess.run(argv, capture_output=True, text=True, env=environment, check=False)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    if completed.returncode or not lines:
      print(f"{name}: failed (exit {completed.returncode}): {completed.stderr.strip()[-500:]}", flush=True)
      continue
    rows.append(json.loads(lines[-1][len("RESULT "):]))
    print(json.dumps(rows[-1]), flush=True)
  if not rows:
    return
  base = rows[0]
  print(f"\n{FLAGS.model} {FLAGS.dtype}, cache {FLAGS.cache}, batch {FLAGS.rows} x {FLAGS.bucket}, "
        f"device {base['device']}; ratios against {base['variant']}")
  print("| variant | prefix compile (s) | score compile (s) | compile ratio | run (ms) | run ratio |")
  print("|---|---:|---:|---:|---:|---:|")
  for row in rows:
    print(f"| {row['variant']} | {row['prefix_compile_s']:.1f} | {row['score_compile_s']:.1f} | "
          f"{row['score_compile_s'] / base['score_compile_s']:.2f} | {row['score_run_ms']:.1f} | "
          f"{row['score_run_ms'] / base['score_run_ms']:.2f} |")


if __name__ == "__main__":
  app.run(main)
