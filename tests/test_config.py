from __future__ import annotations

import json
from dataclasses import replace

import pytest

from glip import config as cfg


def test_presets_build_and_round_trip_through_json():
    for name in cfg.PRESETS:
        config = cfg.preset(name)
        assert cfg.GlipConfig.from_dict(json.loads(config.to_json())) == config


def test_configs_saved_before_the_resnet_body_still_load():
    values = cfg.glip_t().to_dict()
    del values["body"], values["resnet"]
    assert cfg.GlipConfig.from_dict(values) == cfg.glip_t()


def test_reference_config_equals_tiny_preset(reference):
    values = json.loads((reference / "tiny" / "config.json").read_text())
    assert replace(cfg.from_reference_config(values), name="tiny") == cfg.tiny()


@pytest.mark.parametrize("official, ours", [("glip_t_o365_goldg", cfg.glip_t), ("glip_l", cfg.glip_l)])
def test_official_config_values_give_presets(reference, official, ours):
    values = json.loads((reference / "official_configs.json").read_text())["models"][official]["values"]
    built = cfg.from_official(values, name=ours().name)
    assert built == ours()


def test_overrides_and_unknown_keys():
    config = cfg.with_overrides(cfg.demo(), ["head.num_convs=3", "swin.depths=(2, 2, 4, 2)"])
    assert config.head.num_convs == 3 and config.swin.depths == (2, 2, 4, 2)
    with pytest.raises(KeyError, match="valid:.*num_convs"):
        cfg.with_overrides(cfg.demo(), {"head.num_conv": 3})
    with pytest.raises(KeyError, match="unknown preset"):
        cfg.preset("glip_xl")


def test_contradictions_raise():
    with pytest.raises(ValueError, match="FPN channels"):
        cfg.with_overrides(cfg.tiny(), {"fpn.channels": 64})
    with pytest.raises(ValueError, match="not divisible"):
        cfg.SwinConfig(embed_dim=30, num_heads=(4, 4, 4, 4))
    with pytest.raises(ValueError, match="unknown vision body"):
        cfg.with_overrides(cfg.demo(), {"body": "vit"})
    with pytest.raises(ValueError, match="4 stages"):
        cfg.ResNetConfig(depths=(2, 2, 2))
    with pytest.raises(ValueError, match="not supported"):
        cfg.from_official({"MODEL.DYHEAD.FUSE_CONFIG.TYPE": "SCAN"})
