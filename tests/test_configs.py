"""Every shipped training config loads, validates, and carries the published recipe values."""

import importlib
import os

import pytest

from ouro_jax.train import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _configs_importable(monkeypatch):
    monkeypatch.syspath_prepend(REPO)


def _load(name, arg=None):
    return importlib.import_module(f"configs.{name}").get_config(arg)


@pytest.mark.parametrize("name, arg", [
    ("demo", None), ("demo", "steps=50"), ("text", None), ("text", "size=medium"),
    ("ouro_1p4b", "1a"), ("ouro_1p4b", "1b"), ("ouro_1p4b", "2"), ("ouro_1p4b", "3"), ("ouro_1p4b", "4"),
    ("ouro_2p6b", "1b"), ("ouro_2p6b", "4"), ("gate_stage2", "demo"), ("gate_stage2", "ouro_1p4b"),
])
def test_config_validates(name, arg):
    c = _load(name, arg)
    if c.init_upcycle:  # upcycling needs a source run
        with pytest.raises(config_lib.ConfigError, match=r"init_upcycle: needs config\.init_from"):
            config_lib.validate(c)
        c.init_from = "/runs/ouro_1p4b_1a"
    resolved = config_lib.validate(c)
    assert resolved.model.total_ut_steps >= 1


def test_paper_stages():
    # (T, beta, seq_len, schedule, final lr, rope theta) per stage, from the paper's Table 1
    expected = {"1a": (8, 0.1, 4096, "constant", 3e-4, 1e4), "1b": (4, 0.05, 4096, "constant", 3e-4, 1e4),
                "2": (4, 0.05, 16384, "cosine", 3e-5, 4e4), "3": (4, 0.05, 65536, "constant", 3e-5, 1e6),
                "4": (4, 0.05, 32768, "cosine", 1e-5, 1e6)}
    for stage, (steps, beta, seq, schedule, final_lr, theta) in expected.items():
        c = _load("ouro_1p4b", stage)
        assert (c.model.total_ut_steps, c.objective.beta, c.data.seq_len, c.optimizer.schedule) == (
            steps, beta, seq, schedule)
        assert c.optimizer.learning_rate * c.optimizer.min_lr_ratio == pytest.approx(final_lr)
        assert c.model.rope_theta == theta and c.model.num_hidden_layers == 24
        assert c.data.batch_size * c.data.seq_len == (4 if stage == "1a" else 8) * 2**20
        assert (c.optimizer.b1, c.optimizer.b2, c.optimizer.weight_decay, c.optimizer.clip_norm) == (
            0.9, 0.95, 0.1, 1.0)
    two = _load("ouro_2p6b", "1b")
    assert two.model.num_hidden_layers == 48 and two.init_upcycle == "stacked"
    assert _load("gate_stage2", "demo").objective.stage == 2


def test_unknown_variant_is_rejected():
    with pytest.raises(ValueError, match="unknown stage"):
        _load("ouro_1p4b", "5")
    with pytest.raises(ValueError, match="stage must be one of"):
        _load("ouro_2p6b", "1a")
