r"""Training-step throughput of the momentum study's models: vanilla vs momentum attention.

Prints tokens/s of one jitted AdamW step (compile excluded) for softmax attention and for momentum
attention with the model's own scan (:func:`dualform.attention.momentum_values`, ``lax.scan`` over the
sequence), and with two other formulations of the same sum ``m_j = sum_{i<j} eta^(j-i) v_i``:
``momentum_method="associative_scan"``
(:func:`dualform.attention.momentum_values_associative`) and, patched in for the measurement only, the
closed form as an [S, S] matmul. Ratios are relative to softmax attention. Synthetic tokens; no data needed.

  python -m benchmarks.pretrain_bench                 # CPU-study model (4 layers, d=128, 8 x 128 tokens)
  python -m benchmarks.pretrain_bench --preset=gpu    # GPU-study model (experiments/configs/momentum_gpu.py)
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from dualform import attention as attn_core
from dualform import pretrain


def _closed_form(v, eta):
  return attn_core.momentum_values_closed_form(v, eta)


def _time_step(config: pretrain.PretrainConfig, repeats: int) -> float:
  from flax import nnx
  from dualform.models.transformer import build_model
  model = build_model(pretrain._model_config(config), 0)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  optimizer = pretrain.make_optimizer(config)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(lambda p: pretrain.loss_fn(nnx.merge(graphdef, p, rest), tokens))(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return jax.tree.map(lambda p, u: p + u, params, updates), opt_state, loss

  tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.model.vocab_size,
                                                         (config.batch_size, config.seq_len + 1)), jnp.int32)
  params, opt_state, loss = step(params, opt_state, tokens)
  loss.block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    params, opt_state, loss = step(params, opt_state, tokens)
  loss.block_until_ready()
  return (time.perf_counter() - start) / repeats


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="cpu", choices=["cpu", "gpu"])
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  from experiments import momentum
  if args.preset == "cpu":
    from experiments.configs.momentum import get_config
  else:
    from experiments.configs.momentum_gpu import get_config
  config = get_config()
  print(f"backend {jax.default_backend()}, devices {jax.devices()}")
  values = jax.random.normal(jax.random.key(0), (2, 64, 3, 8))
  with jax.default_matmul_precision("highest"):  # TF32 would blur the check on GPU
    for implementation in (_closed_form, attn_core.momentum_values_associative):  # both must equal the scan
      np.testing.assert_allclose(implementation(values, 0.7), attn_core.momentum_values(values, 0.7), rtol=1e-5,
                                 atol=1e-5)
  baseline = None
  original = attn_core.momentum_values
  momentum_variant = momentum.Variant("eta0.5", "momentum", 0.5)
  for label, variant, method, patch in [
      ("softmax", momentum.Variant("vanilla", "softmax"), "scan", None),
      ("momentum (lax.scan)", momentum_variant, "scan", None),
      ("momentum (associative_scan)", momentum_variant, "associative_scan", None),
      ("momentum (closed form, [S,S] matmul; patched)", momentum_variant, "scan", _closed_form)]:
    config.model.momentum_method = method
    attn_core.momentum_values = patch or original
    try:
      seconds = _time_step(momentum.pretrain_config(config, variant, 0), args.repeats)
    finally:
      attn_core.momentum_values = original
    tokens = config.train.batch_size * config.train.seq_len
    baseline = baseline or seconds
    print(f"{label:48s} {seconds * 1e3:9.1f} ms/step {tokens / seconds:12,.0f} tok/s  x{seconds / baseline:.2f} "
          "time of softmax", flush=True)


if __name__ == "__main__":
  main()
