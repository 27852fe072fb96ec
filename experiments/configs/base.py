"""The shared default config of ``python -m experiments.compare``; the per-task files only override.

Command: ``python -m experiments.compare --task <task>`` (or ``--config=experiments/configs/<task>.py``).
Every field carries a comment; the config is locked, so the CLI can override but not add fields.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from dualform.finetune import KV_PATTERN

# Per-task run seed of Dai et al.'s GPT 1.3B runs (PROTOCOL.md §7; GiilDe/ft-vs-icl configs, unverified).
TASK_SEEDS = {"sst2": 2, "sst5": 5, "mr": 5, "subj": 4, "agnews": 3, "cb": 3}

# FT learning rates per model family. fairseq_dense: GPT 1.3B values of PROTOCOL.md §7 (unverified;
# believed to be the paper's Appendix B). llama: chosen for SmolLM2-135M-Instruct (Q4_1) with ``--lr_sweep``
# (accuracy of the FT model on a held-out pool slice excluding the demonstrations; ties: higher mean gold
# log-prob, then smaller LR): CB over {1e-4, 1e-3, 1e-2, 1e-1} on 64 held-out examples, the others over
# {1e-3, 1e-2, 1e-1} on 32 (docs/results.md; per-LR accuracies in each run's results.json). Coarse and noisy:
# re-run the sweep for any serious use, and for any other llama model.
LEARNING_RATES = {
    "fairseq_dense": {"sst2": 5e-4, "sst5": 1.6e-4, "mr": 3e-3, "subj": 3e-3, "agnews": 0.2, "cb": 0.08},
    "llama": {"sst2": 1e-2, "sst5": 1e-3, "mr": 1e-3, "subj": 1e-1, "agnews": 1e-3, "cb": 1e-1},
}

# Log grid of the learning-rate sweep (PROTOCOL.md §7, re-tuning per model).
LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def get_config(task: str = "cb") -> ml_collections.ConfigDict:
  """The default comparison config for ``task``."""
  config = ml_collections.ConfigDict()
  config.task = task  # one of sst2, sst5, mr, subj, agnews, cb (PROTOCOL.md §1)
  config.model = "smollm2-135m"  # load_pretrained name: smollm2-135m, random:<config>, a path, a cache name
  config.trust_pickle = False  # fairseq .pt: allow full unpickling (its omegaconf cfg) of a TRUSTED file (logged)
  config.data_dir = ""  # data folder; empty: $DUALFORM_DATA_DIR, else <project root>/../shared/data
  config.template_index = 0  # template of PROTOCOL.md §2 (0 = the original's)
  config.k = 32  # nominal number of demonstrations (packing may keep fewer: k_eff)
  config.max_len = 2048  # context limit used by packing (PROTOCOL.md §4)
  config.seed = TASK_SEEDS.get(task, 1)  # run seed: demonstration draw, random baselines, derangement
  config.seeds = ""  # comma list of seeds for a multi-seed run (e.g. "1,2,3"); empty: just `seed`
  config.perm_id = 0  # demonstration order: 0 = drawn order; p > 0 permutes the packed set
  config.perm_ids = ""  # comma list of perm_ids paired with `seeds` (empty: perm_id for every seed)
  config.lr = config_dict.placeholder(float)  # FT learning rate; None: LEARNING_RATES[family][task]
  config.lr_sweep = False  # choose the LR by a sweep over lr_grid before the run (recorded in results)
  config.lr_grid = LR_GRID  # log grid of the sweep
  config.lr_select_on = "heldout"  # "heldout": pool slice excluding the demos; "eval": the evaluated split
  config.lr_heldout_examples = 200  # size of the held-out pool slice used by the sweep
  config.objective = "causal_lm"  # FT objective of the `ft` setting: causal_lm (§7)
  config.trainable = KV_PATTERN  # anchored regex of trainable parameter paths (K/V weights and biases)
  config.settings = "zsl,ft,icl"  # settings to run (registry in dualform.compare.SETTINGS), comma list
  config.max_examples = 0  # evaluate only the first N examples of the evaluated order (0: all)
  config.position = "pred_pos"  # headline metric position: pred_pos (t-1, conv) or label_pos (t, orig)
  config.random_baseline = "normal"  # SimAOU random direction: normal (centred, default) or uniform01 (orig)
  config.kendall_max_examples = 0  # Kendall over the first N examples (0: all; 100 = original debug_n)
  config.shuffled_pairing = True  # also report SimAOU/SimAM/Kendall with a seeded derangement of examples
  config.allow_multitoken_labels = False  # score multi-token labels (analysis metrics are then skipped)
  config.model_init = "pretrained"  # "untrained": control of §15.3 (attention and MLP re-initialised)
  config.untrained_seed = 0  # seed of the re-initialised attention/MLP weights of the untrained control
  config.dtype = "float32"  # parameter and compute dtype (bfloat16 is a recorded deviation)
  config.matmul_precision = "highest"  # jax.default_matmul_precision during the run (recorded)
  config.mesh = ""  # data-parallel mesh, e.g. "data=8" (dualform.sharding); empty: one device
  config.eval_tokens_per_batch = 4096  # evaluation batch rows = this // padded length
  config.eval_score_budget = 1 << 26  # cap on rows * heads * T * (C + T) score elements per batch
  config.eval_minimum_bucket = 16  # smallest padded query length (ladder above it); larger on GPUs: fewer shapes
  config.eval_bucket_midpoints = True  # bucket ladder with 1.5x midpoints; False: powers of two (GPU: half the shapes)
  config.eval_fixed_rows = False  # a bucket's last batch gets half or all the full rows (GPU: 2 shapes per bucket)
  config.eval_prefix_multiple = 0  # cache ICL contexts padded to a multiple of this (GPU: shapes shared by tasks)
  config.save_records = True  # records/*.npz (the per-example analysis arrays); off for speed benchmarks
  config.analysis = "host"  # metrics on "host" (float64 numpy) or "device" (float32 jax, records stay there; GPU)
  config.scan_layers = False  # lax.scan over layers: same results, one layer body in the compiled program
  # Threads that compile every evaluation's batch shapes at the start of a run, overlapping the FT steps and
  # earlier batches (GPU: about half a second per shape warm, seconds cold); 0 compiles on first use.
  config.compile_workers = 0
  # ICL's shared-prefix attention: "xla" (any device), or "cudnn" (fused prefix block; CUDA GPU, bfloat16)
  config.prefix_attention = "xla"
  config.ft_bucket_multiple = 32  # FT sequences are padded to a multiple of this (one jitted step for all)
  config.log_every_seconds = 30.0  # periodic progress line interval when stderr is not a TTY
  return config.lock()
