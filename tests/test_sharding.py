"""Sharding on 8 fake CPU devices: the optimiser state is sharded like the parameters, activations keep
the batch split through the layers, and per-device kernels see their own rows."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from ouro_jax import sharding
from ouro_jax.data import pipeline
from ouro_jax.model.config import tiny
from ouro_jax.model.layers import attention_mask, masked_attention, splash_attention
from ouro_jax.train import config as config_lib
from ouro_jax.train import program as program_lib
from ouro_jax.train import recipes

ROWS, SEQ = 16, 32


def _config(**overrides):
    """The demo recipe with 2 scanned layers, 16 rows of 32 tokens."""
    c = recipes.demo(steps=10)
    c.model.update(num_hidden_layers=2, scan_layers=True, remat_policy="full")
    c.data.update(batch_size=ROWS, seq_len=SEQ)
    for key, value in overrides.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


def _program(config, mesh_shape):
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, mesh_shape, strict=True)))
    resolved = config_lib.validate(config, num_devices=mesh.size, check_inputs=False)  # no init_from read
    return program_lib.build(config, resolved, mesh)


def _at(tree, keys):
    for key in keys:
        tree = tree[key]
    return tree


@pytest.mark.parametrize("stage", [1, 2])
def test_every_optimizer_moment_is_sharded_like_its_parameter(stage):
    config = _config(**{"objective.stage": stage})
    if stage == 2:
        config.init_from = "/runs/trained"  # the programs never read it
    program = _program(config, (2, 4, 1))
    state = program.init()
    moments = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state):
        names = [getattr(k, "name", getattr(k, "key", None)) for k in path]
        if "mu" in names or "nu" in names:
            moment = names.index("mu") if "mu" in names else names.index("nu")
            param = _at(state.params, names[moment + 1:])
            assert leaf.shape == param.shape, names
            assert leaf.sharding.is_equivalent_to(param.sharding, leaf.ndim), (names, leaf.sharding)
            assert leaf.addressable_shards[0].data.shape == param.addressable_shards[0].data.shape
            moments += 1
        else:  # step counts
            assert leaf.ndim == 0 and leaf.sharding.is_fully_replicated, names
    params = len(jax.tree.leaves(state.params))
    assert moments == 2 * (params if stage == 1 else 2)  # Stage II: AdamW state of the gate only
    # the fsdp axis really splits the moments: a [layers, embed, heads, kv] kernel holds embed / 4
    mu_q = [x for p, x in jax.tree_util.tree_leaves_with_path(state.opt_state)
            if "q_proj" in jax.tree_util.keystr(p) and ".mu" in jax.tree_util.keystr(p)]
    if stage == 1:
        assert mu_q[0].addressable_shards[0].data.shape[1] == mu_q[0].shape[1] // 4


def _full_batch_shapes(hlo: str) -> list[str]:
    """Array shapes in a partitioned HLO module that hold all ROWS rows of SEQ tokens."""
    return [m for m in re.findall(r"\[([\d,]+)\]", hlo)
            if m.startswith(f"{ROWS},{SEQ}") or re.fullmatch(rf"{ROWS},\d+,{SEQ},{SEQ}", m)]


@pytest.mark.slow
def test_the_compiled_train_step_never_holds_the_whole_batch_on_a_device():
    """Per-device HLO shapes: activations and attention scores hold ROWS / 8 rows, never all ROWS
    (without activation constraints XLA splits the hidden size like the FSDP weights and gathers rows)."""
    program = _program(_config(), (1, 8, 1))
    batch = {k: jax.ShapeDtypeStruct((ROWS, SEQ), jnp.int32, sharding=program.batch_sharding)
             for k in pipeline.BATCH_KEYS}
    hlo = program.train_step.lower(program.abstract_state, batch).compile().as_text()
    local = ROWS // 8
    assert re.search(rf"\[{local},{SEQ},64\]", hlo), "per-device [rows, S, D] activations expected"
    assert re.search(rf"\[{local},4,{SEQ},{SEQ}\]", hlo), "per-device attention scores expected"
    assert _full_batch_shapes(hlo) == []


def test_constrain_keeps_rows_split_where_the_partitioner_would_split_features():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    named = lambda *spec: NamedSharding(mesh, PartitionSpec(*spec))
    x = jax.ShapeDtypeStruct((16, 32), jnp.float32, sharding=named(("data", "fsdp")))
    w = jax.ShapeDtypeStruct((32, 64), jnp.float32, sharding=named(None, "fsdp"))
    project = lambda x, w: sharding.constrain(x @ w, ("batch", None))
    free = jax.jit(project).lower(x, w).compile().output_shardings  # no mesh current: the identity
    held = jax.jit(sharding.traced_on(mesh, project)).lower(x, w).compile().output_shardings
    assert not free.is_equivalent_to(named(("data", "fsdp"), None), 2)
    assert held.is_equivalent_to(named(("data", "fsdp"), None), 2)


def test_per_shard_runs_on_each_devices_rows():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    x = jnp.ones((16, 3))
    rows_seen = sharding.per_shard(lambda a: a * a.shape[0], [("batch", None)])
    on_mesh = jax.device_put(x, sharding.batch_sharding(mesh))
    np.testing.assert_array_equal(jax.jit(sharding.traced_on(mesh, rows_seen))(on_mesh), 2 * x)
    np.testing.assert_array_equal(rows_seen(x), 16 * x)  # outside a mesh: the whole batch


def test_splash_attention_per_shard_matches_masked_attention():
    """The Pallas splash kernel (interpreted on CPU) run per device on 2 x 2 rows equals the XLA
    attention under the segment-and-causal mask, forward and gradients."""
    cfg = tiny(num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    rng = np.random.default_rng(0)
    b, s = 4, 256
    q = jnp.asarray(rng.normal(size=(b, s, 4, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, s, 2, 16)), jnp.float32) for _ in range(2))
    segments = jnp.asarray(np.sort(rng.integers(1, 4, size=(b, s)), axis=1), jnp.int32)
    mesh = sharding.make_mesh({"fsdp": 2}, jax.devices()[:2])
    q, k, v = (jax.device_put(x, NamedSharding(mesh, PartitionSpec("fsdp"))) for x in (q, k, v))

    def loss(attend):
        return lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v)))

    splash = sharding.traced_on(mesh, loss(splash_attention(cfg, segments, interpret=True)))
    reference = loss(masked_attention(cfg, attention_mask(segments)))
    (value, grads), (ref_value, ref_grads) = (
        jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v) for f in (splash, reference))
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, atol=2e-5)
