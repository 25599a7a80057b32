"""The GLIP model: Swin + FPN, a BERT-family text encoder, the deep-fusion DyHead, ATSS anchors.

``Glip.forward`` follows the paper's figure: encode the image, encode the prompt, fuse them in the head, score
every (anchor, token) pair. Losses live in ``glip.loss`` (the criterion), detections in ``glip.postprocess``;
``build_model``, ``build_criterion`` and ``build_postprocessor`` are the only readers of a ``GlipConfig``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from torch import Tensor, nn
from transformers import AutoTokenizer, BertConfig, PreTrainedTokenizerBase

from glip.anchors import AnchorGenerator
from glip.atss import AtssAssigner
from glip.backbone import FeaturePyramid, ResNetBody, SwinTransformer, VisionBackbone
from glip.box_ops import BoxCoder
from glip.config import GlipConfig
from glip.head import Alignment, GroundingHead
from glip.loss import GroundingCriterion
from glip.postprocess import GroundingPostProcessor
from glip.pretrained import minilm_path
from glip.text import TextEncoder

logger = logging.getLogger(__name__)


@dataclass
class GlipOutput:
    """What the model computes for a batch of B images and their prompts of T tokens.

    Attributes:
        token_logits: per level P3..P7, ``[B, H_l*W_l, T]`` float alignment logits (positions row-major (y, x)).
        box_regression: per level, ``[B, 4, H_l, W_l]`` box deltas (after the per-level scale).
        centerness: per level, ``[B, 1, H_l, W_l]`` centerness logits.
        anchors: per level, ``[H_l*W_l, 4]`` float32 anchors in the legacy (+1) xyxy convention of the padded
            batch, shared by all images.
        text_attention_mask: ``[B, T]`` the prompt mask the logits were computed with.
        class_logits: per level, ``[B, K, H, W]`` logits of the legacy class conv (only trained, and only
            meaningful, with the classification loss on).
        alignment: the parts of the token logits, to score regions against other images' tokens (GLIPv2's
            inter-image loss).
    """

    token_logits: list[Tensor]
    box_regression: list[Tensor]
    centerness: list[Tensor]
    anchors: list[Tensor]
    text_attention_mask: Tensor
    class_logits: list[Tensor] | None = None
    alignment: Alignment | None = None


class Glip(nn.Module):
    """Grounded language-image detector.

    Args:
        backbone: Swin + FPN returning P3..P7.
        text_encoder: BERT-family encoder of the prompt.
        head: the deep-fusion DyHead with token-alignment, box and centerness outputs.
        anchor_generator: one ATSS anchor per location and level.
        tokenizer_path: folder of the WordPiece tokenizer that matches ``text_encoder``.
    """

    def __init__(
        self,
        backbone: VisionBackbone,
        text_encoder: TextEncoder,
        head: GroundingHead,
        anchor_generator: AnchorGenerator,
        tokenizer_path: str | Path,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.text_encoder = text_encoder
        self.head = head
        self.anchor_generator = anchor_generator
        self.tokenizer_path = str(tokenizer_path)

    def forward(
        self, images: Tensor, input_ids: Tensor, attention_mask: Tensor, text_padded: bool | None = None
    ) -> GlipOutput:
        """``images`` [B,3,H,W] normalised BGR (H, W multiples of 32); ``input_ids``/``attention_mask`` [B,T].
        ``text_padded``: whether any token is padding, when the caller knows (``TextEncoder.forward``)."""
        features = self.backbone(images)
        text = self.text_encoder(input_ids, attention_mask, text_padded)
        head = self.head(features, text)
        anchors = self.anchor_generator([tuple(level.shape[-2:]) for level in features])
        return GlipOutput(
            head.token_logits,
            head.box_regression,
            head.centerness,
            anchors,
            attention_mask,
            head.legacy_class_logits,
            head.alignment,
        )

    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The fast WordPiece tokenizer of the text encoder (loaded once per process)."""
        return _tokenizer(self.tokenizer_path)


@cache
def _tokenizer(path: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(path, use_fast=True, local_files_only=True)


def text_source(config: GlipConfig) -> Path | None:
    """Folder of the pretrained text encoder of ``config`` (None: random init from the configured sizes)."""
    if config.text.pretrained is None:
        return None
    if config.text.pretrained == "minilm":
        return minilm_path()
    return Path(config.text.pretrained)


def build_text_encoder(config: GlipConfig, load_pretrained: bool = True) -> TextEncoder:
    """The configured text encoder; ``load_pretrained=False`` builds the same shapes without reading weights
    (when a checkpoint will overwrite them anyway)."""
    source = text_source(config)
    if source is not None and load_pretrained:
        encoder = TextEncoder.from_pretrained(source)
        if encoder.hidden_size != config.text.hidden_size:
            raise ValueError(
                f"{source}: hidden size {encoder.hidden_size} != config {config.text.hidden_size}"
            )
        return encoder
    bert = BertConfig(
        vocab_size=config.text.vocab_size,
        hidden_size=config.text.hidden_size,
        num_hidden_layers=config.text.num_layers,
        num_attention_heads=config.text.num_heads,
        intermediate_size=config.text.intermediate_size,
        max_position_embeddings=config.text.max_position_embeddings,
        hidden_dropout_prob=config.text.dropout,
        attention_probs_dropout_prob=config.text.dropout,
    )
    return TextEncoder.from_config(bert)


def build_model(config: GlipConfig, load_pretrained_text: bool = True) -> Glip:
    """A GLIP with the official initialisation (and pretrained text weights where the config names them)."""
    body: SwinTransformer | ResNetBody
    if config.body == "resnet":
        body = ResNetBody(config.resnet.width, config.resnet.depths)
    else:
        body = SwinTransformer(
            embed_dim=config.swin.embed_dim,
            depths=config.swin.depths,
            num_heads=config.swin.num_heads,
            window_size=config.swin.window_size,
            mlp_ratio=config.swin.mlp_ratio,
            drop_path_rate=config.swin.drop_path_rate,
            use_checkpoint=config.swin.use_checkpoint,
        )
    fpn = FeaturePyramid(
        body.stage_channels[1:], config.fpn.channels, config.fpn.drop_block_prob, config.fpn.drop_block_size
    )
    head = GroundingHead(
        channels=config.head.channels,
        text_dim=config.text.hidden_size,
        num_convs=config.head.num_convs,
        fusion_embed_dim=config.head.fusion_embed_dim,
        fusion_heads=config.head.fusion_heads,
        text_layer_heads=config.text.num_heads,
        text_layer_intermediate=config.text.intermediate_size,
        num_legacy_classes=config.head.num_legacy_classes,
        prior_prob=config.head.prior_prob,
        log_scale_init=config.head.log_scale_init,
        fusion_dropout=config.head.fusion_dropout,
        text_layer_dropout=config.head.text_layer_dropout,
        gradient_checkpointing=config.head.use_checkpoint,
        deformable=config.head.deformable,
        fused_text_dot_product=config.head.fused_text_dot_product,
        train_class_logits=config.loss.weight_class > 0,
    )
    anchors = AnchorGenerator(config.anchors.sizes, config.anchors.strides, config.anchors.aspect_ratios)
    text_encoder = build_text_encoder(config, load_pretrained_text)
    return Glip(VisionBackbone(body, fpn), text_encoder, head, anchors, text_source(config) or minilm_path())


def build_criterion(config: GlipConfig) -> GroundingCriterion:
    return GroundingCriterion(
        AtssAssigner(config.loss.atss_top_k), BoxCoder(), config.loss.focal_alpha, config.loss.focal_gamma
    )


def loss_weights(config: GlipConfig) -> dict[str, float]:
    """The one place losses are weighted (official: token 1.0, GIoU 2.0, centerness 1.0; the classification
    loss only when its weight is above 0)."""
    weights = {
        "loss_token": config.loss.weight_token,
        "loss_reg": config.loss.weight_reg,
        "loss_centerness": config.loss.weight_centerness,
    }
    if config.loss.weight_class > 0:
        weights["loss_class"] = config.loss.weight_class
    return weights


def build_postprocessor(config: GlipConfig) -> GroundingPostProcessor:
    return GroundingPostProcessor(
        score_threshold=config.postprocess.score_threshold,
        pre_nms_top_n=config.postprocess.pre_nms_top_n,
        nms_threshold=config.postprocess.nms_threshold,
        detections_per_image=config.postprocess.detections_per_image,
        box_coder=BoxCoder(),
    )
