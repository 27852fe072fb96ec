r"""Momentum-attention study (PROTOCOL.md §11, §14): the CPU default, and the ``smoke`` preset.

CPU default (18.5 minutes on 2 idle cores; the numbers in docs/momentum.md come from it)::

  python -m experiments.momentum --workdir runs/momentum-cpu

It trains matched pairs (same seed, data order, parameter count and steps) of a 4-layer d=128 Llama-style
model with softmax attention and with momentum attention for eta in {0.1, 0.5, 0.9}, 3 seeds each, on
~102k tokens of Gutenberg (100 steps of 8 x 128 tokens), then reports held-out perplexity at 32/64/128
tokens (the paper's 256/512/1024 scaled down to the 128-token training context) and ICL accuracy on
SST-2, MR and SST-5 (first 100 evaluated examples, demonstrations packed into 256 tokens). Expected
result: perplexities in the hundreds and ICL near chance for every variant; no difference between variants
that the 3-seed 95% intervals can resolve. The GPU configuration is experiments/configs/momentum_gpu.py.

Smoke preset (seconds; CI and tests): ``--config=experiments/configs/momentum.py:smoke``.
Inference-only ablation on SmolLM2-135M: ``python -m experiments.momentum --mode=inference_ablation``
(settings under ``config.ablation``).
"""

import ml_collections


def get_config(preset: str = "cpu") -> ml_collections.ConfigDict:
  """The study config; ``preset`` is ``cpu`` (default) or ``smoke``."""
  if preset not in ("cpu", "smoke"):
    raise ValueError(f"unknown preset {preset!r}; use cpu or smoke (GPU: experiments/configs/momentum_gpu.py)")
  config = ml_collections.ConfigDict()
  config.name = f"momentum-{preset}"  # names the default run folder runs/<name>
  config.seeds = (0, 1, 2)  # each seed: init seed = block-order seed = demonstration seed (matched pairs)
  config.etas = (0.1, 0.5, 0.9)  # fixed-eta momentum variants, all layers
  config.learned_eta = False  # also train a variant with eta learned per head (sigmoid, init learned_eta_init)
  config.learned_eta_init = 0.5

  config.model = ml_collections.ConfigDict()
  config.model.num_layers = 4
  config.model.embed_dim = 128
  config.model.num_heads = 4
  config.model.num_kv_heads = 4  # plain multi-head attention, so "per kv head" = "per head"
  config.model.head_dim = 32
  config.model.mlp_dim = 512  # SwiGLU hidden width
  config.model.max_len = 1024  # RoPE context limit (evaluation may exceed the training length)
  config.model.rope_theta = 10000.0
  config.model.vocab_size = 49152  # the SmolLM2 tokenizer, so the ICL machinery runs unchanged
  config.model.momentum_method = "scan"  # lax.scan (PROTOCOL.md §11); "associative_scan" on GPUs

  config.train = ml_collections.ConfigDict()
  config.train.steps = 100
  config.train.batch_size = 8
  config.train.seq_len = 128  # training context
  config.train.learning_rate = 3e-3
  config.train.warmup_steps = 10
  config.train.min_learning_rate_ratio = 0.1
  config.train.weight_decay = 0.1
  config.train.grad_clip_norm = 1.0
  config.train.compute_dtype = "auto"  # float32 on CPU, bfloat16 on GPU
  config.train.log_every = 20
  config.train.checkpoint_every = 50
  config.train.keep_checkpoints = 1

  config.data = ml_collections.ConfigDict()
  config.data.train_corpus = "gutenberg"  # 39 books, ~8.4M SmolLM2 tokens
  config.data.valid_corpora = ("gutenberg", "wikitext-2-raw")  # held-out books (in domain), WikiText (out)
  config.data.cache_dir = ""  # token cache; "" = $DUALFORM_CACHE/corpus or <workdir>/token_cache
  config.data.eval_lengths = (32, 64, 128)  # perplexity input lengths (paper: 256, 512, 1024)
  config.data.eval_tokens = 8192  # scored tokens per corpus and length (a multiple of every length)
  config.data.eval_batch_size = 16

  config.icl = ml_collections.ConfigDict()
  config.icl.tokenizer = "smollm2-135m"
  config.icl.tasks = ("sst2", "mr", "sst5")  # short prompts; CB's do not fit a 256-token context
  config.icl.max_examples = 100  # first N evaluated examples in protocol order (0: all)
  config.icl.k = 32  # nominal demonstrations, packed until max_len (PROTOCOL.md §4)
  config.icl.max_len = 256  # packing limit (the model's usable context here)
  config.icl.tokens_per_batch = 4096
  config.icl.minimum_bucket = 64  # one or two padded query lengths per task: few compiles per (model, context)

  config.ablation = ablation_config()

  if preset == "smoke":
    config.seeds = (0, 1)
    config.etas = (0.5,)
    config.learned_eta = True
    config.model.num_layers = 1
    config.model.embed_dim = 32
    config.model.num_heads = 2
    config.model.num_kv_heads = 2
    config.model.head_dim = 16
    config.model.mlp_dim = 64
    config.model.max_len = 256
    config.train.steps = 4
    config.train.batch_size = 2
    config.train.seq_len = 32
    config.train.warmup_steps = 1
    config.train.log_every = 2
    config.train.checkpoint_every = 2
    config.data.train_corpus = "tinyshakespeare"
    config.data.valid_corpora = ("tinyshakespeare",)
    config.data.eval_lengths = (16, 32)
    config.data.eval_tokens = 64
    config.data.eval_batch_size = 4
    config.icl.tasks = ("sst2",)
    config.icl.max_examples = 8
    config.icl.max_len = 192
    config.ablation.model = "random:tiny-llama"
    config.ablation.etas = (0.0, 0.5)
    config.ablation.tasks = ("sst2",)
    config.ablation.max_examples = 4
    config.ablation.max_len = 192
    config.ablation.ppl_block_len = 32
    config.ablation.ppl_tokens = 64
  return config


def ablation_config() -> ml_collections.ConfigDict:
  """``--mode=inference_ablation``: momentum switched on in a pretrained model, no retraining."""
  ablation = ml_collections.ConfigDict()
  ablation.model = "smollm2-135m"  # SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32
  ablation.etas = (0.0, 0.05, 0.1, 0.3, 0.5)  # 0.0 is momentum with eta = 0, i.e. the unchanged model
  ablation.ppl_corpus = "wikitext-2-raw"
  ablation.ppl_block_len = 512
  ablation.ppl_tokens = 2048  # first N tokens of the valid split (4 blocks)
  ablation.ppl_batch_size = 2
  ablation.tasks = ("sst2", "cb")
  ablation.max_examples = 100  # first N evaluated examples (CB has 56)
  ablation.k = 32
  ablation.max_len = 1024
  ablation.seed = 0  # demonstration draw
  ablation.tokens_per_batch = 4096
  return ablation
