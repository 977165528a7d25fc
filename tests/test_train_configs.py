"""Every shipped training config loads (from its file, without the repository on sys.path), validates,
and carries the published recipe values; variants and keys are checked by one helper."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from ouro_jax import run
from ouro_jax.model.config import OuroConfig
from ouro_jax.train import config as config_lib
from ouro_jax.train import recipes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name, arg=None):
    path = os.path.join(REPO, "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _hf_config_dir(directory, c):
    """A Hugging Face directory with only the config.json of `c`'s source model (validation reads no
    weights): half the layers when `c` upcycles."""
    model = OuroConfig(**c.model.to_dict())
    if c.init_upcycle:
        model = model.replace(num_hidden_layers=model.num_hidden_layers // 2)
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({**model.to_hf_dict(), "model_type": "ouro"}))
    return str(directory)


def test_init_from_is_checked_before_compiling(tmp_path):
    c = recipes.demo()
    c.init_from = str(tmp_path / "missing")
    with pytest.raises(config_lib.ConfigError, match=r"^config\.init_from: .*missing: no such directory$"):
        config_lib.validate(c)
    wide = _with(c, **{"model.hidden_size": 96, "model.rope_theta": 5e5})
    c.init_from = _hf_config_dir(tmp_path / "wide", wide)
    with pytest.raises(config_lib.ConfigError, match=r"another architecture than config\.model: "
                       r"hidden_size=96 \(config\.model: 64\), "
                       r"rope_theta=500000\.0 \(config\.model: 10000\.0\)$"):
        config_lib.validate(c)
    (tmp_path / "run").mkdir()
    run.write_config(tmp_path / "run", c)
    c.init_from = str(tmp_path / "run")
    with pytest.raises(config_lib.ConfigError, match="no complete checkpoint"):
        config_lib.validate(c)
    c.init_from = _hf_config_dir(tmp_path / "same", _with(c, **{"model.total_ut_steps": 8}))  # T may change
    config_lib.validate(c)
    c.init_from = str(tmp_path / "deleted since the run started")
    config_lib.validate(c, resuming=True)  # a resumed run reads its own checkpoint, not init_from


def _with(c, **overrides):
    c = c.copy_and_resolve_references()
    c.update_from_flattened_dict(overrides)
    return c


def _with_local_data(c, tmp_path):
    """Point a config's data at files that exist here (the recipes name corpora of their own)."""
    for data in [c.data, *c.data.mixture.values()]:
        if data.get("source") == "array_record":
            (tmp_path / "shard-0.array_record").write_bytes(b"")
            data.array_record.paths = str(tmp_path / "*.array_record")
        elif data.get("source") == "text":
            (tmp_path / "doc.txt").write_text("In the beginning.\n\nAnd the earth.\n")
            data.text.files = str(tmp_path / "doc.txt")
        elif data.get("source") == "chat":
            (tmp_path / "chat.jsonl").write_text('{"prompt": "Hi", "completion": "Hello."}\n')
            data.chat.files = str(tmp_path / "chat.jsonl")
    return c


@pytest.mark.parametrize("name, arg", [
    ("demo", None), ("demo", "steps=50"), ("text", None), ("text", "size=medium"), ("text", "size=cpu"),
    ("ouro_1p4b", "1a"), ("ouro_1p4b", "1b"), ("ouro_1p4b", "2"), ("ouro_1p4b", "3"), ("ouro_1p4b", "4"),
    ("ouro_2p6b", "1b"), ("ouro_2p6b", "4"), ("gate_stage2", "demo"), ("gate_stage2", "ouro_1p4b"),
    ("sft", None), ("sft", "cpu,weighting=logit_mixture"), ("sft", "ouro_1p4b"), ("sft", "ouro_2p6b"),
])
def test_config_validates(name, arg, tmp_path):
    c = _with_local_data(_load(name, arg), tmp_path)
    # the pod recipes use the TPU splash kernel: validated as on a TPU slice, refused elsewhere
    platform = "tpu" if c.model.attention_impl == "splash" else None
    if c.init_upcycle or c.objective.stage == 2:  # upcycling and Stage II need a source run
        with pytest.raises(config_lib.ConfigError, match=r"(init_upcycle: needs|init_from: Stage II)"):
            config_lib.validate(c, platform=platform)
        c.init_from = _hf_config_dir(tmp_path / "source", c)
    if platform:
        with pytest.raises(config_lib.ConfigError, match=r"model\.attention_impl: 'splash' is the TPU"):
            config_lib.validate(c, platform="gpu")
    resolved = config_lib.validate(c, platform=platform)
    # what a run records (RUN/config.json) reads back as the same config: rerunning the same command
    # resumes instead of being refused as a changed config, and validates to the same pieces
    (tmp_path / "run").mkdir()
    run.write_config(tmp_path / "run", c)
    assert run.config_changes(tmp_path / "run", c) == {}
    assert config_lib.validate(run.read_config(tmp_path / "run"), platform=platform) == resolved


# Tokens per chip in one micro-batch that compiled and fit in a v5p's HBM with 10 % to spare
# (`python -m ouro_jax.aot`, docs/pod_scale.md "Goals: stages x slices"); one whole row is the least.
V5P_MICRO_BATCH_TOKENS = {"ouro_1p4b": 65536, "ouro_2p6b": 32768}


@pytest.mark.parametrize("model, stage", list(recipes.GRAD_ACCUM_V5P_128))
def test_pod_recipes_micro_batches_are_the_fewest_that_fit_a_v5p_128(model, stage):
    """Each stage's micro-batch holds whole rows on each of the 64 chips (16 hosts) and at most the tokens
    per chip that compiled and fit; one micro-batch fewer (that still splits) would hold more."""
    c = _load(model, stage)
    resolved = config_lib.validate(c, num_devices=64, process_count=16, platform="tpu", check_inputs=False)
    rows, seq, budget = c.data.batch_size, c.data.seq_len, max(V5P_MICRO_BATCH_TOKENS[model], c.data.seq_len)
    micro = resolved.micro_batches
    assert rows % (micro * 64) == 0 and rows // (micro * 64) * seq <= budget
    fewer = [m for m in range(1, micro) if rows % (m * 64) == 0]
    assert all(rows // (m * 64) * seq > budget for m in fewer)


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
    with pytest.raises(config_lib.ConfigError, match="stage='5' must be one of 1a, 1b, 2, 3, 4"):
        _load("ouro_1p4b", "5")
    with pytest.raises(config_lib.ConfigError, match="stage='1a' must be one of 1b, 2, 3, 4"):
        _load("ouro_2p6b", "1a")
    with pytest.raises(config_lib.ConfigError, match="unknown variant key 'stpes'; did you mean 'steps'"):
        _load("demo", "stpes=50")
    with pytest.raises(config_lib.ConfigError, match="steps='abc' is not an integer"):
        _load("demo", "steps=abc")
    with pytest.raises(config_lib.ConfigError, match="size='large' must be one of cpu, small, medium"):
        _load("text", "size=large")
    assert _load("demo", "steps=7").total_steps == 7


def test_validation_checks_mesh_batch_and_stage2_before_compiling(tmp_path):
    c = _load("demo")
    c.mesh.data = 3
    with pytest.raises(config_lib.ConfigError, match="mesh"):
        config_lib.validate(c, num_devices=8)
    c.mesh.data = -1
    c.data.batch_size = 12
    with pytest.raises(config_lib.ConfigError, match=r"data\.batch_size: 12 rows must split"):
        config_lib.validate(c, num_devices=8)
    assert config_lib.validate(c, num_devices=4).mesh == {"data": 4, "fsdp": 1, "tensor": 1}


@pytest.mark.parametrize("args, needle", [
    (["--config=configs/demo.py:stpes=50"], "unknown variant key 'stpes'; did you mean 'steps'?"),
    (["--config=configs/demo.py", "--config.totl_steps=5"],
     "unknown config key 'totl_steps'; did you mean 'total_steps'?"),
    (["--config=configs/demoo.py"], "configs/demoo.py"),
    (["--config=configs/ouro_1p4b.py:9"], "stage='9' must be one of"),
])
@pytest.mark.slow
def test_cli_config_mistakes_are_one_line(args, needle, tmp_path):
    workdir = tmp_path / "run"
    args = [a.replace("configs/", os.path.join(REPO, "configs", "")) for a in args]
    result = subprocess.run([sys.executable, "-m", "ouro_jax.train", f"--workdir={workdir}", *args],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert needle in lines[0]
    assert not workdir.exists()


def test_sft_recipes_carry_the_papers_hyper_parameters():
    for model in ("ouro_1p4b", "ouro_2p6b"):
        c = _load("sft", model)
        assert (c.data.source, c.data.seq_len, c.data.chat.mask, c.data.num_epochs) == (
            "chat", 32768, "assistant", 2)
        assert (c.optimizer.learning_rate, c.optimizer.b1, c.optimizer.b2, c.optimizer.schedule) == (
            2e-5, 0.9, 0.95, "cosine")
        assert c.optimizer.weight_decay == 0.0
    assert _load("sft").data.chat.files == "generated"
    with pytest.raises(config_lib.ConfigError, match="weighting='mean' must be one of"):
        _load("sft", "weighting=mean")
