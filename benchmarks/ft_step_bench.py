r"""Milliseconds per K/V finetuning step (PROTOCOL.md §7: batch 1, one SGD step per demonstration).

Runs :func:`dualform.finetune.finetune` on ``--steps`` random sequences of ``--length`` tokens (one bucket),
twice per variant (the first pass compiles), and prints the second pass's time per step, with the layers
as one ``lax.scan`` or unrolled, and with the training queries recorded and copied to the host, recorded
and kept on the device, or not recorded. Ratios are against the first variant. Random weights.

Command (H200)::

  python3 -m benchmarks.ft_step_bench --model fairseq-dense-2.7b --dtype bfloat16

CPU check: ``python -m benchmarks.ft_step_bench --model tiny-fairseq --dtype float32 --length 20``.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import app, flags

from benchmarks.model_flags import define_model_flags
from dualform import finetune
from dualform.models import build_model, get_config

FLAGS = flags.FLAGS
define_model_flags()
flags.DEFINE_integer("steps", 32, "demonstrations (one step each)")
flags.DEFINE_integer("length", 60, "tokens per demonstration")
flags.DEFINE_integer("bucket_multiple", 64, "sequences are padded to a multiple of this")


def main(argv):
  del argv
  base = get_config(FLAGS.model).replace(dtype=FLAGS.dtype, param_dtype=FLAGS.dtype)
  rng = np.random.default_rng(0)
  sequences = [rng.integers(4, 1000, FLAGS.length).tolist() for _ in range(FLAGS.steps)]
  rows = []
  # (record_queries, queries_on_device): recorded and copied to the host (the CPU default), recorded and
  # kept on the device (--analysis device), not recorded.
  recording = ((True, False), (True, True), (False, False))
  for scan in (True, False):
    model = build_model(base.replace(scan_layers=scan), 0)
    for record, on_device in recording:
      config = finetune.FinetuneConfig(learning_rate=1e-4, bucket_multiple=FLAGS.bucket_multiple,
                                       record_queries=record, queries_on_device=on_device)
      times = []
      for _ in range(2):
        start = time.perf_counter()
        result = finetune.finetune(model, sequences, config, has_bos=True, log=lambda message: None)
        jax.block_until_ready((jax.tree.leaves(result.model), result.queries))
        times.append(time.perf_counter() - start)
      where = "" if not record else (" on device" if on_device else " to host")
      rows.append((f"scan_layers={scan} record_queries={record}{where}", 1e3 * times[1] / FLAGS.steps, times[0]))
      print(f"{rows[-1][0]}: {rows[-1][1]:.1f} ms/step (first pass {times[0]:.1f} s)", flush=True)
    del model
  print(f"\n{FLAGS.model} {FLAGS.dtype}, {FLAGS.steps} steps of {FLAGS.length} tokens, device "
        f"{jax.devices()[0].device_kind}; ratios against the first row")
  print("| variant | ms/step | ratio | first pass (s, with compile) |\n|---|---:|---:|---:|")
  for name, per_step, first in rows:
    print(f"| {name} | {per_step:.1f} | {per_step / rows[0][1]:.2f} | {first:.1f} |")


if __name__ == "__main__":
  app.run(main)
