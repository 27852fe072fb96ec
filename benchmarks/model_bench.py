r"""Forward-pass throughput and model FLOPs utilisation (MFU) of the Transformer on random weights.

For every model x dtype it builds the model directly in that dtype (a jitted init: no float32 copy of a
bfloat16 model is ever allocated), jits two forwards of a [batch, seq] token batch, and times each after
warm-up (median of ``--repeats``):

* ``last``: logits only at the last token (``logit_positions`` = T - 1), what scoring a prompt needs;
* ``full``: logits at every position ([B, T, V]).

FLOPs of one forward (the usual dense count, e.g. PaLM appendix B; causal masking is not discounted)::

  2 * (matmul parameters of the layers) * B * T       # q, k, v, o, MLP kernels
  + 2 * D * V * B * P                                # unembedding at P logit positions (P = 1 or T)
  + 2 * 2 * L * T^2 * N * H * B                      # q.k scores and weights.v (N * H = D for all configs)

MFU = achieved FLOP/s / peak. Peaks used unless ``--peak_tflops`` is given: NVIDIA H200/H100 dense
bfloat16 989 TFLOP/s, float32 with TF32 off 67 TFLOP/s (float32 runs use ``--f32_precision=highest`` by
default, i.e. no TF32). On other devices (CPU) MFU is "n/a" and only GFLOP/s are printed.

Commands::

  # the reference run (H200)
  python -m benchmarks.model_bench --models smollm2-135m,fairseq-dense-1.3b,fairseq-dense-2.7b \
      --dtypes float32,bfloat16 --batch 8 --seq 512
  # CPU check (a few minutes on 2 cores)
  python -m benchmarks.model_bench --models smollm2-135m,fairseq-dense-1.3b --dtypes float32,bfloat16 \
      --batch 1 --seq 128 --repeats 3
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from dualform.models import abstract_model, build_model, get_config, param_count
from dualform.params import flat_params

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["smollm2-135m", "fairseq-dense-1.3b", "fairseq-dense-2.7b"], "named configs")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "parameter and compute dtypes")
flags.DEFINE_integer("batch", 8, "sequences per batch")
flags.DEFINE_integer("seq", 512, "tokens per sequence")
flags.DEFINE_integer("warmup", 2, "untimed calls after compilation")
flags.DEFINE_integer("repeats", 10, "timed calls; the median is reported")
flags.DEFINE_float("peak_tflops", None, "peak TFLOP/s for MFU (default: per-dtype H100/H200 figures on those GPUs)")
flags.DEFINE_enum("f32_precision", "highest", ["default", "high", "highest"],
                  "jax matmul precision of float32 runs (highest: no TF32 on GPUs)")
flags.DEFINE_integer("seed", 0, "seed of the random weights and tokens")
flags.DEFINE_string("json_out", None, "also write the table rows as JSON to this file")

# Dense peak TFLOP/s of the GPUs the lead runs on (NVIDIA H100/H200 SXM data sheets).
HOPPER_PEAK_TFLOPS = {"bfloat16": 989.0, "float32": 67.0}


@dataclasses.dataclass(frozen=True)
class Row:
  model: str
  dtype: str
  logits: str
  batch: int
  seq: int
  params: int
  compile_s: float
  median_ms: float
  tokens_per_s: float
  tflops_per_s: float
  mfu: float | None


def forward_flops(config, batch: int, seq: int, logit_positions: int) -> float:
  """Model FLOPs of one forward of [batch, seq] tokens with logits at ``logit_positions`` per sequence."""
  params = flat_params(abstract_model(config))
  layer_matmul = sum(np.prod(value.shape) for path, value in params.items()
                     if path.startswith("layers/") and path.endswith("/kernel"))
  tokens = batch * seq
  unembedding = 2 * config.embed_dim * config.vocab_size * batch * logit_positions
  attention = 2 * 2 * config.num_layers * seq ** 2 * config.num_heads * config.head_dim * batch
  return float(2 * layer_matmul * tokens + unembedding + attention)


def peak_tflops(dtype: str) -> float | None:
  if FLAGS.peak_tflops is not None:
    return FLAGS.peak_tflops
  device = jax.devices()[0]
  if device.platform == "gpu" and any(name in device.device_kind for name in ("H100", "H200")):
    return HOPPER_PEAK_TFLOPS.get(dtype)
  return None


def build_state(config, seed: int):
  """(graphdef, state) of a random model, created directly in ``config.param_dtype``."""
  return nnx.split(build_model(config, seed))


def time_call(function, *args) -> tuple[float, float]:
  """(compile seconds, median seconds of FLAGS.repeats calls after FLAGS.warmup)."""
  start = time.perf_counter()
  compiled = function.lower(*args).compile()
  compile_s = time.perf_counter() - start
  for _ in range(FLAGS.warmup):
    jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(FLAGS.repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return compile_s, statistics.median(times)


def bench_model(name: str, dtype: str) -> list[Row]:
  config = get_config(name).replace(dtype=dtype, param_dtype=dtype)
  graphdef, state = build_state(config, FLAGS.seed)
  batch, seq = FLAGS.batch, FLAGS.seq
  tokens = jax.random.randint(jax.random.key(FLAGS.seed + 1), (batch, seq), 0, config.vocab_size, jnp.int32)
  last = jnp.full((batch, 1), seq - 1, jnp.int32)

  @jax.jit
  def forward_last(state, tokens, logit_positions):
    return nnx.merge(graphdef, state).forward(tokens, logit_positions=logit_positions).logits

  @jax.jit
  def forward_full(state, tokens):
    return nnx.merge(graphdef, state)(tokens)

  rows = []
  peak = peak_tflops(dtype)
  for label, function, args, positions in (("last", forward_last, (state, tokens, last), 1),
                                           ("full", forward_full, (state, tokens), seq)):
    compile_s, seconds = time_call(function, *args)
    achieved = forward_flops(config, batch, seq, positions) / seconds / 1e12
    rows.append(Row(model=name, dtype=dtype, logits=label, batch=batch, seq=seq, params=param_count(state),
                    compile_s=compile_s, median_ms=seconds * 1e3, tokens_per_s=batch * seq / seconds,
                    tflops_per_s=achieved, mfu=None if peak is None else achieved / peak))
    print(format_row(rows[-1]), flush=True)
  del state
  return rows


HEADER = (f"{'model':<20} {'dtype':<9} {'logits':<6} {'B x T':>9} {'params':>14} {'compile s':>9} "
          f"{'median ms':>10} {'tokens/s':>11} {'GFLOP/s':>10} {'MFU':>6}")


def format_row(row: Row) -> str:
  mfu = "n/a" if row.mfu is None else f"{100 * row.mfu:.1f}%"
  return (f"{row.model:<20} {row.dtype:<9} {row.logits:<6} {f'{row.batch}x{row.seq}':>9} {row.params:>14,} "
          f"{row.compile_s:>9.2f} {row.median_ms:>10.2f} {row.tokens_per_s:>11,.0f} "
          f"{1e3 * row.tflops_per_s:>10,.1f} {mfu:>6}")


def main(argv):
  del argv
  jax.config.update("jax_threefry_partitionable", True)
  device = jax.devices()[0]
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, device {device.device_kind} "
        f"x{jax.device_count()}; float32 matmul precision: {FLAGS.f32_precision}")
  for dtype in FLAGS.dtypes:
    peak = peak_tflops(dtype)
    print(f"peak for {dtype}: " + ("n/a (pass --peak_tflops for MFU)" if peak is None else f"{peak} TFLOP/s"))
  print(HEADER, flush=True)
  rows = []
  for name in FLAGS.models:
    for dtype in FLAGS.dtypes:
      if dtype not in ("float32", "bfloat16"):
        raise app.UsageError(f"unsupported --dtypes entry {dtype!r}; use float32 and/or bfloat16")
      precision = FLAGS.f32_precision if dtype == "float32" else "default"
      with jax.default_matmul_precision(precision):
        rows.extend(bench_model(name, dtype))
  print("\nSummary")
  print(HEADER)
  for row in rows:
    print(format_row(row))
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as file:
      json.dump([dataclasses.asdict(row) for row in rows], file, indent=1)


if __name__ == "__main__":
  app.run(main)
