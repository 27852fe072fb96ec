r"""Per-query cost of the dual form ``(W_ZSL + dW_ICL) q`` versus attending over n demonstration tokens.

  python -m benchmarks.dual_form_bench [--sizes=64,256,1024,4096,16384,65536] [--dim=64] [--heads=8]
      [--queries=16] [--dtype=float32] [--repeats=10] [--precision=default]

The dual form applies one precomputed H x H matrix per head to each query (O(H^2) per query and head,
independent of n). Attention reads all n keys and values (O(n H) per query and head), either relaxed
linear (no softmax, the attention the dual form equals) or softmax. Each function is jitted, warmed up,
and timed ``--repeats`` times with ``block_until_ready``; the table reports the median per query and the
ratios attend / dual form. The one-off cost of building ``dW_ICL`` from the n demonstrations
(:func:`dualform.dual_form.meta_gradient`, O(n H^2) per head) is reported alongside. Runs unchanged on a
GPU; the CPU default run takes about a minute.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from dualform import attention
from dualform import dual_form

_SIZES = flags.DEFINE_list("sizes", ["64", "256", "1024", "4096", "16384", "65536"],
                           "Numbers n of demonstration tokens (keys) to attend over.")
_DIM = flags.DEFINE_integer("dim", 64, "Head dimension H.")
_HEADS = flags.DEFINE_integer("heads", 8, "Number of heads (one key/value head per query head).")
_QUERIES = flags.DEFINE_integer("queries", 16, "Query tokens per call; costs are reported per query.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16", "float64"], "Array dtype.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed calls per measurement (the median is reported).")
_PRECISION = flags.DEFINE_enum("precision", "default", ["default", "high", "highest"],
                               "jax.default_matmul_precision for every matmul (GPU float32: default may be TF32).")


def median_seconds(function, *args, repeats: int) -> float:
  """Median wall time of ``function(*args)`` after two warm-up calls (compilation included in the first)."""
  for _ in range(2):
    jax.block_until_ready(function(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(function(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def benchmark(sizes: list[int], head_dim: int, heads: int, queries: int, dtype, repeats: int) -> list[dict]:
  """Rows of per-query seconds for the dual form, linear and softmax attention, for every n in ``sizes``."""
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape) / np.sqrt(head_dim), dtype)
  query = normal(1, queries, heads, head_dim)  # [B=1, T, N, H]
  apply_dual = jax.jit(dual_form.apply_weight)
  build_weight = jax.jit(dual_form.meta_gradient)
  linear = jax.jit(attention.linear_attention)
  softmax = jax.jit(attention.softmax_attention)
  rows = []
  for n in sizes:
    keys, values = normal(1, n, heads, head_dim), normal(1, n, heads, head_dim)  # [B=1, S, K, H]
    weight = jax.block_until_ready(build_weight(keys, values))  # [1, K, H, H], precomputed once
    row = dict(n=n, build=median_seconds(build_weight, keys, values, repeats=repeats),
               dual=median_seconds(apply_dual, weight, query, repeats=repeats) / queries,
               linear=median_seconds(linear, query, keys, values, repeats=repeats) / queries,
               softmax=median_seconds(softmax, query, keys, values, repeats=repeats) / queries)
    rows.append(row)
    del keys, values
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  sizes = [int(size) for size in _SIZES.value]
  if _DTYPE.value == "float64":
    jax.config.update("jax_enable_x64", True)  # this process only; a benchmark entry point, not a library
  device = jax.devices()[0]
  print(f"device: {device.platform} ({device.device_kind}); dtype {_DTYPE.value}; matmul precision "
        f"{_PRECISION.value}; H={_DIM.value}, heads={_HEADS.value}, queries per call={_QUERIES.value}, "
        f"median of {_REPEATS.value}")
  precision = None if _PRECISION.value == "default" else _PRECISION.value
  with jax.default_matmul_precision(precision):
    rows = benchmark(sizes, _DIM.value, _HEADS.value, _QUERIES.value, jnp.dtype(_DTYPE.value), _REPEATS.value)
  print(f"{'n':>7} {'dual form':>11} {'linear attn':>12} {'softmax attn':>13} {'linear/dual':>12} "
        f"{'softmax/dual':>13} {'build dW_ICL':>13}")
  print(f"{'':>7} {'us/query':>11} {'us/query':>12} {'us/query':>13} {'':>12} {'':>13} {'ms (once)':>13}")
  for row in rows:
    print(f"{row['n']:>7} {row['dual'] * 1e6:11.3f} {row['linear'] * 1e6:12.3f} {row['softmax'] * 1e6:13.3f} "
          f"{row['linear'] / row['dual']:12.1f} {row['softmax'] / row['dual']:13.1f} {row['build'] * 1e3:13.3f}")


if __name__ == "__main__":
  app.run(main)
