"""Official checkpoint import (rename table, strict) and our own safetensors format."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import replace

import pytest
import torch

from glip import checkpoint
from glip.config import from_official, glip_l, glip_t, tiny
from glip.model import build_model
from tests.conftest import reference_dir

DTYPES = {"float32": torch.float32, "int64": torch.int64}


def _manifest(name: str) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    rows = (reference_dir() / name).read_text().splitlines()[1:]
    entries = []
    for row in rows:
        key, shape, dtype = row.split("\t")[:3]
        entries.append((key, tuple(int(s) for s in shape.split("x")) if shape else (), DTYPES[dtype]))
    return entries


@pytest.mark.parametrize(
    "preset, manifest, parameters",
    [
        (glip_t, "glip_t_state_dict_keys.tsv", 231_780_222),
        (glip_l, "glip_l_state_dict_keys.tsv", 430_422_384),
    ],
)
def test_official_manifest_loads_strictly(preset, manifest, parameters):
    entries = _manifest(manifest)
    # On the meta device: every name, shape and count is checked without allocating or initialising the full
    # model (about a second for both, against ~45 s on CPU). Values are covered by the tiny reference tests.
    with torch.device("meta"):
        official = {key: torch.empty(shape, dtype=dtype) for key, shape, dtype in entries}
        model = checkpoint.import_official(official, preset())
    state = model.state_dict()
    assert len(state) == len(entries) - 1  # position_ids: a buffer only transformers < 4.31 persisted
    assert sum(p.numel() for p in model.parameters()) == parameters
    expected = {
        checkpoint.official_to_ours(key.removeprefix("module.")): (shape, dtype)
        for key, shape, dtype in entries
        if not checkpoint.OPTIONAL_OFFICIAL_KEYS.search(key.removeprefix("module."))
    }
    assert {k: (tuple(v.shape), v.dtype) for k, v in state.items()} == expected
    # ... and without position_ids (newer transformers), with optional extra keys present
    official.pop("module.language_backbone.body.model.embeddings.position_ids")
    with torch.device("meta"):
        official["module.language_backbone.body.model.pooler.dense.bias"] = torch.empty(768)
        checkpoint.import_official(official, preset())


def test_mismatched_official_checkpoint_names_the_keys(tmp_path):
    official = checkpoint.read_official_state_dict(reference_dir() / "tiny" / "state_dict.safetensors")
    broken = dict(official)
    broken.pop("rpn.head.bbox_pred.weight")
    broken["rpn.head.not_a_module.weight"] = torch.zeros(3)
    broken["rpn.head.centerness.weight"] = torch.zeros(1, 7, 1, 1)
    with pytest.raises(checkpoint.CheckpointError) as error:
        checkpoint.import_official(broken, tiny())
    message = str(error.value)
    assert "rpn.head.not_a_module.weight" in message
    assert "head.box_regression.weight" in message
    assert "head.centerness.weight" in message and "(1, 7, 1, 1)" in message


def test_pth_files_are_read_without_executing_pickles(tmp_path):
    official = checkpoint.read_official_state_dict(reference_dir() / "tiny" / "state_dict.safetensors")
    path = tmp_path / "glip_tiny.pth"
    torch.save({"model": {f"module.{k}": v for k, v in official.items()}, "iteration": 7}, path)
    model = checkpoint.import_official(path, tiny())
    assert torch.equal(model.head.token_bias, official["rpn.head.bias0"])

    marker = tmp_path / "the-payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    evil = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "payload": Payload()}, evil)
    with pytest.raises(checkpoint.CheckpointError, match=f"{evil}: not a weights-only"):
        checkpoint.read_official_state_dict(evil)
    assert not marker.exists(), "unpickling ran the payload"
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.read_official_state_dict(tmp_path / "garbage.pth")


def test_own_format_round_trip(tmp_path):
    model = build_model(tiny()).eval()
    checkpoint.save(model, tiny(), tmp_path / "ckpt")
    loaded, config = checkpoint.load(tmp_path / "ckpt")
    assert config == tiny()
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_own_format_without_text_weights_reads_the_pretrained_encoder(tmp_path):
    from glip.config import demo

    model = build_model(demo())
    checkpoint.save(model, demo(), tmp_path / "ckpt", include_text=False)
    size = (tmp_path / "ckpt" / "model.safetensors").stat().st_size
    text_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if n.startswith("text_encoder"))
    assert size < sum(v.numel() * v.element_size() for v in model.state_dict().values()) - text_bytes + 1e5
    loaded, _ = checkpoint.load(tmp_path / "ckpt")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="pretrained"):
        checkpoint.save(build_model(tiny()), tiny(), tmp_path / "bad", include_text=False)


def test_own_format_keeps_only_the_fine_tuned_top_text_layers(tmp_path):
    from safetensors.torch import load_file

    from glip.config import demo

    model = build_model(demo())
    top = model.text_encoder.top_layers(2)
    with torch.no_grad():
        for parameter in (p for layer in top for p in layer.parameters()):
            parameter.add_(0.5)
    prefixes = model.text_encoder.top_layer_prefixes(2, checkpoint.TEXT_PREFIX)
    assert prefixes == ["text_encoder.bert.encoder.layer.4.", "text_encoder.bert.encoder.layer.5."]
    checkpoint.save(model, demo(), tmp_path / "ckpt", include_text=prefixes, dtype=torch.float16)
    written = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    text_keys = {k for k in written if k.startswith(checkpoint.TEXT_PREFIX)}
    assert text_keys and all(k.startswith(tuple(prefixes)) for k in text_keys)
    loaded, _ = checkpoint.load(tmp_path / "ckpt")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.allclose(a.float(), b.float(), atol=2e-3, rtol=1e-3), name  # fp16 in the file
    # a file that claims a layer it does not hold is refused
    del written["text_encoder.bert.encoder.layer.5.output.dense.bias"]
    from safetensors.torch import save_file

    save_file(written, str(tmp_path / "ckpt" / "model.safetensors"))
    with pytest.raises(checkpoint.CheckpointError, match="layer.5.output.dense.bias"):
        checkpoint.load(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="must start with"):
        checkpoint.save(model, demo(), tmp_path / "bad", include_text=["bert.encoder.layer.5."])


def test_own_format_rejects_a_file_of_another_config(tmp_path):
    checkpoint.save(build_model(tiny()), tiny(), tmp_path / "ckpt")
    document = (tmp_path / "ckpt" / "config.json").read_text().replace('"num_convs": 2', '"num_convs": 3')
    (tmp_path / "ckpt" / "config.json").write_text(document)
    with pytest.raises(checkpoint.CheckpointError, match="head.blocks.2"):
        checkpoint.load(tmp_path / "ckpt")


def _lying_header(data: bytes) -> bytes:
    """``data`` (a safetensors file) with its first tensor claiming a terabyte of data."""
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    first = next(k for k in header if k != "__metadata__")
    header[first]["data_offsets"][1] += 10**12
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data[8 + length :]


def test_unreadable_checkpoint_files_raise_errors_naming_the_file(tmp_path):
    folder = checkpoint.save(build_model(tiny()), tiny(), tmp_path / "ckpt")
    weights, config = folder / checkpoint.WEIGHTS_FILE, folder / checkpoint.CONFIG_FILE
    data, document = weights.read_bytes(), config.read_text()
    broken_weights = {
        "truncated": data[: len(data) // 2],
        "lying sizes": _lying_header(data),
        "header length past the file": struct.pack("<Q", 2**60) + b"{}",
        "empty": b"",
    }
    for content in broken_weights.values():
        weights.write_bytes(content)
        with pytest.raises(checkpoint.CheckpointError, match=f"{weights}: not a readable safetensors"):
            checkpoint.load_any(folder)
        official = tmp_path / "official.safetensors"
        official.write_bytes(content)
        with pytest.raises(checkpoint.CheckpointError, match=f"{official}: not a readable safetensors"):
            checkpoint.read_official_state_dict(official)
    weights.write_bytes(data)
    broken_configs = {
        "{not json": "not a readable checkpoint config",
        '{"format_version": 99}': "unsupported format_version 99",
        "[1, 2]": "unsupported format_version 'list'",
        json.dumps({**json.loads(document), "config": {"nope": 1}}): r"does not build \(unknown config keys",
    }
    for content, message in broken_configs.items():
        config.write_text(content)
        with pytest.raises(checkpoint.CheckpointError, match=message) as error:
            checkpoint.load_any(folder)
        assert str(folder) in str(error.value)
    config.unlink()
    with pytest.raises(checkpoint.CheckpointError, match=f"{config}: not a readable checkpoint config"):
        checkpoint.load_any(folder)


def test_load_any_reads_our_folder(tmp_path):
    model = build_model(tiny())
    folder = checkpoint.save(model, tiny(), tmp_path / "ckpt")
    loaded = checkpoint.load_any(folder)
    assert loaded.config == tiny() and loaded.weights_file == folder / checkpoint.WEIGHTS_FILE
    assert checkpoint.weights_file(folder) == loaded.weights_file
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_load_any_reads_an_official_file_with_a_preset_or_a_reference_config():
    path = reference_dir() / "tiny" / "state_dict.safetensors"
    official = checkpoint.read_official_state_dict(path)
    by_preset = checkpoint.load_any(path, "tiny")
    assert by_preset.config == tiny() and by_preset.weights_file == path == checkpoint.weights_file(path)
    assert torch.equal(by_preset.model.head.token_bias, official["rpn.head.bias0"])
    by_reference = checkpoint.load_any(path, reference_dir() / "tiny" / "config.json")
    assert replace(by_reference.config, name="tiny") == tiny()
    for (name, a), (_, b) in zip(
        by_preset.model.state_dict().items(), by_reference.model.state_dict().items()
    ):
        assert torch.equal(a, b), name


def test_load_any_reads_a_json_of_official_values(tmp_path):
    models = json.loads((reference_dir() / "official_configs.json").read_text())["models"]
    values = models["glip_t_o365_goldg"]["values"]  # nested yacs keys, as merged by the official code
    source = tmp_path / "glip_t.json"
    source.write_text(json.dumps(values))
    assert checkpoint.official_model_config(source) == from_official(values)
    assert replace(checkpoint.official_model_config(source), name="glip_t") == glip_t()
    # The file is checked against the json's architecture (GLIP-T, built on meta): tiny weights are refused.
    with (
        torch.device("meta"),
        pytest.raises(checkpoint.CheckpointError, match=r"official \(16, 16\) vs model \(96, 96\)"),
    ):
        checkpoint.load_any(reference_dir() / "tiny" / "state_dict.safetensors", source)


def test_load_any_needs_the_config_of_an_official_file(tmp_path):
    path = reference_dir() / "tiny" / "state_dict.safetensors"
    with pytest.raises(checkpoint.MissingOfficialConfigError, match="official_config.*glip_t"):
        checkpoint.load_any(path)
    with pytest.raises(checkpoint.CheckpointError, match="neither a preset"):
        checkpoint.load_any(path, "glip_xl")
    with pytest.raises(FileNotFoundError):
        checkpoint.load_any(tmp_path / "missing.pth", "tiny")


def test_weight_files_are_byte_identical_across_processes(tmp_path):
    """A checkpoint's bytes depend on its tensors alone, in whichever process writes them (chaos compares them)."""
    import subprocess
    import sys

    script = (
        "import sys, torch; from glip import checkpoint; "
        "checkpoint.write_weights({'b': torch.arange(6.0).reshape(2, 3), 'a': torch.ones(2)}, sys.argv[1])"
    )
    files = [tmp_path / f"{n}.safetensors" for n in range(4)]
    for path in files:
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, cwd=os.getcwd())
    assert len({path.read_bytes() for path in files}) == 1
    # Why it holds: safetensors orders metadata by a per-process hash when there are two keys or more.
    header = json.loads(files[0].read_bytes()[8 : 8 + struct.unpack("<Q", files[0].read_bytes()[:8])[0]])
    assert len(header["__metadata__"]) == 1
