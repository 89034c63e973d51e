"""Ring attention over the sequence axis matches the single-device reference, forward and backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.core.config import ConfigError
from jaxlm.model import attention, context_parallel as cp

AXES = ("data", "fsdp", "sequence", "expert", "tensor")


def make_mesh(data=1, sequence=1, tensor=1):
    shape = (data, 1, sequence, 1, tensor)
    return jax.sharding.Mesh(np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape), AXES)


def packed_segments(b, t):
    """Three documents of different lengths per row, then a padding tail of 0s."""
    bounds = (np.array([0.2, 0.5, 0.85]) * t).astype(int)
    ids = np.zeros((b, t), np.int32)
    for row in range(b):
        shift = row * 2  # different boundaries per row
        ids[row, : bounds[0] + shift] = 1
        ids[row, bounds[0] + shift : bounds[1]] = 2
        ids[row, bounds[1] : bounds[2] - shift] = 3
    return jnp.asarray(ids)


def quick_compile(fn):
    # Compiling dominates these tests; XLA's backend optimisations do not change float32 results here.
    return jax.jit(fn).lower().compile({"xla_backend_optimization_level": 0})


def run_both(mesh, shards, t, packed, window, b=2, n_heads=4, kv_heads=2, h=8):
    """Outputs and q/k/v gradients of the ring (un-permuted) and of the reference."""
    keys = jax.random.split(jax.random.key(t + shards + window + packed), 4)
    q = jax.random.normal(keys[0], (b, t, n_heads, h), jnp.float32)
    k = jax.random.normal(keys[1], (b, t, kv_heads, h), jnp.float32)
    v = jax.random.normal(keys[2], (b, t, kv_heads, h), jnp.float32)
    cot = jax.random.normal(keys[3], (b, t, n_heads, h), jnp.float32)
    seg = packed_segments(b, t) if packed else jnp.ones((b, t), jnp.int32)
    perm = cp.zigzag_order(t, shards)
    inv = cp.inverse_order(perm)

    def ring(q, k, v):
        out = cp.sharded_ring_attention(q[:, perm], k[:, perm], v[:, perm], seg[:, perm], window)
        return out[:, inv]

    def reference(q, k, v):
        return attention.xla_attention(q, k, v, seg, window)

    def out_and_grads(fn):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(cot)

    with jax.set_mesh(mesh):
        got = quick_compile(lambda: out_and_grads(ring))()
    want = quick_compile(lambda: out_and_grads(reference))()
    return got, want


def assert_match(got, want):
    (out, grads), (ref_out, ref_grads) = got, want
    np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=0)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert np.isfinite(np.asarray(g)).all(), name
        np.testing.assert_allclose(g, r, atol=1e-5, rtol=0, err_msg=f"grad {name}")


MASKS = {"causal": (False, 0), "packed": (True, 0), "window": (False, 5), "packed_window": (True, 5)}


# Packed+windowed at 4 shards (T=64, chunks of 8) by default, with the whole model's causal packed windowed
# case below; the slow pass runs every mask at 2, 4 and 8 shards (at 8, chunks of 2: a window of 5 spans 3).
DEFAULT = [(4, "packed_window")]
CASES = [pytest.param(s, m, marks=() if (s, m) in DEFAULT else pytest.mark.slow) for s in (2, 4, 8) for m in MASKS]


@pytest.mark.parametrize("shards,mask", CASES)
def test_ring_matches_reference(shards, mask):
    packed, window = MASKS[mask]
    t = 64 if shards == 4 else 32
    assert_match(*run_both(make_mesh(sequence=shards), shards, t, packed, window))


def test_ring_with_batch_sharding():
    assert_match(*run_both(make_mesh(data=2, sequence=4), 4, 32, packed=True, window=5))


def test_ring_with_head_sharding():
    assert_match(*run_both(make_mesh(sequence=4, tensor=2), 4, 32, packed=True, window=0))


def test_one_sequence_shard_is_reference():
    assert_match(*run_both(make_mesh(data=2), 1, 32, packed=True, window=5))


def test_zigzag_order():
    perm = cp.zigzag_order(16, 4)
    assert sorted(perm) == list(range(16))
    chunks = perm.reshape(4, 2, 2)  # shard, its two chunks, tokens of a chunk
    for r in range(4):
        np.testing.assert_array_equal(chunks[r, 0], [2 * r, 2 * r + 1])
        np.testing.assert_array_equal(chunks[r, 1], [2 * (7 - r), 2 * (7 - r) + 1])
    np.testing.assert_array_equal(perm[cp.inverse_order(perm)], np.arange(16))
    np.testing.assert_array_equal(cp.zigzag_order(8, 1), np.arange(8))
    for r in range(4):
        np.testing.assert_array_equal(cp.shard_indices(4, 4, r), perm[4 * r : 4 * r + 4])


def test_zigzag_balances_causal_work():
    t, shards = 64, 4
    perm = cp.zigzag_order(t, shards).reshape(shards, -1)
    visible_keys = [(perm[r] + 1).sum() for r in range(shards)]  # causal: token i sees i + 1 keys
    assert len(set(visible_keys)) == 1


def test_check_length():
    cp.check_length(64, 4)
    with pytest.raises(ConfigError, match=r"train.seq_len=100 .*2\*mesh.sequence=8"):
        cp.check_length(100, 4)
    with pytest.raises(ValueError):
        cp.zigzag_order(100, 4)


@pytest.mark.parametrize("window,expected", [(0, 36), (5, 15)])
def test_skips_masked_blocks(window, expected):
    """Of the 4 * n * n (query chunk, key chunk) pairs of a ring, only the visible ones are computed."""
    t, shards = 64, 4  # 8 chunks of 8 tokens: causal sees 8 * 9 / 2 pairs, a window of 5 the diagonal + 7
    computed = 0
    for r in range(shards):
        q_idx = cp.shard_indices(t // shards, shards, r)
        for step in range(shards):
            k_idx = cp.shard_indices(t // shards, shards, (r - step) % shards)
            for qc in (q_idx[:8], q_idx[8:]):
                computed += sum(bool(cp._may_see(qc, kc, window)) for kc in (k_idx[:8], k_idx[8:]))
    assert computed == expected


def test_row_without_visible_keys_is_zero_not_nan():
    b, t, h = 1, 4, 8
    q = jnp.ones((b, t, 1, 1, h))
    kv = jnp.ones((b, t, 1, h))
    idx = jnp.arange(t)
    acc = (jnp.full((b, t, 1, 1), -jnp.inf), jnp.zeros((b, t, 1, 1)), jnp.zeros((b, t, 1, 1, h)))

    def out(q):
        _, l, o = cp._online_update(acc, q, kv, kv, jnp.ones((b, t)), jnp.zeros((b, t)), idx, idx, 0)
        return (o / jnp.where(l == 0, 1.0, l)[..., None]).sum()

    value, grad = jax.jit(jax.value_and_grad(out))(q)
    assert value == 0 and np.isfinite(np.asarray(grad)).all()


def test_transformer_with_context_parallelism_equals_one_device():
    """The whole model on sequence=4 x fsdp=2 (zigzag order in, caller's order out): packed rows with a
    sliding window give one device's loss and gradients."""
    from conftest import quick_jit, small_config

    from jaxlm.core import mesh as mesh_lib
    from jaxlm.core.config import MeshConfig
    from jaxlm.model.transformer import Transformer

    model = Transformer(small_config(sliding_window=5).model, "xla")
    tokens = jax.random.randint(jax.random.key(1), (4, 32), 0, 128)
    seg = jnp.asarray(packed_segments(4, 32))
    pos = jnp.asarray(np.cumsum(np.asarray(seg) == np.asarray(seg), axis=1) - 1)  # positions within the row
    params = quick_jit(lambda k: model.init(k, tokens)["params"], jax.random.key(0))(jax.random.key(0))
    loss = lambda p: jnp.sum(jax.nn.log_softmax(model.apply({"params": p}, tokens, pos, seg))[..., 3] * (seg > 0))
    f = jax.value_and_grad(loss)
    want = quick_jit(f, params)(params)
    with jax.set_mesh(mesh_lib.make_mesh(MeshConfig(sequence=4, fsdp=2))):
        assert "ppermute" in str(jax.make_jaxpr(f)(params))
        got = quick_jit(f, params)(params)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(b)))),
                 got[1], want[1])
