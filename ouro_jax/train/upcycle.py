"""Upcycling by layer duplication (arXiv:2510.25741 §4: Ouro-2.6B starts from the 24-layer model, 48 layers).

`stacked` gives layers 0..N-1, 0..N-1: one loop of the new model applies the old stack twice without
the inter-loop `model.norm` in between, so T new loops approximate 2T old loops (the Stage 1a setting).
`interleaved` gives 0,0,1,1,...: every old layer is applied twice in a row within each loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ORDERS = ("stacked", "interleaved")


def upcycle(params: dict, factor: int = 2, order: str = "stacked") -> dict:
    """Params (pure dict) with the stacked `layers` axis repeated `factor` times in `order`.

    Every other parameter (embedding, final norm, gate, LM head) is shared unchanged.
    """
    if order not in ORDERS:
        raise ValueError(f"upcycle order={order!r} must be one of {ORDERS}")
    if factor < 1:
        raise ValueError(f"upcycle factor={factor} must be >= 1")
    if order == "stacked":
        grow = lambda x: jnp.concatenate([x] * factor, axis=0)
    else:
        grow = lambda x: jnp.repeat(x, factor, axis=0)
    return {**params, "layers": jax.tree.map(grow, params["layers"])}
