"""The looped forward against an independent float64 oracle, and its structural properties."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ouro_jax import Ouro, num_params
from ouro_jax.model import config as cfgs
from ouro_jax.model.layers import rope_cos_sin

import oracle
from util import hf_state_dict, unrolled_forward


def _model(seed=0, **overrides):
    return Ouro(cfgs.tiny(**overrides), rngs=nnx.Rngs(seed))


def _randomise_norms_and_gate(model, seed=1):
    """Norm weights start at 1 and the gate bias at 0; perturb them so the test sees their use."""
    key = jax.random.key(seed)
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param) and ("weight" in path[-1:] or "bias" in path[-1:]):
            key, sub = jax.random.split(key)
            var[...] = var[...] + 0.3 * jax.random.normal(sub, var.shape, var.dtype)
    return model


def _ids(batch=2, seq=12, vocab=128, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, seq), 0, vocab)


@pytest.mark.parametrize("overrides", [
    {},  # GQA 4 heads / 2 kv heads, head_dim 16 with hidden 64
    {"num_key_value_heads": 4, "head_dim": 24},  # MHA, heads * head_dim != hidden
    {"tie_word_embeddings": True, "total_ut_steps": 3, "num_hidden_layers": 3},
])
@pytest.mark.slow
def test_matches_float64_oracle(overrides):
    model = _randomise_norms_and_gate(_model(**overrides))
    ids = _ids()
    out = model(ids)
    ref_logits, ref_gates = oracle.forward(hf_state_dict(model), model.config.to_hf_dict(),
                                           np.asarray(ids))
    T = model.config.total_ut_steps
    assert out.logits.shape == (T, 2, 12, 128) and out.exit_pdf.shape == (T, 2, 12)
    np.testing.assert_allclose(out.logits, ref_logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.gate_logits, ref_gates, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.exit_pdf, oracle.exit_pdf(ref_gates), atol=1e-6, rtol=0)
    # the loop really changes the state: loops differ from each other
    assert np.abs(ref_logits[0] - ref_logits[-1]).max() > 1e-2


def test_packed_rows_match_oracle_with_positions():
    model = _randomise_norms_and_gate(_model())
    ids = _ids(seq=10)
    segment_ids = jnp.array([[1] * 4 + [2] * 6, [1] * 7 + [2] * 3])
    positions = jnp.array([list(range(4)) + list(range(6)), list(range(7)) + list(range(3))])
    out = model(ids, positions=positions, segment_ids=segment_ids)
    ref_logits, ref_gates = oracle.forward(
        hf_state_dict(model), model.config.to_hf_dict(), np.asarray(ids),
        positions=np.asarray(positions), segment_ids=np.asarray(segment_ids))
    np.testing.assert_allclose(out.logits, ref_logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.gate_logits, ref_gates, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_packed_segments_never_attend_across_documents():
    model = _model()
    doc_a, doc_b = _ids(1, 5, seed=1), _ids(1, 7, seed=2)
    packed = jnp.concatenate([doc_a, doc_b], axis=1)
    segment_ids = jnp.array([[1] * 5 + [2] * 7])
    positions = jnp.array([list(range(5)) + list(range(7))])
    out = model(packed, positions=positions, segment_ids=segment_ids)
    alone = model(doc_b)
    np.testing.assert_allclose(out.logits[:, :, 5:], alone.logits, atol=1e-5)
    np.testing.assert_allclose(out.gate_logits[:, :, 5:], alone.gate_logits, atol=1e-5)
    # changing the first document leaves every output of the second untouched
    other_a = (doc_a + 17) % 128
    out2 = model(jnp.concatenate([other_a, doc_b], axis=1), positions=positions,
                 segment_ids=segment_ids)
    np.testing.assert_array_equal(out2.logits[:, :, 5:], out.logits[:, :, 5:])
    assert np.abs(out2.logits[:, :, :5] - out.logits[:, :, :5]).max() > 1e-3


def test_causal():
    model = _model()
    ids = _ids(1, 10)
    changed = ids.at[0, 6].set((ids[0, 6] + 1) % 128)
    a, b = model(ids), model(changed)
    np.testing.assert_array_equal(a.logits[:, :, :6], b.logits[:, :, :6])
    np.testing.assert_array_equal(a.gate_logits[:, :, :6], b.gate_logits[:, :, :6])
    assert np.abs(a.logits[:, :, 6:] - b.logits[:, :, 6:]).max() > 1e-3


@pytest.mark.slow
def test_one_loop_is_a_plain_transformer_and_scan_equals_unrolled_loop():
    model = _randomise_norms_and_gate(_model(num_hidden_layers=3))
    ids = _ids()
    for loops in (1, 4):
        out = model(ids, num_loops=loops)
        logits, gates = unrolled_forward(model, ids, loops)
        assert out.logits.shape[0] == loops
        np.testing.assert_allclose(out.logits, logits, atol=1e-5, rtol=0)
        np.testing.assert_allclose(out.gate_logits, gates, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_fused_layer_equals_the_layer():
    """`DecoderLayer.fuse` (one q/k/v and one gate/up matmul, as decoding runs it) gives the same output
    and k, v as the layer's separate projections, and adds no parameter."""
    model = _randomise_norms_and_gate(_model())
    layer, fused = model.unstacked_layers()[1], _model().unstacked_layers()[1]
    nnx.update(fused, nnx.state(layer))
    params = jax.tree.structure(nnx.state(fused, nnx.Param))
    fused.fuse()
    assert jax.tree.structure(nnx.state(fused, nnx.Param)) == params
    x = jax.random.normal(jax.random.key(2), (2, 5, model.config.hidden_size))
    positions = jnp.broadcast_to(jnp.arange(5), (2, 5))
    cos, sin = rope_cos_sin(positions, model.config.head_dim, model.config.rope_theta, jnp.float32)
    (y, (k, v)), (y_fused, (k_fused, v_fused)) = layer.with_kv(x, cos, sin), fused.with_kv(x, cos, sin)
    assert k.shape == v.shape == (2, 5, model.config.num_key_value_heads, model.config.head_dim)
    for ours, theirs in ((y_fused, y), (k_fused, k), (v_fused, v)):
        np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(fused(x, cos, sin), y_fused)


def test_num_loops_override_prefix_consistent():
    """Running 2 loops gives the first 2 loops of a 4-loop run (loops are causal in depth)."""
    model = _model()
    ids = _ids()
    four, two = model(ids), model(ids, num_loops=2)
    np.testing.assert_allclose(two.logits, four.logits[:2], atol=1e-6)


def test_parameter_count_independent_of_loops():
    counts = {num_params(_model(total_ut_steps=t)) for t in (1, 2, 4, 8)}
    assert len(counts) == 1


def _expected_params(c):
    d, f, v, hd = c.hidden_size, c.intermediate_size, c.vocab_size, c.head_dim
    attn = d * hd * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    per_layer = attn + 3 * d * f + 4 * d
    head = 0 if c.tie_word_embeddings else v * d
    return v * d + c.num_hidden_layers * per_layer + d + (d + 1) + head


@pytest.mark.parametrize("preset, expected", [
    ("ouro_1p4b", 1_434_652_673), ("ouro_2p6b", 2_667_974_657)])
def test_released_parameter_counts(preset, expected):
    """Counts from the released checkpoints' safetensors byte sizes, built abstractly."""
    cfg = cfgs.PRESETS[preset]()
    abstract = nnx.eval_shape(lambda: Ouro(cfg, rngs=nnx.Rngs(0)))
    assert num_params(abstract) == expected == _expected_params(cfg)


def test_tiny_parameter_count_formula():
    for overrides in ({}, {"tie_word_embeddings": True}, {"num_key_value_heads": 1}):
        model = _model(**overrides)
        assert num_params(model) == _expected_params(model.config)


def test_bfloat16_compute_keeps_exits_float32():
    model32 = _model()
    model16 = Ouro(cfgs.tiny(dtype="bfloat16"), rngs=nnx.Rngs(0))
    ids = _ids()
    out16, out32 = model16(ids), model32(ids)
    assert out16.logits.dtype == jnp.float32
    assert out16.gate_logits.dtype == jnp.float32 and out16.exit_pdf.dtype == jnp.float32
    assert out16.hidden_states.dtype == jnp.bfloat16
    agree = jnp.mean(jnp.argmax(out16.logits, -1) == jnp.argmax(out32.logits, -1))
    assert agree > 0.9
    np.testing.assert_allclose(out16.exit_pdf, out32.exit_pdf, atol=2e-2)


@pytest.mark.slow
def test_bfloat16_params_are_stored_in_bfloat16():
    model = Ouro(cfgs.tiny(dtype="bfloat16", param_dtype="bfloat16"), rngs=nnx.Rngs(0))
    dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    assert jnp.all(jnp.isfinite(model(_ids()).logits))


def test_every_parameter_has_logical_axes():
    model = _model()
    vocabulary = {"vocab", "embed", "heads", "kv_heads", "kv", "mlp", "layers", None}
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            names = var.get_metadata()["out_sharding"]
            assert len(names) == var.ndim, path
            assert set(names) <= vocabulary, (path, names)
            if path[0] == "layers":
                assert names[0] == "layers", path
    assert model.layers.self_attn.q_proj.kernel.get_metadata()["out_sharding"] == (
        "layers", "embed", "heads", "kv")


@pytest.mark.slow
def test_jitted_step_does_not_retrace():
    from ouro_jax import objective

    model = _model()
    graphdef, params = nnx.split(model)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def train_step(params, batch):
        def loss(p):
            return objective.stage1_loss(nnx.merge(graphdef, p), batch, beta=0.1)[0]
        value, grads = jax.value_and_grad(loss)(params)
        return value, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

    batch = {"input_ids": _ids(seed=3), "targets": _ids(seed=4)}
    first, params = train_step(params, batch)
    batch = {"input_ids": _ids(seed=5), "targets": _ids(seed=6)}
    second, params = train_step(params, batch)  # a retrace would raise
    assert jnp.isfinite(first) and jnp.isfinite(second)


@functools.cache
def _stage1_value_and_grads(remat_policy):
    from ouro_jax import objective

    batch = {"input_ids": _ids(seed=3), "targets": _ids(seed=4)}
    graphdef, params = nnx.split(_model(remat_policy=remat_policy))
    fn = lambda p: objective.stage1_loss(nnx.merge(graphdef, p), batch, beta=0.1)[0]
    return jax.jit(jax.value_and_grad(fn))(params)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch", "save_qkv", "save_qkv_context"])
@pytest.mark.slow
def test_remat_policies_keep_loss_and_gradients(policy):
    (v0, g0), (v1, g1) = _stage1_value_and_grads("none"), _stage1_value_and_grads(policy)
    np.testing.assert_allclose(v0, v1, rtol=1e-6)
    chex.assert_trees_all_close(g0, g1, atol=1e-6)
