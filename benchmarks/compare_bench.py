r"""ICL evaluation both ways: prefix cache + length-bucketed batches (dualform) versus one full forward per
example (batch 1, context + query + label each time, as the original code), same model and jit.

Prints the seconds per example of each (warm: compile excluded; cold totals too), the speed ratio, and
checks that predictions agree and label scores match.

  python -m benchmarks.compare_bench --task sst2 --model smollm2-135m --max_examples 16
  python -m benchmarks.compare_bench --task cb --model random:fairseq-dense-2.7b --dtype bfloat16

``--max_examples`` limits the slow side (the fast side runs ``--fast_examples``, default: the whole set).
"""

from __future__ import annotations

import json
import sys

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("task", "sst2", "task")
flags.DEFINE_string("model", "smollm2-135m", "model name for dualform.loading.load_pretrained")
flags.DEFINE_integer("k", 32, "nominal number of demonstrations")
flags.DEFINE_integer("seed", None, "demonstration seed (default: the task's)")
flags.DEFINE_integer("max_examples", 16, "examples run on the slow side (one full forward each)")
flags.DEFINE_integer("fast_examples", 0, "examples run on the fast side (0: the whole evaluated set)")
flags.DEFINE_string("dtype", "float32", "parameter and compute dtype")
flags.DEFINE_string("matmul_precision", "highest", "jax matmul precision")
flags.DEFINE_integer("tokens_per_batch", 4096, "fast side: padded tokens per batch")


def main(argv):
  del argv
  import jax

  from dualform import evaluate
  from dualform.data import packing, tasks
  from dualform.loading import load_pretrained
  from experiments.configs import base

  jax.config.update("jax_threefry_partitionable", True)
  task = tasks.get_task(FLAGS.task)
  seed = FLAGS.seed if FLAGS.seed is not None else base.TASK_SEEDS[task.name]
  pretrained = load_pretrained(FLAGS.model, dtype=FLAGS.dtype)
  model, tokenizer = pretrained.model, pretrained.tokenizer
  eval_set = tasks.load_eval_set(task)
  queries = [packing.encode_query(tokenizer, task, example) for example in eval_set]
  context = packing.pack_context(tokenizer, task, tasks.load_pool(task), seed=seed, k=FLAGS.k,
                                 max_query_len=packing.max_query_length(tokenizer, task, queries))
  label_tokens = queries[0].label_ids
  fast_count = FLAGS.fast_examples or len(queries)
  slow_count = min(FLAGS.max_examples, fast_count)
  inputs = [query.input_ids for query in queries[:fast_count]]
  record = evaluate.EvalRecordSpec(attn_out=True, query_scores=True, context_scores=True)
  with jax.default_matmul_precision(FLAGS.matmul_precision):
    cold = evaluate.evaluate(model, context.token_ids, inputs, label_tokens, record=record,
                             tokens_per_batch=FLAGS.tokens_per_batch)
    warm = evaluate.evaluate(model, context.token_ids, inputs, label_tokens, record=record,
                             tokens_per_batch=FLAGS.tokens_per_batch)
    # Slow side: a first pass compiles every padded length it meets; the second pass is timed warm.
    slow_cold = evaluate.evaluate_full_sequences(model, context.token_ids, inputs[:slow_count], label_tokens,
                                                 record=record)
    slow = evaluate.evaluate_full_sequences(model, context.token_ids, inputs[:slow_count], label_tokens,
                                            record=record)
  fast_per_example = warm.seconds / fast_count
  slow_per_example = slow.seconds / slow_count
  agree = bool(np.array_equal(warm.predictions[:slow_count], slow.predictions))
  score_error = float(np.max(np.abs(warm.label_scores[:slow_count] - slow.label_scores)))
  report = {
      "task": task.name, "model": FLAGS.model, "dtype": FLAGS.dtype, "backend": jax.default_backend(),
      "device": str(jax.devices()[0]), "context_tokens": context.context_length, "k_eff": context.k_eff,
      "fast_examples": fast_count, "slow_examples": slow_count,
      "fast_seconds_cold": cold.seconds, "fast_seconds_warm": warm.seconds, "fast_shapes": warm.traces,
      "slow_seconds_cold": slow_cold.seconds, "slow_seconds": slow.seconds,
      "fast_seconds_per_example": fast_per_example, "slow_seconds_per_example": slow_per_example,
      "speedup_warm": slow_per_example / fast_per_example,
      "speedup_cold_fast_side": slow_per_example / (cold.seconds / fast_count),
      "predictions_agree": agree, "max_abs_label_score_difference": score_error,
  }
  print(json.dumps(report, indent=1))
  print(f"{task.name}: cached+batched {fast_per_example * 1e3:.1f} ms/example vs full forward "
        f"{slow_per_example * 1e3:.1f} ms/example: {report['speedup_warm']:.1f}x (predictions agree: {agree})")
  return 0 if agree else 1


if __name__ == "__main__":
  sys.exit(app.run(main))
