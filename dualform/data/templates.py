"""Filling the task templates (PROTOCOL §2).

Public names:

  format_input(task, example, template_index=0) -> str
      the input template with every ``{field}`` slot replaced by the record's text, verbatim (no strip, no
      detokenisation); ``{sentence}`` and ``{text}`` both read the ``text`` field.
  answer_text(task, label, template_index=0) -> str
      the output template filled with class ``label``'s word, e.g. ``" Negative"`` (leading space).
  answer_texts(task, template_index=0) -> tuple[str, ...]
      ``answer_text`` for every class, in class-id order.
  demonstration_text(task, example, template_index=0) -> str
      ``format_input + answer_text(gold)``: one demonstration as text (for records; token ids are joined
      without re-tokenising, see ``dualform.data.packing``).

Only the template's own ``{slot}``s are filled; braces inside the inserted text are left alone. (The original
chains ``str.replace``, which differs only if a premise contained the literal text ``{hypothesis}``; no record
in the shared data does.)
"""

from __future__ import annotations

import re

from dualform.data.tasks import Example, TaskSpec, get_task

_SLOT = re.compile(r"\{([a-z_]+)\}")
_FIELD_ALIASES = {"sentence": "text"}  # the SST-2 template says {sentence}; the records say "text".


def _field_value(task: TaskSpec, example: Example, slot: str) -> str:
  name = _FIELD_ALIASES.get(slot, slot)
  if name not in example.fields:
    raise ValueError(f"task {task.name}: template slot {{{slot}}} needs field {name!r}, but the example "
                     f"has {sorted(example.fields)}; load it with the task's own loader")
  return example.fields[name]


def format_input(task: str | TaskSpec, example: Example, template_index: int = 0) -> str:
  """Fills the input template with the example's fields, verbatim.

  Example: sst2, text ``"a gem . "`` -> ``"Sentence: a gem .  Label:"`` (the trailing space is kept).
  """
  task = get_task(task)
  template = task.template(template_index).input_template
  # Split on the slots and rebuild, so that only the template's slots are filled: text that itself
  # contains "{hypothesis}" is never substituted again (the original's chained str.replace would).
  pieces = _SLOT.split(template)
  return "".join(_field_value(task, example, piece) if position % 2 else piece
                 for position, piece in enumerate(pieces))


def answer_text(task: str | TaskSpec, label: int, template_index: int = 0) -> str:
  """The answer string of class ``label``: the output template with its label word, e.g. ``" Positive"``."""
  task = get_task(task)
  template = task.template(template_index)
  if isinstance(label, bool) or not hasattr(label, "__index__"):
    raise ValueError(f"label must be an integer class id, got {label!r}")
  label = label.__index__()
  if not 0 <= label < task.num_classes:
    raise ValueError(f"label {label} out of range for task {task.name}; use 0..{task.num_classes - 1}")
  return template.output_template.replace("{answer}", template.label_words[label])


def answer_texts(task: str | TaskSpec, template_index: int = 0) -> tuple[str, ...]:
  """``answer_text`` of every class, in class-id order."""
  task = get_task(task)
  return tuple(answer_text(task, label, template_index) for label in range(task.num_classes))


def demonstration_text(task: str | TaskSpec, example: Example, template_index: int = 0) -> str:
  """One demonstration as text: the filled input followed by the gold answer (no separator)."""
  return format_input(task, example, template_index) + answer_text(task, example.label, template_index)
