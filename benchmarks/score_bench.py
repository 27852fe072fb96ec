r"""Evaluation throughput: microseconds per query token of one scoring batch, zero-shot against ICL.

Times ``_score_batch`` (the comparison's evaluation step: label scores plus the setting's analysis
records) on random weights for batches of ``--rows`` x ``--bucket`` query tokens, without a prefix (ZSL)
and after a ``--cache``-token padded ICL prefix, with and without the records. ICL batches are capped by
the comparison's ``--eval_score_budget`` (rows * heads * bucket * (cache + bucket) scores), so the ICL rows
are swept too. Every variant is compiled first, then timed (median of ``--repeats``); ratios are per query
token against the first variant. "dispatch" is the time a call takes to return when nothing waits on its
result: near zero when dispatch is asynchronous, about the batch time when the call blocks the host.

``--prefix_attention cudnn`` adds the ICL variants with cuDNN's fused prefix attention (the same weights)
and prints how far their label scores are from the XLA path's on the same batch.

Command (H200)::

  python3 -m benchmarks.score_bench --model fairseq-dense-2.7b --dtype bfloat16 --icl_rows 124,256,512
  python3 -m benchmarks.score_bench --prefix_attention cudnn --icl_rows 124 --zsl_rows 512

CPU check: ``python -m benchmarks.score_bench --model tiny-fairseq --dtype float32 --cache 64 --bucket 16
--zsl_rows 8 --icl_rows 4,8 --repeats 2``.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from benchmarks.model_flags import define_model_flags
from benchmarks.random_batch import random_batch_setup
from dualform import evaluate
from dualform.compare import SETTINGS
from dualform.models import build_model
from dualform.static import interned

FLAGS = flags.FLAGS
define_model_flags(prefix=True)
flags.DEFINE_integer("bucket", 64, "padded query length")
flags.DEFINE_list("zsl_rows", ["512"], "rows of the zero-shot batches")
flags.DEFINE_list("icl_rows", ["124", "256", "512"], "rows of the ICL batches")
flags.DEFINE_integer("repeats", 5, "timed calls per variant; the median is reported")


def main(argv):
  del argv
  setup = random_batch_setup(FLAGS.model, FLAGS.dtype, FLAGS.scan_layers, FLAGS.cache)
  config, graphdef, state, rng = setup.config, setup.graphdef, setup.state, setup.rng
  cache = evaluate._encode_prefix(graphdef, state, setup.prefix, setup.valid)  # pylint: disable=protected-access
  implementations = {"xla": graphdef}
  if FLAGS.prefix_attention != "xla":  # the same state under a graphdef whose config picks the other path
    other = config.replace(prefix_attention=FLAGS.prefix_attention)
    implementations[FLAGS.prefix_attention] = interned(nnx.split(nnx.eval_shape(lambda: build_model(other, 0)))[0])
  labels = jnp.asarray([5, 9, 5, 5, 5, 5, 5, 5], jnp.int32)
  variants = [(f"zsl rows={rows}{' records' if records else ''}", None, int(rows), records, graphdef)
              for rows in FLAGS.zsl_rows for records in (True, False)]
  variants += [(f"icl {name} rows={rows}{' records' if records else ''}", cache, int(rows), records, program)
               for rows in FLAGS.icl_rows for records in (True, False) for name, program in implementations.items()]
  results, agreement, batches, xla_scores = [], [], {}, {}
  for name, prefix_cache, rows, records, program in variants:
    setting = "icl" if prefix_cache is not None else "zsl"
    record = SETTINGS[setting].record if records else evaluate.NO_RECORDS
    if (setting, rows) not in batches:  # every implementation scores the same batch
      batches[(setting, rows)] = (jnp.asarray(rng.integers(4, 1000, (rows, FLAGS.bucket)), jnp.int32),
                                  jnp.asarray(rng.integers(FLAGS.bucket // 2, FLAGS.bucket + 1, rows), jnp.int32))
    tokens, lengths = batches[(setting, rows)]
    start = time.perf_counter()
    scored = jax.block_until_ready(evaluate._score_batch(program, state, prefix_cache, tokens, lengths, labels,  # pylint: disable=protected-access
                                                         record=record))
    first = time.perf_counter() - start
    if prefix_cache is not None and len(implementations) > 1:
      key = (rows, records)
      if program is graphdef:
        xla_scores[key] = scored["label_scores"]
      else:
        difference = float(jnp.max(jnp.abs(scored["label_scores"] - xla_scores[key])))
        spread = float(jnp.max(jnp.abs(xla_scores[key])))
        agreement.append(f"{name}: max |label score - xla's| {difference:.3g} (scores up to {spread:.3g})")
    del scored
    times = []
    for _ in range(FLAGS.repeats):
      start = time.perf_counter()
      jax.block_until_ready(evaluate._score_batch(program, state, prefix_cache, tokens, lengths, labels,  # pylint: disable=protected-access
                                                  record=record))
      times.append(time.perf_counter() - start)
    # Dispatch: how long the calls take to return when nothing waits on them (asynchronous dispatch returns
    # at once; a call that blocks the host until the device is done returns after about the batch time).
    start = time.perf_counter()
    outputs = [evaluate._score_batch(program, state, prefix_cache, tokens, lengths, labels, record=record)  # pylint: disable=protected-access
               for _ in range(FLAGS.repeats)]
    dispatch = (time.perf_counter() - start) / FLAGS.repeats
    jax.block_until_ready(outputs)
    del outputs
    per_token = 1e6 * statistics.median(times) / (rows * FLAGS.bucket)
    scores = rows * config.num_heads * FLAGS.bucket * ((FLAGS.cache if prefix_cache is not None else 0) + FLAGS.bucket)
    results.append((name, 1e3 * statistics.median(times), per_token, scores, first, 1e3 * dispatch))
    print(f"{name}: {results[-1][1]:.1f} ms/batch, {per_token:.2f} us/token, dispatch {1e3 * dispatch:.1f} ms "
          f"(first call {first:.1f} s)", flush=True)
  print(f"\n{FLAGS.model} {FLAGS.dtype}, bucket {FLAGS.bucket}, ICL cache {FLAGS.cache}, device "
        f"{jax.devices()[0].device_kind}; ratios per query token against the first row")
  print("| variant | ms/batch | us/token | ratio | scores/batch | dispatch (ms) | first call (s) |\n"
        "|---|---:|---:|---:|---:|---:|---:|")
  for name, per_batch, per_token, scores, first, dispatch in results:
    print(f"| {name} | {per_batch:.1f} | {per_token:.2f} | {per_token / results[0][2]:.2f} | {scores:,} | "
          f"{dispatch:.1f} | {first:.1f} |")
  for line in agreement:
    print(line)


if __name__ == "__main__":
  app.run(main)
