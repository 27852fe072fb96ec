r"""Host seconds to trace and to lower one evaluation batch (``evaluate._score_batch``) of a named config.

Nothing is allocated or compiled: the model is abstract (``ShapeDtypeStruct`` leaves). Every distinct batch
shape of a run is traced and lowered once before it compiles (or is read from the persistent cache), so on
a GPU host with a slow Python this is part of each shape's first-use cost. Prints the medians over
``--shapes`` bucket lengths (after ``--warmup`` untimed ones, garbage collector off) with the layers as
one ``lax.scan`` (the GPU run's setting) and unrolled, as ratios against the unrolled layers.

Command: ``python -m benchmarks.trace_bench --model fairseq-dense-2.7b``.
"""

from __future__ import annotations

import gc
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from benchmarks.model_flags import define_model_flags
from dualform import evaluate
from dualform.models import abstract_model, get_config
from dualform.static import interned

FLAGS = flags.FLAGS
define_model_flags()
flags.DEFINE_integer("shapes", 10, "timed bucket lengths (40, 48, ...)")
flags.DEFINE_integer("warmup", 2, "untimed bucket lengths first")
flags.DEFINE_integer("rows", 256, "rows per batch")


def _medians(scan_layers: bool) -> tuple[float, float]:
  """(trace, lower) median seconds of ``--shapes`` batch shapes with the layers scanned or unrolled."""
  config = get_config(FLAGS.model).replace(dtype=FLAGS.dtype, param_dtype=FLAGS.dtype, scan_layers=scan_layers)
  graphdef, state = nnx.split(abstract_model(config))
  graphdef = interned(graphdef)
  labels = jax.ShapeDtypeStruct((8,), jnp.int32)
  record = evaluate.EvalRecordSpec(attn_out=True)
  traces, lowers = [], []
  for index in range(FLAGS.warmup + FLAGS.shapes):
    bucket = 40 + 8 * index
    tokens = jax.ShapeDtypeStruct((FLAGS.rows, bucket), jnp.int32)
    lengths = jax.ShapeDtypeStruct((FLAGS.rows,), jnp.int32)
    start = time.perf_counter()
    traced = evaluate._score_batch.trace(graphdef, state, None, tokens, lengths, labels, record=record)  # pylint: disable=protected-access
    middle = time.perf_counter()
    traced.lower()
    end = time.perf_counter()
    if index >= FLAGS.warmup:
      traces.append(middle - start)
      lowers.append(end - middle)
  return statistics.median(traces), statistics.median(lowers)


def main(argv):
  del argv
  gc.disable()
  scanned, unrolled = _medians(True), _medians(False)
  gc.enable()
  print(f"{FLAGS.model} {FLAGS.dtype}, {FLAGS.rows} rows; ratios against the unrolled layers")
  print("| layers | trace (s) | lower (s) | trace ratio | lower ratio |\n|---|---:|---:|---:|---:|")
  for name, (trace, lower) in (("unrolled", unrolled), ("lax.scan", scanned)):
    print(f"| {name} | {trace:.4f} | {lower:.4f} | {trace / unrolled[0]:.2f} | {lower / unrolled[1]:.2f} |")


if __name__ == "__main__":
  app.run(main)
