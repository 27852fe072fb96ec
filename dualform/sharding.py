"""Sharding as configuration: a named device mesh, parameter PartitionSpecs from regex rules, batch shardings.

The model code never mentions devices. Parameters are placed with ``jax.device_put`` + ``nnx.update``
according to rules kept as data, batches get a ``NamedSharding`` over the ``"data"`` axis, and ``jax.jit``
(GSPMD) inserts the collectives, so a sharded model computes what the single-device model computes.

Mesh axes (both optional):

* ``"data"``: splits the batch (data parallelism over examples, the default ``{"data": -1}``); parameters
  are replicated along it.
* ``"model"``: splits the large weights (tensor parallelism): attention projections over heads (the
  ``N*H`` / ``K*H`` columns of q/k/v, the rows of o), the MLP over its hidden width F, the embedding
  and an untied head over the vocabulary.

A rule names a mesh axis per tensor dimension. When the mesh lacks that axis, or the dimension is not
divisible by the axis size (e.g. 3 key/value heads over 8 devices), that dimension is replicated instead:
the result is the same, only the memory split differs. Every parameter must match some rule (first match
wins; :data:`DEFAULT_RULES` ends with a replicate-everything rule).

Public names: :data:`MeshSpec`, :data:`DEFAULT_RULES`, :func:`make_mesh`, :func:`partition_spec_for`,
:func:`param_partition_specs`, :func:`param_shardings`, :func:`shard_model`, :func:`batch_sharding`,
:func:`shard_batch`, :func:`replicate`.

Example::

  mesh = make_mesh({"data": 2, "model": 4})
  shard_model(model, mesh)
  logits = jitted_forward(model, shard_batch(tokens, mesh))
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from dualform.params import path_string

MeshSpec = Mapping[str, int]
Rule = tuple[str, PartitionSpec]
DATA_AXIS = "data"
MODEL_AXIS = "model"

# (anchored regex over parameter paths, PartitionSpec over that parameter's dimensions); first match wins.
# Kernels are [in, out]: D model width, N*H query heads x head dim, K*H key/value heads x head dim,
# F MLP hidden width, V vocabulary.
DEFAULT_RULES: tuple[Rule, ...] = (
    (r"^embed/embedding$", PartitionSpec(MODEL_AXIS, None)),                          # [V, D] over vocab
    (r"^layers/\d+/attn/(q_proj|k_proj|v_proj)/kernel$", PartitionSpec(None, MODEL_AXIS)),  # [D, N*H] over heads
    (r"^layers/\d+/attn/(q_proj|k_proj|v_proj)/bias$", PartitionSpec(MODEL_AXIS)),          # [N*H]
    (r"^layers/\d+/attn/o_proj/kernel$", PartitionSpec(MODEL_AXIS, None)),            # [N*H, D] over heads
    (r"^layers/\d+/mlp/(fc1|gate_proj|up_proj)/kernel$", PartitionSpec(None, MODEL_AXIS)),  # [D, F] over F
    (r"^layers/\d+/mlp/fc1/bias$", PartitionSpec(MODEL_AXIS)),                        # [F]
    (r"^layers/\d+/mlp/(fc2|down_proj)/kernel$", PartitionSpec(MODEL_AXIS, None)),    # [F, D] over F
    (r"^lm_head/kernel$", PartitionSpec(None, MODEL_AXIS)),                           # [D, V] over vocab
    (r".*", PartitionSpec()),                                  # norms, output biases [D]: replicated
)


def make_mesh(spec: MeshSpec | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with named axes from ``{"name": size}``; one size may be -1 (all remaining devices).

  The product of the sizes must equal the number of devices (default ``jax.devices()``). Axes are
  ``AxisType.Auto`` so that GSPMD propagates shardings through the unchanged model code.
  """
  spec = {DATA_AXIS: -1} if spec is None else dict(spec)
  devices = list(jax.devices() if devices is None else devices)
  if not spec:
    raise ValueError('mesh spec is empty; pass e.g. {"data": -1}')
  sizes = list(spec.values())
  if any(not isinstance(size, int) or (size <= 0 and size != -1) for size in sizes):
    raise ValueError(f"mesh axis sizes must be positive ints or one -1; got {spec}")
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1; got {spec}")
  known = math.prod(size for size in sizes if size != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {spec} cannot use {len(devices)} devices: {known} does not divide it")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {spec} needs {math.prod(sizes)} devices but {len(devices)} are given; "
                     f"make the sizes multiply to {len(devices)} or use -1")
  names = tuple(spec)
  return jax.make_mesh(tuple(sizes), names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


def _axis_size(mesh: Mesh, axis: str | tuple[str, ...] | None) -> int | None:
  """Size of a (possibly compound) spec entry, or None if the mesh lacks one of its axes."""
  names = (axis,) if isinstance(axis, str) else tuple(axis)
  if any(name not in mesh.shape for name in names):
    return None
  return math.prod(mesh.shape[name] for name in names)


def partition_spec_for(path: str, shape: tuple[int, ...], mesh: Mesh,
                       rules: Sequence[Rule] = DEFAULT_RULES) -> PartitionSpec:
  """The PartitionSpec of one parameter: the first rule whose regex fully matches ``path``.

  Axes the mesh lacks, and axes that do not divide their dimension, are dropped (replicated).
  """
  for pattern, spec in rules:
    if re.fullmatch(pattern, path):
      break
  else:
    raise ValueError(f"no sharding rule matches parameter {path!r}; add a rule (e.g. (r'.*', P()) last)")
  if len(spec) > len(shape):
    raise ValueError(f"sharding rule {pattern!r} gives {len(spec)} dims for {path} of shape {shape}")
  resolved = []
  for axis, dim in zip(tuple(spec) + (None,) * (len(shape) - len(spec)), shape):
    size = None if axis is None else _axis_size(mesh, axis)
    resolved.append(axis if size is not None and dim % size == 0 else None)
  return PartitionSpec(*resolved)


def param_partition_specs(model_or_state, mesh: Mesh, rules: Sequence[Rule] = DEFAULT_RULES) -> nnx.State:
  """A state of PartitionSpecs, one per parameter (same tree as ``nnx.state(model, nnx.Param)``)."""
  state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
  return nnx.map_state(lambda path, variable: variable.replace(
      partition_spec_for(path_string(path), variable.shape, mesh, rules)), state)


def param_shardings(model_or_state, mesh: Mesh, rules: Sequence[Rule] = DEFAULT_RULES) -> nnx.State:
  """A state of NamedShardings, one per parameter; usable as jit ``out_shardings`` or for device_put."""
  specs = param_partition_specs(model_or_state, mesh, rules)
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Sequence[Rule] = DEFAULT_RULES) -> nnx.Module:
  """Places every parameter by ``rules`` on ``mesh`` in place (``device_put`` + ``nnx.update``); returns it.

  Non-parameter state (if any) is replicated.
  """
  params, rest = nnx.state(model, nnx.Param, ...)
  shardings = param_shardings(params, mesh, rules)
  nnx.update(model, jax.device_put(params, shardings))
  if jax.tree.leaves(rest):
    nnx.update(model, replicate(rest, mesh))
  return model


def batch_sharding(mesh: Mesh, ndim: int = 2, axis: str = DATA_AXIS) -> NamedSharding:
  """NamedSharding splitting dim 0 over ``axis`` (replicated when the mesh has no such axis)."""
  leading = axis if axis in mesh.shape else None
  return NamedSharding(mesh, PartitionSpec(leading, *([None] * (ndim - 1))))


def shard_batch(batch, mesh: Mesh, axis: str = DATA_AXIS):
  """Places an array (or a pytree of arrays) with its leading (batch) dim split over ``axis``.

  The batch size must be divisible by the axis size; pad the batch (right-padded rows) if it is not.
  """
  size = mesh.shape.get(axis, 1)

  def put(array):
    if array.ndim == 0:
      raise ValueError("shard_batch needs arrays with a leading batch dimension; got a scalar")
    if array.shape[0] % size:
      raise ValueError(f"batch of {array.shape[0]} rows does not split over mesh axis {axis!r} of size "
                       f"{size}; pad the batch to a multiple of {size}")
    return jax.device_put(array, batch_sharding(mesh, array.ndim, axis))

  return jax.tree.map(put, batch)


def replicate(tree, mesh: Mesh):
  """Places every array of ``tree`` (arrays, a KVCache, an ``nnx.State``) fully replicated on ``mesh``."""
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))
