"""Prompts and positive maps on the real bert-base-uncased WordPiece vocabulary (offline MiniLM-L6)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from glip.pretrained import minilm_path
from glip.prompts import (
    Prompt,
    caption_from_phrases,
    chunk_caption_phrases,
    clean_category_name,
    normalized_positive_map,
    phrase_token_indices,
    positive_map,
    sample_detection_prompt,
    split_into_prompts,
    tokenize_prompts,
)

REFERENCE_CAPTION = "a red circle. a blue square. a green triangle."


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path())


def token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, verbose=False)["input_ids"])


def lvis_like_names(count: int = 1203) -> list[str]:
    """Unique category names shaped like LVIS: multi-word, some with "_(...)" and some long."""
    adjectives = [
        "red",
        "wooden",
        "electric",
        "folding",
        "stuffed",
        "antique",
        "hard",
        "paper",
        "baby",
        "sea",
    ]
    nouns = [
        "chair", "tyrannosaurus", "snowboarder", "hippopotamus", "kettle", "windshield wiper", "bottle cap",
        "saxophone", "chandelier", "parakeet", "trampoline", "cufflink", "harmonica", "wheelbarrow",
        "pomegranate", "stethoscope", "clothes hamper", "thermos bottle", "vending machine", "zucchini",
    ]  # fmt: skip
    generator = random.Random(1203)
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < count:
        words = generator.sample(adjectives, generator.randint(0, 2)) + [generator.choice(nouns)]
        raw = "_".join(words) + f"_{len(names)}"
        if len(names) % 7 == 0:
            raw += "_(" + generator.choice(["food", "weapon", "sports equipment"]) + ")"
        if len(names) % 101 == 0:
            raw += "_" + "_".join(generator.choice(nouns) for _ in range(8))
        name = clean_category_name(raw)
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


# ------------------------------------------------------------------------------------------------------
# reference case


def test_reference_caption_matches_official(tokenizer, reference: Path, reference_case1: dict):
    meta, inputs = reference_case1["meta"], reference_case1["inputs"]
    targets = load_file(reference / "tiny" / "loss_case1" / "targets.safetensors")
    prompt = Prompt.from_caption(meta["caption"], meta["tokens_positive"])
    tokenized = tokenize_prompts(tokenizer, [prompt], pad_to_max=True)

    assert tokenized.input_ids.dtype == torch.int64 and tokenized.input_ids.shape == (1, 256)
    assert torch.equal(tokenized.input_ids, inputs["input_ids"])
    assert torch.equal(tokenized.attention_mask, inputs["attention_mask"])
    assert tokenizer.convert_ids_to_tokens(tokenized.input_ids[0, :14].tolist()) == meta["tokens"]
    expected = [meta["positive_map_label_to_token"][str(label)] for label in (1, 2, 3)]
    assert phrase_token_indices(tokenized) == expected
    assert torch.equal(positive_map(tokenized), targets["positive_map"])
    assert torch.equal(normalized_positive_map(tokenized), inputs["positive_map"])
    assert torch.equal(normalized_positive_map(tokenized), targets["positive_map_normalized"])
    assert tokenized.truncated == ((),) and tokenized.unmapped == ((),)


def test_detection_form_of_reference_phrases(tokenizer):
    prompt = caption_from_phrases(["a red circle", "a blue square", "a green triangle"])
    assert prompt.caption == "a red circle. a blue square. a green triangle"
    assert prompt.spans == (((0, 12),), ((14, 27),), ((29, 45),))
    assert prompt.phrase_texts() == ["a red circle", "a blue square", "a green triangle"]
    tokenized = tokenize_prompts(tokenizer, [prompt])
    assert phrase_token_indices(tokenized) == [[1, 2, 3], [5, 6, 7], [9, 10, 11]]
    assert tokenized.num_tokens == 13  # no trailing "." token


# ------------------------------------------------------------------------------------------------------
# span -> token mapping


def phrase_pieces(tokenizer, tokenized, row: int = 0) -> list[list[str]]:
    ids = tokenized.input_ids[row].tolist()
    rows = phrase_token_indices(tokenized, row)
    return [[tokenizer.convert_ids_to_tokens(ids[t]) for t in indices] for indices in rows]


def test_multi_piece_words(tokenizer):
    caption = "a snowboarder jumps over a tyrannosaurus rex"
    prompt = Prompt.from_caption(caption, [(2, 13), (27, 44), (2, 19)])
    tokenized = tokenize_prompts(tokenizer, [prompt])
    assert phrase_pieces(tokenizer, tokenized) == [
        ["snow", "##board", "##er"],
        ["ty", "##ran", "##nos", "##aurus", "rex"],
        ["snow", "##board", "##er", "jumps"],
    ]
    assert phrase_token_indices(tokenized) == [[2, 3, 4], [8, 9, 10, 11, 12], [2, 3, 4, 5]]


def test_repeated_phrase_maps_to_its_own_tokens(tokenizer):
    caption = "a dog chases a dog"
    first, second = (0, 5), (13, 18)
    assert caption[slice(*first)] == caption[slice(*second)] == "a dog"
    tokenized = tokenize_prompts(tokenizer, [Prompt.from_caption(caption, [first, second])])
    assert phrase_token_indices(tokenized) == [[1, 2], [4, 5]]
    binary = positive_map(tokenized)
    assert binary.sum(dim=1).tolist() == [2.0, 2.0] and (binary[0] * binary[1]).sum() == 0


def test_one_phrase_with_two_spans(tokenizer):
    caption = "the man, who wears a hat, smiles"
    prompt = Prompt.from_caption(caption, [[(0, 7), (26, 32)]])
    tokenized = tokenize_prompts(tokenizer, [prompt])
    assert phrase_pieces(tokenizer, tokenized) == [["the", "man", "smiles"]]


def test_punctuation_and_unicode(tokenizer):
    caption = "Café crème, (naïve) résumé! 🙂 near 日本 — ok?"
    phrases = ["Café crème", "naïve", "résumé", "🙂", "日本"]
    spans = [(caption.index(p), caption.index(p) + len(p)) for p in phrases]
    tokenized = tokenize_prompts(tokenizer, [Prompt.from_caption(caption, spans)])
    expected = [["cafe", "cr", "##eme"], ["naive"], ["resume"], ["[UNK]"], ["日", "本"]]
    assert phrase_pieces(tokenizer, tokenized) == expected
    assert tokenized.unmapped == ((),)


def test_whitespace_fallbacks_follow_official(tokenizer):
    caption = "look:  a  big dog  here"
    # Spans starting/ending on up to two spaces are rescued by the beg+1/+2 and end-2/-3 fallbacks.
    tokenized = tokenize_prompts(tokenizer, [Prompt.from_caption(caption, [(5, 16), (7, 18)])])
    assert phrase_pieces(tokenizer, tokenized) == [["a", "big", "dog"], ["a", "big", "dog"]]


def test_blank_span_is_reported_unmapped(tokenizer):
    caption = "a dog   cat"
    tokenized = tokenize_prompts(tokenizer, [Prompt.from_caption(caption, [(2, 5), (5, 8)])])
    assert tokenized.unmapped == ((1,),) and tokenized.truncated == ((),)
    assert positive_map(tokenized)[1].sum() == 0


def test_invalid_spans_raise():
    with pytest.raises(ValueError):
        Prompt.from_caption("a dog", [(3, 9)])
    with pytest.raises(ValueError):
        Prompt.from_caption("a dog", [(2, 2)])
    with pytest.raises(ValueError):
        caption_from_phrases(["dog", "  "])


# ------------------------------------------------------------------------------------------------------
# truncation at 256 tokens


def filler_caption(filler_words: int, tail: str) -> str:
    return "dog " * filler_words + tail


def test_phrase_ending_on_last_kept_token_is_kept(tokenizer):
    # [CLS] + 253 x dog (1..253) + "red" (254) + "ball" (255, cut: [SEP] takes position 255).
    caption = filler_caption(253, "red ball on grass")
    red = caption.index("red")
    spans = [(red, red + 3), (red + 4, red + 8), (red, red + 8), (red + 9, len(caption))]
    tokenized = tokenize_prompts(tokenizer, [Prompt.from_caption(caption, spans)], pad_to_max=True)
    assert tokenized.input_ids.shape == (1, 256) and tokenized.attention_mask.sum() == 256
    assert tokenized.input_ids[0, 254] == tokenizer.convert_tokens_to_ids("red")
    assert phrase_token_indices(tokenized) == [[254], [], [], []]
    assert tokenized.truncated == ((1, 2, 3),)
    assert positive_map(tokenized).sum(dim=1).tolist() == [1.0, 0.0, 0.0, 0.0]


def test_caption_of_exactly_256_tokens_is_not_truncated(tokenizer):
    caption = filler_caption(253, "red")
    assert token_count(tokenizer, caption) == 256
    prompt = Prompt.from_caption(caption, [(len(caption) - 3, len(caption))])
    tokenized = tokenize_prompts(tokenizer, [prompt])
    assert tokenized.num_tokens == 256 and tokenized.truncated == ((),)
    assert phrase_token_indices(tokenized) == [[254]]


def test_truncation_inside_a_word_is_reported(tokenizer):
    caption = filler_caption(253, "snowboarder")  # snow (254) | ##board ##er cut
    prompt = Prompt.from_caption(caption, [(len(caption) - 11, len(caption))])
    tokenized = tokenize_prompts(tokenizer, [prompt])
    assert tokenized.truncated == ((0,),) and phrase_token_indices(tokenized) == [[]]


# ------------------------------------------------------------------------------------------------------
# batches


def test_batch_pads_to_longest_or_to_max(tokenizer):
    short = caption_from_phrases(["cat"])
    long = caption_from_phrases(["snowboarder", "red kettle", "dog"])
    longest = tokenize_prompts(tokenizer, [short, long])
    assert longest.num_tokens == 10
    assert longest.attention_mask.sum(dim=1).tolist() == [3, 10]
    assert longest.input_ids[0, 3:].eq(0).all() and longest.offsets.shape == (2, 10, 2)
    assert positive_map(longest).shape == (4, 10)
    assert positive_map(longest, prompt_index=1).shape == (3, 10)
    assert phrase_token_indices(longest, prompt_index=1) == [[1, 2, 3], [5, 6], [8]]
    padded = tokenize_prompts(tokenizer, [short, long], pad_to_max=True)
    assert padded.num_tokens == 256 and positive_map(padded).shape == (4, 256)
    assert torch.equal(padded.input_ids[:, :10], longest.input_ids)
    assert torch.equal(positive_map(padded)[:, :10], positive_map(longest))
    offsets = longest.offsets[1, 1].tolist()
    assert long.caption[offsets[0] : offsets[1]] == "snow"
    # Bucketed: the batch pads to the smallest 8 * 2**k holding its longest row, padded as the tokenizer pads.
    bucketed = tokenize_prompts(tokenizer, [short, long], length_bucket=8)
    assert bucketed.num_tokens == 16 and bucketed.input_ids[:, 10:].eq(0).all()
    assert bucketed.attention_mask[:, 10:].eq(0).all() and bucketed.offsets[:, 10:].eq(0).all()
    assert torch.equal(bucketed.input_ids[:, :10], longest.input_ids)
    assert torch.equal(bucketed.offsets[:, :10], longest.offsets)
    assert bucketed.prompts == longest.prompts
    assert tokenize_prompts(tokenizer, [short], length_bucket=8).num_tokens == 8
    assert tokenize_prompts(tokenizer, [short, long], pad_to_max=True, length_bucket=8).num_tokens == 256


def test_bucketed_lengths():
    from glip.prompts import bucketed_length

    assert [bucketed_length(n, 32) for n in (1, 32, 33, 64, 65, 129, 256)] == [32, 32, 64, 64, 128, 256, 256]
    assert [bucketed_length(n, 48, 200) for n in (3, 49, 97, 193)] == [48, 96, 192, 200]
    with pytest.raises(ValueError):
        bucketed_length(5, 0)


def test_normalized_map_rows(tokenizer):
    tokenized = tokenize_prompts(tokenizer, [caption_from_phrases(["snowboarder", "dog"])])
    normalized = normalized_positive_map(tokenized)
    assert torch.allclose(normalized.sum(dim=1), torch.tensor([1.0, 1.0]), atol=1e-5)
    assert normalized[0, 1].item() == pytest.approx(1 / 3, rel=1e-5)


# ------------------------------------------------------------------------------------------------------
# vocabularies larger than one prompt


def test_clean_category_name():
    assert clean_category_name("bow_(weapon)") == "bow"
    assert clean_category_name("traffic_light") == "traffic light"
    assert clean_category_name("hair  dryer ") == "hair dryer"
    assert clean_category_name("Bible") == "Bible"


def test_lvis_sized_vocabulary_splits_into_fitting_prompts(tokenizer):
    names = lvis_like_names()
    assert len(names) == 1203 and len(set(names)) == 1203
    prompts = split_into_prompts(names, tokenizer)
    assert len(prompts) > 1
    assert [i for p in prompts for i in p.phrase_ids] == list(range(1203))
    for number, prompt in enumerate(prompts):
        count = token_count(tokenizer, prompt.caption)
        assert count <= 256
        assert prompt.phrase_texts() == [names[i] for i in prompt.phrase_ids]
        if number + 1 < len(prompts):  # greedy: the next name would not have fitted
            next_name = names[prompts[number + 1].phrase_ids[0]]
            assert token_count(tokenizer, prompt.caption + ". " + next_name) > 256
    tokenized = tokenize_prompts(tokenizer, prompts, pad_to_max=True)
    assert tokenized.truncated == tuple(() for _ in prompts) and tokenized.unmapped == tokenized.truncated
    assert all(len(row) > 0 for row in phrase_token_indices(tokenized))


def test_name_too_long_for_one_prompt_raises(tokenizer):
    with pytest.raises(ValueError, match="alone needs"):
        split_into_prompts(["dog", "tyrannosaurus " * 70], tokenizer)


def test_small_limit_splits_at_every_name(tokenizer):
    prompts = split_into_prompts(["snowboarder", "dog", "red kettle"], tokenizer, max_tokens=5)
    assert [p.caption for p in prompts] == ["snowboarder", "dog", "red kettle"]
    assert [p.phrase_ids for p in prompts] == [(0,), (1,), (2,)]


def long_caption() -> tuple[str, list[tuple[int, int]]]:
    """~900-token caption and noun-phrase spans, some multi-word and multi-piece."""
    generator = random.Random(7)
    subjects = ["a snowboarder", "the old tyrannosaurus skeleton", "two red kettles", "a hippopotamus"]
    caption, spans = "", []
    for number in range(80):
        subject = generator.choice(subjects)
        spans.append((len(caption), len(caption) + len(subject)))
        caption += subject + " stands near "
        obj = f"stethoscope number {number}"
        spans.append((len(caption), len(caption) + len(obj)))
        caption += obj + ". "
    return caption, spans


def test_long_caption_chunks_never_cut_a_phrase(tokenizer):
    caption, spans = long_caption()
    assert token_count(tokenizer, caption) > 600
    prompts = chunk_caption_phrases(caption, spans, tokenizer, max_tokens=256)
    assert len(prompts) >= 3
    assert [i for p in prompts for i in p.phrase_ids] == list(range(len(spans)))
    full_tokens = tokenizer(caption, add_special_tokens=False)["input_ids"]
    window_tokens: list[int] = []
    for prompt in prompts:
        assert token_count(tokenizer, prompt.caption) <= 256
        assert prompt.phrase_texts() == [caption[slice(*spans[i])] for i in prompt.phrase_ids]
        window_tokens += tokenizer(prompt.caption, add_special_tokens=False)["input_ids"]
    assert window_tokens == full_tokens  # windows tile the caption at word boundaries
    tokenized = tokenize_prompts(tokenizer, prompts)
    assert all(len(row) > 0 for row in phrase_token_indices(tokenized))


def test_chunk_moves_the_cut_before_a_phrase(tokenizer):
    caption = "dog cat a big snowboarder here"
    phrase = (8, 25)  # "a big snowboarder": tokens 2..6 of the caption (dog cat a big snow ##board ##er here)
    prompts = chunk_caption_phrases(caption, [(0, 3), phrase], tokenizer, max_tokens=8)
    # The greedy cut after 6 tokens would split "snowboarder" and the phrase; the window ends at "cat ".
    assert [p.caption for p in prompts] == ["dog cat ", "a big snowboarder here"]
    assert prompts[1].spans == (((0, 17),),) and prompts[1].phrase_ids == (1,)


def test_chunk_short_caption_is_one_window(tokenizer):
    prompts = chunk_caption_phrases(REFERENCE_CAPTION, [(0, 12), (14, 27)], tokenizer)
    assert len(prompts) == 1 and prompts[0].caption == REFERENCE_CAPTION
    assert prompts[0].spans == (((0, 12),), ((14, 27),))


def test_chunk_phrase_longer_than_window_raises(tokenizer):
    caption = "a " + "very " * 20 + "big dog"
    with pytest.raises(ValueError, match="longer than"):
        chunk_caption_phrases(caption, [(0, len(caption))], tokenizer, max_tokens=10)


# ------------------------------------------------------------------------------------------------------
# training prompts for detection data


def check_sample(tokenizer, sample, positives, all_names, max_negatives, max_tokens):
    prompt = sample.prompt
    chosen = [all_names[i] for i in prompt.phrase_ids]
    assert prompt.phrase_texts() == chosen and len(set(chosen)) == len(chosen)
    negatives = [name for name in chosen if name not in positives]
    assert len(negatives) <= max_negatives
    assert set(chosen) - set(negatives) | set(sample.dropped_positives) == set(positives)
    assert token_count(tokenizer, prompt.caption) <= max_tokens
    return negatives


@pytest.mark.parametrize("make_rng", [random.Random, np.random.default_rng])
def test_sample_detection_prompt_is_deterministic(tokenizer, make_rng):
    names = lvis_like_names(300)
    positives = [names[3], names[40], names[3], names[200]]
    first = sample_detection_prompt(positives, names, tokenizer, make_rng(5))
    second = sample_detection_prompt(positives, names, tokenizer, make_rng(5))
    assert first == second
    others = {
        sample_detection_prompt(positives, names, tokenizer, make_rng(s)).prompt.caption for s in range(6)
    }
    assert len(others) > 1


def test_sample_detection_prompt_limits(tokenizer):
    names = lvis_like_names()
    positives = [names[10], names[500], names[1000]]
    counts, positive_first = [], 0
    for seed in range(60):
        sample = sample_detection_prompt(positives, names, tokenizer, random.Random(seed))
        assert sample.dropped_positives == ()
        counts.append(len(check_sample(tokenizer, sample, positives, names, 85, 256)))
        positive_first += names[sample.prompt.phrase_ids[0]] in positives
    assert max(counts) > 20 and min(counts) >= 1
    assert positive_first < 30  # shuffled together with the negatives, positives are not always first


def num_negatives(tokenizer, names, rng, max_negatives) -> int:
    sample = sample_detection_prompt(["thing 0"], names, tokenizer, rng, max_negatives=max_negatives)
    return sample.prompt.num_phrases - 1


def test_sample_detection_prompt_full_or_random_negatives(tokenizer):
    names = [f"thing {i}" for i in range(400)]
    counts = [num_negatives(tokenizer, names, np.random.default_rng(seed), 20) for seed in range(200)]
    assert max(counts) == 20 and min(counts) >= 1
    full = sum(count == 20 for count in counts)
    assert 80 <= full <= 130  # ~50% full + ~1/40 of the random half
    assert len(set(counts)) > 10  # the random half spreads over 1..20
    assert all(num_negatives(tokenizer, names, random.Random(seed), 0) == 0 for seed in range(5))


def test_sample_detection_prompt_drops_positives_that_do_not_fit(tokenizer):
    names = [f"{'hippopotamus ' * 9}{i}" for i in range(60)] + ["dog", "cat"]
    positives = names[:40]
    sample = sample_detection_prompt(positives, names, tokenizer, random.Random(0), max_tokens=256)
    kept = [names[i] for i in sample.prompt.phrase_ids if names[i] in positives]
    assert 0 < len(kept) < 40 and len(sample.dropped_positives) == 40 - len(kept)
    check_sample(tokenizer, sample, positives, names, 85, 256)


def test_sample_detection_prompt_rejects_unknown_positive(tokenizer):
    with pytest.raises(ValueError, match="not in all_names"):
        sample_detection_prompt(["unicorn"], ["dog", "cat"], tokenizer, random.Random(0))
