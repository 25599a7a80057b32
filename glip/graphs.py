"""The inference forward pass replayed from CUDA graphs.

A GLIP forward pass is thousands of small ops: GLIP-T dispatches about 4,250 aten ops a pass, whatever the batch
(counted on CPU with a dispatch mode, ``tests/test_graphs.py``). On an H200 launching an uncompiled pass of 16
images took the host 227-293 ms, about what the GPU needed to run it (bench/RESULTS.md, session 13): the host,
not the GPU, set the rate. A CUDA graph records the pass's kernels once and launches them all with one call.

``GraphedForward`` keeps one graph per input shape. A compiled model is recorded the same way (its kernels
are chosen during the warm-up calls, before recording).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from torch import Tensor, nn

from glip.model import GlipOutput

logger = logging.getLogger(__name__)


class _Recorded(NamedTuple):
    graph: torch.cuda.CUDAGraph
    inputs: tuple[Tensor, Tensor, Tensor]  # the graph's own images, input ids, attention mask
    outputs: GlipOutput  # written by every replay


class GraphedForward:
    """``model(images, input_ids, attention_mask, text_padded)`` for inference on CUDA, replayed from one CUDA
    graph per input shape (batch, image height and width, prompt length, whether any token is padding).

    A shape's first call runs the model ``warmup`` times eagerly on ``stream`` (lazily made buffers, compiled
    kernels, library workspaces: nothing may be made for the first time while recording), returns the last
    run's outputs and records a graph of the same call. Later calls copy the inputs into the graph's own input
    tensors, replay it and return clones of what post-processing reads (token logits, box regression,
    centerness, anchors; ``class_logits`` and ``alignment`` are None), so that a batch's outputs outlive the
    next replay: callers keep two batches in flight. The graphs share one memory pool, which is safe because
    they run one at a time on ``stream`` and every replay's outputs are cloned before another graph runs.

    A shape whose recording fails (an op that cannot be captured) runs eagerly from then on, logged once; so do
    shapes beyond ``max_graphs`` (each holds its outputs and inputs on the GPU).

    Call it on ``stream``, inside the forward pass's autocast context with ``cache_enabled=False``: a weight
    cast cached while recording would point into the graph's memory afterwards.

    Args:
        model: the detector, in eval mode, on a CUDA device.
        stream: a side stream (not the default stream, on which CUDA cannot record) that every call runs on.
        warmup: eager runs of a new shape before it is recorded.
        max_graphs: shapes recorded at most.
    """

    def __init__(self, model: nn.Module, stream: torch.cuda.Stream, warmup: int = 2, max_graphs: int = 16):
        if warmup < 1 or max_graphs < 1:
            raise ValueError(f"need warmup >= 1 and max_graphs >= 1, got {warmup} and {max_graphs}")
        self.model = model
        self.stream = stream
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, _Recorded] = {}
        self.eager: dict[tuple, str] = {}  # shape -> why it runs eagerly
        self._pool = None

    def __call__(
        self, images: Tensor, input_ids: Tensor, attention_mask: Tensor, text_padded: bool | None = None
    ) -> GlipOutput:
        key = (tuple(images.shape), images.dtype, tuple(input_ids.shape), text_padded)
        recorded = self.graphs.get(key)
        if recorded is None:
            if key in self.eager:
                return self.model(images, input_ids, attention_mask, text_padded)
            return self._record(key, images, input_ids, attention_mask, text_padded)
        for own, given in zip(recorded.inputs, (images, input_ids, attention_mask), strict=True):
            own.copy_(given, non_blocking=True)
        recorded.graph.replay()
        return _cloned(recorded.outputs, attention_mask)

    def _record(
        self, key: tuple, images: Tensor, input_ids: Tensor, attention_mask: Tensor, text_padded: bool | None
    ) -> GlipOutput:
        if len(self.graphs) >= self.max_graphs:
            self._run_eagerly(key, f"more than {self.max_graphs} input shapes")
            return self.model(images, input_ids, attention_mask, text_padded)
        for _ in range(self.warmup):
            outputs = self.model(images, input_ids, attention_mask, text_padded)
        inputs = (images.clone(), input_ids.clone(), attention_mask.clone())
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: other threads' CUDA calls (decoding, copies) do not break this recording
            with torch.cuda.graph(
                graph, pool=self._pool, stream=self.stream, capture_error_mode="thread_local"
            ):
                recorded = self.model(*inputs, text_padded)
        except RuntimeError as error:  # an op that cannot be recorded (a host sync, a host-to-device copy)
            self._run_eagerly(key, f"recording failed: {error}")
            return outputs
        self._pool = graph.pool()
        self.graphs[key] = _Recorded(graph, inputs, _kept(recorded))
        logger.info("CUDA graph %d recorded for input shape %s", len(self.graphs), key)
        return outputs

    def _run_eagerly(self, key: tuple, reason: str) -> None:
        self.eager[key] = reason
        logger.warning("input shape %s runs without a CUDA graph: %s", key, reason)


def _kept(outputs: GlipOutput) -> GlipOutput:
    """The outputs post-processing reads (the rest is dropped, so its memory is the pool's again)."""
    return GlipOutput(
        outputs.token_logits,
        outputs.box_regression,
        outputs.centerness,
        outputs.anchors,
        outputs.text_attention_mask,
    )


def _cloned(outputs: GlipOutput, attention_mask: Tensor) -> GlipOutput:
    def clone(levels: list[Tensor]) -> list[Tensor]:
        return [level.clone() for level in levels]

    return GlipOutput(
        clone(outputs.token_logits),
        clone(outputs.box_regression),
        clone(outputs.centerness),
        clone(outputs.anchors),
        attention_mask,
    )
