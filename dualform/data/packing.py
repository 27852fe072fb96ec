"""Token-level layout: queries, demonstration packing, FT sequences (PROTOCOL §3-§5, §7).

Public names:

  Tokenizer         the protocol every tokenizer satisfies: ``encode(text) -> list[int]`` (no BOS, no
                    trailing separator), ``bos_id: int | None`` (prepended when not None), ``separator_id``
                    (after every demonstration: fairseq ``</s>`` = 2, SmolLM2 ``"\\n"`` = 198),
                    ``vocab_size``, ``name``.
  LabelTokenError   ``ValueError`` raised when a label word is not a single token (and that is required).
  label_token_ids(tok, task, template_index=0) -> tuple[tuple[int, ...], ...]   token ids of every answer.
  check_single_token_labels(tok, task, template_index=0) -> tuple[int, ...]
                    the one id per class, or ``LabelTokenError`` naming the offending label.
  labels_are_single_tokens(tok, task, template_index=0) -> bool
  EncodedQuery      ``input_ids`` (list), ``label_ids`` (one tuple of ids per class), ``gold``, ``index``.
  encode_query(tok, task, example, *, template_index=0, allow_multitoken_labels=False) -> EncodedQuery
  encode_queries(tok, task, examples, *, ...) -> list[EncodedQuery]   the same, answers encoded once and
                    inputs in one batch.
  max_query_length(tok, task, examples, ...) -> int
                    ``M = max_i (len(query_input_i) + max_j len(label_j))`` over the evaluated examples.
  demonstration_order(pool_size, seed) -> np.ndarray   ``np.random.default_rng(seed).permutation(pool_size)``.
  PackedContext     the ICL context: ``token_ids`` (list), ``demo_pool_indices``, ``demo_spans``,
                    ``separator_positions``, ``k_eff``, ``bos``, ``text`` and the packing settings.
  pack_context(tok, task, pool, order=None, *, max_query_len, max_len=2048, k=32, perm_id=0, seed=None,
               template_index=0, allow_multitoken_labels=False) -> PackedContext
  zero_shot_context(tok) -> list[int]  ``[bos]`` or ``[]``: the context of ZSL and FT evaluation.
  PromptLayout      ``token_ids`` of ``context + query_input + label``, ``context_length`` c,
                    ``label_position`` t, ``prediction_position`` t-1, ``query_positions`` c..t.
  prompt_layout(context_ids, query, candidate=0) -> PromptLayout
  FinetuneSequences the FT data of §7: ``token_ids[i] = [bos if any] + input_i + label_i`` in ICL order,
                    ``target_masks`` (loss targets), ``demo_token_masks`` (where FT queries are recorded),
                    ``pool_indices``; iterating yields the token-id lists.
  finetune_sequences(tok, task, demos, *, template_index=0, allow_multitoken_labels=False)

Packing (PROTOCOL §4, orig): start from ``[bos]`` (or ``[]``); walk the candidates in ``order`` and append
demonstration i (``input_i + label_i + [separator]``) while ``len(context) + len(demo_i) + M < max_len``;
stop at the first demonstration that does not fit (later, shorter ones are not tried) or after ``k``.
For ``perm_id > 0`` the packed set is reordered by ``np.random.default_rng([seed, perm_id]).permutation(k_eff)``.
Token ids are joined as ids: the concatenated text is never re-tokenised, so spans are exact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from dualform.data.tasks import Example, TaskSpec, get_task
from dualform.data.templates import answer_text, format_input

DEFAULT_MAX_LEN = 2048  # fairseq --tokens-per-sample / gpt_maxlen (PROTOCOL §4).
DEFAULT_K = 32  # nominal number of demonstrations (PROTOCOL §4).
TEXT_SEPARATOR = "\n"  # how ``PackedContext.text`` renders the separator token (fairseq's </s> stands for it).


@runtime_checkable
class Tokenizer(Protocol):
  """What the packing code needs from a tokenizer (implemented in ``dualform.tokenizer``)."""
  name: str
  vocab_size: int
  bos_id: int | None
  separator_id: int

  def encode(self, text: str) -> list[int]:
    """Token ids of ``text``: no BOS, no trailing separator."""
    ...


class LabelTokenError(ValueError):
  """A label word is not exactly one token, and the caller requires single-token labels."""


def _encode(tok: Tokenizer, text: str, what: str) -> list[int]:
  ids = [int(token) for token in tok.encode(text)]
  if not ids:
    raise ValueError(f"tokenizer {getattr(tok, 'name', tok)!r} encodes the {what} {text!r} to no tokens; "
                     f"check the tokenizer and the template")
  return ids


def label_token_ids(tok: Tokenizer, task: str | TaskSpec,
                    template_index: int = 0) -> tuple[tuple[int, ...], ...]:
  """The token ids of every class's answer text (e.g. ``" Negative"``), in class-id order."""
  task = get_task(task)
  return tuple(tuple(_encode(tok, answer, "answer")) for answer in
               (answer_text(task, label, template_index) for label in range(task.num_classes)))


def check_single_token_labels(tok: Tokenizer, task: str | TaskSpec,
                              template_index: int = 0) -> tuple[int, ...]:
  """Returns the single id of every class's answer; raises ``LabelTokenError`` otherwise."""
  task = get_task(task)
  ids = label_token_ids(tok, task, template_index)
  for label, label_ids in enumerate(ids):
    if len(label_ids) != 1:
      raise LabelTokenError(
          f"task {task.name}: answer {answer_text(task, label, template_index)!r} is {len(label_ids)} tokens "
          f"{list(label_ids)} under tokenizer {getattr(tok, 'name', '?')!r}; the analysis needs single-token "
          f"labels, so pass allow_multitoken_labels=True to run without it")
  single = tuple(label_ids[0] for label_ids in ids)
  if len(set(single)) != len(single):
    raise LabelTokenError(f"task {task.name}: two classes share an answer token {list(single)}; "
                          f"use distinct label words")
  return single


def labels_are_single_tokens(tok: Tokenizer, task: str | TaskSpec, template_index: int = 0) -> bool:
  """Whether every answer of ``task`` is exactly one token (recorded per run, PROTOCOL §3.2)."""
  return all(len(ids) == 1 for ids in label_token_ids(tok, task, template_index))


@dataclasses.dataclass(frozen=True)
class EncodedQuery:
  """A query example as tokens.

  Attributes:
    input_ids: the filled input template (no BOS, no separator).
    label_ids: ``label_ids[j]`` are the answer tokens of class j.
    gold: the gold class id.
    index: the example's 0-based line in its source file.
  """
  input_ids: list[int]
  label_ids: tuple[tuple[int, ...], ...]
  gold: int
  index: int = -1

  @property
  def label_token_ids(self) -> tuple[int, ...]:
    """First answer token of every class (the scored token when labels are single tokens)."""
    return tuple(ids[0] for ids in self.label_ids)

  @property
  def length(self) -> int:
    """``len(input) + max_j len(label_j)``: this query's contribution to M."""
    return len(self.input_ids) + max(len(ids) for ids in self.label_ids)


def _check_label(task: TaskSpec, example: Example) -> None:
  label = example.label
  if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < task.num_classes:
    raise ValueError(f"example {example.index} of task {task.name} has label {label!r}; "
                     f"use a class id in 0..{task.num_classes - 1}")


def encode_query(tok: Tokenizer, task: str | TaskSpec, example: Example, *, template_index: int = 0,
                 allow_multitoken_labels: bool = False) -> EncodedQuery:
  """Encodes ``example`` as a query: input ids plus the answer ids of every class.

  The input and each answer are encoded separately, so no merge crosses the boundary (PROTOCOL §3).
  Multi-token answers raise ``LabelTokenError`` unless ``allow_multitoken_labels=True``.
  """
  return encode_queries(tok, task, [example], template_index=template_index,
                        allow_multitoken_labels=allow_multitoken_labels)[0]


def encode_queries(tok: Tokenizer, task: str | TaskSpec, examples: Sequence[Example], *, template_index: int = 0,
                   allow_multitoken_labels: bool = False) -> list[EncodedQuery]:
  """:func:`encode_query` of every example: the answers are encoded once and the inputs in one
  ``encode_batch`` call (the per-example form spent seconds on the label checks of a 2,000-row task)."""
  task = get_task(task)
  for example in examples:
    _check_label(task, example)
  if allow_multitoken_labels:
    labels = label_token_ids(tok, task, template_index)
  else:
    labels = tuple((token,) for token in check_single_token_labels(tok, task, template_index))
  texts = [format_input(task, example, template_index) for example in examples]
  batch = getattr(tok, "encode_batch", None)  # optional: the Tokenizer protocol needs only ``encode``
  encoded = (batch(texts) if batch is not None else [tok.encode(text) for text in texts]) if texts else []
  queries = []
  for example, text, ids in zip(examples, texts, encoded):
    if not ids:
      _encode(tok, text, "input")  # raises the one-line error naming the text
    queries.append(EncodedQuery(input_ids=[int(token) for token in ids], label_ids=labels,
                                gold=int(example.label), index=example.index))
  return queries


def max_query_length(tok: Tokenizer, task: str | TaskSpec, examples: Sequence[Example | EncodedQuery], *,
                     template_index: int = 0, allow_multitoken_labels: bool = False) -> int:
  """``M = max over examples of len(query_input) + len(label)`` (longest answer; PROTOCOL §4 step 1)."""
  task = get_task(task)
  if len(examples) == 0:
    raise ValueError("max_query_length needs at least one evaluated example; got none")
  longest = 0
  for example in examples:
    query = example if isinstance(example, EncodedQuery) else encode_query(
        tok, task, example, template_index=template_index, allow_multitoken_labels=allow_multitoken_labels)
    longest = max(longest, query.length)
  return longest


def demonstration_order(pool_size: int, seed: int) -> np.ndarray:
  """Candidate order over the pool: ``np.random.default_rng(seed).permutation(pool_size)`` (HF shuffle)."""
  if isinstance(pool_size, bool) or not isinstance(pool_size, (int, np.integer)) or pool_size < 1:
    raise ValueError(f"pool_size must be a positive integer, got {pool_size!r}")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
  return np.random.default_rng(int(seed)).permutation(int(pool_size))


@dataclasses.dataclass(frozen=True)
class PackedContext:
  """The packed ICL context (PROTOCOL §4). Treat the lists as read-only.

  Attributes:
    token_ids: ``[bos] + sum_i (input_i + label_i + [separator])`` (``[]`` start without BOS).
    demo_pool_indices: pool index of each packed demonstration, in ICL (final) order.
    demo_spans: ``(start, end)`` of each demonstration's input+label tokens in ``token_ids`` (half-open,
      separator excluded), in ICL order.
    label_positions: position of each demonstration's first label token.
    separator_positions: position of the separator after each demonstration.
    demo_token_ids: input+label ids of each demonstration, in ICL order (what FT trains on).
    demo_labels: gold class of each demonstration, in ICL order.
    k_eff: number of packed demonstrations.
    bos: whether ``token_ids`` starts with a BOS token.
    text: the demonstrations as text, each followed by ``"\\n"`` (the separator's text; fairseq's ``</s>``
      stands for a newline).
    drawn_pool_indices: the packed pool indices in drawn order (before the ``perm_id`` permutation).
    permutation: the permutation applied for ``perm_id > 0`` (``None`` for ``perm_id = 0``).
    k, max_len, max_query_len, perm_id, seed, separator_id, template_index: the settings used.
  """
  token_ids: list[int]
  demo_pool_indices: tuple[int, ...]
  demo_spans: tuple[tuple[int, int], ...]
  label_positions: tuple[int, ...]
  separator_positions: tuple[int, ...]
  demo_token_ids: tuple[tuple[int, ...], ...]
  demo_labels: tuple[int, ...]
  k_eff: int
  bos: bool
  text: str
  drawn_pool_indices: tuple[int, ...]
  permutation: tuple[int, ...] | None
  k: int
  max_len: int
  max_query_len: int
  perm_id: int
  seed: int | None
  separator_id: int
  template_index: int = 0

  @property
  def context_length(self) -> int:
    """``c``: the number of tokens before the query."""
    return len(self.token_ids)

  @property
  def demo_token_positions(self) -> np.ndarray:
    """Positions of every demonstration input/label token (BOS and separators dropped), in order: [T]."""
    if not self.demo_spans:
      return np.zeros((0,), np.int64)
    return np.concatenate([np.arange(start, end) for start, end in self.demo_spans])

  @property
  def demo_lengths(self) -> tuple[int, ...]:
    """Number of input+label tokens of each demonstration (separator excluded)."""
    return tuple(end - start for start, end in self.demo_spans)

  def to_record(self) -> dict:
    """A JSON-ready summary for ``results.json`` (token ids excluded; they go to ``.npz``)."""
    return {
        "k": self.k, "k_eff": self.k_eff, "max_len": self.max_len, "max_query_len": self.max_query_len,
        "perm_id": self.perm_id, "seed": self.seed, "bos": self.bos, "separator_id": self.separator_id,
        "template_index": self.template_index, "context_length": self.context_length,
        "demo_pool_indices": list(self.demo_pool_indices),
        "drawn_pool_indices": list(self.drawn_pool_indices),
        "permutation": None if self.permutation is None else list(self.permutation),
        "demo_spans": [list(span) for span in self.demo_spans],
        "demo_labels": list(self.demo_labels), "text": self.text,
    }


def zero_shot_context(tok: Tokenizer) -> list[int]:
  """The context of ZSL and FT evaluation: ``[bos]`` when the tokenizer uses one, else ``[]``."""
  return [] if tok.bos_id is None else [int(tok.bos_id)]


def _check_positive(name: str, value: object) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")
  return int(value)


def pack_context(tok: Tokenizer, task: str | TaskSpec, pool: Sequence[Example],
                 order: Sequence[int] | np.ndarray | None = None, *, max_query_len: int,
                 max_len: int = DEFAULT_MAX_LEN, k: int = DEFAULT_K, perm_id: int = 0,
                 seed: int | None = None, template_index: int = 0,
                 allow_multitoken_labels: bool = False) -> PackedContext:
  """Packs demonstrations into the ICL context exactly as PROTOCOL §4 says.

  Args:
    tok: the tokenizer (``Tokenizer`` protocol).
    task: task name or spec.
    pool: the demonstration pool (``load_pool``), indexed by ``order``.
    order: candidate order over the pool; ``None`` means ``demonstration_order(len(pool), seed)``.
    max_query_len: M from ``max_query_length`` over the evaluated examples.
    max_len: the context limit (2048).
    k: the nominal number of demonstrations; packing stops after k.
    perm_id: 0 keeps the drawn order; ``p > 0`` applies ``default_rng([seed, p]).permutation(k_eff)``.
    seed: the run seed (needed when ``order`` is ``None`` or ``perm_id > 0``).

  Raises ``ValueError`` when k exceeds the pool, when nothing fits (the prompt alone is longer than the
  context) and on bad labels or settings.
  """
  task = get_task(task)
  k = _check_positive("k", k)
  max_len = _check_positive("max_len", max_len)
  max_query_len = _check_positive("max_query_len", max_query_len)
  if isinstance(perm_id, bool) or not isinstance(perm_id, (int, np.integer)) or perm_id < 0:
    raise ValueError(f"perm_id must be a non-negative integer, got {perm_id!r}")
  if len(pool) == 0:
    raise ValueError(f"task {task.name}: the demonstration pool is empty; load it with load_pool")
  if k > len(pool):
    raise ValueError(f"task {task.name}: k={k} exceeds the pool of {len(pool)} demonstrations; lower k")
  if (order is None or perm_id > 0) and seed is None:
    raise ValueError("pack_context needs seed when order is None or perm_id > 0; pass the run seed")
  if order is None:
    order = demonstration_order(len(pool), seed)
  order = np.asarray(order)
  if order.ndim != 1 or (order.size and not np.issubdtype(order.dtype, np.integer)):
    raise ValueError(f"order must be a 1-D array of pool indices, got shape {order.shape} {order.dtype}")
  if order.size and (order.min() < 0 or order.max() >= len(pool)):
    raise ValueError(f"order holds indices outside 0..{len(pool) - 1}; pass a permutation of the pool")
  if len(np.unique(order)) != order.size:
    raise ValueError("order repeats a pool index; pass a permutation of the pool")

  start = zero_shot_context(tok)
  separator = int(tok.separator_id)
  if len(start) + max_query_len >= max_len:
    raise ValueError(f"task {task.name}: nothing fits: the longest query ({max_query_len} tokens) "
                     f"{'plus BOS ' if start else ''}already reaches max_len={max_len}; raise max_len")
  # Walk the candidates in order (PROTOCOL §4, steps 2-4).
  drawn: list[tuple[int, EncodedQuery]] = []
  length = len(start)
  for pool_index in order.tolist():
    if len(drawn) == k:
      break
    example = pool[pool_index]
    encoded = encode_query(tok, task, example, template_index=template_index,
                           allow_multitoken_labels=allow_multitoken_labels)
    demo_length = len(encoded.input_ids) + len(encoded.label_ids[encoded.gold]) + 1
    if length + demo_length + max_query_len < max_len:
      drawn.append((pool_index, encoded))
      length += demo_length
    else:
      break
  if not drawn:
    first = int(order[0]) if order.size else -1
    raise ValueError(f"task {task.name}: nothing fits: the first demonstration (pool row {first}) plus the "
                     f"longest query ({max_query_len} tokens) exceed max_len={max_len}; raise max_len")
  k_eff = len(drawn)
  permutation = None
  packed = drawn
  if perm_id > 0:
    permutation = tuple(int(i) for i in np.random.default_rng([int(seed), int(perm_id)]).permutation(k_eff))
    packed = [drawn[i] for i in permutation]

  token_ids = list(start)
  spans, label_positions, separator_positions, demo_token_ids, texts = [], [], [], [], []
  for pool_index, encoded in packed:
    demo = encoded.input_ids + list(encoded.label_ids[encoded.gold])
    spans.append((len(token_ids), len(token_ids) + len(demo)))
    label_positions.append(len(token_ids) + len(encoded.input_ids))
    token_ids.extend(demo)
    separator_positions.append(len(token_ids))
    token_ids.append(separator)
    demo_token_ids.append(tuple(demo))
    example = pool[pool_index]
    texts.append(format_input(task, example, template_index)
                 + answer_text(task, example.label, template_index) + TEXT_SEPARATOR)
  return PackedContext(
      token_ids=token_ids,
      demo_pool_indices=tuple(int(pool_index) for pool_index, _ in packed),
      demo_spans=tuple(spans), label_positions=tuple(label_positions),
      separator_positions=tuple(separator_positions), demo_token_ids=tuple(demo_token_ids),
      demo_labels=tuple(encoded.gold for _, encoded in packed), k_eff=k_eff, bos=bool(start),
      text="".join(texts), drawn_pool_indices=tuple(int(pool_index) for pool_index, _ in drawn),
      permutation=permutation, k=k, max_len=max_len, max_query_len=max_query_len, perm_id=int(perm_id),
      seed=None if seed is None else int(seed), separator_id=separator, template_index=template_index)


@dataclasses.dataclass(frozen=True)
class PromptLayout:
  """One scored sequence ``context + query_input + label_candidate`` and its positions (PROTOCOL §5, §8).

  Attributes:
    token_ids: the sequence to run.
    context_length: c, the number of tokens before the query.
    label_position: t, the first token of the candidate's answer (``label_pos``).
    prediction_position: t-1, the last prompt token (``pred_pos``), whose logits score the answers.
  """
  token_ids: list[int]
  context_length: int
  label_position: int
  prediction_position: int

  @property
  def query_positions(self) -> np.ndarray:
    """Positions c..t inclusive: the query part whose scores SimAM compares (PROTOCOL §9)."""
    return np.arange(self.context_length, self.label_position + 1)


def prompt_layout(context_ids: Sequence[int] | PackedContext, query: EncodedQuery,
                  candidate: int = 0) -> PromptLayout:
  """``context + query.input_ids + label_ids[candidate]`` with c, t and t-1 (candidate 0 by default)."""
  if isinstance(context_ids, PackedContext):
    context_ids = context_ids.token_ids
  if not 0 <= candidate < len(query.label_ids):
    raise ValueError(f"candidate {candidate} out of range; use 0..{len(query.label_ids) - 1}")
  context = [int(token) for token in context_ids]
  label_position = len(context) + len(query.input_ids)
  token_ids = context + list(query.input_ids) + list(query.label_ids[candidate])
  return PromptLayout(token_ids=token_ids, context_length=len(context), label_position=label_position,
                      prediction_position=label_position - 1)


@dataclasses.dataclass(frozen=True)
class FinetuneSequences(Sequence):
  """The FT training data of PROTOCOL §7 (one sequence per demonstration, in ICL order).

  Attributes:
    token_ids: ``[bos if any] + input_i + label_i`` per demonstration (no trailing separator).
    target_masks: ``target_masks[i][p]`` says token p is a loss target, predicted from position p-1:
      every token after BOS; without BOS every token from the second on (so ``p >= 1`` either way).
      The loss is ``mean_{p: mask} -log softmax(logits[p-1])[token_ids[p]]`` (one SGD step per sequence).
    demo_token_masks: demonstration tokens (every token but BOS), where §8 records the FT queries; their
      concatenation over sequences lines up with ``PackedContext.demo_token_positions``.
    pool_indices: the pool index of each sequence's demonstration.
    bos: whether the sequences start with BOS.
  Indexing and iteration yield ``token_ids[i]``.
  """
  token_ids: list[list[int]]
  target_masks: list[list[bool]]
  demo_token_masks: list[list[bool]]
  pool_indices: tuple[int, ...]
  bos: bool

  def __len__(self) -> int:
    return len(self.token_ids)

  def __getitem__(self, index):
    return self.token_ids[index]

  def __iter__(self) -> Iterator[list[int]]:
    return iter(self.token_ids)

  @property
  def num_demo_tokens(self) -> int:
    """T: the number of training tokens (the length of ``w_FT`` in the Kendall analysis)."""
    return sum(sum(mask) for mask in self.demo_token_masks)


def finetune_sequences(tok: Tokenizer, task: str | TaskSpec, demos: PackedContext | Sequence[Example], *,
                       template_index: int = 0, allow_multitoken_labels: bool = False) -> FinetuneSequences:
  """FT sequences ``[bos] + input_i + label_i`` for the packed demonstrations, in ICL order (PROTOCOL §7).

  ``demos`` is a ``PackedContext`` (its own tokens are reused, so FT and ICL see identical ids) or a list of
  examples (encoded here, in the given order).
  """
  start = zero_shot_context(tok)
  if isinstance(demos, PackedContext):
    if demos.bos != bool(start):
      raise ValueError("the packed context and the tokenizer disagree about BOS; pack with the same tokenizer")
    bodies = [list(ids) for ids in demos.demo_token_ids]
    pool_indices = demos.demo_pool_indices
  else:
    task = get_task(task)
    if len(demos) == 0:
      raise ValueError("finetune_sequences needs at least one demonstration; got none")
    bodies = []
    for example in demos:
      encoded = encode_query(tok, task, example, template_index=template_index,
                             allow_multitoken_labels=allow_multitoken_labels)
      bodies.append(encoded.input_ids + list(encoded.label_ids[encoded.gold]))
    pool_indices = tuple(int(example.index) for example in demos)
  token_ids = [start + body for body in bodies]
  target_masks = [[position >= 1 for position in range(len(ids))] for ids in token_ids]
  demo_token_masks = [[position >= len(start) for position in range(len(ids))] for ids in token_ids]
  return FinetuneSequences(token_ids=token_ids, target_masks=target_masks,
                           demo_token_masks=demo_token_masks, pool_indices=tuple(pool_indices),
                           bos=bool(start))
