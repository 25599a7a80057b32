"""The teacher: a GLIP checkpoint that grounds the phrases of web captions in their images (pseudo-labels).

``Teacher.label`` takes images with their captions and the character spans of the caption's phrases, builds
one prompt per caption (a caption longer than the text encoder's token limit is cut into windows that never
split a phrase, ``glip.prompts.chunk_caption_phrases``, and the windows' phrase ids are mapped back), runs the
model in batches of images of any sizes and returns, per image, ``PhraseBox`` tuples: the phrase's index in
the caption's phrase list, a continuous ``xyxy`` box in original-image pixels and the GLIP score.

A teacher is named by ``teacher_id`` (its name plus a digest of the weights file), which is what pseudo-label
outputs record; ``config_hash`` digests every inference setting that can change the boxes.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
from collections import deque
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import torch

from glip import checkpoint
from glip.config import GlipConfig, config_digest, with_overrides
from glip.dyhead import DEFORM_KERNELS, ModulatedDeformConvNorm
from glip.fusion import BiAttentionBlock
from glip.model import Glip
from glip.postprocess import PhraseDetections
from glip.predictor import GlipPredictor, PendingBatch
from glip.preprocess import ImageInput, image_size
from glip.prompts import Prompt, bucketed_length, chunk_caption_phrases
from teacher.fetch import local_checkpoint

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Overrides that change inference only; anything else would describe another architecture than the weights.
INFERENCE_OVERRIDE_PREFIXES = ("postprocess.", "input.", "text.pad_to_max")
DIGEST_CHARS = 10
# Teacher names become file and ledger names: letters, digits, '.', '_' and '-', not starting with a symbol.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
DEFORM_MODES = ("auto", *DEFORM_KERNELS)
COMPILE_MODES = ("auto", "off", "head", "backbone+head")
TF32_MODES = ("auto", "on", "off")
# Batch sides padded to multiples of this when compiled: 800 (GLIP's short side) is one, the long sides up to
# 1344 fall in 960 / 1120 / 1280 / 1344, so a few graphs serve every aspect ratio at <= ~15% more pixels.
DEFAULT_SIZE_BUCKET = 160
# Prompts pad to the token limit when sizes are bucketed (0; ``token_bucket``). Bucketed at 32 (prompts of the
# bench's crawl, 15.7 tokens on average, padded to 32 or 64 instead of 256), a graphed GLIP-T forward pass of 16
# took 6.6% less GPU time on an H200, but the two lengths split the pairs into more, partly filled, batches:
# 50.2 img/s against 54.1 (bench/RESULTS.md, session 16).
DEFAULT_TOKEN_BUCKET = 0
_READ_CHUNK = 1 << 20

Span = tuple[int, int]


class PendingLabels(NamedTuple):
    """A batch submitted to the teacher (``Teacher.submit``), its boxes not collected yet."""

    batch: PendingBatch
    phrase_ids: list[Sequence[int]]


class PhraseBox(NamedTuple):
    """One grounded phrase: ``phrase`` indexes the image's phrase list; ``box`` is continuous ``(x0, y0, x1,
    y1)`` in original-image pixels; ``score`` the GLIP score in [0, 1]."""

    phrase: int
    box: tuple[float, float, float, float]
    score: float


@dataclass(frozen=True)
class TeacherConfig:
    """How to build a teacher.

    Attributes:
        checkpoint: a folder in our format (``model.safetensors`` + ``config.json``) or an official GLIP
            ``.pth`` (or ``.safetensors``) file: a local path, or an fsspec URL (``s3://...``) that each node
            copies into its cache once (``teacher.fetch``).
        official_config: for an official file only: a preset name (``glip_t``, ``glip_l``, ``tiny``) or the
            path of a JSON of official config values (yacs keys), or of a reference ``config.json``.
        name: the teacher's name in ``teacher_id``; default the checkpoint's folder or file stem.
        device: ``cuda``, ``cpu``, ``cuda:1`` ...; default CUDA when available.
        amp: bf16 autocast on CUDA and on CPUs with native bf16 (else fp32).
        batch_size: (image, prompt) pairs per forward pass.
        overrides: inference-only dotted overrides of the model config, e.g. ``("input.min_size=480",
            "postprocess.score_threshold=0.1")``; only ``postprocess.*``, ``input.*`` and ``text.pad_to_max``
            (padding every prompt to the token limit, as the official code, or only to the batch's longest).
        deform: how the DyHead's deformable convs run: ``torchvision`` (fp32 always, the official numbers;
            ``auto`` picks it) or ``gather`` (``glip.dyhead.modulated_deform_conv2d``: in the autocast dtype,
            compilable). Measured on an H200 (bench/RESULTS.md): uncompiled, gather ran GLIP-T at 28.4 img/s
            against torchvision's 37.8; compiled with the head it reached 50.4, and torchvision's op compiled
            was not measured beside it, so nothing shows that gather pays.
        compile: ``torch.compile`` of ``head`` or ``backbone+head`` (each compiled once per batch shape, on its
            first batch), ``off``, or ``auto``: the head on CUDA, off elsewhere (compiling on CPU costs
            minutes). On an H200 the compiled head took GLIP-T from 37.8 to 45.8-50.4 img/s; compiling the
            backbone too gave 44.0 beside 45.8 (bench/RESULTS.md). A compiled teacher fills every forward
            batch up to ``batch_size`` and pads images to ``size_bucket`` multiples, so that a few graphs serve
            every batch.
        size_bucket: see ``compile``; None: ``DEFAULT_SIZE_BUCKET`` when compiled or graphed, else 0 (the
            model's own ``input.size_divisibility`` only). Padding changes the boxes a little (GroupNorm sees
            it); with a bucket, only pairs of one padded image size and one padded prompt length share a batch
            (``Teacher.batch_key``), so that an image's boxes do not depend on the images beside it.
        token_bucket: with a size bucket, prompts pad to ``token_bucket * 2**k`` tokens, the fewest that hold
            them (at most the token limit; ``glip.prompts.bucketed_length``); 0: every prompt to the token limit
            (the official PAD_MAX); None: ``DEFAULT_TOKEN_BUCKET``, 0. Without a size bucket, prompts pad as the
            model config says (``text.pad_to_max``, else to the batch's longest).
        tf32: ``on``: the forward pass's fp32 matrix products run as TF32 on CUDA (``GlipPredictor.tf32``):
            under bf16 autocast, the GEMMs inside torchvision's deformable convs, which it runs in fp32 and which
            took 28% of GLIP-T's GPU time as cuBLAS SIMT kernels on an H200; ``auto`` (on with CUDA): GLIP-T's
            uncompiled forward went from 31.6 to 46.2 img/s there (bench/RESULTS.md). No effect on CPUs.
        cuda_graphs: replay the forward pass from CUDA graphs, one per batch shape (``glip.graphs``); None (the
            default): on with CUDA. Launching GLIP-T's ~4,250 ops a pass took the host 227-293 ms a batch of 16
            on an H200, as long as the GPU took to run them; replayed, 17-38 ms, and the GPU was busy 0.90-0.96 of
            a streaming pass instead of 0.48 (bench/RESULTS.md, sessions 13 and 16). Like ``compile``, it fills
            every batch to ``batch_size`` and pads images to ``size_bucket`` multiples.
        storage_options: fsspec options for a ``checkpoint`` URL (``endpoint_url``, keys); kept out of the
            repr, as they may hold credentials.
        cache: where a node copies a ``checkpoint`` URL (``teacher.fetch.cache_folder``; None: its default).
    """

    checkpoint: str
    official_config: str | None = None
    name: str | None = None
    device: str | None = None
    amp: bool = True
    batch_size: int = 8
    overrides: tuple[str, ...] = ()
    deform: str = "auto"
    compile: str = "auto"
    size_bucket: int | None = None
    tf32: str = "auto"
    cuda_graphs: bool | None = None
    token_bucket: int | None = None
    storage_options: tuple[tuple[str, Any], ...] = field(default=(), repr=False)
    cache: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "checkpoint", str(self.checkpoint))
        options = self.storage_options
        options = options.items() if isinstance(options, Mapping) else options
        object.__setattr__(self, "storage_options", tuple(sorted((str(k), v) for k, v in options)))
        object.__setattr__(self, "overrides", tuple(self.overrides))
        if self.batch_size < 1:
            raise ValueError(f"TeacherConfig.batch_size must be >= 1, got {self.batch_size}")
        for item in self.overrides:
            if not item.split("=", 1)[0].strip().startswith(INFERENCE_OVERRIDE_PREFIXES):
                raise ValueError(
                    f"override {item!r}: only {INFERENCE_OVERRIDE_PREFIXES} keys change inference"
                )
        if self.name is not None and not NAME_PATTERN.match(self.name):
            raise ValueError(f"teacher name {self.name!r}: use letters, digits, '.', '_' and '-'")
        _check_modes(self.deform, self.compile, self.size_bucket, self.tf32, self.token_bucket)

    def local_checkpoint(self) -> Path:
        """``checkpoint`` as a local path: itself, or for a URL this node's cached copy (``teacher.fetch``)."""
        return local_checkpoint(self.checkpoint, dict(self.storage_options), self.cache)


def _check_modes(
    deform: str, compile: str, size_bucket: int | None, tf32: str = "auto", token_bucket: int | None = None
) -> None:
    if deform not in DEFORM_MODES:
        raise ValueError(f"teacher deform {deform!r} is not one of {DEFORM_MODES}")
    if compile not in COMPILE_MODES:
        raise ValueError(f"teacher compile {compile!r} is not one of {COMPILE_MODES}")
    if tf32 not in TF32_MODES:
        raise ValueError(f"teacher tf32 {tf32!r} is not one of {TF32_MODES}")
    if size_bucket is not None and size_bucket < 0:
        raise ValueError(f"teacher size_bucket must be >= 0, got {size_bucket}")
    if token_bucket is not None and token_bucket < 0:
        raise ValueError(f"teacher token_bucket must be >= 0, got {token_bucket}")


class Teacher:
    """A GLIP model ready to pseudo-label captioned images.

    Args:
        model: the detector.
        model_config: its config (input size, post-processing, token limit).
        name: the teacher's name (letters, digits, ``._-``).
        weights_digest: hex digest of the weights file; its first characters end ``teacher_id``.
        device: where to run; default CUDA when available.
        amp: bf16 autocast on CUDA and on CPUs with native bf16.
        batch_size: (image, prompt) pairs per forward pass.
        deform, compile, size_bucket, tf32, cuda_graphs, token_bucket: as ``TeacherConfig``'s.
    """

    def __init__(
        self,
        model: Glip,
        model_config: GlipConfig,
        name: str,
        weights_digest: str,
        device: str | torch.device | None = None,
        amp: bool = True,
        batch_size: int = 8,
        deform: str = "auto",
        compile: str = "auto",
        size_bucket: int | None = None,
        tf32: str = "auto",
        cuda_graphs: bool | None = None,
        token_bucket: int | None = None,
    ) -> None:
        if not NAME_PATTERN.match(name):
            raise ValueError(f"teacher name {name!r}: use letters, digits, '.', '_' and '-'")
        _check_modes(deform, compile, size_bucket, tf32, token_bucket)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.deform = deform if deform != "auto" else "torchvision"
        self.compiled = compile if compile != "auto" else ("head" if device.type == "cuda" else "off")
        cuda_graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.cuda_graphs = cuda_graphs
        static_shapes = self.compiled != "off" or cuda_graphs  # few batch shapes: few graphs of either kind
        if size_bucket is None:
            size_bucket = DEFAULT_SIZE_BUCKET if static_shapes else 0
        self.size_bucket = size_bucket
        if token_bucket is None:
            token_bucket = DEFAULT_TOKEN_BUCKET
        self.token_bucket = token_bucket if size_bucket else 0
        if size_bucket and model_config.text.pad_to_max != (not token_bucket):
            # Bucketed prompt lengths too: a prompt padded to its batch's longest changes the boxes a little, so
            # that batches of one padded image size would still depend on their neighbours' captions.
            model_config = with_overrides(model_config, [f"text.pad_to_max={not token_bucket}"])
        self.tf32 = device.type == "cuda" and tf32 != "off"
        for module in model.modules():
            if isinstance(module, ModulatedDeformConvNorm):
                module.kernel = self.deform
        self.predictor = GlipPredictor(
            model,
            model_config,
            device,
            torch.bfloat16 if amp else None,
            pad_batch=batch_size if static_shapes else 0,
            size_bucket=size_bucket,
            tf32=self.tf32,
            cuda_graphs=cuda_graphs,
            token_bucket=self.token_bucket,
        )
        if self.compiled != "off":
            _raise_recompile_limit(64)
            for part in self.compiled.split("+"):
                getattr(self.predictor.model, part).compile(dynamic=False)
        self.model_config = model_config
        self.name = name
        self.weights_digest = weights_digest
        self.batch_size = batch_size
        self.max_tokens = model_config.text.max_query_len
        self._caption_tokens = functools.lru_cache(maxsize=4096)(
            lambda caption: self.token_counts([caption])[0]
        )

    @classmethod
    def from_checkpoint(cls, config: TeacherConfig) -> Teacher:
        """Load ``config.checkpoint`` (our folder format, or an official file with ``official_config``; a URL
        is copied into this node's cache first)."""
        path = config.local_checkpoint()
        model, model_config, weights = checkpoint.load_any(path, config.official_config)
        model_config = with_overrides(model_config, list(config.overrides))
        name = config.name or _default_name(path)
        teacher = cls(
            model,
            model_config,
            name,
            file_digest(weights),
            config.device,
            config.amp,
            config.batch_size,
            config.deform,
            config.compile,
            config.size_bucket,
            config.tf32,
            config.cuda_graphs,
            config.token_bucket,
        )
        logger.info("teacher %s on %s (%s)", teacher.teacher_id, teacher.device, teacher.precision)
        return teacher

    @property
    def teacher_id(self) -> str:
        """``<name>-<first 10 hex digits of the weights file's sha256>``: stable across machines."""
        return f"{self.name}-{self.weights_digest[:DIGEST_CHARS]}"

    @property
    def device(self) -> torch.device:
        return self.predictor.device

    @property
    def precision(self) -> str:
        """``bfloat16`` when autocast is on (CUDA, bf16-capable CPU), else ``float32``."""
        return str(self.predictor.amp_dtype or torch.float32).removeprefix("torch.")

    @property
    def config_hash(self) -> str:
        """16 hex digits over everything that changes the boxes: model config, precision, the fusion's
        attention form (fused or explicit: equal up to rounding), batch size (batches are zero-padded to their
        largest image), and the weights; and, where not the CPU defaults, the deformable conv kernel, what is
        compiled (the compiler's kernels round differently), the size bucket, TF32 products, CUDA graphs and
        the batched post-processing."""
        payload = {
            "model": self.model_config.to_dict(),
            "precision": self.precision,
            "attention": self.attention,
            "batch_size": self.batch_size,
            "weights": self.weights_digest,
        }
        # Left out at their defaults, so that the hashes of CPU teachers (and their label shards) stand.
        if self.deform != "torchvision":
            payload["deform"] = self.deform
        if self.compiled != "off":
            payload["compile"] = self.compiled
        if self.size_bucket:
            payload["size_bucket"] = self.size_bucket
            payload["batches"] = "one padded size"  # batch_key: neighbours no longer change the boxes
        if self.token_bucket:
            payload["token_bucket"] = self.token_bucket
        if self.tf32:
            payload["tf32"] = True
        if self.cuda_graphs:
            payload["cuda_graphs"] = (
                True  # replayed scores differed from eager ones by up to 4e-4 (bf16, H200)
            )
        batched = self.predictor.postprocessor.batched
        if batched if batched is not None else self.device.type == "cuda":
            payload["postprocess"] = "batched"  # equal up to rounding and the order of exact ties
        return config_digest(payload)

    @property
    def attention(self) -> str:
        """``sdpa`` when the fusion blocks run fused attention (the default), ``explicit`` when they run the
        official form, ``mixed`` otherwise."""
        forms = {m.sdpa for m in self.predictor.model.modules() if isinstance(m, BiAttentionBlock)}
        return {frozenset({True}): "sdpa", frozenset({False}): "explicit"}.get(frozenset(forms), "mixed")

    def prompts(self, caption: str, spans: Sequence[Span], tokens: int | None = None) -> list[Prompt]:
        """The prompts of one caption: none without phrases, one when the caption fits in the token limit,
        else one per window (``phrase_ids`` index ``spans``). ``tokens``: the caption's token count from
        ``token_counts``, when known (else it is tokenized here).

        Raises:
            ValueError: a span is not a non-empty range of the caption, or a phrase alone exceeds the limit.
        """
        if not spans:
            return []
        if tokens is None:
            [tokens] = self.token_counts([caption])
        if tokens <= self.max_tokens:
            return [Prompt.from_caption(caption, list(spans))]
        return chunk_caption_phrases(caption, list(spans), self.predictor.tokenizer, self.max_tokens)

    def token_counts(self, captions: Sequence[str]) -> list[int]:
        """Each caption's token count, special tokens included (one batched call of the fast tokenizer)."""
        if not captions:
            return []
        encoded = self.predictor.tokenizer(list(captions), verbose=False)["input_ids"]
        return [len(ids) for ids in encoded]

    def label(
        self, images: Sequence[ImageInput], captions: Sequence[str], phrase_spans: Sequence[Sequence[Span]]
    ) -> list[list[PhraseBox]]:
        """Ground each caption's phrases in its image.

        Args:
            images: PIL images or ``H x W x 3`` uint8 BGR arrays, any sizes.
            captions: one caption per image.
            phrase_spans: per image, one ``(start, end)`` char span per phrase (end exclusive).

        Returns:
            per image, its ``PhraseBox`` list sorted by score (descending); empty for an image without
            phrases, which never reaches the model.
        """
        if not len(images) == len(captions) == len(phrase_spans):
            raise ValueError(
                f"{len(images)} images, {len(captions)} captions, {len(phrase_spans)} span lists"
            )
        prompts = [self.prompts(caption, spans) for caption, spans in zip(captions, phrase_spans)]
        return self.label_prompts(images, prompts)

    def label_prompts(
        self, images: Sequence[ImageInput], prompts_per_image: Sequence[Sequence[Prompt]]
    ) -> list[list[PhraseBox]]:
        """``label`` with the prompts already built (``prompts``); phrase indices are the prompts' ids.

        The (image, prompt) pairs, in order, run ``batch_size`` at a time (``submit``, keeping ``in_flight``
        batches submitted before collecting the oldest); with a size bucket, only pairs whose images pad to the
        same size share a batch (``batch_key``, ``grouped_batches``)."""
        pairs = [(index, prompt) for index, prompts in enumerate(prompts_per_image) for prompt in prompts]
        found: list[list[PhraseBox]] = [[] for _ in images]
        waiting: deque = deque()

        def collect_oldest() -> None:
            batch, pending = waiting.popleft()
            for (index, _), pair_boxes in zip(batch, self.collect(pending)):
                found[index].extend(pair_boxes)

        keys = [self.batch_key(images[index], prompt) for index, prompt in pairs]
        for batch in grouped_batches(pairs, keys, self.batch_size):
            waiting.append((batch, self.submit([images[i] for i, _ in batch], [p for _, p in batch])))
            while len(waiting) >= self.in_flight:
                collect_oldest()
        while waiting:
            collect_oldest()
        return [sorted(boxes, key=box_order) for boxes in found]

    def label_batch(self, images: Sequence[ImageInput], prompts: Sequence[Prompt]) -> list[list[PhraseBox]]:
        """One forward pass over at most ``batch_size`` (image, prompt) pairs; each pair's boxes, unsorted.
        A caller that streams pairs (the label stage) gets the boxes of ``label_prompts`` by cutting the same
        pairs into the same batches, merging per image and sorting with ``box_order``."""
        if not images and not prompts:
            return []
        return self.collect(self.submit(images, prompts))

    def batch_key(self, image: ImageInput, prompt: Prompt) -> tuple[int, ...] | None:
        """Which (image, prompt) pairs may share a forward batch: with a size bucket (compiled or graphed
        teachers, or asked), those whose images pad to the same size and, with a token bucket, whose prompts
        pad to the same length, ``(height, width[, tokens])``; else any (None).

        A batch is zero-padded to its largest image and its longest prompt, and the boxes see the padding: an
        image's boxes depend on its batch neighbours (the shipped teacher on 32 world images in another order:
        6 images kept other labels, others moved). Batches of one padded size and prompt length (a bucketed
        teacher makes no others) make every image's boxes its own up to rounding, whatever order the crawl's
        images arrive in (img2dataset writes them as their downloads finish), and pad a landscape image beside a
        portrait one to neither's square."""
        if not self.size_bucket:
            return None
        size = self.predictor.preprocessor.padded_size(*image_size(image))
        if not self.token_bucket:
            return size
        tokens = min(self._caption_tokens(prompt.caption), self.max_tokens)
        return (*size, bucketed_length(tokens, self.token_bucket, self.max_tokens))

    @property
    def in_flight(self) -> int:
        """How many submitted batches a caller should keep before collecting the oldest: 2 on CUDA (the next
        forward pass runs while the CPU post-processes the last), 1 elsewhere (``submit`` then ``collect``)."""
        return 2 if self.device.type == "cuda" else 1

    def submit(self, images: Sequence[ImageInput], prompts: Sequence[Prompt]) -> PendingLabels:
        """``label_batch``'s first half: the forward pass launched (``glip.predictor.GlipPredictor.submit``)."""
        if len(images) > self.batch_size:
            raise ValueError(f"{len(images)} pairs in one forward pass; batch_size is {self.batch_size}")
        pending = self.predictor.submit(images, prompts)
        return PendingLabels(pending, [prompt.phrase_ids for prompt in prompts])

    def collect(self, pending: PendingLabels) -> list[list[PhraseBox]]:
        """``label_batch``'s second half: each submitted pair's boxes, unsorted."""
        detections = self.predictor.collect(pending.batch)
        return [_phrase_boxes(found, ids) for found, ids in zip(detections, pending.phrase_ids)]


def grouped_batches(items: Sequence[T], keys: Sequence[Hashable], size: int) -> list[list[T]]:
    """``items`` cut into batches of at most ``size`` whose items share a key: keys in the order they first
    appear, items in their order within a key (with one key: consecutive batches, the last one smaller)."""
    by_key: dict[Hashable, list[T]] = {}
    for item, key in zip(items, keys, strict=True):
        by_key.setdefault(key, []).append(item)
    return [group[start : start + size] for group in by_key.values() for start in range(0, len(group), size)]


def _raise_recompile_limit(limit: int) -> None:
    """Let dynamo keep up to ``limit`` graphs per compiled module (one per batch shape; its default, 8, would
    send the ninth bucket to eager)."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), limit))
            return


def _phrase_boxes(detections: PhraseDetections, phrase_ids: Sequence[int]) -> list[PhraseBox]:
    """Detections of one prompt as ``PhraseBox`` with the prompt's phrase ids (chunk position -> phrase)."""
    boxes = detections.boxes.tolist()
    scores = detections.scores.tolist()
    positions = detections.phrase_indices.tolist()
    return [PhraseBox(phrase_ids[p], tuple(b), s) for p, b, s in zip(positions, boxes, scores)]


def box_order(box: PhraseBox) -> tuple:
    """The order of a phrase's boxes everywhere: score descending, then phrase, then coordinates."""
    return (-box.score, box.phrase, box.box)


def teacher_id_of(config: TeacherConfig) -> str:
    """The ``teacher_id`` that ``Teacher.from_checkpoint(config)`` will have, without loading the model
    (a driver names output folders with it before workers load the teacher; a URL is fetched first)."""
    path = config.local_checkpoint()
    return f"{config.name or _default_name(path)}-{file_digest(checkpoint.weights_file(path))[:DIGEST_CHARS]}"


def file_digest(path: str | Path) -> str:
    """sha256 hex digest of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while piece := handle.read(_READ_CHUNK):
            digest.update(piece)
    return digest.hexdigest()


def _default_name(path: Path) -> str:
    stem = path.name if path.is_dir() else path.stem
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._")
    return cleaned or "teacher"
