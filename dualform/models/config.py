"""Model hyperparameters as frozen dataclasses, and the one size table of named configs.

Two decoder-only families share one Transformer (:mod:`dualform.models.transformer`):

* ``fairseq_dense``: the dense GPT models of Dai et al. (fairseq ``transformer_lm_gpt3_*``): pre-LN
  LayerNorm (eps 1e-5), exact-erf GELU MLP of 4d, biases everywhere, fairseq sinusoidal positions
  (``[sin | cos]`` halves, ``(half - 1)`` denominator, first token at ``padding_idx + 1 = 2``), token
  embeddings scaled by ``sqrt(d)``, output embedding tied to the input embedding.
* ``llama``: RMSNorm, SwiGLU MLP, rotate-half RoPE, grouped-query attention, no biases, tied or untied
  embeddings (SmolLM2).

Parameter tree (``nnx.state`` paths; kernels are ``[in, out]``)::

  embed/embedding                               [V, D]
  layers/{i}/attn_norm/{scale[, bias]}          [D]
  layers/{i}/attn/{q,k,v,o}_proj/kernel         [D, N*H] / [D, K*H] / [D, K*H] / [N*H, D]
  layers/{i}/attn/{q,k,v,o}_proj/bias           (fairseq_dense only)
  layers/{i}/mlp_norm/{scale[, bias]}           [D]
  layers/{i}/mlp/{fc1,fc2}/{kernel,bias}        (fairseq_dense: [D, F], [F, D])
  layers/{i}/mlp/{gate_proj,up_proj,down_proj}/kernel   (llama: [D, F], [D, F], [F, D])
  final_norm/{scale[, bias]}                    [D]
  lm_head/kernel                                [D, V] (only when not tie_embeddings)
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from dualform.attention import ATTENTION_KINDS, PREFIX_IMPLEMENTATIONS

Family = Literal["fairseq_dense", "llama"]
FAMILIES: tuple[str, ...] = ("fairseq_dense", "llama")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Shape and behaviour of one decoder-only Transformer.

  Attributes:
    name: a short identifier recorded in results (e.g. ``"smollm2-135m"``).
    family: ``"fairseq_dense"`` or ``"llama"``; fixes norm, MLP, positions and biases (module docstring).
    vocab_size: V, rows of the token embedding.
    num_layers: L.
    embed_dim: D, the residual width.
    num_heads: N query heads.
    num_kv_heads: K key/value heads, ``N % K == 0`` (K == N for fairseq_dense).
    head_dim: H, with ``N * H == D`` for fairseq_dense.
    mlp_dim: F, the MLP hidden width.
    max_len: context length in tokens (positions beyond it are refused).
    norm_eps: LayerNorm / RMSNorm epsilon.
    rope_theta: RoPE base (llama only).
    tie_embeddings: logits use the input embedding transposed; otherwise a separate ``lm_head``.
    padding_idx: fairseq padding index; real tokens start at position ``padding_idx + 1``.
    attention_kinds: per-layer attention kind (``softmax``, ``linear_relaxed``, ``momentum``);
      ``None`` means softmax everywhere.
    momentum_eta: per-layer momentum coefficient, required where the kind is ``momentum``.
    learn_momentum_eta: make eta a learned parameter per key/value head in every momentum layer
      (``eta = sigmoid(eta_logit)``, ``eta_logit`` initialised to ``logit(momentum_eta)``; path
      ``layers/{i}/attn/eta_logit`` [K]). Off by default: eta is a fixed constant.
    momentum_method: how momentum layers compute ``sum_{i<t} eta^(t-i) v_i``: ``"scan"`` (``lax.scan``,
      the default) or ``"associative_scan"`` (same sum, parallel depth; much faster on GPUs).
    dtype: compute dtype of activations (``"float32"`` or ``"bfloat16"``); softmax runs in >= float32.
    param_dtype: dtype parameters are stored in.
    scan_layers: run the layer stack as one ``lax.scan`` over per-layer parameters stacked inside the
      call (same results; the compiled program holds one layer body whatever the depth, though on the
      H200 most compile time went to autotuning, which the scan does not remove: BUILD_NOTES.md). Only
      the call layout changes: parameters stay per layer. Used when every layer has the same attention
      kind, else the unrolled loop runs. Off by default (the stack costs one copy of the layer weights
      per call, which the CPU path does not need).
    prefix_attention: how softmax layers attend to a shared cached prefix (``dualform.attention.
      prefix_attention``): ``"xla"`` (default, any backend and dtype) or ``"cudnn"`` (cuDNN's fused
      kernel for the prefix block: CUDA GPUs, bfloat16 or float16 compute; same attention, other rounding;
      prefixes shorter than ``transformer.FUSED_PREFIX_MIN_LENGTH`` keys keep the XLA path).
  """

  name: str
  family: Family
  vocab_size: int
  num_layers: int
  embed_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  max_len: int
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  tie_embeddings: bool = True
  padding_idx: int = 1
  attention_kinds: tuple[str, ...] | None = None
  momentum_eta: tuple[float | None, ...] | None = None
  learn_momentum_eta: bool = False
  momentum_method: str = "scan"
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = False
  prefix_attention: str = "xla"

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"unknown model family {self.family!r}; choose one of {FAMILIES}")
    for field in ("vocab_size", "num_layers", "embed_dim", "num_heads", "num_kv_heads", "head_dim",
                  "mlp_dim", "max_len"):
      if getattr(self, field) <= 0:
        raise ValueError(f"{field} must be positive; got {getattr(self, field)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                       f"({self.num_kv_heads})")
    if self.family == "fairseq_dense":
      if self.num_heads * self.head_dim != self.embed_dim:
        raise ValueError(f"fairseq_dense needs num_heads * head_dim == embed_dim; got "
                         f"{self.num_heads} * {self.head_dim} != {self.embed_dim}")
      if self.num_kv_heads != self.num_heads:
        raise ValueError("fairseq_dense models have no grouped-query attention (num_kv_heads == num_heads)")
      if self.embed_dim % 2:
        raise ValueError("fairseq sinusoidal positions need an even embed_dim")
    if self.family == "llama" and self.head_dim % 2:
      raise ValueError("RoPE needs an even head_dim")
    if self.attention_kinds is not None:
      if len(self.attention_kinds) != self.num_layers:
        raise ValueError(f"attention_kinds has {len(self.attention_kinds)} entries for "
                         f"{self.num_layers} layers")
      bad = sorted(set(self.attention_kinds) - set(ATTENTION_KINDS))
      if bad:
        raise ValueError(f"unknown attention kinds {bad}; choose from {ATTENTION_KINDS}")
      etas = self.momentum_eta or (None,) * self.num_layers
      if len(etas) != self.num_layers:
        raise ValueError(f"momentum_eta has {len(etas)} entries for {self.num_layers} layers")
      for layer, (kind, eta) in enumerate(zip(self.attention_kinds, etas)):
        if kind == "momentum" and eta is None:
          raise ValueError(f"layer {layer} uses momentum attention but has no eta; set momentum_eta")
        if kind == "momentum" and self.learn_momentum_eta and not 0.0 < eta < 1.0:
          raise ValueError(f"layer {layer}: a learned eta starts from momentum_eta in (0, 1); got {eta}")
    if self.prefix_attention not in PREFIX_IMPLEMENTATIONS:
      raise ValueError(f"unknown prefix_attention {self.prefix_attention!r}; choose one of {PREFIX_IMPLEMENTATIONS}")
    if self.prefix_attention == "cudnn" and self.dtype not in ("bfloat16", "float16"):
      raise ValueError(f"prefix_attention 'cudnn' needs dtype bfloat16 or float16 (cuDNN has no {self.dtype} "
                       "fused attention); use 'xla'")
    if self.momentum_method not in ("scan", "associative_scan"):
      raise ValueError(f"unknown momentum_method {self.momentum_method!r}; use scan or associative_scan")
    if self.dtype not in ("float32", "bfloat16", "float16", "float64"):
      raise ValueError(f"unsupported compute dtype {self.dtype!r}; use float32, bfloat16, float16 or float64")
    if self.param_dtype not in ("float32", "bfloat16", "float16", "float64"):
      raise ValueError(f"unsupported param_dtype {self.param_dtype!r}; use float32, bfloat16, float16 or float64")
    if not self.norm_eps > 0:
      raise ValueError(f"norm_eps must be positive; got {self.norm_eps}")
    if self.family == "llama" and not self.rope_theta > 0:
      raise ValueError(f"rope_theta must be positive; got {self.rope_theta}")
    if self.padding_idx < 0:
      raise ValueError(f"padding_idx must be >= 0; got {self.padding_idx}")

  # Derived, family-fixed behaviour.
  @property
  def use_bias(self) -> bool:
    return self.family == "fairseq_dense"

  @property
  def norm(self) -> str:
    return "layernorm" if self.family == "fairseq_dense" else "rmsnorm"

  @property
  def mlp(self) -> str:
    return "gelu" if self.family == "fairseq_dense" else "swiglu"

  @property
  def positions(self) -> str:
    return "sinusoidal" if self.family == "fairseq_dense" else "rope"

  @property
  def scale_embeddings(self) -> bool:
    return self.family == "fairseq_dense"

  @property
  def first_position(self) -> int:
    """Absolute position id of the first token (fairseq: padding_idx + 1 = 2; RoPE: 0)."""
    return self.padding_idx + 1 if self.family == "fairseq_dense" else 0

  def layer_attention(self, layer: int) -> tuple[str, float | None]:
    """(kind, eta) of one layer."""
    kind = "softmax" if self.attention_kinds is None else self.attention_kinds[layer]
    eta = None if self.momentum_eta is None else self.momentum_eta[layer]
    return kind, eta

  def with_attention(self, kind: str, eta: float | None = None,
                     layers: tuple[int, ...] | None = None) -> "TransformerConfig":
    """A copy with ``kind`` (and ``eta``) on the given layers (default: all)."""
    layers = tuple(range(self.num_layers)) if layers is None else tuple(layers)
    kinds = list(self.attention_kinds or ("softmax",) * self.num_layers)
    etas = list(self.momentum_eta or (None,) * self.num_layers)
    for layer in layers:
      kinds[layer], etas[layer] = kind, (eta if kind == "momentum" else None)
    return dataclasses.replace(self, attention_kinds=tuple(kinds), momentum_eta=tuple(etas))

  def replace(self, **changes) -> "TransformerConfig":
    return dataclasses.replace(self, **changes)


def _fairseq(name: str, layers: int, dim: int, heads: int) -> TransformerConfig:
  return TransformerConfig(name=name, family="fairseq_dense", vocab_size=51200, num_layers=layers,
                           embed_dim=dim, num_heads=heads, num_kv_heads=heads, head_dim=dim // heads,
                           mlp_dim=4 * dim, max_len=2048, norm_eps=1e-5)


def _smollm2(name: str, layers: int, dim: int, heads: int, kv_heads: int, ffn: int,
             theta: float) -> TransformerConfig:
  return TransformerConfig(name=name, family="llama", vocab_size=49152, num_layers=layers, embed_dim=dim,
                           num_heads=heads, num_kv_heads=kv_heads, head_dim=dim // heads, mlp_dim=ffn,
                           max_len=8192, norm_eps=1e-5, rope_theta=theta, tie_embeddings=True)


# The one size table (PROTOCOL.md §12.1, §13.1). Converters and shape tests read it from here.
NAMED_CONFIGS: dict[str, TransformerConfig] = {
    "fairseq-dense-125m": _fairseq("fairseq-dense-125m", 12, 768, 12),
    "fairseq-dense-355m": _fairseq("fairseq-dense-355m", 24, 1024, 16),
    "fairseq-dense-1.3b": _fairseq("fairseq-dense-1.3b", 24, 2048, 32),
    "fairseq-dense-2.7b": _fairseq("fairseq-dense-2.7b", 32, 2560, 32),
    "smollm2-135m": _smollm2("smollm2-135m", 30, 576, 9, 3, 1536, 1e5),
    "smollm2-360m": _smollm2("smollm2-360m", 32, 960, 15, 5, 2560, 1e5),
    "smollm2-1.7b": _smollm2("smollm2-1.7b", 24, 2048, 32, 32, 8192, 1.3e5),
    # Tiny shapes with the real vocabularies, so the real tokenizers drive smoke runs on random weights.
    "tiny-llama": TransformerConfig(name="tiny-llama", family="llama", vocab_size=49152, num_layers=2,
                                    embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                                    max_len=2048, rope_theta=1e5),
    "tiny-fairseq": TransformerConfig(name="tiny-fairseq", family="fairseq_dense", vocab_size=51200,
                                      num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=4, head_dim=8,
                                      mlp_dim=128, max_len=2048),
}

# Published parameter counts (PROTOCOL.md §12.1 with V = 51200, §13.1); checked by shape-only tests.
PUBLISHED_PARAM_COUNTS: dict[str, int] = {
    "fairseq-dense-125m": 124_377_600,
    "fairseq-dense-355m": 354_740_224,
    "fairseq-dense-1.3b": 1_313_460_224,
    "fairseq-dense-2.7b": 2_648_724_480,
    "smollm2-135m": 134_515_008,
    "smollm2-360m": 361_821_120,
    "smollm2-1.7b": 1_711_376_384,
}


def get_config(name: str) -> TransformerConfig:
  """Looks up a named config; raises a one-line error listing the known names."""
  try:
    return NAMED_CONFIGS[name]
  except KeyError:
    raise ValueError(f"unknown model config {name!r}; known: {', '.join(sorted(NAMED_CONFIGS))}") from None


def tiny_config(family: Family = "llama", **overrides) -> TransformerConfig:
  """A few-kilobyte config for tests and smoke runs (random weights)."""
  base = dict(name=f"tiny-{family}", family=family, vocab_size=128, num_layers=2, embed_dim=32,
              num_heads=4, num_kv_heads=2 if family == "llama" else 4, head_dim=8, mlp_dim=64 if family ==
              "llama" else 128, max_len=256, norm_eps=1e-5, rope_theta=10000.0)
  base.update(overrides)
  return TransformerConfig(**base)
