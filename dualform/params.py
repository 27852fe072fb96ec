"""Parameter paths and regex selection over an NNX model's state.

A parameter is named by its ``nnx.state`` path joined with ``/`` (e.g. ``layers/3/attn/k_proj/kernel``;
see :mod:`dualform.models.config` for the tree). Selections are anchored regexes matched against the
whole path (``re.fullmatch``), never name substrings, so ``k_proj`` alone selects nothing and a bias is
selected only when the pattern says so.

Public names:

* :data:`TRAINABLE_KV`: the K/V-only finetuning pattern of Dai et al.
* :func:`path_string`: an ``nnx`` path tuple as a ``/``-joined string.
* :func:`flat_params`: ``{path string: array}`` of a model's (or abstract model's) parameters.
* :func:`param_paths`: the sorted path strings of a model's parameters.
* :class:`PathRegex`: an ``nnx`` filter ``(path, value) -> bool`` matching path strings.
* :func:`param_filter`: ``nnx.All(nnx.Param, PathRegex(pattern))``, for ``nnx.Optimizer(wrt=...)`` and
  ``nnx.split``.
* :class:`ParamSelection` and :func:`select_params`: the resolved paths and their value count; refuses
  a pattern that selects nothing.

Example::

  selection = select_params(model, TRAINABLE_KV)   # smollm2-135m: 60 paths, 6,635,520 values
  optimizer = nnx.Optimizer(model, optax.sgd(lr), wrt=param_filter(TRAINABLE_KV))
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from flax import nnx

# K/V projections (kernels and, for fairseq_dense, biases) of every layer: the parameters Dai et al. finetune.
TRAINABLE_KV = r"^layers/\d+/attn/(k_proj|v_proj)/(kernel|bias)$"


def path_string(path: tuple[Any, ...]) -> str:
  """``("layers", 0, "attn", "k_proj", "kernel")`` -> ``"layers/0/attn/k_proj/kernel"``."""
  return "/".join(str(getattr(key, "key", key)) for key in path)


def _compile(pattern: str | re.Pattern) -> re.Pattern:
  if isinstance(pattern, re.Pattern):
    return pattern
  try:
    return re.compile(pattern)
  except re.error as error:
    raise ValueError(f"invalid parameter regex {pattern!r}: {error}; fix the pattern") from None


@dataclasses.dataclass(frozen=True)
class PathRegex:
  """An ``nnx`` filter: true when the ``/``-joined path fully matches ``pattern``."""

  pattern: str

  def __post_init__(self):
    _compile(self.pattern)

  def __call__(self, path: tuple[Any, ...], value: Any) -> bool:
    del value
    return _compile(self.pattern).fullmatch(path_string(path)) is not None


def param_filter(pattern: str) -> nnx.filterlib.Filter:
  """The ``nnx`` filter selecting ``nnx.Param`` leaves whose path fully matches ``pattern``."""
  return nnx.All(nnx.Param, PathRegex(pattern))


def flat_params(model_or_state) -> dict[str, Any]:
  """``{path string: value}`` of every ``nnx.Param`` (arrays, or ShapeDtypeStructs for abstract models)."""
  state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
  return {path_string(path): variable.get_value() if hasattr(variable, "get_value") else variable.value
          for path, variable in state.flat_state()}


def param_paths(model_or_state) -> list[str]:
  """Sorted path strings of every parameter."""
  return sorted(flat_params(model_or_state))


@dataclasses.dataclass(frozen=True)
class ParamSelection:
  """Parameters selected by a regex: their sorted paths and total number of values."""

  pattern: str
  paths: tuple[str, ...]
  count: int

  def describe(self) -> str:
    """One line for start-up logs: pattern, number of tensors and of values."""
    return f"{self.pattern}: {len(self.paths)} tensors, {self.count:,} values"


def select_params(model_or_state, pattern: str) -> ParamSelection:
  """Resolves ``pattern`` (full match) against the parameter paths; raises if nothing matches."""
  regex = _compile(pattern)
  params = flat_params(model_or_state)
  paths = tuple(sorted(path for path in params if regex.fullmatch(path)))
  if not paths:
    examples = ", ".join(sorted(params)[:3])
    raise ValueError(f"parameter regex {pattern!r} selects nothing; paths look like: {examples}")
  count = sum(math.prod(params[path].shape) for path in paths)
  return ParamSelection(pattern=pattern, paths=paths, count=count)
