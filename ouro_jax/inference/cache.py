"""The KV cache of a looped model, with decode-time KV sharing (arXiv:2510.25741 §5.4.2, Table 14).

Shapes: T loops that may run (config.total_ut_steps, or k with `exit_at_loop=k`), N layers, B batch,
P prompt length (left-padded), M = max_new_tokens, K kv heads, H head_dim. Loops are addressed by their
0-based loop index t (t = 0 is loop 1), layers by their index l.

Layout: one array per cache slot, slot index t * N + l for loop index t and layer l (the released
code's `cache_idx`), so that a loop reads and writes its slots with no slicing copies.
  prompt_k, prompt_v  T*N arrays [B, K, P, H]: one slot per (loop, layer) for every prompt token; the
                      paper keeps all T caches for the prompt (sharing them in prefill costs >10 points).
  decode_k, decode_v  the decoded tokens. sharing "none": T*N arrays [B, K, M, H], one slot per
                      (loop, layer) as in the released code (exact). sharing "last" / "average": N arrays
                      [B, K, M, H], ONE slot per layer that every loop reads, so decoded-token memory
                      is 1/T of "none".
Decoded token j (the j-th token fed back, j = 0..M-2) lives at position j; position M-1 is never written
(the last generated token is not fed back). The decoder allocates the decode slots for its first phase
and `grow`s them phase by phase to M positions (`step.cache_phases`), so M above is their final length.

Which K/V a query reads, for the token being decoded at loop index t, layer l:
  * prompt tokens: their own loop-t K/V, slot (t, l);
  * earlier decoded tokens: slot (t, l) ("none") or their single shared entry of layer l;
  * itself: the K/V it computes in loop t during this forward (never a shared entry: the shared entry
    of a token is written only after its whole recurrence has run).
Shared entry of a token ("last"): its K/V of the last loop it ran; ("average"): the mean of its K/V over
the loops it ran (indices 0..e for a token that exited at loop index e).

Skipped loops: with sharing "none", the slots of loops e+1..T-1 of a token that exits at loop index
e < T-1 hold what `generate(skipped_kv=...)` chooses (the decoder fills them before `KVCache.write`):
"compute" runs those loops anyway (the released code's semantics: real K/V, the exit picks only the
logits); "project" stores, per layer, the K/V that layer would compute from the exit state (its input
norm and K/V projections, as CALM does for skipped layers); "copy" stores the loop-e K/V
(`fill_skipped`, the Huginn "latest" policy). The paper leaves this open.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from ouro_jax.model.exits import select_loop

SHARING = ("none", "last", "average")


def fill_skipped(x: jax.Array, exit_loop: jax.Array, batch_axis: int, fill: jax.Array | None = None
                 ) -> jax.Array:
    """Fill the loops each row skipped.

    x [T, ...] one token's per-loop values (entries after a row's exit loop are don't-care), rows on
    `batch_axis`; exit_loop [B] int, the loop index each row ran last; fill: x's shape without the
    leading T axis (default: each row's exit-loop entry, a copy) -> x with indices > exit_loop set to fill.
    """
    shape = [1] * x.ndim
    shape[batch_axis] = exit_loop.shape[0]
    loops = jnp.arange(x.shape[0]).reshape(-1, *[1] * (x.ndim - 1))
    ran = loops <= exit_loop.reshape(shape)
    return jnp.where(ran, x, select_loop(x, exit_loop, batch_axis)[None] if fill is None else fill[None])


def share(kv: jax.Array, exit_loop: jax.Array, sharing: str) -> jax.Array:
    """The single decode-time entry per layer of one token.

    kv [T, N, B, K, H]; exit_loop [B] loop index -> [N, B, K, H]: loop `exit_loop`'s K/V ("last") or the
    mean over loop indices 0..exit_loop ("average", accumulated in float32).
    """
    if sharing == "last":
        return select_loop(kv, exit_loop, axis=2)
    ran = jnp.arange(kv.shape[0])[:, None, None, None, None] <= exit_loop[None, None, :, None, None]
    total = jnp.sum(jnp.where(ran, kv.astype(jnp.float32), 0.0), axis=0)
    return (total / (exit_loop + 1).astype(jnp.float32)[None, :, None, None]).astype(kv.dtype)


@struct.dataclass
class KVCache:
    """Prompt and decoded-token K/V (layout in the module docstring)."""

    prompt_k: tuple[jax.Array, ...]
    prompt_v: tuple[jax.Array, ...]
    decode_k: tuple[jax.Array, ...]
    decode_v: tuple[jax.Array, ...]
    num_layers: int = struct.field(pytree_node=False)
    sharing: str = struct.field(pytree_node=False)

    @classmethod
    def create(cls, prompt_k, prompt_v, decoded_length: int, sharing: str) -> KVCache:
        """Wrap the prefill's K/V (nested [t][l] lists of [B, K, P, H]) and allocate zeroed decode slots
        of `decoded_length` positions (the decoder passes its first phase's length, `grow` adds the rest)."""
        if sharing not in SHARING:
            raise ValueError(f"kv_sharing={sharing!r} must be one of {SHARING}")
        flat = lambda nested: tuple(x for per_loop in nested for x in per_loop)
        b, k, _, h = prompt_k[0][0].shape
        slots = len(prompt_k) * len(prompt_k[0]) if sharing == "none" else len(prompt_k[0])
        dtype = prompt_k[0][0].dtype
        zeros = lambda: tuple(jnp.zeros((b, k, decoded_length, h), dtype) for _ in range(slots))
        return cls(flat(prompt_k), flat(prompt_v), zeros(), zeros(), len(prompt_k[0]), sharing)

    @property
    def decoded_length(self) -> int:
        """Decoded-token positions the slots hold (static)."""
        return self.decode_k[0].shape[2]

    def grow(self, length: int) -> KVCache:
        """The same cache with decode slots of `length` >= `decoded_length` positions (zeros appended)."""
        pad = ((0, 0), (0, 0), (0, length - self.decoded_length), (0, 0))
        grown = lambda slots: tuple(jnp.pad(x, pad) for x in slots)
        return self.replace(decode_k=grown(self.decode_k), decode_v=grown(self.decode_v))

    def prompt(self, loop: int, layer: int) -> tuple[jax.Array, jax.Array]:
        """Prompt K/V read at (loop index, layer): two [B, K, P, H] arrays."""
        slot = loop * self.num_layers + layer
        return self.prompt_k[slot], self.prompt_v[slot]

    def decoded(self, loop: int, layer: int) -> tuple[jax.Array, jax.Array]:
        """Decoded-token K/V read at (loop index, layer): two [B, K, `decoded_length`, H] arrays."""
        slot = loop * self.num_layers + layer if self.sharing == "none" else layer
        return self.decode_k[slot], self.decode_v[slot]

    def write(self, position: jax.Array, k: jax.Array, v: jax.Array, exit_loop: jax.Array) -> KVCache:
        """Store one decoded token at `position` (a scalar, or [B] a position per row).

        k, v [T, N, B, K, H]: with sharing "none" the entries of every (loop, layer) slot, skipped loops
        already filled (`fill_skipped`, or by the decoder's `skipped_kv` policy); with "last" /
        "average" loops after a row's exit loop are don't-care. exit_loop [B]: the loop index each row
        ran last, -1 for a row that had finished (its entry is never read; it is stored as if it had
        exited after loop 1, so that every entry stays finite: no 0/0 in "average").
        """
        exit_loop = jnp.maximum(exit_loop, 0)
        if self.sharing == "none":
            k, v = k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:])  # [T*N, B, K, H]
        else:
            k, v = share(k, exit_loop, self.sharing), share(v, exit_loop, self.sharing)  # [N, B, K, H]
        if jnp.ndim(position) == 0:
            update = lambda slots, new: tuple(
                jax.lax.dynamic_update_slice(slot, x[:, :, None], (0, 0, position, 0))
                for slot, x in zip(slots, new, strict=True))
        else:  # a position per row; positions past the slots are dropped
            rows = jnp.arange(position.shape[0])
            update = lambda slots, new: tuple(slot.at[rows, :, position].set(x, mode="drop")
                                              for slot, x in zip(slots, new, strict=True))
        return self.replace(decode_k=update(self.decode_k, k), decode_v=update(self.decode_v, v))

    def nbytes(self) -> dict[str, int]:
        """Bytes held: {"prompt", "decoded", "total"}."""
        size = lambda slots: sum(x.nbytes for x in slots)
        prompt = size(self.prompt_k) + size(self.prompt_v)
        decoded = size(self.decode_k) + size(self.decode_v)
        return {"prompt": prompt, "decoded": decoded, "total": prompt + decoded}
