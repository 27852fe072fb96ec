"""dualform: in-context learning as implicit finetuning, executable and tested in JAX.

Public entry points:

* :mod:`dualform.attention`: softmax, relaxed linear and momentum attention (the attention core).
* :mod:`dualform.dual_form`: the explicit dual form (W_ZSL, ΔW_ICL, ΔW_FT, linear-layer GD as attention).
* :mod:`dualform.models`: decoder-only Transformers in Flax NNX with hook points and a prefix cache.
* :func:`load_model`: ``model, tokenizer = dualform.load_model("smollm2-135m")``.
"""

__version__ = "0.1.0"


def load_model(name_or_path: str, **kwargs):
  """``(model, tokenizer)`` for a named model or a checkpoint path; see :mod:`dualform.loading`."""
  from dualform.loading import load_model as _load_model  # imported lazily: converters pull in gguf etc.
  return _load_model(name_or_path, **kwargs)


def load_pretrained(name_or_path: str, **kwargs):
  """``Pretrained(model, tokenizer, info)``; see :mod:`dualform.loading`."""
  from dualform.loading import load_pretrained as _load_pretrained
  return _load_pretrained(name_or_path, **kwargs)
