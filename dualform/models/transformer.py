"""One decoder-only Transformer in Flax NNX for the fairseq dense GPT and Llama families.

``model(tokens)`` maps int32 tokens [B, T] to logits [B, T, V]. :meth:`Transformer.forward` adds what
the analysis needs, with no cost to the plain path when unused:

* a prefix (KV) cache: ``cache = model.encode_prefix(context[None])`` encodes a shared context once;
  ``model.forward(batch, cache=cache)`` runs a right-padded batch of continuations against it and equals
  a full forward of each concatenated sequence (right padding needs no mask under causal attention);
* logits only where needed: ``logit_positions`` [B, P] computes [B, P, V] instead of [B, T, V];
* hook points: ``record=RecordSpec(...)`` with ``record_positions`` [B, P] returns, per layer, at those
  positions: ``attn_out`` [B, P, D] (attention block output after the output projection, bias included,
  before the residual add), ``scores`` [B, P, N, S] (pre-softmax, pre-mask ``q.k / sqrt(H)`` after RoPE,
  over all S = cache + T keys), ``weights`` [B, P, N, S] (post-softmax mixing weights) and ``queries``
  [B, P, N, H] (``q_proj(norm(x)) / sqrt(H)``, before RoPE);
* a per-layer attention kind (softmax, relaxed linear, momentum with eta) through the attention core,
  switched with :func:`set_attention`;
* a padded prefix: ``encode_prefix(padded[None], valid_length)`` caches a right-padded context whose padding
  is masked, so contexts of different lengths share compiled shapes;
* ``config.scan_layers``: the layers run as one ``lax.scan`` (same results, one layer in the program).

Residual stream per layer (pre-norm): ``x = x + Attn(norm1(x)); x = x + MLP(norm2(x))``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from dualform import attention as attn_core
from dualform.models.config import TransformerConfig

_INIT_STDDEV = 0.02

# config.prefix_attention applies to cached prefixes of at least this many keys; shorter ones (the zero-shot
# context, one <s> token) keep the XLA path, where there is nothing to fuse, and so their exact numbers.
FUSED_PREFIX_MIN_LENGTH = 128


@dataclasses.dataclass(frozen=True)
class RecordSpec:
  """Which per-layer intermediates to record at ``record_positions`` (all off by default)."""

  attn_out: bool = False
  scores: bool = False
  weights: bool = False
  queries: bool = False

  @property
  def any(self) -> bool:
    return self.attn_out or self.scores or self.weights or self.queries


RECORD_ALL = RecordSpec(attn_out=True, scores=True, weights=True, queries=True)


class KVCache(NamedTuple):
  """Keys (after RoPE) and values of an encoded prefix, batch 1: per layer [1, C, K, H].

  ``valid_length`` (int32 scalar, or None when all C are valid): a prefix right-padded to C; only its first
  ``valid_length`` keys are attended to and continuations start at that position, so contexts of different
  lengths padded to one C share one compiled shape (:meth:`Transformer.encode_prefix`).
  """

  keys: tuple[Array, ...]
  values: tuple[Array, ...]
  valid_length: Array | None = None

  @property
  def length(self) -> int:
    """C, the (padded) number of cached positions: the static key axis."""
    return self.keys[0].shape[1]

  @property
  def offset(self) -> int | Array:
    """Position of the first continuation token: ``valid_length`` when padded, else C."""
    return self.length if self.valid_length is None else self.valid_length


class ForwardOutput(NamedTuple):
  """Result of :meth:`Transformer.forward`.

  logits: [B, T, V], or [B, P, V] when ``logit_positions`` was given.
  records: per-layer dicts of recorded arrays (empty tuple when nothing was recorded).
  cache: the KV cache of this call's tokens when ``return_cache`` was set, else None.
  """

  logits: Array
  records: tuple[dict[str, Array], ...]
  cache: KVCache | None


def _dtype(name: str):
  return jnp.dtype(name)


def _normal_init():
  return nnx.initializers.normal(stddev=_INIT_STDDEV)


def fairseq_sinusoidal_table(num_positions: int, dim: int, padding_idx: int,
                             dtype=jnp.float32) -> Float[Array, "P D"]:
  """fairseq's ``SinusoidalPositionalEmbedding`` table [P, D]: ``[sin(p f) | cos(p f)]``,
  ``f_k = exp(-k ln(10000) / (D/2 - 1))``, row ``padding_idx`` zero; computed in ``dtype``."""
  half = dim // 2
  freqs = jnp.exp(jnp.arange(half, dtype=dtype) * -(math.log(10000.0) / (half - 1)))
  angles = jnp.arange(num_positions, dtype=dtype)[:, None] * freqs[None, :]
  table = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=1)
  return table.at[padding_idx].set(0.0)


def fairseq_positions(positions: Int[Array, "B T"], dim: int, dtype=jnp.float32) -> Float[Array, "B T D"]:
  """The fairseq sinusoid evaluated at absolute position ids [B, T] (no table; jit friendly).

  Angles are computed in ``dtype`` (float32 as in fairseq; float64 for x64 identity tests).
  """
  half = dim // 2
  freqs = jnp.exp(jnp.arange(half, dtype=dtype) * -(math.log(10000.0) / (half - 1)))
  angles = positions.astype(dtype)[..., None] * freqs
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def apply_rope(x: Float[Array, "B T N H"], positions: Int[Array, "B T"], theta: float) -> Float[Array, "B T N H"]:
  """Rotate-half RoPE (Hugging Face layout): ``x cos + rotate_half(x) sin``, angles ``p / theta**(2i/H)``."""
  head_dim = x.shape[-1]
  angle_dtype = jnp.promote_types(jnp.float32, x.dtype)  # float32, or float64 for x64 models
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=angle_dtype) / head_dim))
  # [batch, seq, head_dim / 2]
  angles = positions.astype(angle_dtype)[..., None] * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, H]
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  first, second = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-second, first], axis=-1)
  return x * cos + rotated * sin


def _gather_positions(x: Array, positions: Int[Array, "B P"]) -> Array:
  """x[b, positions[b, p], ...] for x [B, T, ...]: [B, P, ...]."""
  return jnp.take_along_axis(x, positions.reshape(positions.shape + (1,) * (x.ndim - 2)), axis=1)


def _make_norm(config: TransformerConfig, rngs: nnx.Rngs) -> nnx.Module:
  kwargs = dict(epsilon=config.norm_eps, dtype=_dtype(config.dtype), param_dtype=_dtype(config.param_dtype),
                rngs=rngs)
  if config.norm == "layernorm":
    return nnx.LayerNorm(config.embed_dim, **kwargs)
  return nnx.RMSNorm(config.embed_dim, **kwargs)


def _linear(in_dim: int, out_dim: int, config: TransformerConfig, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(in_dim, out_dim, use_bias=config.use_bias, dtype=_dtype(config.dtype),
                    param_dtype=_dtype(config.param_dtype), kernel_init=_normal_init(), rngs=rngs)


class Attention(nnx.Module):
  """Multi-head grouped-query self-attention with projections; kind and eta are static attributes."""

  def __init__(self, config: TransformerConfig, layer: int, rngs: nnx.Rngs):
    self.config = config
    self.kind, self.eta = config.layer_attention(layer)
    dim, heads, kv_heads, head_dim = config.embed_dim, config.num_heads, config.num_kv_heads, config.head_dim
    self.q_proj = _linear(dim, heads * head_dim, config, rngs)
    self.k_proj = _linear(dim, kv_heads * head_dim, config, rngs)
    self.v_proj = _linear(dim, kv_heads * head_dim, config, rngs)
    self.o_proj = _linear(heads * head_dim, dim, config, rngs)
    if self.kind == "momentum" and config.learn_momentum_eta:
      # Learned momentum per key/value head: eta = sigmoid(eta_logit) stays in (0, 1).
      self.eta_logit = nnx.Param(jnp.full((kv_heads,), math.log(self.eta / (1.0 - self.eta)),
                                          _dtype(config.param_dtype)))

  def momentum_eta(self) -> float | Array:
    """The momentum coefficient: the fixed ``eta``, or ``sigmoid(eta_logit)`` [K] when learned."""
    if hasattr(self, "eta_logit"):
      return jax.nn.sigmoid(self.eta_logit[...])
    return self.eta

  def __call__(self, x: Float[Array, "B T D"], positions: Int[Array, "B T"], prefix: tuple[Array, Array] | None,
               record: RecordSpec | None, record_positions: Int[Array, "B P"] | None,
               prefix_length: Array | None = None):
    """Returns (out [B, T, D], (keys, values) of these tokens [B, T, K, H], records dict).

    ``prefix_length``: the prefix keys at or after it are padding and masked out (see :class:`KVCache`).
    """
    cfg = self.config
    batch, seq, _ = x.shape
    # [batch, seq, heads, head_dim]
    q = self.q_proj(x).reshape(batch, seq, cfg.num_heads, cfg.head_dim)
    # [batch, seq, kv_heads, head_dim]
    k = self.k_proj(x).reshape(batch, seq, cfg.num_kv_heads, cfg.head_dim)
    v = self.v_proj(x).reshape(batch, seq, cfg.num_kv_heads, cfg.head_dim)
    unrotated_q = q
    if cfg.positions == "rope":
      q = apply_rope(q, positions, cfg.rope_theta)
      k = apply_rope(k, positions, cfg.rope_theta)
    new_kv = (k, v)
    scale = None if self.kind != "linear_relaxed" else 1.0
    shared_prefix = prefix is not None and prefix[0].shape[0] == 1 and self.kind != "momentum"
    wants_scores = record is not None and (record.scores or record.weights)
    if shared_prefix:
      # One batch-1 prefix serves every row: no per-row copy and no [batch, heads, seq, prefix + seq] tensor.
      prefix_k, prefix_v = (array.astype(k.dtype) for array in prefix)
      fused = self.kind == "softmax" and prefix_k.shape[1] >= FUSED_PREFIX_MIN_LENGTH
      out = attn_core.prefix_attention(
          q, k, v, prefix_k, prefix_v, kind=self.kind, scale=scale, prefix_length=prefix_length,
          implementation=cfg.prefix_attention if fused else "xla")
      if wants_scores:
        # Only the recorded rows of the score matrix: [batch, heads, P, prefix + seq].
        picked_q = _gather_positions(q, record_positions)
        scores = jnp.concatenate([attn_core.attention_scores(picked_q, prefix_k, scale=scale),
                                  attn_core.attention_scores(picked_q, k, scale=scale)], axis=-1)
        prefix_visible = jnp.ones(record_positions.shape + (prefix_k.shape[1],), bool)
        if prefix_length is not None:
          prefix_visible = prefix_visible & (jnp.arange(prefix_k.shape[1]) < prefix_length)
        visible = jnp.concatenate([prefix_visible, jnp.arange(seq) <= record_positions[..., None]],
                                  axis=-1)  # [batch, P, keys]
        weights = attn_core.attention_weights(scores, visible, self.kind)
    else:
      if prefix is not None:
        prefix_k, prefix_v = prefix
        k = jnp.concatenate([jnp.broadcast_to(prefix_k, (batch,) + prefix_k.shape[1:]).astype(k.dtype), k], axis=1)
        v = jnp.concatenate([jnp.broadcast_to(prefix_v, (batch,) + prefix_v.shape[1:]).astype(v.dtype), v], axis=1)
      mask = attn_core.causal_mask(seq, k.shape[1])
      if prefix_length is not None:  # padding keys of the prefix are never visible
        mask = mask & ((jnp.arange(k.shape[1]) < prefix_length) | (jnp.arange(k.shape[1]) >= k.shape[1] - seq))
      # [batch, heads, seq, keys]
      scores = attn_core.attention_scores(q, k, scale=scale)
      weights = attn_core.attention_weights(scores, mask, self.kind)
      out = attn_core.weighted_values(weights, v)
    if self.kind == "momentum":
      out = attn_core.add_momentum(out, v, self.momentum_eta(), method=cfg.momentum_method)
    out = self.o_proj(out.astype(x.dtype).reshape(batch, seq, cfg.num_heads * cfg.head_dim))

    records = {}
    if record is not None and record.any:
      if record.attn_out:
        records["attn_out"] = _gather_positions(out, record_positions)
      if wants_scores:
        # [batch, P, heads, keys] (the shared-prefix path computed only the recorded rows)
        picked = ((lambda a: jnp.swapaxes(a, 1, 2)) if shared_prefix
                  else (lambda a: _gather_positions(jnp.swapaxes(a, 1, 2), record_positions)))
        if record.scores:
          records["scores"] = picked(scores if scale is None else scores * cfg.head_dim ** -0.5)
        if record.weights:
          records["weights"] = picked(weights)
      if record.queries:
        records["queries"] = _gather_positions(unrotated_q * cfg.head_dim ** -0.5, record_positions)
    return out, new_kv, records


class MLP(nnx.Module):
  """fairseq: ``fc2(gelu_erf(fc1 x))``; llama: ``down(silu(gate x) * up x)``."""

  def __init__(self, config: TransformerConfig, rngs: nnx.Rngs):
    self.kind = config.mlp
    if self.kind == "gelu":
      self.fc1 = _linear(config.embed_dim, config.mlp_dim, config, rngs)
      self.fc2 = _linear(config.mlp_dim, config.embed_dim, config, rngs)
    else:
      self.gate_proj = _linear(config.embed_dim, config.mlp_dim, config, rngs)
      self.up_proj = _linear(config.embed_dim, config.mlp_dim, config, rngs)
      self.down_proj = _linear(config.mlp_dim, config.embed_dim, config, rngs)

  def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
    if self.kind == "gelu":
      return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
  """Pre-norm decoder layer: ``x + Attn(norm(x))`` then ``x + MLP(norm(x))``."""

  def __init__(self, config: TransformerConfig, layer: int, rngs: nnx.Rngs):
    self.attn_norm = _make_norm(config, rngs)
    self.attn = Attention(config, layer, rngs)
    self.mlp_norm = _make_norm(config, rngs)
    self.mlp = MLP(config, rngs)

  def __call__(self, x, positions, prefix, record, record_positions, prefix_length=None):
    attn_out, new_kv, records = self.attn(self.attn_norm(x), positions, prefix, record, record_positions,
                                          prefix_length)
    x = x + attn_out
    x = x + self.mlp(self.mlp_norm(x))
    return x, new_kv, records


class Transformer(nnx.Module):
  """Decoder-only language model; see the module docstring for the call forms."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embed = nnx.Embed(config.vocab_size, config.embed_dim, dtype=_dtype(config.dtype),
                           param_dtype=_dtype(config.param_dtype), embedding_init=_normal_init(), rngs=rngs)
    self.layers = nnx.List([Block(config, layer, rngs) for layer in range(config.num_layers)])
    self.final_norm = _make_norm(config, rngs)
    if not config.tie_embeddings:
      self.lm_head = nnx.Linear(config.embed_dim, config.vocab_size, use_bias=False, dtype=_dtype(config.dtype),
                                param_dtype=_dtype(config.param_dtype), kernel_init=_normal_init(), rngs=rngs)

  def __call__(self, tokens: Int[Array, "B T"]) -> Float[Array, "B T V"]:
    """Logits [B, T, V] of a plain forward pass from position 0."""
    return self.forward(tokens).logits

  def default_positions(self, batch: int, seq: int, offset: int = 0) -> Int[Array, "B T"]:
    """Absolute position ids of tokens ``offset .. offset + seq - 1`` (fairseq adds padding_idx + 1)."""
    ids = jnp.arange(seq, dtype=jnp.int32) + offset + self.config.first_position
    return jnp.broadcast_to(ids, (batch, seq))

  def embed_tokens(self, tokens: Int[Array, "B T"], positions: Int[Array, "B T"]) -> Float[Array, "B T D"]:
    cfg = self.config
    x = self.embed(tokens)
    if cfg.scale_embeddings:
      x = x * jnp.asarray(math.sqrt(cfg.embed_dim), x.dtype)
    if cfg.positions == "sinusoidal":
      angle_dtype = jnp.promote_types(jnp.float32, x.dtype)
      x = x + fairseq_positions(positions, cfg.embed_dim, angle_dtype).astype(x.dtype)
    return x

  def unembed(self, x: Float[Array, "... D"]) -> Float[Array, "... V"]:
    """Final norm then the (tied or separate) output projection."""
    x = self.final_norm(x)
    if self.config.tie_embeddings:
      return self.embed.attend(x)
    return self.lm_head(x)

  def forward(self, tokens: Int[Array, "B T"], *, cache: KVCache | None = None,
              positions: Int[Array, "B T"] | None = None, logit_positions: Int[Array, "B P"] | None = None,
              record: RecordSpec | None = None, record_positions: Int[Array, "B P"] | None = None,
              return_cache: bool = False) -> ForwardOutput:
    """Forward pass with optional prefix cache, partial logits, recording and cache output.

    Args:
      tokens: int32 [B, T]; with ``cache`` they continue the cached prefix of C tokens.
      cache: a batch-1 prefix cache from :meth:`encode_prefix`, shared by every row.
      positions: absolute position ids [B, T]; default follows the cache (``C + arange(T)``).
      logit_positions: int [B, P] indices into T; logits are computed only there.
      record: which intermediates to record; needs ``record_positions`` [B, P] (indices into T).
      return_cache: also return this call's keys/values as a :class:`KVCache` (for batch 1 prefixes).
    """
    cfg = self.config
    batch, seq = tokens.shape
    offset = 0 if cache is None else cache.offset
    if (cache is None or cache.valid_length is None) and offset + seq > cfg.max_len:
      raise ValueError(f"sequence of {offset + seq} tokens exceeds the model context of {cfg.max_len}")
    if cache is not None and cache.valid_length is not None and any(
        kind == "momentum" for kind in (cfg.attention_kinds or ())):
      raise ValueError("momentum attention needs an unpadded prefix cache (its values are summed in order)")
    if record is not None and record.any and record_positions is None:
      raise ValueError("record needs record_positions [batch, P] (indices into the token axis)")
    if cache is not None and len(cache.keys) != cfg.num_layers:
      raise ValueError(f"cache has {len(cache.keys)} layers, model has {cfg.num_layers}")
    if positions is None:
      positions = self.default_positions(batch, seq, offset)
    x = self.embed_tokens(tokens, positions)
    prefix_length = None if cache is None else cache.valid_length
    scanned = self._scanned_layers(x, positions, cache, prefix_length, record, record_positions, return_cache)
    if scanned is not None:
      x, keys, values, all_records = scanned
    else:
      all_records, keys, values = [], [], []
      for layer, block in enumerate(self.layers):
        prefix = None if cache is None else (cache.keys[layer], cache.values[layer])
        x, (k, v), records = block(x, positions, prefix, record, record_positions, prefix_length)
        all_records.append(records)
        if return_cache:
          keys.append(k)
          values.append(v)
    if logit_positions is not None:
      x = _gather_positions(x, logit_positions)
    logits = self.unembed(x)
    new_cache = KVCache(tuple(keys), tuple(values)) if return_cache else None
    records_out = tuple(all_records) if record is not None and record.any else ()
    return ForwardOutput(logits, records_out, new_cache)

  def _scanned_layers(self, x, positions, cache, prefix_length, record, record_positions, return_cache):
    """The layer stack as one ``lax.scan`` (``config.scan_layers``): (x, keys, values, records), or None
    when scanning is off or the layers differ in structure (attention kind), so the loop runs instead.

    Per-layer parameters are stacked to [L, ...] inside the call (the parameter tree stays per layer, so
    checkpoints, optimizer masks and hooks are unchanged) and the prefix cache to [L, 1, C, K, H]; the scan
    body is one :class:`Block`, so the compiled program holds one layer however deep the model is.
    """
    if not self.config.scan_layers or len(self.layers) < 2:
      return None
    first = self.layers[0]
    if any(type(block) is not type(first) or (block.attn.kind, block.attn.eta, block.attn.config)
           != (first.attn.kind, first.attn.eta, first.attn.config) for block in self.layers[1:]):
      return None  # layers differ in structure (their static attention attributes)
    # One split (layer 0) gives the body's GraphDef and the parameter paths; the other layers' values are
    # read by attribute: splitting every layer (a graph walk each) cost a sixth of each trace (benchmarks/
    # trace_bench.py, 2.7B config; a GPU run traces every batch shape once).
    graphdef, first_state = nnx.split(first)
    flat = list(first_state.flat_state())

    def value(block, path):
      node = block
      for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, key)
      return node[...]

    # [layers, ...] per parameter leaf
    stacked = nnx.State.from_flat_path([
        (path, variable.replace(jnp.stack([value(block, path) for block in self.layers])))
        for path, variable in flat])
    prefixes = None if cache is None else (jnp.stack(cache.keys), jnp.stack(cache.values))

    def body(hidden, layer_inputs):
      state, prefix = layer_inputs
      hidden, kv, records = nnx.merge(graphdef, state)(hidden, positions, prefix, record, record_positions,
                                                       prefix_length)
      return hidden, (kv if return_cache else None, records)

    x, (kv, records) = jax.lax.scan(body, x, (stacked, prefixes))
    layers = range(len(self.layers))
    keys = [kv[0][layer] for layer in layers] if return_cache else []
    values = [kv[1][layer] for layer in layers] if return_cache else []
    return x, keys, values, [{name: array[layer] for name, array in records.items()} for layer in layers]

  def encode_prefix(self, tokens: Int[Array, "1 C"], valid_length: Int[Array, ""] | None = None) -> KVCache:
    """Encodes a shared context once: its per-layer keys (after RoPE) and values [1, C, K, H].

    ``valid_length``: the context is right-padded to C and only its first ``valid_length`` tokens are real
    (causal attention leaves their keys and values untouched by the padding); the cache then masks the
    padding and continues positions from ``valid_length`` (:class:`KVCache`).
    """
    if tokens.ndim != 2 or tokens.shape[0] != 1:
      raise ValueError(f"encode_prefix takes one context of shape [1, C]; got {tokens.shape}")
    cache = self.forward(tokens, logit_positions=jnp.zeros((1, 1), jnp.int32), return_cache=True).cache
    return cache if valid_length is None else cache._replace(valid_length=jnp.asarray(valid_length, jnp.int32))


def set_attention(model: Transformer, kind: str, eta: float | None = None,
                  layers: tuple[int, ...] | None = None) -> Transformer:
  """Switches the attention kind of the given layers (default all) in place; returns the model.

  The kind is static, so a jitted function retraces once for the new kinds. The config is updated too.
  """
  config = model.config.with_attention(kind, eta, layers)
  for layer, block in enumerate(model.layers):
    block.attn.kind, block.attn.eta = config.layer_attention(layer)
    block.attn.config = config
  model.config = config
  return model


def set_prefix_attention(model: Transformer, implementation: str) -> Transformer:
  """Sets ``config.prefix_attention`` (``"xla"`` or ``"cudnn"``) of the model and of every layer, in place;
  returns the model. Static, like the attention kind: a jitted function retraces once."""
  config = model.config.replace(prefix_attention=implementation)  # validates it
  for block in model.layers:
    block.attn.config = block.attn.config.replace(prefix_attention=implementation)
  model.config = config
  return model


def param_count(model_or_state) -> int:
  """Number of parameter values (nnx.Param leaves) of a model or abstract model."""
  state = nnx.state(model_or_state, nnx.Param)
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state))


def build_model(config: TransformerConfig, seed: int = 0) -> Transformer:
  """A randomly initialised model (normal(0.02) kernels and embeddings, unit norms), in ``config.param_dtype``.

  Initialised eagerly, op by op: a jitted init has no array arguments, so XLA constant-folds the whole
  random initialisation on the host (8 minutes for SmolLM2-135M on an H200; 18 s against 2 s eager on CPU).
  """
  return Transformer(config, rngs=nnx.Rngs(seed))


def abstract_model(config: TransformerConfig) -> Transformer:
  """The model with ShapeDtypeStruct leaves (nothing allocated): the target of checkpoint ports."""
  return nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
