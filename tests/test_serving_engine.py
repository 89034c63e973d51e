"""The serving engine in process: slot rows at different lengths and chunked prefill decode what the static
generator decodes; a row's tokens, greedy or sampled, do not depend on the other rows; the sharded engine
equals the single-device one; per-row filters equal per-row scalar filters; streamed text is cut at stops."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_config

from jaxlm.inference.generate import Generator, SamplingConfig, filter_logits
from jaxlm.model.transformer import Transformer
from jaxlm.serving.detokenize import TextStream
from jaxlm.serving.engine import Sampling, SlotEngine, prefill_buckets

PROMPTS = [[5, 17, 3, 99, 42], list(range(3, 43)), [64, 2, 90], [11]]  # the 40-token one is three chunks


@pytest.fixture(scope="module")
def model_params():
    model = Transformer(small_config().model)
    boxed = jax.jit(model.init)(jax.random.key(3), jnp.zeros((1, 8), jnp.int32))["params"]
    return model, boxed


def run_engine(engine: SlotEngine, prompts, steps: int, sampling=None, rows=None) -> list[list[int]]:
    """Prefills each prompt into its row (in chunks of the largest bucket), then decodes them together."""
    rows = rows or list(range(len(prompts)))
    sampling = sampling or [Sampling()] * len(prompts)
    per_slot = [Sampling()] * engine.slots
    tokens, lengths = np.zeros(engine.slots, np.int32), np.full(engine.slots, -1)
    out = {r: [] for r in rows}
    for row, prompt, s in zip(rows, prompts, sampling):
        chunk = engine.buckets[-1]
        for start in range(0, len(prompt), chunk):
            first = engine.prefill(row, start, prompt[start:start + chunk], s)
        out[row].append(int(first.token[0]))
        tokens[row], lengths[row], per_slot[row] = first.token[0], len(prompt), s
    for step in range(1, steps):
        counters = np.where(lengths >= 0, step, 0)
        got = engine.decode(tokens, lengths, per_slot, counters)
        for row in rows:
            out[row].append(int(got.token[row]))
            tokens[row], lengths[row] = got.token[row], lengths[row] + 1
    return [out[r] for r in rows]


def test_rows_at_different_lengths_decode_what_the_generator_decodes(model_params):
    model, boxed = model_params
    params = nn.unbox(boxed)
    engine = SlotEngine(model, params, slots=6, prefill_chunk=16)
    assert engine.buckets == (16,)
    want = [[int(t[0]) for t in Generator(model, params, SamplingConfig(max_new_tokens=8)).stream([p])]
            for p in PROMPTS]
    assert run_engine(engine, PROMPTS, 8, rows=[0, 3, 4, 5]) == want


def test_a_rows_tokens_do_not_depend_on_the_other_rows(model_params):
    """Greedy and sampled rows (their own seeds and filters) give the same tokens alone and in a full batch,
    with no program compiled after start."""
    model, boxed = model_params
    engine = SlotEngine(model, nn.unbox(boxed), slots=4, prefill_chunk=16)
    compiled = engine.compile()
    sampling = [Sampling(), Sampling(0.7, 0, 1.0, 5), Sampling(1.0, 20, 0.9, 11), Sampling()]
    crowd = run_engine(engine, PROMPTS, 10, sampling)
    for i in range(3):
        assert crowd[i] == run_engine(engine, [PROMPTS[i]], 10, [sampling[i]], rows=[i])[0], i
    assert crowd[1] != run_engine(engine, [PROMPTS[1]], 10, [Sampling(0.7, 0, 1.0, 6)], rows=[1])[0]  # the seed counts
    assert engine.compiled_programs() == compiled == 3 + 1  # widths 1, 2, 4 and one bucket: nothing compiled since


def test_sharded_engine_equals_one_device(model_params):
    from jaxlm.core import mesh as mesh_lib
    from jaxlm.core.config import MeshConfig
    from jaxlm.core.sharding import tree_shardings

    model, boxed = model_params
    params = nn.unbox(boxed)
    mesh = mesh_lib.make_mesh(MeshConfig(fsdp=4, tensor=2))
    sharded = jax.device_put(params, tree_shardings(boxed, mesh))
    one = run_engine(SlotEngine(model, params, slots=4, prefill_chunk=16), PROMPTS, 6)
    engine = SlotEngine(model, sharded, slots=4, prefill_chunk=16, mesh=mesh)
    assert run_engine(engine, PROMPTS, 6) == one
    spec = engine.cache[0]["k"].sharding.spec  # one layer's (B, S, K, H)
    assert len(engine.cache) == 2 and "fsdp" in spec[0] and spec[2] == "tensor"


def test_per_row_filters_equal_each_rows_scalar_filter():
    logits = jax.random.normal(jax.random.key(0), (4, 50)) * 3
    temperature, top_k, top_p = [1.0, 0.5, 2.0, 1.0], [0, 5, 0, 3], [1.0, 1.0, 0.6, 0.8]
    rows = filter_logits(logits, jnp.array(temperature), jnp.array(top_k), jnp.array(top_p))
    for i in range(4):
        alone = filter_logits(logits[i:i + 1], temperature[i], top_k[i], top_p[i])
        np.testing.assert_array_equal(rows[i:i + 1], alone)
    assert int(jnp.isfinite(rows[1]).sum()) == 5 and int(jnp.isfinite(rows[0]).sum()) == 50


def test_prefill_buckets():
    assert prefill_buckets(256, 64) == (16, 32, 64)
    assert prefill_buckets(100, 4096) == (16, 32, 64, 100)


class Words:
    """Each id is a word; decode joins with spaces (a stop string can span tokens)."""

    vocab = ["<s>", "</s>", "the", "end", "of", "en", "d", "story", "é"]

    def decode(self, ids):
        return " ".join(self.vocab[i] for i in ids)


def test_text_stream_holds_back_a_possible_stop_and_cuts_at_it():
    stream = TextStream(Words(), ["end of"])
    pieces = [stream.push(t) for t in (7, 2, 3)]  # "story the end": "end" may begin "end of"
    assert "".join(pieces) == "story the " and not stream.stopped
    assert stream.push(4) == "" and stream.stopped  # "story the end of": cut before the stop
    assert stream.text == "story the "
    plain = TextStream(Words(), ["zzz"])
    text = "".join(plain.push(t) for t in (2, 5, 6, 8)) + plain.finish()
    assert text == "the en d é" and not plain.stopped
