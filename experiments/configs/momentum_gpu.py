r"""Momentum-attention study, GPU size (one H200): 6 layers d=384, 1024-token context, 3 seeds.

Build the offline inputs once where the shared corpora exist (about 35 MiB: Gutenberg train/valid and
WikiText-2 raw valid as uint16 token arrays, the SmolLM2 tokenizer, four ICL tasks)::

  python -m experiments.momentum --mode=bundle --config=experiments/configs/momentum_gpu.py \
      --bundle_dir=.carry/momentum

then, on the GPU machine (jax/flax/optax/orbax are preinstalled there; ml_collections travels as a wheel in
the bundle), one seed per call (about 8.5 minutes each on one H200, under the 10-minute call limit), with
``carry=[".carry/momentum"]``::

  python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/momentum/whl/*.whl && \
  export PYTHONPATH=/tmp/site:$PWD DUALFORM_TOKENIZER=.carry/momentum/tokenizer \
         DUALFORM_DATA_DIR=.carry/momentum/data JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache && \
  python3 -m experiments.momentum --config=experiments/configs/momentum_gpu.py --config.seeds='(0,)' \
      --workdir=runs/momentum-gpu-seed0 && cp runs/momentum-gpu-seed0/results.json $OUT/results_seed0.json

(likewise seeds 1 and 2; a call cut short resumes on a still-warm machine from the per-run checkpoints),
then merge here::

  python -m experiments.momentum --mode=aggregate --config=experiments/configs/momentum_gpu.py \
      --inputs=results_seed0.json,results_seed1.json,results_seed2.json --workdir=runs/momentum-gpu

docs/momentum.md reports exactly this run (2026-11-29; jax 0.11.2, flax 0.12.10 on the H200).

Each (variant, seed) trains the same steps on the same blocks from the same initialisation, then is scored on
held-out perplexity at 256/512/1024 tokens (the paper's lengths) and on ICL accuracy for SST-2, SST-5, MR
and CB (all evaluated examples, k = 32 packed into 1024 tokens). bfloat16 compute, float32 parameters.
Result (docs/momentum.md): Gutenberg perplexity ~118 at 1024 tokens; eta 0.1 and 0.5 are within noise of
vanilla, eta 0.9 is worse (+34, 95% CI [22, 46]); ICL stays at chance (the models predict one label word).
"""

from experiments.configs import momentum


def get_config():
  config = momentum.get_config("cpu")
  config.name = "momentum-gpu"
  config.model.num_layers = 6
  config.model.embed_dim = 384
  config.model.num_heads = 6
  config.model.num_kv_heads = 6
  config.model.head_dim = 64
  config.model.mlp_dim = 1024
  config.model.max_len = 2048
  config.model.momentum_method = "associative_scan"  # same sum; lax.scan trains 7x slower on an H200
  config.train.steps = 600
  config.train.batch_size = 16
  config.train.seq_len = 1024
  config.train.learning_rate = 2e-3
  config.train.warmup_steps = 60
  config.train.log_every = 50
  config.train.checkpoint_every = 300
  config.data.cache_dir = ".carry/momentum/token_cache"
  config.data.eval_lengths = (256, 512, 1024)
  config.data.eval_tokens = 131072
  config.data.eval_batch_size = 16
  config.icl.tasks = ("sst2", "sst5", "mr", "cb")
  config.icl.max_examples = 0
  config.icl.max_len = 1024
  return config
