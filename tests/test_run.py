"""The run module: a run written by training is found and loaded the same way by `from_pretrained`, export
and resume; config changes on resume are refused or recorded; one training at a time holds a run."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from ouro_jax import from_pretrained, run
from ouro_jax.convert import transfer
from ouro_jax.train import loop, recipes

TINY = {"total_steps": 4, "log_every_steps": 1, "eval_every_steps": 0, "checkpoint_every_steps": 2,
        "data.batch_size": 8, "data.seq_len": 16, "model.total_ut_steps": 2, "model.hidden_size": 32,
        "model.intermediate_size": 64, "model.num_attention_heads": 2, "model.num_key_value_heads": 2,
        "model.head_dim": 16, "async_checkpointing": False}


def tiny_config(**overrides):
    c = recipes.demo()
    c.update_from_flattened_dict({**TINY, **overrides})
    return c


def params_of(model):
    return jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("runs") / "demo"
    loop.train(tiny_config(), str(workdir))
    return workdir


@pytest.mark.slow
def test_a_trained_run_is_located_loaded_exported_and_resumed(trained, tmp_path):
    location = run.locate(trained)
    assert (location.kind, location.root, location.step) == ("run", trained, 4)
    assert run.locate(trained / "checkpoints" / "2").kind == "step"
    assert run.read_config(trained).total_steps == 4
    model = from_pretrained(trained)
    assert model.config == run.model_config(trained)
    reference = params_of(model)
    restored = run.restore_params(trained, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                         reference))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), reference)
    earlier = params_of(from_pretrained(trained / "checkpoints" / "2"))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(earlier), jax.tree.leaves(reference),
                                                        strict=True))

    exported = transfer.export_hf(str(trained), str(tmp_path / "hf"), dtype="float32", tokenizer="none")
    assert run.locate(exported).kind == "hf"
    jax.tree.map(np.testing.assert_array_equal, params_of(from_pretrained(exported)), reference)

    # resume: the same run continued to 6 steps (a recorded config change) starts from step 4
    resumed = tmp_path / "resumed"
    loop.train(tiny_config(), str(resumed))
    original = (resumed / "config.json").read_text()
    with pytest.raises(run.RunError, match=r"another config \(total_steps: 4 -> 6\).*--config_change=allow"):
        loop.train(tiny_config(total_steps=6), str(resumed))
    loop.train(tiny_config(total_steps=6), str(resumed), allow_config_change=True)
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (resumed / "config.json").read_text() == original  # the record of the original run is kept
    change = json.loads((resumed / "config_changes.jsonl").read_text())
    assert change["step"] == 4 and change["changes"] == {"total_steps": [4, 6]}


@pytest.mark.slow
def test_resume_refuses_another_model_and_a_file(trained, tmp_path):
    with pytest.raises(run.RunError, match=r"another model \(model.hidden_size: 32 -> 64\)"):
        run.check_resume(trained, tiny_config(**{"model.hidden_size": 64}), allow_change=True)
    run.check_resume(trained, tiny_config())  # the same config continues
    (tmp_path / "file").write_text("x")
    with pytest.raises(run.RunError, match="is a file"):
        run.check_resume(tmp_path / "file", tiny_config())


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    with run.lock(tmp_path):
        holder = json.loads((tmp_path / run.LOCK).read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(run.RunError, match=f"in use by pid {os.getpid()} on host"):
            with run.lock(tmp_path):
                pass
    assert not (tmp_path / run.LOCK).exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / run.LOCK).write_text(json.dumps({"host": holder["host"], "pid": int(dead)}))
    with run.lock(tmp_path):
        assert json.loads((tmp_path / run.LOCK).read_text())["pid"] == os.getpid()
    assert not (tmp_path / run.LOCK).exists()
