"""Ahead-of-time compilation for TPU slices (`python -m ouro_jax.aot`): Cloud names, analytic FLOPs
against a hand count and XLA's own count, the row search, and real TPU compiles of a small config
(the libtpu wheel of the `[aot]` extra; no TPU is used)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from ouro_jax import objective, sharding
from ouro_jax.aot import compile as aot
from ouro_jax.aot import flops, topology
from ouro_jax.cli import UserError
from ouro_jax.model.config import OuroConfig, tiny
from ouro_jax.model.ouro import Ouro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name, chips, topo, hosts", [
    ("v4-8", 4, "v4:2x2x1", 1), ("v4-64", 32, "v4:2x4x4", 8), ("v5p-128", 64, "v5p:4x4x4", 16),
    ("v5p-1024", 512, "v5p:8x8x8", 128), ("v5e-4", 4, "v5e:2x2", 1), ("v5litepod-16", 16, "v5e:4x4", 4),
    ("v5e-256", 256, "v5e:16x16", 64), ("v6e-64", 64, "v6e:8x8", 16),
])
def test_cloud_names(name, chips, topo, hosts):
    tpu = topology.parse(name)
    assert (tpu.chips, tpu.topology, tpu.hosts) == (chips, topo, hosts)


@pytest.mark.parametrize("name", ["v5p-127", "v5p-12", "v7x-8", "tpu-8", "v5e-3"])
def test_bad_names_are_refused(name):
    with pytest.raises(UserError):
        topology.parse(name)


def test_train_step_flops_hand_count():
    # tiny(): D 64, F 176, N 2 layers, Nq 4, K 2, H 16, V 128; T 4; 2 rows x 8 tokens; remat none, xla.
    # layer: projections 2*64*16*(2*4 + 2*2) = 24576, mlp 6*64*176 = 67584, attention 4*4*16 = 256 per key
    # head 2*64*128 = 16384, gate 128.
    # model: causal keys (8+1)/2: layer 93312; forward/token 4*(2*93312 + 16384 + 128) = 812544;
    #        x3 (backward) x16 tokens = 39002112.
    # executed: 8 keys: layer 94208; forward/token 4*(2*94208 + 16512) = 819712; readout recomputed
    #        4*16384 = 65536; (3*819712 + 65536) * 16 = 40394752.
    step = flops.train_step_flops(tiny(), rows=2, seq_len=8)
    assert (step.model, step.executed) == (39002112, 40394752)
    # full remat recomputes each of the 4 x 2 layer applications once more: + 4*2*94208*16
    full = flops.train_step_flops(tiny(remat_policy="full"), rows=2, seq_len=8)
    assert full.executed - step.executed == 4 * 2 * 94208 * 16 and full.model == step.model
    # Stage II: forward + the gate's backward only
    gate = flops.train_step_flops(tiny(), rows=2, seq_len=8, stage=2)
    assert gate.model == 16 * (812544 + 2 * 4 * 128)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["none", "full", "save_qkv_context"])
def test_flops_match_xla_where_xla_can_count(policy):
    """With one layer and one loop every scan runs once, so XLA's cost analysis (which counts a scan
    body once) is exact: it agrees with the analytic count to within elementwise work (2 %). XLA merges
    the readout's recomputation with its forward when the loop runs once, so that term is left out."""
    cfg = OuroConfig(vocab_size=1024, hidden_size=256, intermediate_size=704, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=4, head_dim=64, total_ut_steps=1,
                     remat_policy=policy, max_position_embeddings=256)
    graphdef, params = nnx.split(Ouro(cfg, rngs=nnx.Rngs(0)))
    rows, seq = 2, 128
    ids = jnp.zeros((rows, seq), jnp.int32)
    count = lambda fn, *args: jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]
    forward = count(lambda p: nnx.merge(graphdef, p)(ids).logits, params)
    loss = lambda p: objective.stage1_loss(nnx.merge(graphdef, p), {"input_ids": ids, "targets": ids})[0]
    train = count(jax.grad(loss), params)
    head, gate = flops.readout_flops(cfg)
    analytic_forward = rows * seq * (flops.layer_flops(cfg).total(seq) + head + gate)
    analytic_train = flops.train_step_flops(cfg, rows, seq).executed - rows * seq * head
    assert forward == pytest.approx(analytic_forward, rel=0.02)
    assert train == pytest.approx(analytic_train, rel=0.02)


@pytest.mark.slow
@pytest.mark.parametrize("count", range(7))
def test_largest_fitting_finds_the_boundary_in_few_compiles(count):
    for limit in range(-1, count):
        calls = []
        fits = lambda i, limit=limit, calls=calls: calls.append(i) or i <= limit
        assert aot.largest_fitting(count, fits) == limit
        assert len(calls) <= 2 * max(count, 1).bit_length() and len(set(calls)) == len(calls)


def test_missing_libtpu_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "libtpu", None)
    with pytest.raises(UserError, match=r"\.\[aot\]"):
        topology.devices(topology.parse("v5e-4"))


def _aot(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    return subprocess.run([sys.executable, "-m", "ouro_jax.aot", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)


@pytest.mark.slow
def test_cli_compiles_the_train_step_for_a_small_slice(tmp_path):
    # the demo recipe widened so that every per-chip block is a whole number of TPU tiles (8 x 128):
    # XLA's byte counts then measure sharding, not the padding of tiny arrays
    wide = dict(num_hidden_layers=2, hidden_size=512, head_dim=128, intermediate_size=1024)
    out = tmp_path / "report.json"
    # grad_accum_steps=3 does not split the batch; --rows_per_chip replaces it (as a recipe's count for
    # another slice would be). An upcycling config compiles without the run it would start from
    # (init_from): compiling reads no checkpoint.
    done = _aot("--config=configs/demo.py", "--topology=v5e-4", "--rows_per_chip=8", f"--json={out}",
                "--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.optimizer.grad_accum_steps=3",
                "--config.init_upcycle=stacked",
                *(f"--config.model.{k}={v}" for k, v in wide.items()))
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["chips"] == 4 and report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert report["rows_per_chip"] == 8 and report["grad_accum_steps"] == 128 // (8 * 4)
    assert report["fits"] and 0 < report["hbm_bytes_per_chip"] < report["hbm_capacity_per_chip"]
    total, per_chip = report["state_bytes_total"], report["state_bytes_per_chip"]
    assert per_chip <= 1.05 * total / 4 + 64 * 2**20
    # XLA's own count of a chip's arguments (its quarter of the state, its rows of the six int32 batch
    # arrays, tile padding of the few small leaves): replicated AdamW moments would add half the total
    batch_bytes = 6 * 128 * 32 * 4 // 4
    assert report["argument_bytes_per_chip"] <= 1.05 * total / 4 + batch_bytes + 2**20 < total / 2
    assert report["model_flops_per_step"] == flops.train_step_flops(
        OuroConfig(**_demo_model(**wide)), 128, 32).model
    assert "rows_per_chip" in done.stdout and "fits" in done.stdout


def _demo_model(**overrides):
    from ouro_jax.train import recipes

    return {**recipes.demo().model.to_dict(), **overrides}


def test_cli_refuses_an_unknown_slice_in_one_line():
    done = _aot("--config=configs/demo.py", "--topology=v9-8")
    assert done.returncode == 1 and done.stderr.strip().count("\n") == 0
    assert done.stderr.startswith("error: --topology='v9-8'")


def test_multi_slice_mesh_spans_slices_with_the_data_axis():
    devices = topology.devices(topology.parse("v5e-4"), num_slices=2)
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1}, devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    for i in range(2):
        assert {d.slice_index for d in mesh.devices[i].flat} == {i}


@pytest.mark.slow
def test_generation_compiles_for_a_small_slice():
    """`generate`'s prefill and decode loop compile for a v5e-4 at two batch sizes, fit, and the decode
    program's arguments per chip hold at least the K/V cache of its rows, and grow by at least that of the
    added rows, counted by hand from the config: each row keeps, per (loop, layer), a k and a v of K
    heads x H dims for its P prompt and M decoded positions, and the rows split over the 4 chips (TPU
    layouts pad small minor dimensions, so the compiled sizes are lower-bounded, not equal)."""
    from ouro_jax.train import recipes

    config = recipes.demo()
    config.mesh.update(data=1, fsdp=-1)
    m = config.model
    context, new_tokens, chips = 32, 2, 4  # `serving` decodes 2 new tokens
    row_kv_bytes = (2 * m.total_ut_steps * m.num_hidden_layers * m.num_key_value_heads * m.head_dim
                    * (context + new_tokens) * 4)  # float32
    args = {}
    for batch in (8, 16):
        reports = aot.serving(config, topology.parse("v5e-4"), batch=batch, context=context)
        assert [r["program"] for r in reports] == ["prefill", "decode_step"]
        assert all(r["fits"] and r["hbm_bytes_per_chip"] > 0 for r in reports)
        decode_step = reports[1]
        assert decode_step["argument_bytes_per_chip"] > batch // chips * row_kv_bytes
        args[batch] = decode_step["argument_bytes_per_chip"]
    assert args[16] - args[8] >= 8 // chips * row_kv_bytes
