"""Static jit arguments that are hashed once.

``jax.jit`` hashes every static argument on every call to look up its compiled program. An ``nnx.GraphDef``
hash walks the whole module graph: about 14 ms per call for a 32-layer model on this project's CPU, which
was a quarter of a 2.7B finetuning step on the H200 (one call per demonstration) and a share of every
evaluation batch. :func:`interned` returns one :class:`Hashed` wrapper per distinct value (hashed once,
compared by identity afterwards), so a loop of calls costs one dictionary lookup before the loop.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Hashed(Generic[T]):
  """``value`` with its hash computed once; equal to another wrapper of an equal value."""

  __slots__ = ("value", "_hash")

  def __init__(self, value: T):
    self.value = value
    self._hash = hash(value)

  def __hash__(self) -> int:
    return self._hash

  def __eq__(self, other: Any) -> bool:
    return isinstance(other, Hashed) and (self is other or (self._hash == other._hash and self.value == other.value))

  def __repr__(self) -> str:
    return f"Hashed({type(self.value).__name__}, hash={self._hash})"


_INTERNED: dict[Any, Hashed] = {}


def interned(value: T) -> Hashed[T]:
  """The one :class:`Hashed` wrapper of ``value`` (equal values share it, so jit's cache compares identities)."""
  wrapper = _INTERNED.get(value)
  if wrapper is None:
    wrapper = _INTERNED[value] = Hashed(value)
  return wrapper
