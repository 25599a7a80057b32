"""Checkpoints: official GLIP ``.pth`` import through a rename table, and our own safetensors format.

Official checkpoints (microsoft/GLIP releases) are ``torch.save`` dicts with a ``"model"`` state dict whose keys
carry the DistributedDataParallel prefix ``module.``. They are read with ``torch.load(weights_only=True)``: an
untrusted pickle is never executed. Every official key is mapped to one of ours by ``RENAMES`` and loaded
strictly: every parameter and buffer of our model must be covered and nothing may be left over, except the
keys listed in ``OPTIONAL_OFFICIAL_KEYS`` (present in some releases, not used by the model).

Our format is a folder with ``model.safetensors`` (our parameter names) and ``config.json`` (the ``GlipConfig``
plus metadata). When the text encoder is the unchanged pretrained one named by the config, its weights may be
left out of the file (``include_text=False``) and are read from the pretrained folder at load time.

``load_any`` is the one entry point for callers that take either kind: a folder in our format, or an official
file with the config it was trained with (``official_model_config``: a preset name or a JSON file).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from glip.config import PRESETS, GlipConfig, from_official, from_reference_config, preset
from glip.model import Glip, build_model

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TEXT_PREFIX = "text_encoder."

# Official name (without "module.") -> ours. Applied in order; the first matching pattern wins.
# Tower layout: dyhead_tower.{3i} = fusion, {3i+1} = BERT layer on text, {3i+2} = DyConv (block i).
_TOWER = r"rpn\.head\.dyhead_tower\.(\d+)\."
RENAMES: list[tuple[str, str]] = [
    # vision backbone: Swin body
    (r"^backbone\.body\.patch_embed\.proj\.", "backbone.swin.patch_embed.projection."),
    (r"^backbone\.body\.patch_embed\.norm\.", "backbone.swin.patch_embed.norm."),
    (r"^backbone\.body\.norm(\d)\.", r"backbone.swin.output_norms.\1."),
    (
        r"^backbone\.body\.layers\.(\d+)\.blocks\.(\d+)\.norm1\.",
        r"backbone.swin.stages.\1.blocks.\2.attention_norm.",
    ),
    (
        r"^backbone\.body\.layers\.(\d+)\.blocks\.(\d+)\.norm2\.",
        r"backbone.swin.stages.\1.blocks.\2.mlp_norm.",
    ),
    (
        r"^backbone\.body\.layers\.(\d+)\.blocks\.(\d+)\.attn\.proj\.",
        r"backbone.swin.stages.\1.blocks.\2.attention.projection.",
    ),
    (
        r"^backbone\.body\.layers\.(\d+)\.blocks\.(\d+)\.attn\.",
        r"backbone.swin.stages.\1.blocks.\2.attention.",
    ),
    (r"^backbone\.body\.layers\.(\d+)\.blocks\.(\d+)\.mlp\.", r"backbone.swin.stages.\1.blocks.\2.mlp."),
    (r"^backbone\.body\.layers\.(\d+)\.downsample\.", r"backbone.swin.stages.\1.downsample."),
    # FPN: fpn_inner{2,3,4} / fpn_layer{2,3,4} are the stride-8/16/32 laterals / outputs
    (r"^backbone\.fpn\.fpn_inner(\d)\.", lambda m: f"backbone.fpn.lateral_convs.{int(m.group(1)) - 2}."),
    (r"^backbone\.fpn\.fpn_layer(\d)\.", lambda m: f"backbone.fpn.output_convs.{int(m.group(1)) - 2}."),
    (r"^backbone\.fpn\.top_blocks\.(p6|p7)\.", r"backbone.fpn.\1."),
    # language backbone
    (r"^language_backbone\.body\.model\.", "text_encoder.bert."),
    # head: fusion blocks (tower index 3i)
    (_TOWER + r"b_attn\.gamma_v$", lambda m: f"head.blocks.{_block(m, 0)}.fusion.gamma_visual"),
    (_TOWER + r"b_attn\.gamma_l$", lambda m: f"head.blocks.{_block(m, 0)}.fusion.gamma_text"),
    (_TOWER + r"b_attn\.layer_norm_v\.", lambda m: f"head.blocks.{_block(m, 0)}.fusion.norm_visual."),
    (_TOWER + r"b_attn\.layer_norm_l\.", lambda m: f"head.blocks.{_block(m, 0)}.fusion.norm_text."),
    (
        _TOWER + r"b_attn\.attn\.(v_proj|l_proj|values_v_proj|values_l_proj|out_v_proj|out_l_proj)\.",
        lambda m: f"head.blocks.{_block(m, 0)}.fusion.{_FUSION_NAMES[m.group(2)]}.",
    ),
    # head: BERT layers on the text (tower index 3i+1)
    (
        _TOWER + r"attention\.self\.(query|key|value)\.",
        lambda m: f"head.blocks.{_block(m, 1)}.text_layer.{m.group(2)}.",
    ),
    (
        _TOWER + r"attention\.output\.dense\.",
        lambda m: f"head.blocks.{_block(m, 1)}.text_layer.attention_output.",
    ),
    (
        _TOWER + r"attention\.output\.LayerNorm\.",
        lambda m: f"head.blocks.{_block(m, 1)}.text_layer.attention_norm.",
    ),
    (_TOWER + r"intermediate\.dense\.", lambda m: f"head.blocks.{_block(m, 1)}.text_layer.intermediate."),
    (_TOWER + r"output\.dense\.", lambda m: f"head.blocks.{_block(m, 1)}.text_layer.output."),
    (_TOWER + r"output\.LayerNorm\.", lambda m: f"head.blocks.{_block(m, 1)}.text_layer.output_norm."),
    # head: DyConv (tower index 3i+2). DyConv[0] runs on the coarser level, [1] on the same, [2] on the finer.
    (
        _TOWER + r"DyConv\.(\d)\.conv\.",
        lambda m: f"head.blocks.{_block(m, 2)}.dyconv.{_DYCONV_NAMES[m.group(2)]}.",
    ),
    (
        _TOWER + r"DyConv\.(\d)\.bn\.",
        lambda m: f"head.blocks.{_block(m, 2)}.dyconv.{_DYCONV_NAMES[m.group(2)]}.norm.",
    ),
    (_TOWER + r"offset\.", lambda m: f"head.blocks.{_block(m, 2)}.dyconv.offset_conv."),
    (_TOWER + r"AttnConv\.1\.", lambda m: f"head.blocks.{_block(m, 2)}.dyconv.scale_attention."),
    (_TOWER + r"relu\.fc\.0\.", lambda m: f"head.blocks.{_block(m, 2)}.dyconv.dyrelu.squeeze."),
    (_TOWER + r"relu\.fc\.2\.", lambda m: f"head.blocks.{_block(m, 2)}.dyconv.dyrelu.expand."),
    # head outputs
    (r"^rpn\.head\.bbox_pred\.", "head.box_regression."),
    (r"^rpn\.head\.centerness\.", "head.centerness."),
    (r"^rpn\.head\.cls_logits\.", "head.legacy_class_logits."),
    (r"^rpn\.head\.scales\.(\d)\.scale$", r"head.box_scales.\1"),
    (r"^rpn\.head\.dot_product_projection_text\.", "head.text_projection."),
    (r"^rpn\.head\.log_scale$", "head.log_scale"),
    (r"^rpn\.head\.bias_lang$", "head.token_bias_weight"),
    (r"^rpn\.head\.bias0$", "head.token_bias"),
    (r"^rpn\.anchor_generator\.cell_anchors\.(\d)$", r"anchor_generator.cell_anchors.\1"),
]
_FUSION_NAMES = {
    "v_proj": "visual_proj",
    "l_proj": "text_proj",
    "values_v_proj": "visual_value_proj",
    "values_l_proj": "text_value_proj",
    "out_v_proj": "visual_out_proj",
    "out_l_proj": "text_out_proj",
}
_DYCONV_NAMES = {"0": "conv_from_coarser", "1": "conv_same", "2": "conv_from_finer"}
_COMPILED = [(re.compile(pattern), replacement) for pattern, replacement in RENAMES]

# Present in some official releases, never used by this model (MLM head, BERT pooler; see
# ../shared/reference/glip_optional_keys.tsv), and BERT's position_ids buffer (persistent only with
# transformers < 4.31). They are dropped with a log line.
OPTIONAL_OFFICIAL_KEYS = re.compile(
    r"^(rpn\.head\.mlm_head\.|language_backbone\.body\.model\.pooler\.|"
    r"language_backbone\.body\.model\.embeddings\.position_ids$)"
)


class CheckpointError(ValueError):
    """A checkpoint is unreadable or does not match the model: the message names the file, or the offending
    keys."""


class MissingOfficialConfigError(CheckpointError):
    """An official checkpoint was given without the config that describes its architecture."""


class LoadedCheckpoint(NamedTuple):
    """What ``load_any`` returns: the model, its config, and the file its weights came from (what a digest of
    the weights, e.g. a teacher id, is taken over)."""

    model: Glip
    config: GlipConfig
    weights_file: Path


def _block(match: re.Match, offset: int) -> int:
    tower_index = int(match.group(1))
    if tower_index % 3 != offset:
        raise CheckpointError(
            f"tower module {tower_index} is not of the expected kind (index % 3 == {offset})"
        )
    return tower_index // 3


def official_to_ours(name: str) -> str:
    """Our parameter name of an official one (``module.`` prefix already stripped)."""
    for pattern, replacement in _COMPILED:
        match = pattern.search(name)
        if match:
            if callable(replacement):
                return name[: match.start()] + replacement(match) + name[match.end() :]
            return pattern.sub(replacement, name, count=1)
    raise CheckpointError(f"no rename rule for official key {name!r}")


def read_official_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The model state dict of an official ``.pth`` (or ``.safetensors``), keys without ``module.``.

    The file may be the trainer's dict (``{"model": ..., "optimizer": ..., ...}``) or a bare state dict.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        loaded: Mapping = _read_safetensors(path)
    else:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # the unpickler's many error types; the message says what it refused
            raise CheckpointError(f"{path}: not a weights-only PyTorch checkpoint ({error})") from error
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{path}: expected a dict, got {type(loaded).__name__}")
    state = loaded.get("model", loaded)
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: the 'model' entry is not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def convert_official(official: Mapping[str, Tensor], model: Glip) -> dict[str, Tensor]:
    """Rename an official state dict to ours and check it against ``model`` exactly.

    Raises:
        CheckpointError: naming keys without a rule, keys of ours not covered, keys left over, and shape
            mismatches (each with both names and shapes).
    """
    expected = model.state_dict()
    converted: dict[str, Tensor] = {}
    unmapped, dropped = [], []
    for name, tensor in official.items():
        name = name.removeprefix("module.")
        if OPTIONAL_OFFICIAL_KEYS.search(name):
            dropped.append(name)
            continue
        try:
            converted[official_to_ours(name)] = tensor
        except CheckpointError:
            unmapped.append(name)
    if dropped:
        logger.info("ignored %d optional official keys (e.g. %s)", len(dropped), dropped[0])
    problems = _compare(converted, expected, source="official")
    if unmapped:
        problems.insert(
            0, f"official keys without a rename rule: {unmapped[:10]}{' ...' if len(unmapped) > 10 else ''}"
        )
    if problems:
        raise CheckpointError("checkpoint does not match the model:\n  " + "\n  ".join(problems))
    return converted


def _compare(
    state: Mapping[str, Tensor], expected: Mapping[str, Tensor], source: str, allow_missing: str | None = None
) -> list[str]:
    problems = []
    missing = [k for k in expected if k not in state and not (allow_missing and k.startswith(allow_missing))]
    extra = [k for k in state if k not in expected]
    shapes = [
        f"{k}: {source} {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in state
        if k in expected and state[k].shape != expected[k].shape
    ]
    if missing:
        problems.append(f"model keys not in the {source} checkpoint ({len(missing)}): {missing[:10]}")
    if extra:
        problems.append(f"{source} keys the model does not have ({len(extra)}): {extra[:10]}")
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): {shapes[:10]}")
    return problems


def import_official(path: str | Path | Mapping[str, Tensor], config: GlipConfig) -> Glip:
    """Build ``config``'s model and load an official checkpoint into it, strictly."""
    official = read_official_state_dict(path) if isinstance(path, str | Path) else dict(path)
    model = build_model(config, load_pretrained_text=False)
    converted = convert_official(official, model)
    model.load_state_dict(converted, strict=True)
    return model


def save(
    model: Glip,
    config: GlipConfig,
    folder: str | Path,
    include_text: bool | Sequence[str] = True,
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``folder/model.safetensors`` + ``folder/config.json`` (each atomically).

    ``include_text=False`` leaves the text encoder out; valid only when it is the unchanged pretrained
    encoder that ``config.text.pretrained`` names (e.g. it was frozen during training). A list of key prefixes
    (e.g. ``model.text_encoder.top_layer_prefixes(2, TEXT_PREFIX)``) keeps only those text weights (the layers
    a partial fine-tune changed); the rest is read from the pretrained folder at load time. ``dtype`` stores the
    floating-point tensors in another precision (``torch.float16`` halves a shipped file); ``load`` casts
    them back to the model's float32.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if include_text is not True and config.text.pretrained is None:
        raise ValueError("leaving text weights out needs a pretrained text encoder named in the config")
    if not isinstance(include_text, bool):
        include_text = sorted(include_text)
        if any(not p.startswith(TEXT_PREFIX) for p in include_text):
            raise ValueError(f"text weight prefixes must start with {TEXT_PREFIX!r}: {include_text}")
    state = {
        k: v.detach().to("cpu").contiguous()
        for k, v in model.state_dict().items()
        if _keeps_text(include_text, k)
    }
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    weights = folder / WEIGHTS_FILE
    temporary = weights.with_suffix(".tmp")
    write_weights(state, temporary)
    os.replace(temporary, weights)
    document = {
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "text_weights_included": include_text,
        "metadata": dict(metadata or {}),
    }
    temporary = folder / (CONFIG_FILE + ".tmp")
    temporary.write_text(json.dumps(document, indent=1, sort_keys=True))
    os.replace(temporary, folder / CONFIG_FILE)
    return folder


def write_weights(state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """``state`` as a safetensors file whose bytes are a function of ``state`` alone. The metadata is one key:
    safetensors keeps metadata in a Rust ``HashMap``, whose order (and so the header's bytes) changes from one
    process to the next when it holds two (found by ``make chaos``: equal weights, different files)."""
    save_file(dict(state), str(path), metadata={"format": f"glip-engine/{FORMAT_VERSION}"})


def _keeps_text(include_text: bool | list[str], key: str) -> bool:
    """Whether ``save`` writes ``key``: every non-text key, and the text keys ``include_text`` selects."""
    if include_text is True or not key.startswith(TEXT_PREFIX):
        return True
    return include_text is not False and any(key.startswith(p) for p in include_text)


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file; a header that lies (sizes or offsets past the data, a length
    beyond the file, bad JSON) raises CheckpointError naming the file, before any tensor is allocated."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from error


def read_config(folder: str | Path) -> tuple[GlipConfig, dict]:
    """The config and the whole ``config.json`` document of a checkpoint folder.

    Raises:
        CheckpointError: naming the file, when it is missing, not JSON, of another format version, or holds
            a config this code cannot build (unknown keys, values that contradict each other).
    """
    path = Path(folder) / CONFIG_FILE
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not a readable checkpoint config ({error})") from error
    if not isinstance(document, dict) or document.get("format_version") != FORMAT_VERSION:
        found = document.get("format_version") if isinstance(document, dict) else type(document).__name__
        raise CheckpointError(f"{folder}: unsupported format_version {found!r}")
    try:
        return GlipConfig.from_dict(document["config"]), document
    except (KeyError, TypeError, ValueError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        raise CheckpointError(f"{path}: the model config does not build ({message})") from error


def load(folder: str | Path, device: str | torch.device = "cpu") -> tuple[Glip, GlipConfig]:
    """Load a checkpoint folder written by ``save``; strict (text weights may come from the pretrained folder)."""
    folder = Path(folder)
    config, document = read_config(folder)
    included = document.get("text_weights_included", True)
    with_text = included is True
    model = build_model(config, load_pretrained_text=not with_text)
    state = _read_safetensors(folder / WEIGHTS_FILE)
    problems = _compare(
        state, model.state_dict(), source=str(folder), allow_missing=None if with_text else TEXT_PREFIX
    )
    if problems:
        raise CheckpointError(f"{folder} does not match its config:\n  " + "\n  ".join(problems))
    if not with_text:
        # Text keys the file says it holds must be there; the others come from the pretrained folder.
        own = model.state_dict()
        claimed = [
            k for k in own if k.startswith(TEXT_PREFIX) and _keeps_text(included, k) and k not in state
        ]
        if claimed:
            raise CheckpointError(f"{folder}: missing {claimed}")
        state = {**{k: v for k, v in own.items() if k.startswith(TEXT_PREFIX) and k not in state}, **state}
    model.load_state_dict(state, strict=True)
    return model.to(device), config


def weights_file(path: str | Path) -> Path:
    """The file holding a checkpoint's weights: ``folder/model.safetensors`` for our format, else ``path``."""
    path = Path(path)
    return path / WEIGHTS_FILE if path.is_dir() else path


def official_model_config(source: str | Path) -> GlipConfig:
    """The model config of an official checkpoint.

    Args:
        source: a preset name (``glip_t``, ``glip_l``, ...), or the path of a reference ``config.json`` (with
            ``changed_from_glip_t_config``), or of a JSON of official config values (flat or nested yacs
            keys).
    """
    if str(source) in PRESETS:
        return preset(str(source))
    if not Path(source).is_file():
        raise CheckpointError(
            f"official config {str(source)!r} is neither a preset ({', '.join(PRESETS)}) nor a JSON file"
        )
    document = json.loads(Path(source).read_text())
    if "changed_from_glip_t_config" in document:
        return from_reference_config(document)
    return from_official(document)


def load_any(
    path: str | Path, official_config: str | Path | None = None, device: str | torch.device = "cpu"
) -> LoadedCheckpoint:
    """Load a folder in our format (``load``) or an official ``.pth`` / ``.safetensors`` file
    (``import_official``).

    Args:
        path: the checkpoint folder or official file.
        official_config: for an official file only (ignored for a folder, which carries its config): see
            ``official_model_config``.
        device: where the model ends up.

    Raises:
        MissingOfficialConfigError: ``path`` is an official file and ``official_config`` is None.
        CheckpointError: the weights do not match the config (see ``load`` and ``convert_official``).
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    if path.is_dir():
        model, config = load(path, device)
        return LoadedCheckpoint(model, config, weights_file(path))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint folder or file")
    if official_config is None:
        raise MissingOfficialConfigError(
            f"{path} is an official checkpoint: pass official_config, a preset name ({', '.join(PRESETS)}) "
            "or the path of a JSON of official config values or of a reference config.json"
        )
    config = official_model_config(official_config)
    return LoadedCheckpoint(import_official(path, config).to(device), config, path)
