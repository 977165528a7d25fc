"""Training: the loop, optimiser, sharded step, checkpoints, resume and failure handling."""

import functools
import json
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ouro_jax import run, sharding
from ouro_jax.convert.pretrained import save_pretrained
from ouro_jax.data import pipeline
from ouro_jax.model.ouro import Ouro
from ouro_jax.run import restore_params
from ouro_jax.train import config as config_lib
from ouro_jax.train import loop, recipes
from ouro_jax.train import optimizer as optim
from ouro_jax.train import program as program_lib
from ouro_jax.train.step import TrainState

from util import run_until

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A small p-hop run: CLI flags and the same values for in-process configs.
SMALL = {
    "total_steps": 12, "log_every_steps": 1, "eval_every_steps": 6, "checkpoint_every_steps": 4,
    "data.batch_size": 16, "data.seq_len": 16, "data.eval_batches": 2,
    "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_attention_heads": 2,
    "model.num_key_value_heads": 2, "model.head_dim": 16, "model.total_ut_steps": 2,
    "optimizer.warmup_steps": 2,
}
NOT_EXACT = {"tokens_per_s"}  # wall-clock dependent


def small_config(**overrides):
    c = recipes.demo()
    c.update_from_flattened_dict({**SMALL, **overrides})
    return c


def cli(workdir, *extra, **overrides):
    flags = [f"--config.{k}={v}" for k, v in {**SMALL, **overrides}.items()]
    return [sys.executable, "-m", "ouro_jax.train", "--config=configs/demo.py", f"--workdir={workdir}",
            *flags, *extra]


def run_cli(args, **kwargs):
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300, **kwargs)


def records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in NOT_EXACT} for line in f]


# --- the loop -----------------------------------------------------------------------------------
@functools.cache
def _demo_run(tmp_root):
    workdir = os.path.join(tmp_root, "demo")
    loop.train(small_config(total_steps=40, **{"optimizer.learning_rate": 3e-3}), workdir)
    return workdir


@pytest.mark.slow
def test_loss_decreases_and_metrics_are_complete(tmp_path_factory):
    workdir = _demo_run(str(tmp_path_factory.getbasetemp()))
    recs = records(workdir)
    assert [r["step"] for r in recs] == list(range(1, 41))
    first, last = np.mean([r["loss"] for r in recs[:5]]), np.mean([r["loss"] for r in recs[-5:]])
    assert last < first - 0.05, (first, last)
    keys = {"step", "loss", "loss_loop_1", "loss_loop_2", "exit_pdf_loop_1", "exit_pdf_loop_2",
            "weighted_ce", "entropy", "mean_exit_loop", "grad_norm", "lr", "accuracy_loop_1"}
    assert keys <= set(recs[-1])
    evals = [r for r in recs if "eval_loss_loop_1" in r]
    assert [r["step"] for r in evals] == [6, 12, 18, 24, 30, 36, 40]
    assert 0.0 <= evals[-1]["eval_answer_accuracy_loop_2"] <= 1.0
    np.testing.assert_allclose(recs[-1]["exit_pdf_loop_1"] + recs[-1]["exit_pdf_loop_2"], 1.0, atol=1e-5)
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["total_steps"] == 40
    # TensorBoard event files hold the same scalars
    from tensorboardX.proto import event_pb2

    tb_dir = os.path.join(workdir, "tensorboard")
    data = open(os.path.join(tb_dir, os.listdir(tb_dir)[0]), "rb").read()
    losses, tags, pos = {}, set(), 0
    while pos < len(data):  # TFRecord framing: u64 length, u32 crc, payload, u32 crc
        length = int.from_bytes(data[pos:pos + 8], "little")
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
        pos += 16 + length
        for value in event.summary.value:
            tags.add(value.tag)
            if value.tag == "loss":
                losses[event.step] = value.simple_value
    assert losses[40] == pytest.approx(recs[-1]["loss"], rel=1e-6)
    assert {"eval/per_loop", "eval/exit_histogram", "eval_answer_accuracy_loop_2"} <= tags  # plots too


@pytest.mark.slow
def test_same_seed_gives_identical_metrics_and_rerun_is_a_no_op(tmp_path_factory, tmp_path):
    reference = records(_demo_run(str(tmp_path_factory.getbasetemp())))
    workdir = str(tmp_path / "again")
    config = small_config(total_steps=40, **{"optimizer.learning_rate": 3e-3})
    loop.train(config, workdir)
    assert records(workdir) == reference
    ckpts = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert ckpts[-1] == 40 and len(ckpts) <= config.max_checkpoints_to_keep
    loop.train(config, workdir)  # the same command again: resumes at step 40, nothing left to do
    assert records(workdir) == reference


@pytest.mark.slow
def test_sigkill_and_restart_gives_bit_identical_metrics(tmp_path):
    # A run far longer than the test: killed past step 10, resumed, stopped (SIGTERM) a few steps past the
    # kill; an uninterrupted run of the same config stopped later agrees on every common record. Each wait
    # is "at least n records", so no machine is too fast for it.
    steps = {"total_steps": 100_000, "checkpoint_every_steps": 3, "eval_every_steps": 10}
    killed = str(tmp_path / "b")
    code, killed_at = run_until(cli(killed, **steps), killed, 10, signal.SIGKILL)
    assert code == -signal.SIGKILL and killed_at >= 10
    assert run_until(cli(killed, **steps), killed, killed_at + 5, signal.SIGTERM)[0] == 75
    resumed = records(killed)
    assert len(resumed) >= killed_at + 5 and run.latest_step(killed) >= resumed[-1]["step"]
    uninterrupted = str(tmp_path / "a")
    assert run_until(cli(uninterrupted, **steps), uninterrupted, len(resumed), signal.SIGTERM)[0] == 75
    assert records(uninterrupted)[:len(resumed)] == resumed


@pytest.mark.slow
def test_sigterm_saves_and_stops_then_resumes(tmp_path):
    workdir = str(tmp_path / "term")
    steps = {"total_steps": 400, "checkpoint_every_steps": 1000, "eval_every_steps": 0}
    proc = subprocess.Popen(cli(workdir, **steps), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 75  # saved and stopped: "rerun me"
    step = run.latest_step(workdir)
    assert step is not None and 0 < step < 400  # saved where it stopped, not at a periodic step
    assert records(workdir)[-1]["step"] <= step


# --- configuration and failures --------------------------------------------------------------------
@pytest.mark.slow
def test_cli_overrides_and_rejections(tmp_path):
    unknown = run_cli(cli(str(tmp_path / "u"), **{"optimizer.nonexistent": 1}))
    assert unknown.returncode != 0 and "nonexistent" in unknown.stderr
    for overrides, needle in [
        ({"model.total_ut_steps": 0}, "total_ut_steps=0"),
        ({"objective.stage": 3}, "config.objective.stage"),
        ({"optimizer.schedule": "linear"}, "config.optimizer.schedule"),
        ({"mesh.data": 3}, "mesh"),
        ({"data.source": "text", "data.text.files": "/nonexistent/*.txt"}, "/nonexistent"),
        ({"data.source": "text", "data.text.files": os.path.join(REPO, "README.md"),
          "data.tokenizer": "/no/such/tokenizer.json"}, "/no/such/tokenizer.json"),
    ]:
        workdir = str(tmp_path / "bad")
        result = run_cli(cli(workdir, **overrides))
        assert result.returncode == 1, (overrides, result.stderr[-1500:])
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and needle in lines[-1], (overrides, lines[-3:])
        assert not os.path.exists(os.path.join(workdir, "checkpoints")), overrides


@pytest.mark.slow
def test_nan_loss_stops_with_one_line_and_keeps_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path / "nan")
    result = run_cli(cli(workdir, **{"optimizer.learning_rate": 1e12, "optimizer.warmup_steps": 0,
                                     "optimizer.clip_norm": 1e30, "checkpoint_every_steps": 1,
                                     "total_steps": 50, "async_checkpointing": False}))
    assert result.returncode == 1, result.stderr[-1500:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: loss is") and "last good checkpoint" in last_line
    cfg = small_config()
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
        lambda: Ouro(config_lib.validate(cfg).model, rngs=nnx.Rngs(0)))))
    params = restore_params(workdir, abstract)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


# --- optimiser ------------------------------------------------------------------------------------
def test_schedules():
    opt = dict(learning_rate=1.0, warmup_steps=10, decay_steps=20, min_lr_ratio=0.1)
    wsd = optim.learning_rate_schedule({**opt, "schedule": "wsd"}, 100)
    assert float(wsd(5)) == pytest.approx(0.5) and float(wsd(10)) == pytest.approx(1.0)
    assert float(wsd(80)) == pytest.approx(1.0) and float(wsd(90)) == pytest.approx(0.55)
    assert float(wsd(100)) == pytest.approx(0.1)
    cos = optim.learning_rate_schedule({**opt, "schedule": "cosine"}, 100)
    assert float(cos(55)) == pytest.approx(0.55) and float(cos(100)) == pytest.approx(0.1)
    const = optim.learning_rate_schedule({**opt, "schedule": "constant"}, 100)
    assert float(const(99)) == pytest.approx(1.0)


def test_weight_decay_skips_norms_and_gate_bias():
    params = nnx.to_pure_dict(nnx.state(Ouro(config_lib.validate(small_config()).model,
                                             rngs=nnx.Rngs(0))))
    mask = optim.decay_mask(params)
    assert not mask["norm"]["weight"] and not mask["early_exit_gate"]["bias"]
    assert not mask["layers"]["input_layernorm_2"]["weight"]
    assert mask["early_exit_gate"]["kernel"] and mask["embed_tokens"]["embedding"]
    assert mask["layers"]["mlp"]["down_proj"]["kernel"]


def _step_setup(config, mesh):
    resolved = config_lib.validate(config, num_devices=mesh.size, check_inputs=False)  # no init_from read
    program = program_lib.build(config, resolved, mesh)
    batch = next(iter(pipeline.build_train_dataset(config.data, seed=0)))
    return program.init(), program.train_step, sharding.put_batch(batch, program.batch_sharding)


@pytest.mark.slow
def test_stage2_updates_only_the_gate():
    config = small_config(init_from="/runs/trained", **{"objective.stage": 2, "optimizer.warmup_steps": 0})
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    state, step, batch = _step_setup(config, mesh)
    before = jax.device_get(state.params)
    new_state, metrics = step(state, batch)
    after = jax.device_get(new_state.params)
    for path, old in jax.tree_util.tree_leaves_with_path(before):
        new = after
        for key in path:
            new = new[key.key]
        changed = not np.array_equal(old, new)
        assert changed == (path[0].key == "early_exit_gate"), path
    assert np.isfinite(float(metrics["loss"]))


@pytest.mark.slow
def test_gradient_accumulation_matches_one_big_batch():
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    one, step1, batch = _step_setup(small_config(), mesh)
    two, step2, _ = _step_setup(small_config(**{"optimizer.grad_accum_steps": 4}), mesh)
    (s1, m1), (s2, m2) = step1(one, batch), step2(two, batch)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
    chex.assert_trees_all_close(s1.params, s2.params, atol=1e-6)


# --- sharding -------------------------------------------------------------------------------------
MESH_CONFIG = {"model.num_key_value_heads": 2, "model.num_attention_heads": 2}


@functools.cache
def _single_device_step():
    """One train step on one device: (params, metrics) on the host."""
    state, step, batch = _step_setup(small_config(**MESH_CONFIG),
                                     sharding.make_mesh({"data": 1}, jax.devices()[:1]))
    new_state, metrics = step(state, batch)
    return jax.device_get(new_state.params), jax.device_get(metrics)


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2)])
@pytest.mark.slow
def test_mesh_equivalence_and_real_sharding(shape):
    params1, m1 = _single_device_step()
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape, strict=True)))
    state8, step8, batch8 = _step_setup(small_config(**MESH_CONFIG), mesh)
    s8, m8 = step8(state8, batch8)
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m8["grad_norm"], rtol=1e-5)
    chex.assert_trees_all_close(params1, jax.device_get(s8.params), atol=1e-5)
    # parameters are sharded as the rules say
    q = s8.params["layers"]["self_attn"]["q_proj"]["kernel"]  # [layers, embed, heads, kv]
    embedding = s8.params["embed_tokens"]["embedding"]  # [vocab, embed]
    expected_q = jax.sharding.PartitionSpec(None, "fsdp" if shape[1] > 1 else None,
                                            "tensor" if shape[2] > 1 else None, None)
    named = lambda spec: jax.sharding.NamedSharding(mesh, spec)
    assert q.sharding.is_equivalent_to(named(expected_q), q.ndim)
    assert embedding.sharding.is_equivalent_to(named(jax.sharding.PartitionSpec(
        "tensor" if shape[2] > 1 else None, "fsdp" if shape[1] > 1 else None)), 2)
    shard_shape = q.addressable_shards[0].data.shape
    assert shard_shape[1] == q.shape[1] // shape[1] and shard_shape[2] == q.shape[2] // shape[2]


def test_mesh_shape_errors():
    assert sharding.mesh_shape({"data": -1, "tensor": 2}, 8) == (4, 1, 2)
    with pytest.raises(ValueError, match="needs 6 devices"):
        sharding.mesh_shape({"data": 3, "fsdp": 2}, 8)
    with pytest.raises(ValueError, match="unknown axes"):
        sharding.mesh_shape({"model": 2}, 8)
    with pytest.raises(ValueError, match="cannot fill"):
        sharding.mesh_shape({"data": -1, "fsdp": 3}, 8)


def test_checkpoint_restores_onto_another_mesh(tmp_path):
    config = small_config()
    mesh_a = sharding.make_mesh({"data": 1, "fsdp": 8})
    state, step, batch = _step_setup(config, mesh_a)
    state, _ = step(state, batch)
    data_iter = iter(pipeline.build_train_dataset(config.data, seed=0))
    ckpt = run.Checkpointer(tmp_path / "run", max_to_keep=2)
    ckpt.save(int(state.step), *state.checkpoint_items(), data_iter)
    ckpt.manager.wait_until_finished()
    mesh_b = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
    fresh, _, _ = _step_setup(config, mesh_b)
    target = program_lib.abstract_like(fresh, jax.tree.map(lambda x: x.sharding, fresh))
    restored = TrainState.from_checkpoint_items(*ckpt.restore(
        1, *target.checkpoint_items(), iter(pipeline.build_train_dataset(config.data, seed=0))))
    ckpt.close()
    chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(state))
    up = restored.params["layers"]["mlp"]["up_proj"]["kernel"]  # [layers, embed, mlp]
    assert up.sharding.is_equivalent_to(
        jax.sharding.NamedSharding(mesh_b, jax.sharding.PartitionSpec(None, None, "tensor")), 3)


@pytest.mark.slow
def test_init_from_a_hugging_face_directory(tmp_path):
    """A run starts from an HF export's weights directly (no `convert --to=run` first)."""
    config = small_config(total_steps=1, eval_every_steps=0, **{"optimizer.learning_rate": 1e-9})
    model = config_lib.validate(config).model
    source = Ouro(model, rngs=nnx.Rngs(7))  # not the run's seed: a fresh init would not match
    config.init_from = str(save_pretrained(source, tmp_path / "hf", dtype="float32"))
    loop.train(config, str(tmp_path / "run"))
    trained = restore_params(str(tmp_path / "run"), nnx.to_pure_dict(nnx.state(nnx.eval_shape(
        lambda: Ouro(model, rngs=nnx.Rngs(0))))))
    chex.assert_trees_all_close(trained, nnx.to_pure_dict(nnx.state(source)), atol=1e-6)


@pytest.mark.slow
def test_init_from_with_upcycling(tmp_path_factory, tmp_path):
    source = _demo_run(str(tmp_path_factory.getbasetemp()))
    config = small_config(total_steps=1, eval_every_steps=0, init_from=source,
                          init_upcycle="interleaved", **{"model.num_hidden_layers": 2,
                                                         "optimizer.learning_rate": 1e-9})
    loop.train(config, str(tmp_path / "up"))
    cfg1 = config_lib.validate(small_config()).model
    old = restore_params(source, nnx.to_pure_dict(nnx.state(nnx.eval_shape(
        lambda: Ouro(cfg1, rngs=nnx.Rngs(0))))))
    new = restore_params(str(tmp_path / "up"), nnx.to_pure_dict(nnx.state(nnx.eval_shape(
        lambda: Ouro(config_lib.validate(config).model, rngs=nnx.Rngs(0))))))
    old_up = old["layers"]["mlp"]["up_proj"]["kernel"]  # [1, ...] -> [2, ...] interleaved copies
    new_up = new["layers"]["mlp"]["up_proj"]["kernel"]
    np.testing.assert_allclose(new_up[0], old_up[0], atol=1e-6)
    np.testing.assert_allclose(new_up[1], old_up[0], atol=1e-6)
    np.testing.assert_allclose(new["lm_head"]["kernel"], old["lm_head"]["kernel"], atol=1e-6)
    assert jnp.asarray(new_up).shape[0] == 2
