"""Decoding: KV-cache greedy equals full-forward argmax; the sampling filters give the right distributions."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_config

from jaxlm.core.config import ConfigError
from jaxlm.inference.generate import Generator, SamplingConfig, filter_logits, init_cache, penalize
from jaxlm.model.transformer import Transformer


def _model(**overrides):
    config = small_config(**overrides)
    model = Transformer(config.model)
    params = nn.unbox(model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32)))["params"]
    return model, params


def _greedy_without_cache(model, params, prompt, n):
    """The full forward at every step, on one fixed length (one compile): right padding never reaches the
    earlier positions of a causal model, so position len-1 is the unpadded forward's last."""
    tokens, width = list(prompt), len(prompt) + n
    forward = jax.jit(lambda p, t: model.apply({"params": p}, t))
    for _ in range(n):
        logits = forward(params, jnp.asarray([tokens + [0] * (width - len(tokens))], jnp.int32))
        tokens.append(int(jnp.argmax(logits[0, len(tokens) - 1])))
    return tokens[len(prompt):]


@pytest.mark.parametrize("overrides", [{}, pytest.param({"scan_layers": False, "sliding_window": 6, "qkv_bias": True},
                                                       marks=pytest.mark.slow)])  # ~15 s each
def test_cached_greedy_equals_full_forward_argmax(overrides):
    """Batched prompts of different lengths (left-padded), GQA cache, with and without scan and a window."""
    model, params = _model(**overrides)
    prompts = [[5, 17, 3, 99, 42, 7, 8], [11], [64, 2, 90]]
    gen = Generator(model, params, SamplingConfig(max_new_tokens=10))
    out = np.stack(list(gen.stream(prompts)), axis=1)
    for row, prompt in zip(out, prompts):
        assert row.tolist() == _greedy_without_cache(model, params, prompt, 10)


def test_sampled_tokens_log_probs_equal_a_trainers_recomputation():
    """The sampler's log-prob of each token it drew (temperature, top-k and a repetition penalty shaping the
    draw) equals the log-softmax of one full forward pass over prompt + completion, the log-prob an RL
    trainer computes for the same params: within 1e-5, the classic silent mismatch."""
    model, params = _model()
    prompts = [[5, 17, 3, 99, 42, 7, 8], [11], [64, 2, 90]]
    sampling = SamplingConfig(max_new_tokens=9, temperature=1.3, top_k=40, repetition_penalty=1.2, seed=3)
    steps = list(Generator(model, params, sampling).stream(prompts, logprobs=True))
    tokens, logps = np.stack([t for t, _ in steps], 1), np.stack([lp for _, lp in steps], 1)
    forward = jax.jit(lambda p, t: jax.nn.log_softmax(model.apply({"params": p}, t)))
    for prompt, row, row_logp in zip(prompts, tokens, logps):
        full = np.asarray(forward(params, jnp.asarray([prompt + row.tolist()], jnp.int32)))[0]
        want = [full[len(prompt) - 1 + i, tok] for i, tok in enumerate(row)]
        np.testing.assert_allclose(row_logp, want, rtol=0, atol=1e-5)
    assert len(set(tokens[0].tolist())) > 1  # sampled, not a constant


def test_cache_holds_kv_heads_only():
    c = small_config().model
    cache = init_cache(c, batch=3, max_len=20)
    assert cache["k"].shape == (c.num_layers, 3, 20, c.num_kv_heads, c.resolved_head_dim)
    assert c.num_kv_heads < c.num_heads


def test_prompt_longer_than_context_is_a_clear_error():
    model, params = _model()
    gen = Generator(model, params, SamplingConfig(max_new_tokens=10))
    with pytest.raises(ConfigError, match="exceeds the model's context of 64"):
        next(gen.stream([[1] * 60]))


LOGITS = jnp.log(jnp.asarray([[0.4, 0.3, 0.15, 0.1, 0.05]]))


def _frequencies(logits, n=40000, **kw):
    filtered = filter_logits(logits, **kw)
    draws = jax.random.categorical(jax.random.key(0), filtered, shape=(n, 1))
    return np.bincount(np.asarray(draws[:, 0]), minlength=logits.shape[-1]) / n


def test_top_k_keeps_the_k_largest_renormalised():
    freq = _frequencies(LOGITS, temperature=1.0, top_k=2, top_p=1.0)
    np.testing.assert_allclose(freq, [0.4 / 0.7, 0.3 / 0.7, 0, 0, 0], atol=0.01)


def test_top_p_keeps_the_smallest_nucleus():
    # Mass before each token: 0, .4, .7, .85, .95 -> top_p=0.8 keeps the first three.
    freq = _frequencies(LOGITS, temperature=1.0, top_k=0, top_p=0.8)
    np.testing.assert_allclose(freq, [0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0, 0], atol=0.01)


def test_temperature_sharpens_and_flattens():
    for t in (0.5, 2.0):
        expected = np.asarray(jax.nn.softmax(LOGITS[0] / t))
        np.testing.assert_allclose(_frequencies(LOGITS, temperature=t, top_k=0, top_p=1.0), expected, atol=0.01)


def test_repetition_penalty():
    logits = jnp.asarray([[2.0, -2.0, 1.0]])
    seen = jnp.asarray([[True, True, False]])
    np.testing.assert_allclose(penalize(logits, seen, 2.0), [[1.0, -4.0, 1.0]])


class _AsciiTokenizer:
    def encode(self, text):
        return [ord(c) if ord(c) < 128 else 0 for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i)


def test_stop_strings_the_tokenizer_cannot_produce_are_clear_errors():
    from jaxlm.inference.generate import check_stops

    check_stops(_AsciiTokenizer(), ["\n", " Amen", "###"])
    with pytest.raises(ConfigError, match="stop string 'é' can never appear"):
        check_stops(_AsciiTokenizer(), ["é"])
    with pytest.raises(ConfigError, match="stop string '' can never appear"):
        check_stops(_AsciiTokenizer(), [""])


def test_sharded_cache_and_params_decode_the_same_tokens():
    """Params sharded fsdp x tensor over 8 devices, the cache sharded by the same rule table."""
    from jaxlm.core import mesh as mesh_lib
    from jaxlm.core.config import MeshConfig
    from jaxlm.core.sharding import tree_shardings

    config = small_config()
    model = Transformer(config.model)
    boxed = model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"]
    params = nn.unbox(boxed)
    mesh = mesh_lib.make_mesh(MeshConfig(fsdp=4, tensor=2))
    sharded = jax.device_put(params, tree_shardings(boxed, mesh))
    prompts = [[5, 17, 3, 99, 42, 7, 8], [11], [64, 2, 90], [1, 2]]
    want = np.stack(list(Generator(model, params, SamplingConfig(max_new_tokens=6)).stream(prompts)), axis=1)
    gen = Generator(model, sharded, SamplingConfig(max_new_tokens=6), mesh)
    got = np.stack(list(gen.stream(prompts)), axis=1)
    np.testing.assert_array_equal(got, want)
    cache = init_cache(config.model, 4, 16, mesh)
    spec = cache["k"].sharding.spec
    assert "fsdp" in spec[1] and spec[3] == "tensor" and spec[2] is None


def test_streamed_answer_never_prints_part_of_a_stop_string(capsys):
    """`jaxlm generate --prompt` streams token by token: text that could still become a stop string is held
    back, so the answer ends before the stop, not in '<|im_end|' (one token per character here)."""
    from jaxlm.commands.generate import _stream

    class Chars:
        def eos_id(self):
            return 0

        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    class Fixed:
        def stream(self, prompts):
            for ch in "Yes, <b>.<|im_end|>\nmore":
                yield np.array([ord(ch)])

    _stream(Fixed(), Chars(), [[1]], ("<|im_end|>",))
    assert capsys.readouterr().out == "Yes, <b>.\n"
