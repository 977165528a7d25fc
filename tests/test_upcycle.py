"""Upcycling by layer duplication (ouro_jax.train.upcycle): what each order preserves, exactly, and
what neither does.

With N layers and T loops, the original model computes per loop [L_0 … L_{N-1}, norm]. After
`upcycle(params, 2, order)` the 2N-layer model computes per loop
  stacked:     [L_0 … L_{N-1}, L_0 … L_{N-1}, norm]      (the old stack twice, no norm in between)
  interleaved: [L_0, L_0, L_1, L_1, …, L_{N-1}, L_{N-1}, norm]
Neither equals the original model run for 2T loops, [L_0 … L_{N-1}, norm] x 2T, because that one
applies model.norm between the two passes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ouro_jax.model.config import tiny
from ouro_jax.model.layers import rope_cos_sin
from ouro_jax.model.ouro import Ouro
from ouro_jax.train.upcycle import upcycle

CONFIG = tiny(num_hidden_layers=3, total_ut_steps=2)
IDS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 10))
TOL = dict(rtol=0, atol=1e-5)  # the same math; XLA may fuse the two programs differently


def build(config, params) -> Ouro:
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Ouro(config, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def model():
    """The original model, with norms moved off 1 so that the inter-loop norm is visible."""
    original = Ouro(CONFIG, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(original, nnx.Param))
    keys = iter(jax.random.split(jax.random.key(1), 8))
    for name in ("input_layernorm", "input_layernorm_2", "post_attention_layernorm",
                 "post_attention_layernorm_2"):
        w = params["layers"][name]["weight"]
        params["layers"][name]["weight"] = w + 0.3 * jax.random.normal(next(keys), w.shape)
    params["norm"]["weight"] = 2.0 + 0.3 * jax.random.normal(next(keys), params["norm"]["weight"].shape)
    return build(CONFIG, params)


def params_of(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def upcycled(model, order, factor=2) -> Ouro:
    config = model.config.replace(num_hidden_layers=factor * model.config.num_hidden_layers)
    return build(config, upcycle(params_of(model), factor, order))


def single_layers(model) -> list:
    """The original model's N layers as separate modules (views of its stacked parameters)."""
    graphdef, stacked = nnx.split(model.layers)
    return [nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], stacked))
            for i in range(model.config.num_hidden_layers)]


def reference(model, loop_fn, loops=CONFIG.total_ut_steps):
    """(logits [T, B, S, V], gate logits [T, B, S]) of `loop_fn(h, cos, sin) -> h` followed by the
    original model's norm, LM head and gate, for `loops` loops."""
    positions = jnp.broadcast_to(jnp.arange(IDS.shape[1]), IDS.shape)
    cos, sin = rope_cos_sin(positions, CONFIG.head_dim, CONFIG.rope_theta, CONFIG.compute_jnp_dtype)
    h = model.embed(IDS)
    logits, gates = [], []
    for _ in range(loops):
        h = model.norm(loop_fn(h, cos, sin))
        logits.append(model.logits(h))
        gates.append(model.gate_logit(h))
    return np.stack(logits), np.stack(gates)


def assert_outputs(out, expected):
    np.testing.assert_allclose(np.asarray(out.logits), expected[0], **TOL)
    np.testing.assert_allclose(np.asarray(out.gate_logits), expected[1], **TOL)


def test_stacked_runs_the_old_stack_twice_per_loop(model):
    expected = reference(model, lambda h, cos, sin: model.apply_layers(
        model.apply_layers(h, cos, sin, None), cos, sin, None))
    assert_outputs(upcycled(model, "stacked")(IDS), expected)


def test_interleaved_runs_each_old_layer_twice_in_a_row(model):
    layers = single_layers(model)

    def one_loop(h, cos, sin):
        for layer in layers:
            h = layer(layer(h, cos, sin, None), cos, sin, None)
        return h

    assert_outputs(upcycled(model, "interleaved")(IDS), reference(model, one_loop))


@pytest.mark.parametrize("order", ["stacked", "interleaved"])
def test_neither_order_equals_the_original_at_twice_the_loops(model, order):
    """The original at 2T loops normalises between the two passes; the upcycled model does not."""
    original = model(IDS, num_loops=2 * CONFIG.total_ut_steps)
    new = upcycled(model, order)(IDS)
    # every second original loop is where the upcycled model's loops end
    gap = np.abs(np.asarray(new.logits) - np.asarray(original.logits[1::2])).max()
    assert gap > 0.1, gap


@pytest.mark.parametrize("factor", [2, 3])
def test_layer_layout_and_shared_parameters(model, factor):
    params = params_of(model)
    n = CONFIG.num_hidden_layers
    for order, source in (("stacked", [i % n for i in range(factor * n)]),
                          ("interleaved", [i // factor for i in range(factor * n)])):
        up = upcycle(params, factor, order)
        assert set(up) == set(params)
        for key in set(params) - {"layers"}:
            assert up[key] is params[key]  # embedding, final norm, gate, LM head: shared, unchanged
        for old, new in zip(jax.tree.leaves(params["layers"]), jax.tree.leaves(up["layers"]), strict=True):
            assert new.shape == (factor * n, *old.shape[1:])
            np.testing.assert_array_equal(np.asarray(new), np.asarray(old)[source])


def test_factor_one_is_the_identity(model):
    params = params_of(model)
    for order in ("stacked", "interleaved"):
        same = upcycle(params, 1, order)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(same), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_arguments(model):
    params = params_of(model)
    with pytest.raises(ValueError, match="order='blocked' must be one of"):
        upcycle(params, 2, "blocked")
    with pytest.raises(ValueError, match="factor=0 must be >= 1"):
        upcycle(params, 0, "stacked")
