"""Text encoder: golden comparison with the official GLIP language backbone, and the offline MiniLM-L6."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import BertTokenizerFast

from glip.text import TextEncoder, minilm_path


@pytest.mark.golden
def test_language_backbone_matches_official(
    reference_case1: dict, official_text_encoder: TextEncoder
) -> None:
    inputs, expected = reference_case1["inputs"], reference_case1["outputs"]
    with torch.no_grad():
        text = official_text_encoder(inputs["input_ids"], inputs["attention_mask"])
    torch.testing.assert_close(text.hidden, expected["language_backbone.hidden"], atol=1e-4, rtol=0)
    torch.testing.assert_close(text.embedded, expected["language_backbone.embedded"], atol=1e-4, rtol=0)
    torch.testing.assert_close(text.aggregate, expected["language_backbone.aggregate"], atol=1e-4, rtol=0)
    assert torch.equal(text.attention_mask, expected["language_backbone.masks"])


@pytest.mark.golden
def test_batch_padding_does_not_change_real_tokens(
    reference_case1: dict, official_text_encoder: TextEncoder
) -> None:
    """Official prompts are padded to 256; shorter batch padding must give the same real-token features."""
    inputs, encoder = reference_case1["inputs"], official_text_encoder
    length = int(inputs["attention_mask"].sum())
    with torch.no_grad():
        full = encoder(inputs["input_ids"], inputs["attention_mask"])
        short = encoder(inputs["input_ids"][:, : length + 3], inputs["attention_mask"][:, : length + 3])
    torch.testing.assert_close(short.hidden[:, :length], full.hidden[:, :length], atol=1e-5, rtol=0)
    torch.testing.assert_close(short.aggregate, full.aggregate, atol=1e-5, rtol=0)


def test_outputs_follow_the_mask(small_text_encoder) -> None:
    torch.manual_seed(0)
    encoder = small_text_encoder().eval()
    input_ids = torch.tensor([[101, 1037, 2417, 102, 0, 0], [101, 1037, 2417, 4418, 1012, 102]])
    attention_mask = (input_ids != 0).long()
    with torch.no_grad():
        text = encoder(input_ids, attention_mask)
    assert text.hidden.shape == (2, 6, 32) and text.aggregate.shape == (2, 32)
    assert encoder.hidden_size == 32
    assert text.hidden[0, 4:].abs().sum() > 0, "hidden is not masked (as the official)"
    assert torch.equal(text.embedded[0, 4:], torch.zeros(2, 32))
    torch.testing.assert_close(text.aggregate[0], text.hidden[0, :4].mean(0))
    torch.testing.assert_close(text.aggregate[1], text.hidden[1].mean(0))
    assert encoder.bert.config._attn_implementation == "eager"


def test_minilm_loads_offline_from_the_package() -> None:
    folder = minilm_path()
    assert (folder / "config.json").is_file() and (folder / "vocab.txt").is_file()
    encoder = TextEncoder.from_pretrained(folder).eval()
    assert encoder.hidden_size == 384
    assert encoder.bert.config.num_hidden_layers == 6 and encoder.bert.config.num_attention_heads == 12

    # The pretrained weights, not a random init: a parameter equals the shipped file's tensor.
    shipped = load_file(folder / "model.safetensors")
    name = "encoder.layer.5.output.dense.weight"
    assert torch.equal(encoder.bert.state_dict()[name], shipped[name])

    # transformers 5: BertTokenizerFast(vocab_file=...) silently builds a wrong vocabulary; load the folder.
    tokenizer = BertTokenizerFast.from_pretrained(folder)
    assert tokenizer("a red circle")["input_ids"] == [101, 1037, 2417, 4418, 102]  # bert-base-uncased ids
    sentences = ["a red circle", "a red disc", "quarterly stock market earnings report"]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        text = encoder(batch["input_ids"], batch["attention_mask"])
    assert torch.isfinite(text.hidden).all()
    embedding = F.normalize(text.aggregate, dim=-1)
    similar, unrelated = embedding[0] @ embedding[1], embedding[0] @ embedding[2]
    assert similar > unrelated + 0.2, (float(similar), float(unrelated))
