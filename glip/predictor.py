"""Images + prompts -> phrase detections in original-image pixels (preprocess, forward, postprocess).

``GlipPredictor`` is the inference path shared by evaluation (``student``) and the teacher (``teacher``):
it batches images of different sizes and prompts of different lengths, runs the model once per batch (bf16
autocast on CUDA when asked, fp32 on CPU) and returns per image the boxes (continuous xyxy, original pixels),
scores and 0-based phrase indices of the image's own prompt. Padding never leaks between images: each image
is scored only against the tokens of its own prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from glip.config import GlipConfig
from glip.model import Glip, build_postprocessor
from glip.postprocess import PhraseDetections
from glip.preprocess import ImageInput, ImagePreprocessor
from glip.prompts import Prompt, split_into_prompts, tokenize_prompts


class GlipPredictor:
    """Run a GLIP on images with prompts.

    Args:
        model: the detector (moved to ``device`` and put in eval mode).
        config: its config (input size, normalisation, post-processing, prompt padding).
        device: where to run; default CUDA when available.
        amp_dtype: autocast dtype (e.g. ``torch.bfloat16``) on CUDA, and on CPUs with native bf16 dot
            products (AVX512-BF16 / AMX), where it is ~3x faster than fp32; None runs in fp32.
        resize: resize images by the config's min/max size rule (False: feed them at their own size).
    """

    def __init__(
        self,
        model: Glip,
        config: GlipConfig,
        device: str | torch.device | None = None,
        amp_dtype: torch.dtype | None = None,
        resize: bool = True,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.config = config
        self.amp_dtype = amp_dtype if autocast_supported(self.device, amp_dtype) else None
        self.resize = resize
        self.tokenizer = model.tokenizer()
        self.preprocessor = ImagePreprocessor(
            config.input.min_size,
            config.input.max_size,
            config.input.size_divisibility,
            config.input.pixel_mean,
            config.input.pixel_std,
        )
        self.postprocessor = build_postprocessor(config)

    @torch.no_grad()
    def predict(self, images: Sequence[ImageInput], prompts: Sequence[Prompt]) -> list[PhraseDetections]:
        """One prompt per image; returns one ``PhraseDetections`` per image (phrase indices into its prompt)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if not images:
            return []
        batch = self.preprocessor.batch(images, resize=self.resize, device=self.device)
        tokenized = tokenize_prompts(
            self.tokenizer, prompts, self.config.text.max_query_len, self.config.text.pad_to_max
        )
        with torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        ):
            outputs = self.model(
                batch.images, tokenized.input_ids.to(self.device), tokenized.attention_mask.to(self.device)
            )
        phrase_tokens = [list(p.token_indices or ()) for p in tokenized.prompts]
        detections = self.postprocessor(
            outputs.token_logits,
            outputs.box_regression,
            outputs.centerness,
            outputs.anchors,
            phrase_tokens,
            batch.image_sizes,
        )
        results = []
        for image_detections, (scale_y, scale_x), image in zip(detections, batch.scale_factors, images):
            original = _image_size(image)
            results.append(_to_cpu(image_detections.to_original((scale_x, scale_y), original)))
        return results

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


def _image_size(image: ImageInput) -> tuple[int, int]:
    """(height, width) of a PIL image or an H x W x 3 array/tensor."""
    if isinstance(image, Image.Image):
        width, height = image.size
        return height, width
    return int(image.shape[0]), int(image.shape[1])


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
