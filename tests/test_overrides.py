"""Dotted, typed config overrides: ``glip.config.replace_dotted`` and the jobs' ``--set SECTION.KEY=VALUE``."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest

from glip.config import GlipConfig, demo, replace_dotted, tiny, with_overrides
from jobs import train as train_job
from jobs._settings import apply_sets
from student.schedule import OptimConfig
from student.train import TrainConfig


@dataclass(frozen=True)
class Inner:
    size: int = 1
    rate: float = 0.5


@dataclass(frozen=True)
class Outer:
    flag: bool = False
    count: int = 2
    scale: float = 1.0
    label: str = "x"
    limit: int | None = None
    sizes: tuple[int, ...] = (1, 2)
    pair: tuple[float, str] = (0.5, "a")
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError("count must be >= 0")


@pytest.mark.parametrize(
    "text, expected",
    [("true", True), ("False", False), ("YES", True), ("no", False), ("1", True), ("0", False), (True, True)],
)
def test_bool(text, expected):
    assert replace_dotted(Outer(), {"flag": text}).flag is expected


@pytest.mark.parametrize("text", ["maybe", "2", "", 2])
def test_bool_refuses_anything_else(text):
    with pytest.raises(ValueError, match=r"'flag' expects bool"):
        replace_dotted(Outer(), {"flag": text})


def test_int_float_str():
    outer = replace_dotted(Outer(), {"count": "7", "scale": "1e-3", "label": "hello world"})
    assert (outer.count, outer.scale, outer.label) == (7, 1e-3, "hello world")
    assert type(replace_dotted(Outer(), {"scale": 3}).scale) is float
    assert replace_dotted(Outer(), {"count": "1e3"}).count == 1000
    assert replace_dotted(Outer(), {"count": 4.0}).count == 4
    for bad in ("1.5", 1.5, "many", True):
        with pytest.raises(ValueError, match="'count' expects int"):
            replace_dotted(Outer(), {"count": bad})
    with pytest.raises(ValueError, match="'label' expects str, got 3"):
        replace_dotted(Outer(), {"label": 3})


def test_optional():
    assert replace_dotted(Outer(), {"limit": "5"}).limit == 5
    assert replace_dotted(Outer(limit=5), {"limit": "none"}).limit is None
    assert replace_dotted(Outer(limit=5), {"limit": "NULL"}).limit is None
    assert replace_dotted(Outer(limit=5), {"limit": None}).limit is None
    with pytest.raises(ValueError, match=r"'limit' expects int \| None, got 'x'"):
        replace_dotted(Outer(), {"limit": "x"})


@pytest.mark.parametrize("text", ["(3, 4, 5)", "[3, 4, 5]", "3,4,5", " 3, 4 ,5 ", [3, 4, 5], ("3", 4, 5.0)])
def test_variadic_tuple(text):
    assert replace_dotted(Outer(), {"sizes": text}).sizes == (3, 4, 5)


def test_tuple_edge_cases():
    assert replace_dotted(Outer(), {"sizes": "(160,)"}).sizes == (160,)
    assert replace_dotted(Outer(), {"sizes": "160"}).sizes == (160,)
    assert replace_dotted(Outer(), {"sizes": "()"}).sizes == ()
    assert replace_dotted(Outer(), {"pair": "(2, b)"}).pair == (2.0, "b")
    assert replace_dotted(Outer(), {"pair": "[1.5, 'c']"}).pair == (1.5, "c")
    with pytest.raises(ValueError, match=r"'pair' expects tuple\[float, str\].*2 items, not 3"):
        replace_dotted(Outer(), {"pair": "1,b,c"})
    with pytest.raises(ValueError, match=r"'sizes' expects tuple\[int, \.\.\.\], got '1,x'"):
        replace_dotted(Outer(), {"sizes": "1,x"})


def test_nested_dataclass():
    outer = replace_dotted(Outer(), {"inner.size": "3", "inner.rate": "0.25", "count": "1"})
    assert outer == Outer(count=1, inner=Inner(size=3, rate=0.25))
    assert replace_dotted(Outer(), {"inner": Inner(size=9)}).inner.size == 9
    with pytest.raises(
        KeyError, match=r"'inner' is a group of settings; give a key below it; valid: \['rate', 'size'\]"
    ):
        replace_dotted(Outer(), {"inner": "3"})
    with pytest.raises(KeyError, match="'count' has no keys below it"):
        replace_dotted(Outer(), {"count.x": 1})


def test_unknown_keys_list_the_valid_ones_at_their_level():
    with pytest.raises(
        KeyError, match=r"unknown config key 'inner.sise' \(in 'inner'\); valid: \['rate', 'size'\]"
    ):
        replace_dotted(Outer(), {"inner.sise": 1})
    with pytest.raises(KeyError, match=r"unknown config key 'nope'; valid: \['count', 'flag', 'inner', "):
        replace_dotted(Outer(), {"nope": 1})


def test_post_init_still_runs():
    with pytest.raises(ValueError, match="count must be >= 0"):
        replace_dotted(Outer(), {"count": "-1"})
    with pytest.raises(ValueError, match="FPN channels"):
        replace_dotted(tiny(), {"fpn.channels": "64"})
    with pytest.raises(ValueError, match="text_layers needs freeze_text off"):
        replace_dotted(TrainConfig(freeze_text=True), {"text_layers": "2"})


def test_glip_and_train_configs():
    config = with_overrides(demo(), ["head.num_convs=3", "text.pad_to_max=False", "text.pretrained=none"])
    assert isinstance(config, GlipConfig)
    assert (config.head.num_convs, config.text.pad_to_max, config.text.pretrained) == (3, False, None)
    assert with_overrides(demo(), {"input.train_min_sizes": "(160,)"}).input.train_min_sizes == (160,)
    with pytest.raises(ValueError, match="'head.num_convs' expects int, got '2.5'"):
        with_overrides(demo(), ["head.num_convs=2.5"])
    with pytest.raises(ValueError, match="not of the form key=value"):
        with_overrides(demo(), ["head.num_convs"])
    trained = replace_dotted(TrainConfig(), {"optim.lr": "1e-3", "text_layers": "2", "amp": "no"})
    assert trained.optim == OptimConfig(lr=1e-3, warmup_steps=100) and trained.text_layers == 2
    assert trained.amp is False


def test_apply_sets_replaces_each_section():
    configs = {"model": demo(), "train": TrainConfig(), "other": "untouched"}
    items = ["train.optim.lr=1e-3", "model.head.num_convs=3", "train.steps = 7", "model.loss.weight_class=0"]
    result = apply_sets(items, configs)
    assert result["train"] == TrainConfig(steps=7, optim=OptimConfig(lr=1e-3, warmup_steps=100))
    assert result["model"].head.num_convs == 3 and result["model"].loss.weight_class == 0.0
    assert result["other"] == "untouched" and configs["train"] == TrainConfig()
    assert apply_sets([], configs) == configs


def test_apply_sets_errors():
    configs = {"model": demo(), "train": TrainConfig()}
    with pytest.raises(ValueError, match="not of the form SECTION.KEY=VALUE"):
        apply_sets(["train.steps"], configs)
    with pytest.raises(KeyError, match=r"unknown section 'optim'; valid sections: \['model', 'train'\]"):
        apply_sets(["optim.lr=1"], configs)
    with pytest.raises(ValueError, match="give a key below the section"):
        apply_sets(["train=1"], configs)
    with pytest.raises(KeyError, match=r"section 'train': unknown config key 'optim.nope'.*'lr'"):
        apply_sets(["train.optim.nope=1"], configs)
    with pytest.raises(ValueError, match=r"section 'train': config key 'steps' expects int, got 'ten'"):
        apply_sets(["train.steps=ten"], configs)


@pytest.mark.parametrize(
    "item, expected",
    [
        ("model.nope=1", r"unknown config key 'nope'; valid: \[.*'body'.*'head'"),
        ("train.optim.nope=1", r"'optim.nope' \(in 'optim'\); valid: \[.*'lr'"),
        ("train.steps=1.5", "'steps' expects int, got '1.5'"),
        ("loss.weight_class=1", r"unknown section 'loss'; valid sections: \['model', 'train'\]"),
    ],
)
def test_train_job_rejects_bad_settings_with_exit_2(item, expected, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_job.main(["--out", str(tmp_path / "run"), "--preset", "tiny", "--set", item])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "usage: glip-engine train" in error
    assert re.search(expected, error), error


def test_train_job_applies_shortcuts_then_sets(tmp_path, monkeypatch):
    seen = {}

    def fake_train(config, train_config, *rest):
        seen.update(config=config, train_config=train_config)
        return {}

    monkeypatch.setattr(train_job, "load_coco_detection", lambda *args: ([], []))
    monkeypatch.setattr(train_job, "train", fake_train)
    argv = ["--out", str(tmp_path), "--preset", "tiny", "--detection", "coco.json", "--freeze-text"]
    argv += ["--steps", "9", "--batch-size", "3", "--set", "train.steps=5", "--set", "train.optim.lr=2e-4"]
    assert train_job.main([*argv, "--set", "model.head.num_convs=1"]) == 0
    assert seen["config"] == with_overrides(tiny(), {"head.num_convs": 1})
    train_config = seen["train_config"]
    assert (train_config.steps, train_config.batch_size, train_config.freeze_text) == (5, 3, True)
    assert train_config.optim.lr == 2e-4
