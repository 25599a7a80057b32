"""Images + prompts -> phrase detections in original-image pixels (preprocess, forward, postprocess).

``GlipPredictor`` is the inference path shared by evaluation (``student``) and the teacher (``teacher``):
it batches images of different sizes and prompts of different lengths, runs the model once per batch (bf16
autocast on CUDA when asked, fp32 on CPU) and returns per image the boxes (continuous xyxy, original pixels),
scores and 0-based phrase indices of the image's own prompt. Padding never leaks between images: each image
is scored only against the tokens of its own prompt.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from glip.config import GlipConfig
from glip.graphs import GraphedForward
from glip.model import Glip, build_postprocessor
from glip.postprocess import PhraseDetections, tf32_matmul
from glip.preprocess import ImageInput, ImagePreprocessor, image_size
from glip.prompts import Prompt, split_into_prompts, tokenize_prompts


class PendingBatch(NamedTuple):
    """A batch whose forward pass is launched (``GlipPredictor.submit``), waiting for ``collect``."""

    outputs: object  # glip.model.GlipOutput
    phrase_tokens: list[list[int]]
    image_sizes: list[tuple[int, int]]
    scale_factors: list[tuple[float, float]]
    original_sizes: list[tuple[int, int]]
    ready: torch.cuda.Event | None  # recorded after the forward on CUDA


class GlipPredictor:
    """Run a GLIP on images with prompts.

    Args:
        model: the detector (moved to ``device`` and put in eval mode).
        config: its config (input size, normalisation, post-processing, prompt padding).
        device: where to run; default CUDA when available.
        amp_dtype: autocast dtype (e.g. ``torch.bfloat16``) on CUDA, and on CPUs with native bf16 dot
            products (AVX512-BF16 / AMX), where it is ~3x faster than fp32; None runs in fp32.
        resize: resize images by the config's min/max size rule (False: feed them at their own size).
        pad_batch: when > 0, a batch of fewer (image, prompt) pairs is filled up to this many with copies of
            its last pair (their outputs dropped), so that a compiled model sees one batch size. The copies add no
            padding: the other pairs' boxes change only by rounding (products blocked for another batch size).
        size_bucket: ``ImagePreprocessor.size_bucket`` (batch sides padded to multiples of it).
        token_bucket: when > 0 and the config does not pad prompts to the limit, prompts pad to
            ``glip.prompts.bucketed_length`` of the batch's longest (few lengths, as ``size_bucket`` sizes).
        tf32: run the forward pass's fp32 matrix products on CUDA as TF32 (``tf32_matmul``): under autocast
            the only large ones are the GEMMs inside torchvision's deformable conv, which runs in fp32 and
            without TF32 takes cuBLAS's SIMT path (no tensor cores). No effect on CPUs.

    ``predict`` is ``collect(submit(...))``. On CUDA, ``submit`` copies the inputs from pinned memory and
    launches the forward pass on the predictor's compute stream without waiting for it, and ``collect`` runs
    the post-processing (batched over the batch's images and levels: a few host syncs) on a second stream once
    that forward is done:
    a caller that submits batch k+1 before collecting batch k keeps the GPU on k+1's forward pass while the
    CPU finishes k (``teacher.Teacher.submit``). Same kernels, same numbers as one at a time.
    """

    def __init__(
        self,
        model: Glip,
        config: GlipConfig,
        device: str | torch.device | None = None,
        amp_dtype: torch.dtype | None = None,
        resize: bool = True,
        pad_batch: int = 0,
        size_bucket: int = 0,
        tf32: bool = False,
        cuda_graphs: bool = False,
        token_bucket: int = 0,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {self.device}")
        self.model = model.to(self.device).eval()
        self.config = config
        self.amp_dtype = amp_dtype if autocast_supported(self.device, amp_dtype) else None
        self.resize = resize
        self.pad_batch = pad_batch
        self.tf32 = tf32
        self.token_bucket = token_bucket
        self.tokenizer = model.tokenizer()
        self.preprocessor = ImagePreprocessor(
            config.input.min_size,
            config.input.max_size,
            config.input.size_divisibility,
            config.input.pixel_mean,
            config.input.pixel_std,
            size_bucket,
        )
        self.postprocessor = build_postprocessor(config)
        on_gpu = self.device.type == "cuda"
        self._compute_stream = torch.cuda.Stream(self.device) if on_gpu else None
        self._collect_stream = torch.cuda.Stream(self.device) if on_gpu else None
        self._graphed = GraphedForward(self.model, self._compute_stream) if cuda_graphs else None

    def predict(self, images: Sequence[ImageInput], prompts: Sequence[Prompt]) -> list[PhraseDetections]:
        """One prompt per image; returns one ``PhraseDetections`` per image (phrase indices into its prompt)."""
        if not images and not prompts:
            return []
        return self.collect(self.submit(images, prompts))

    @torch.no_grad()
    def submit(self, images: Sequence[ImageInput], prompts: Sequence[Prompt]) -> PendingBatch:
        """Preprocess, tokenize and launch the forward pass of a non-empty batch (see the class docstring)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if not images:
            raise ValueError("an empty batch")
        originals = [image_size(image) for image in images]
        if len(images) < self.pad_batch:
            filler = self.pad_batch - len(images)
            images, prompts = [*images, *[images[-1]] * filler], [*prompts, *[prompts[-1]] * filler]
        with _on(self._compute_stream):
            batch = self.preprocessor.batch(images, resize=self.resize, device=self.device)
            text = self.config.text
            tokenized = tokenize_prompts(
                self.tokenizer, prompts, text.max_query_len, text.pad_to_max, self.token_bucket
            )
            forward = self._graphed or self.model
            with (
                torch.autocast(
                    self.device.type,
                    dtype=self.amp_dtype or torch.float32,
                    enabled=self.amp_dtype is not None,
                    cache_enabled=self._graphed is None,  # see GraphedForward
                ),
                tf32_matmul(True if self.tf32 else None),
            ):
                outputs = forward(
                    batch.images,
                    self._to_device(tokenized.input_ids),
                    self._to_device(tokenized.attention_mask),
                    text_padded=not bool(tokenized.attention_mask.all()),  # the host copy: no device wait
                )
            ready = None
            if self._compute_stream is not None:
                ready = torch.cuda.Event()
                ready.record(self._compute_stream)
        count = len(originals)
        return PendingBatch(
            outputs,
            [list(p.token_indices or ()) for p in tokenized.prompts][:count],
            batch.image_sizes[:count],
            batch.scale_factors[:count],
            originals,
            ready,
        )

    @torch.no_grad()
    def collect(self, pending: PendingBatch) -> list[PhraseDetections]:
        """Post-process a submitted batch: one ``PhraseDetections`` per image, on the CPU."""
        count = len(pending.original_sizes)
        with _on(self._collect_stream):
            if pending.ready is not None:
                self._collect_stream.wait_event(pending.ready)
            outputs = pending.outputs
            detections = self.postprocessor(
                [level[:count] for level in outputs.token_logits],
                [level[:count] for level in outputs.box_regression],
                [level[:count] for level in outputs.centerness],
                outputs.anchors,
                pending.phrase_tokens,
                pending.image_sizes,
            )
            return [
                _to_cpu(found.to_original((scale_x, scale_y), original))
                for found, (scale_y, scale_x), original in zip(
                    detections, pending.scale_factors, pending.original_sizes
                )
            ]

    def _to_device(self, tensor: Tensor) -> Tensor:
        """Host -> device; on CUDA from pinned memory without waiting (a pageable copy waits for the stream)."""
        if self.device.type != "cuda":
            return tensor.to(self.device)
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def predict_vocabulary(
        self, images: Sequence[ImageInput], names: Sequence[str]
    ) -> list[PhraseDetections]:
        """Detect a vocabulary of names on every image, one prompt chunk of at most ``max_query_len`` tokens
        at a time (the official chunked evaluation); phrase indices index ``names``."""
        chunks = split_into_prompts(names, self.tokenizer, self.config.text.max_query_len)
        merged: list[list[PhraseDetections]] = [[] for _ in images]
        for chunk in chunks:
            for index, found in enumerate(self.predict(images, [chunk] * len(images))):
                ids = torch.tensor(chunk.phrase_ids, dtype=torch.int64)
                merged[index].append(PhraseDetections(found.boxes, found.scores, ids[found.phrase_indices]))
        return [_concatenate(parts) for parts in merged]


def autocast_supported(device: torch.device, dtype: torch.dtype | None) -> bool:
    """Whether autocast to ``dtype`` runs natively on ``device`` (CUDA; bf16 on CPUs that have it)."""
    if dtype is None:
        return False
    if device.type == "cuda":
        return True
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )


def _on(stream: torch.cuda.Stream | None):
    """``torch.cuda.stream(stream)``, or nothing without one."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _to_cpu(detections: PhraseDetections) -> PhraseDetections:
    return PhraseDetections(
        detections.boxes.float().cpu(), detections.scores.float().cpu(), detections.phrase_indices.cpu()
    )


def _concatenate(parts: Sequence[PhraseDetections]) -> PhraseDetections:
    return PhraseDetections(
        torch.cat([p.boxes for p in parts]),
        torch.cat([p.scores for p in parts]),
        torch.cat([p.phrase_indices for p in parts]),
    )
