"""Prompts and positive maps: which caption tokens each phrase (category name, noun phrase) stands for.

A GLIP prompt is a caption plus, per phrase, the character spans ``[start, end)`` of that phrase in the
caption. The model scores every (anchor, token) pair; a phrase's score is built from the tokens its spans
cover. This module builds prompts (detection style "a. b. c", or spans inside a web caption), tokenizes
them with a fast BERT-family tokenizer, and maps spans to token positions exactly as the official
``create_positive_map`` does (``char_to_token`` of the first and last character, with the ``beg+1, beg+2``
/ ``end-2, end-3`` fallbacks for spans that start or end on whitespace).

Unlike the official code, a phrase whose span lies past the token limit is reported (``truncated``), not
silently given an empty row; prompts longer than the limit can be split with ``split_into_prompts`` (names)
or ``chunk_caption_phrases`` (a long caption), so that nothing is lost.
"""

from __future__ import annotations

import bisect
import logging
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

Span = tuple[int, int]
RandomSource = random.Random | np.random.Generator

DETECTION_SEPARATOR = ". "
MAX_QUERY_TOKENS = 256
# Official create_positive_map divides each row by (row sum + 1e-6), so all-zero rows stay zero.
NORMALIZE_EPS = 1e-6
# Official CONTROL_PROB (0, 0, 0.5, 0): half of the training prompts take the full number of negatives.
FULL_NEGATIVES_PROBABILITY = 0.5


@dataclass(frozen=True)
class Prompt:
    """A caption and the phrases grounded in it.

    Attributes:
        caption: the text given to the tokenizer.
        spans: per phrase, one or more character spans ``(start, end)`` into ``caption``, end exclusive.
        phrase_ids: per phrase, what it stands for (a category index, or the phrase's index in the
            original caption before chunking).
        token_indices: per phrase, the sorted token positions it covers (the official
            ``positive_map_label_to_token`` values); ``None`` until ``tokenize_prompts`` fills it.
    """

    caption: str
    spans: tuple[tuple[Span, ...], ...]
    phrase_ids: tuple[int, ...]
    token_indices: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self) -> None:
        spans = tuple(tuple((int(s), int(e)) for s, e in phrase) for phrase in self.spans)
        object.__setattr__(self, "spans", spans)
        object.__setattr__(self, "phrase_ids", tuple(int(i) for i in self.phrase_ids))
        if len(self.phrase_ids) != len(spans):
            raise ValueError(f"{len(spans)} phrases but {len(self.phrase_ids)} phrase ids")
        for phrase in spans:
            _check_spans(phrase, len(self.caption))
        if self.token_indices is not None:
            indices = tuple(tuple(int(t) for t in row) for row in self.token_indices)
            if len(indices) != len(spans):
                raise ValueError(f"{len(spans)} phrases but {len(indices)} token index rows")
            object.__setattr__(self, "token_indices", indices)

    @classmethod
    def from_caption(
        cls,
        caption: str,
        spans: Sequence[Span | Sequence[Span]],
        phrase_ids: Sequence[int] | None = None,
    ) -> Prompt:
        """Prompt for phrases found inside an existing caption (grounding data, spaCy noun chunks).

        Args:
            caption: the caption, unchanged.
            spans: per phrase either one ``(start, end)`` pair or a list of them (char offsets, end
                exclusive).
            phrase_ids: per phrase an id; defaults to ``0..P-1``.
        """
        normalized = tuple(_as_span_list(entry) for entry in spans)
        ids = tuple(range(len(normalized))) if phrase_ids is None else tuple(phrase_ids)
        return cls(caption=caption, spans=normalized, phrase_ids=ids)

    @property
    def num_phrases(self) -> int:
        return len(self.spans)

    def phrase_texts(self) -> list[str]:
        """The text of every phrase (several spans joined by a space)."""
        return [" ".join(self.caption[s:e] for s, e in phrase) for phrase in self.spans]


@dataclass(frozen=True, eq=False)
class TokenizedPrompts:
    """A tokenized batch of prompts.

    Attributes:
        prompts: the input prompts, ``token_indices`` filled in.
        input_ids: ``[B, T]`` int64 token ids, 0-padded ([PAD] of the BERT vocabulary).
        attention_mask: ``[B, T]`` int64, 1 for real tokens including [CLS]/[SEP], 0 for padding.
        offsets: ``[B, T, 2]`` int64 character span ``[start, end)`` of each token in its caption,
            ``(0, 0)`` for special tokens and padding.
        truncated: per prompt, the phrase positions with a span past the last kept token; those spans
            contribute no tokens (a single-span phrase gets an empty row), so their boxes must be dropped.
        unmapped: per prompt, the phrase positions that cover no token for another reason (a span of
            whitespace or of characters the tokenizer discards).
    """

    prompts: tuple[Prompt, ...]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    offsets: torch.Tensor
    truncated: tuple[tuple[int, ...], ...]
    unmapped: tuple[tuple[int, ...], ...]

    @property
    def num_tokens(self) -> int:
        """T, the padded sequence length."""
        return int(self.input_ids.shape[1])


@dataclass(frozen=True)
class DetectionPromptSample:
    """A training prompt for a detection image.

    Attributes:
        prompt: the prompt; ``phrase_ids`` index ``all_names``.
        dropped_positives: positive names that did not fit in the token limit; drop their boxes.
    """

    prompt: Prompt
    dropped_positives: tuple[str, ...]


def clean_category_name(name: str) -> str:
    """Category name as the official ``clean_name`` writes it into prompts.

    Removes a parenthesised part ("bow_(weapon)" -> "bow"), turns "_" into spaces, then collapses runs of
    whitespace and strips the ends (the official code removes one doubled space and keeps a trailing one,
    which changes no token).
    """
    # Greedy like the official regex: from the first "(" to the last ")".
    name = re.sub(r"\(.*\)", "", name)
    return " ".join(name.replace("_", " ").split())


def caption_from_phrases(
    phrases: Sequence[str],
    separator: str = DETECTION_SEPARATOR,
    phrase_ids: Sequence[int] | None = None,
) -> Prompt:
    """The official detection prompt "a. b. c": phrases joined by ``separator``, no trailing separator.

    Args:
        phrases: non-blank phrase texts (category names, already cleaned).
        separator: text between phrases.
        phrase_ids: per phrase an id (category index); defaults to ``0..P-1``.

    Returns:
        a Prompt with one span per phrase covering exactly the phrase text.
    """
    if not phrases:
        raise ValueError("a prompt needs at least one phrase")
    spans: list[tuple[Span]] = []
    position = 0
    for index, phrase in enumerate(phrases):
        if not phrase.strip():
            raise ValueError(f"phrase {index} is blank: {phrase!r}")
        spans.append(((position, position + len(phrase)),))
        position += len(phrase) + len(separator)
    ids = tuple(range(len(phrases))) if phrase_ids is None else tuple(phrase_ids)
    return Prompt(caption=separator.join(phrases), spans=tuple(spans), phrase_ids=ids)


def tokenize_prompts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    max_length: int = MAX_QUERY_TOKENS,
    pad_to_max: bool = False,
    length_bucket: int = 0,
) -> TokenizedPrompts:
    """Tokenize a batch of prompts and find the tokens of every phrase.

    Args:
        tokenizer: a fast (Rust-backed) BERT-family tokenizer; ``char_to_token`` needs it.
        prompts: B prompts.
        max_length: token limit including [CLS]/[SEP]; longer captions are truncated.
        pad_to_max: pad every row to ``max_length`` (the official PAD_MAX) instead of to the longest.
        length_bucket: when > 0 (and not ``pad_to_max``), pad to ``bucketed_length`` of the longest row
            instead: a few prompt lengths, each a function of the prompts alone (see ``bucketed_length``).

    Returns:
        TokenizedPrompts with T = ``max_length`` if ``pad_to_max``, else the longest row (bucketed).
    """
    if not prompts:
        raise ValueError("tokenize_prompts needs at least one prompt")
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("a fast tokenizer is required (char_to_token and offsets)")
    encoding = tokenizer(
        [prompt.caption for prompt in prompts],
        max_length=max_length,
        truncation=True,
        padding="max_length" if pad_to_max else "longest",
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
    )  # lists, made tensors below through numpy: 2.5 against 9-11 ms for 16 prompts of 256 tokens with "pt"
    arrays = {
        name: np.asarray(encoding[name], dtype=np.int64)
        for name in ("input_ids", "attention_mask", "offset_mapping", "special_tokens_mask")
    }
    filled, truncated, unmapped = [], [], []
    for row, prompt in enumerate(prompts):
        cut_at = _truncation_char(tokenizer, arrays, row, prompt.caption, max_length)
        indices, cut, lost = _phrase_tokens(lambda c, r=row: encoding.char_to_token(r, c), prompt, cut_at)
        filled.append(Prompt(prompt.caption, prompt.spans, prompt.phrase_ids, indices))
        truncated.append(cut)
        unmapped.append(lost)
    _log_dropped(truncated, unmapped, max_length)
    input_ids, attention_mask, offsets = (
        torch.from_numpy(arrays[name]) for name in ("input_ids", "attention_mask", "offset_mapping")
    )
    if length_bucket > 0 and not pad_to_max:
        extra = bucketed_length(input_ids.shape[1], length_bucket, max_length) - input_ids.shape[1]
        pad_id = tokenizer.pad_token_id or 0  # as the tokenizer pads: [PAD], mask 0, offsets (0, 0)
        input_ids = torch.nn.functional.pad(input_ids, (0, extra), value=pad_id)
        attention_mask = torch.nn.functional.pad(attention_mask, (0, extra))
        offsets = torch.nn.functional.pad(offsets, (0, 0, 0, extra))
    return TokenizedPrompts(
        prompts=tuple(filled),
        input_ids=input_ids,
        attention_mask=attention_mask,
        offsets=offsets,
        truncated=tuple(truncated),
        unmapped=tuple(unmapped),
    )


def bucketed_length(tokens: int, bucket: int, limit: int = MAX_QUERY_TOKENS) -> int:
    """The padded length of a prompt of ``tokens`` tokens: the smallest ``bucket * 2**k`` (k >= 0) that holds
    it, at most ``limit``: a compiled or graphed model meets only a few prompt lengths (``Teacher.batch_key``),
    and short captions (the bench's crawl: 15.7 tokens on average) pad to 32 instead of the official 256."""
    if bucket < 1:
        raise ValueError(f"a token bucket must be >= 1, got {bucket}")
    length = bucket
    while length < tokens:
        length *= 2
    return min(length, max(limit, tokens))


def phrase_token_indices(tokenized: TokenizedPrompts, prompt_index: int | None = None) -> list[list[int]]:
    """Token positions of every phrase (the official ``positive_map_label_to_token``, label = row + 1).

    Args:
        tokenized: output of ``tokenize_prompts``.
        prompt_index: one prompt's phrases, or ``None`` for the phrases of all prompts in batch order.
    """
    prompts = tokenized.prompts if prompt_index is None else (tokenized.prompts[prompt_index],)
    return [list(row) for prompt in prompts for row in prompt.token_indices or ()]


def positive_map(tokenized: TokenizedPrompts, prompt_index: int | None = None) -> torch.Tensor:
    """Binary phrase-to-token map, what the model and the loss use.

    Returns:
        ``[P, T]`` float32 of 0/1, P = phrases of ``prompt_index`` (or of all prompts, concatenated in batch
        order like the official collator), T = ``tokenized.num_tokens``.
    """
    rows = phrase_token_indices(tokenized, prompt_index)
    result = torch.zeros(len(rows), tokenized.num_tokens, dtype=torch.float32)
    for row, indices in enumerate(rows):
        result[row, indices] = 1.0
    return result


def normalized_positive_map(tokenized: TokenizedPrompts, prompt_index: int | None = None) -> torch.Tensor:
    """Row-normalised map as the official ``create_positive_map`` returns it.

    Returns:
        ``[P, T]`` float32, each row divided by (row sum + 1e-6); empty rows stay zero.
    """
    binary = positive_map(tokenized, prompt_index)
    return binary / (binary.sum(dim=-1, keepdim=True) + NORMALIZE_EPS)


def split_into_prompts(
    names: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    max_tokens: int = MAX_QUERY_TOKENS,
    separator: str = DETECTION_SEPARATOR,
) -> list[Prompt]:
    """Split a category vocabulary into detection prompts that each fit in ``max_tokens``.

    Names are packed greedily in order; each prompt's ``phrase_ids`` are indices into ``names``, so every
    name appears exactly once across the prompts.

    Raises:
        ValueError: a name alone does not fit in ``max_tokens`` (with [CLS]/[SEP]).
    """
    counts = _token_counts(tokenizer, names)
    separator_tokens = _token_counts(tokenizer, [separator])[0]
    special = tokenizer.num_special_tokens_to_add()
    chunks: list[list[int]] = []
    used = special
    for index, count in enumerate(counts):
        if special + count > max_tokens:
            raise ValueError(
                f"category {index} {names[index]!r} alone needs {special + count} tokens > {max_tokens}"
            )
        cost = count + separator_tokens if chunks and chunks[-1] else count
        if not chunks or used + cost > max_tokens:
            chunks.append([])
            used, cost = special, count
        chunks[-1].append(index)
        used += cost
    prompts = [caption_from_phrases([names[i] for i in chunk], separator, chunk) for chunk in chunks]
    for prompt in prompts:
        _require_fits(tokenizer, prompt, max_tokens)
    return prompts


def chunk_caption_phrases(
    caption: str,
    spans: Sequence[Span | Sequence[Span]],
    tokenizer: PreTrainedTokenizerBase,
    max_tokens: int = MAX_QUERY_TOKENS,
) -> list[Prompt]:
    """Split a caption too long for ``max_tokens`` into windows that never cut a phrase or a word.

    Windows are contiguous pieces of the caption, each at most ``max_tokens`` tokens with [CLS]/[SEP],
    filled greedily; every phrase (all of its spans) lies wholly inside one window. Windows that hold no
    phrase are not returned.

    Args:
        caption: the full caption.
        spans: per phrase one ``(start, end)`` or a list of them, char offsets into ``caption``.

    Returns:
        sub-prompts in caption order; spans are re-based to the window, ``phrase_ids`` are the phrases'
        indices in ``spans``.

    Raises:
        ValueError: a phrase or a single word is longer than a window.
    """
    whole = Prompt.from_caption(caption, spans)
    encoding = tokenizer(caption, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    starts = [start for start, _ in encoding["offset_mapping"]]
    extents = [(min(s for s, _ in phrase), max(e for _, e in phrase)) for phrase in whole.spans]
    allowed = _allowed_cuts(starts, encoding.word_ids(), extents, len(caption))
    capacity = max_tokens - tokenizer.num_special_tokens_to_add()
    cuts = _greedy_cuts(allowed, len(starts), capacity)
    bounds = [0, *(starts[k] for k in cuts), len(caption)]
    return _window_prompts(whole, extents, bounds)


def sample_detection_prompt(
    positive_names: Sequence[str],
    all_names: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    rng: RandomSource,
    max_negatives: int = 85,
    max_tokens: int = MAX_QUERY_TOKENS,
    separator: str = DETECTION_SEPARATOR,
) -> DetectionPromptSample:
    """The official training prompt for a detection image: positives and sampled negatives, shuffled.

    Half of the time ``min(max_negatives, #non-positive names)`` negatives are drawn, otherwise a uniform
    number in ``1..that`` (official CONTROL_PROB (0, 0, 0.5, 0)). The prompt never exceeds ``max_tokens``
    with [CLS]/[SEP]: negatives are dropped first; if the positives alone do not fit, the ones that do not
    (in shuffled order) are dropped and reported.

    Args:
        positive_names: names of the categories present in the image (repeats allowed).
        all_names: the whole vocabulary, unique names; ``prompt.phrase_ids`` index it.
        rng: ``random.Random`` or ``numpy.random.Generator``; the result is a function of its state.
    """
    if not isinstance(rng, random.Random | np.random.Generator):
        raise TypeError(f"rng must be random.Random or numpy.random.Generator, got {type(rng).__name__}")
    index = _name_index(all_names)
    positives = list(dict.fromkeys(positive_names))
    unknown = [name for name in positives if name not in index]
    if unknown:
        raise ValueError(f"positive names not in all_names: {unknown[:5]}")
    budget = _TokenBudget(tokenizer, max_tokens, separator)
    positives = _shuffled(rng, positives)
    kept_positives = budget.take_prefix(positives)
    positive_set = set(positives)
    pool = [name for name in all_names if name not in positive_set]
    negatives = _sample(rng, pool, _num_negatives(rng, max_negatives, len(pool)))
    chosen = _shuffled(rng, kept_positives + budget.take_prefix(negatives))
    prompt = caption_from_phrases(chosen, separator, [index[name] for name in chosen])
    _require_fits(tokenizer, prompt, max_tokens)
    dropped = tuple(positives[len(kept_positives) :])
    if dropped:
        logger.info("dropped %d positive categories that do not fit in %d tokens", len(dropped), max_tokens)
    return DetectionPromptSample(prompt=prompt, dropped_positives=dropped)


def with_negative_phrases(
    prompt: Prompt,
    pool: Sequence[str],
    rng: RandomSource,
    max_negatives: int,
    separator: str = DETECTION_SEPARATOR,
) -> Prompt:
    """A grounding prompt with negative phrases from ``pool`` appended after its caption (DetCLIP's negative
    concepts; the prompt-level counterpart of GLIPv2's inter-image negatives): ``caption. n1. n2``.

    The number drawn follows the detection prompts (``sample_detection_prompt``). The caption and its spans
    are unchanged; each negative gets a phrase of its own (phrase id -1), so its tokens are negatives of every
    box's token targets. Negatives placed past the token limit are truncated away by ``tokenize_prompts``,
    never the caption's phrases.

    Args:
        pool: candidate phrases, already screened against the caption (none may name what it names).
    """
    if not pool or max_negatives <= 0:
        return prompt
    chosen = _sample(rng, pool, _num_negatives(rng, max_negatives, len(pool)))
    caption = prompt.caption
    spans = list(prompt.spans)
    for phrase in chosen:
        if not phrase.strip():
            raise ValueError(f"negative phrase {phrase!r} is blank")
        caption += separator
        spans.append(((len(caption), len(caption) + len(phrase)),))
        caption += phrase
    return Prompt(caption=caption, spans=tuple(spans), phrase_ids=prompt.phrase_ids + (-1,) * len(chosen))


# ----------------------------------------------------------------------------------------------------------
# span -> token mapping


def _phrase_tokens(
    char_to_token: Callable[[int], int | None], prompt: Prompt, cut_at: int | None
) -> tuple[tuple[tuple[int, ...], ...], tuple[int, ...], tuple[int, ...]]:
    """Token positions per phrase, and the phrase positions lost to truncation / mapped to nothing."""
    indices, truncated, unmapped = [], [], []
    for position, phrase in enumerate(prompt.spans):
        tokens: set[int] = set()
        was_cut = False
        for start, end in phrase:
            if cut_at is not None and prompt.caption[max(start, cut_at) : end].strip():
                was_cut = True
                continue
            bounds = _span_token_bounds(char_to_token, start, end, len(prompt.caption))
            if bounds is not None:
                tokens.update(range(bounds[0], bounds[1] + 1))
        indices.append(tuple(sorted(tokens)))
        if was_cut:
            truncated.append(position)
        elif not tokens:
            unmapped.append(position)
    return tuple(indices), tuple(truncated), tuple(unmapped)


def _span_token_bounds(
    char_to_token: Callable[[int], int | None], start: int, end: int, caption_length: int
) -> tuple[int, int] | None:
    """First and last token of a char span, with the official whitespace fallbacks (None if unmapped)."""
    first = _first_mapped(char_to_token, (start, start + 1, start + 2), caption_length)
    last = _first_mapped(char_to_token, (end - 1, end - 2, end - 3), caption_length)
    if first is None or last is None:
        return None
    return first, last


def _first_mapped(
    char_to_token: Callable[[int], int | None], chars: Sequence[int], caption_length: int
) -> int | None:
    for char in chars:
        # The official fallbacks can step outside the caption; char_to_token raises on negative input.
        if 0 <= char < caption_length:
            token = char_to_token(char)
            if token is not None:
                return token
    return None


def _truncation_char(
    tokenizer: PreTrainedTokenizerBase,
    encoding: dict[str, np.ndarray],
    row: int,
    caption: str,
    max_length: int,
) -> int | None:
    """Char offset where truncation cut the caption, or None when every token was kept (``encoding``: the
    tokenizer's batch as arrays)."""
    if int(encoding["attention_mask"][row].sum()) < max_length:
        return None
    content = encoding["special_tokens_mask"][row] == 0
    content &= encoding["attention_mask"][row] == 1
    ends = encoding["offset_mapping"][row][content, 1]
    cut_at = int(ends.max()) if len(ends) else 0
    # A row exactly max_length long may hold the whole caption: only later tokens mean truncation.
    rest = tokenizer(caption[cut_at:], add_special_tokens=False)["input_ids"]
    return cut_at if rest else None


def _log_dropped(
    truncated: Sequence[tuple[int, ...]], unmapped: Sequence[tuple[int, ...]], max_length: int
) -> None:
    num_truncated = sum(len(row) for row in truncated)
    num_unmapped = sum(len(row) for row in unmapped)
    if num_truncated:
        logger.warning(
            "%d phrase(s) lie past the %d-token limit and get no tokens", num_truncated, max_length
        )
    if num_unmapped:
        logger.warning("%d phrase(s) cover no token (blank or discarded characters)", num_unmapped)


# ----------------------------------------------------------------------------------------------------------
# prompt construction helpers


def _as_span_list(entry: Span | Sequence[Span]) -> tuple[Span, ...]:
    """One ``(start, end)`` or a list of them -> tuple of spans."""
    if len(entry) == 2 and all(isinstance(value, int | np.integer) for value in entry):
        return ((int(entry[0]), int(entry[1])),)
    return tuple((int(s), int(e)) for s, e in entry)


def _check_spans(phrase: Sequence[Span], caption_length: int) -> None:
    if not phrase:
        raise ValueError("every phrase needs at least one span")
    for start, end in phrase:
        if not 0 <= start < end <= caption_length:
            raise ValueError(
                f"span ({start}, {end}) is not a non-empty range of a {caption_length}-char caption"
            )


def _token_counts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[int]:
    """Tokens of each text without [CLS]/[SEP]."""
    if not texts:
        return []
    ids = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return [len(row) for row in ids]


def _require_fits(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, max_tokens: int) -> None:
    """Check the real token count: packing adds token counts, which holds for WordPiece (BERT) only."""
    count = len(tokenizer(prompt.caption, verbose=False)["input_ids"])
    if count > max_tokens:
        raise ValueError(
            f"prompt needs {count} tokens > {max_tokens}: this tokenizer does not tokenize a joined "
            "prompt as the sum of its pieces (a WordPiece/BERT tokenizer is expected)"
        )


class _TokenBudget:
    """Running token count of a detection prompt being built, [CLS]/[SEP] included."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_tokens: int, separator: str) -> None:
        self._tokenizer = tokenizer
        self._max_tokens = max_tokens
        self._separator_tokens = _token_counts(tokenizer, [separator])[0]
        self._used = tokenizer.num_special_tokens_to_add()
        self._num_phrases = 0

    def take_prefix(self, names: Sequence[str]) -> list[str]:
        """Add names in order until one does not fit (the official screening stops there too)."""
        kept: list[str] = []
        for name, count in zip(names, _token_counts(self._tokenizer, names)):
            cost = count + (self._separator_tokens if self._num_phrases else 0)
            if self._used + cost > self._max_tokens:
                break
            self._used += cost
            self._num_phrases += 1
            kept.append(name)
        return kept


def _name_index(names: Sequence[str]) -> dict[str, int]:
    index = {name: position for position, name in enumerate(names)}
    if len(index) != len(names):
        raise ValueError("all_names must be unique")
    return index


def _num_negatives(rng: RandomSource, max_negatives: int, pool_size: int) -> int:
    full = min(max_negatives, pool_size)
    if _uniform(rng) < FULL_NEGATIVES_PROBABILITY:
        return full
    return min(_randint(rng, 1, max(1, full)), full)


# ----------------------------------------------------------------------------------------------------------
# caption windows


def _allowed_cuts(
    starts: Sequence[int], word_ids: Sequence[int | None], extents: Sequence[Span], caption_length: int
) -> list[int]:
    """Token indices k where a window may start: a new word, and no phrase spans across starts[k]."""
    inside = np.zeros(caption_length + 2, dtype=np.int64)
    for start, end in extents:
        # Char positions strictly inside (start, end) must not become a window boundary.
        inside[start + 1] += 1
        inside[end] -= 1
    covered = np.cumsum(inside)
    return [k for k in range(1, len(starts)) if word_ids[k] != word_ids[k - 1] and covered[starts[k]] == 0]


def _greedy_cuts(allowed: Sequence[int], num_tokens: int, capacity: int) -> list[int]:
    """Window start tokens (after the first window) so that each window holds at most ``capacity``."""
    if capacity < 1:
        raise ValueError(f"max_tokens leaves no room for content tokens (capacity {capacity})")
    cuts: list[int] = []
    start = 0
    while num_tokens - start > capacity:
        position = bisect.bisect_right(allowed, start + capacity) - 1
        if position < 0 or allowed[position] <= start:
            raise ValueError(
                f"tokens {start}..{start + capacity} hold no allowed cut: a phrase or word is longer "
                f"than {capacity} tokens"
            )
        start = allowed[position]
        cuts.append(start)
    return cuts


def _window_prompts(whole: Prompt, extents: Sequence[Span], bounds: Sequence[int]) -> list[Prompt]:
    """Sub-prompts of ``whole`` for the char windows ``[bounds[i], bounds[i+1])`` that hold phrases."""
    prompts = []
    for begin, end in zip(bounds[:-1], bounds[1:]):
        members = [p for p, (s, e) in enumerate(extents) if begin <= s and e <= end]
        if not members:
            continue
        spans = [[(s - begin, e - begin) for s, e in whole.spans[p]] for p in members]
        prompts.append(Prompt.from_caption(whole.caption[begin:end], spans, members))
    return prompts


# ----------------------------------------------------------------------------------------------------------
# random sources: random.Random and numpy Generator give the same kind of draws


def _uniform(rng: RandomSource) -> float:
    if isinstance(rng, np.random.Generator):
        return float(rng.random())
    return rng.random()


def _randint(rng: RandomSource, low: int, high: int) -> int:
    """Uniform integer in ``[low, high]``."""
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(low, high + 1))
    return rng.randint(low, high)


def _shuffled(rng: RandomSource, items: Sequence[str]) -> list[str]:
    if isinstance(rng, np.random.Generator):
        return [items[i] for i in rng.permutation(len(items))]
    result = list(items)
    rng.shuffle(result)
    return result


def _sample(rng: RandomSource, items: Sequence[str], count: int) -> list[str]:
    """``count`` distinct items in random order."""
    if isinstance(rng, np.random.Generator):
        return [items[i] for i in rng.choice(len(items), size=count, replace=False)]
    return rng.sample(list(items), count)
