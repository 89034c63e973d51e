"""Encoder-decoder generation (jaxlm/inference/seq2seq_generate.py, the cached decoder path of
jaxlm/model/t5.py): cached greedy decoding equals the argmax of full forward passes and transformers'
`generate` for T5 v1.0, T5 v1.1 and UMT5, scanned and unrolled, over padded inputs; sampling is
reproducible and its log-probs are the model's; `jaxlm generate` runs a T5 run and refuses --chat with it
and a BERT run in one line."""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("transformers")

from conftest import quick_jit  # noqa: E402
from hf_models import save_tokenizer  # noqa: E402
from test_t5 import import_t5, random_params, save_t5, small_config  # noqa: E402

from jaxlm import cli  # noqa: E402
from jaxlm.core import overrides  # noqa: E402
from jaxlm.core.config import ConfigError, SamplingConfig  # noqa: E402
from jaxlm.inference.seq2seq_generate import Seq2SeqGenerator  # noqa: E402
from jaxlm.model import architectures  # noqa: E402

# Three inputs of different lengths (the longest past T5's max distance of 20), padded to one bucket.
PROMPTS = [list(np.random.default_rng(3).integers(2, 99, n)) for n in (9, 26, 3)]
NEW = 12
EOS = 1  # transformers' T5 configs' eos_token_id


def full_forward_greedy(model, params, prompts, n, start=0):
    """Greedy decoding by the full forward pass (`__call__`) over the growing decoder prefix: one fixed
    decoder width (one compile), right-padded, which a causal decoder never reads back."""
    width = 32
    enc, seg = np.zeros((len(prompts), width), np.int32), np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        enc[i, :len(p)], seg[i, :len(p)] = p, 1
    dec = np.zeros((len(prompts), n + 1), np.int32)
    dec[:, 0] = start
    forward = lambda p, d: model.apply({"params": p}, enc, None, seg, d)
    forward = quick_jit(forward, params, dec)
    for i in range(n):
        dec[:, i + 1] = np.argmax(np.asarray(forward(params, dec))[:, i], axis=-1)
    return dec[:, 1:], forward


def generated(model, params, prompts=PROMPTS, **sampling) -> np.ndarray:
    gen = Seq2SeqGenerator(model, params, SamplingConfig(**{"max_new_tokens": NEW, **sampling}))
    return np.stack(list(gen.stream(prompts)), axis=1)


# (seed, initializer_factor) of each kind's random model: with transformers' default init, their greedy outputs
# repeat one token; these vary.
MODELS = {"t5": (2, 10.0), "t5_v1_1": (0, 3.0), "umt5": (0, 3.0)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5_generate")
    return {kind: save_t5(kind, str(root / kind), seed, initializer_factor=factor)
            for kind, (seed, factor) in MODELS.items()}


@functools.cache
def greedy(directory: str, scan: bool):
    _, config, params = import_t5(directory, scan=scan)
    model = architectures.build(config)
    return model, params, generated(model, params)


def until_eos(row) -> list[int]:
    row = list(row)
    return row[:row.index(EOS) + 1] if EOS in row else row


@pytest.mark.parametrize("kind", ["t5", "t5_v1_1", "umt5"])
def test_cached_greedy_equals_full_forward_argmax(kind, saved):
    """Tied ReLU (v1.0), untied gated GELU (v1.1), per-layer bias (UMT5); scanned and unrolled layers."""
    model, params, scanned = greedy(saved[kind], True)
    want, _ = full_forward_greedy(model, params, PROMPTS, NEW)
    np.testing.assert_array_equal(scanned, want)
    np.testing.assert_array_equal(greedy(saved[kind], False)[2], want)
    assert all(len(set(row)) > 1 for row in want.tolist())  # not a constant


@pytest.mark.parametrize("kind", ["t5", "t5_v1_1", "umt5"])
def test_greedy_equals_transformers_generate(kind, saved):
    import torch
    import transformers

    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(saved[kind], attn_implementation="eager",
                                                            dtype=torch.float32).eval()
    ids = np.zeros((len(PROMPTS), max(map(len, PROMPTS))), np.int64)
    for i, p in enumerate(PROMPTS):
        ids[i, :len(p)] = p
    with torch.no_grad():
        out = hf.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor((ids != 0).astype(np.int64)),
                          do_sample=False, num_beams=1, max_new_tokens=NEW, decoder_start_token_id=0).numpy()
    ours = greedy(saved[kind], True)[2]
    for row, hf_row in zip(ours, out[:, 1:]):  # transformers pads the rows that ended
        assert until_eos(row) == until_eos(hf_row)


def test_sampling_is_reproducible_and_its_log_probs_are_the_models():
    model, params = random_params(small_config(relative_bias_per_layer=True, tie_embeddings=False))
    greedy_tokens, forward = full_forward_greedy(model, params, PROMPTS, NEW)
    np.testing.assert_array_equal(generated(model, params, temperature=0.7, top_k=1, seed=5), greedy_tokens)
    sampling = SamplingConfig(max_new_tokens=NEW, temperature=1.3, top_k=40, repetition_penalty=1.2, seed=3)
    gen = Seq2SeqGenerator(model, params, sampling)
    steps = list(gen.stream(PROMPTS, logprobs=True))
    tokens, logps = np.stack([t for t, _ in steps], 1), np.stack([lp for _, lp in steps], 1)
    np.testing.assert_array_equal(np.stack(list(gen.stream(PROMPTS)), 1), tokens)  # the seed fixes the draws
    assert (tokens != greedy_tokens).any()
    # The log-prob of every sampled token, before any filter or penalty: the log-softmax of one full forward pass.
    dec = np.concatenate([np.zeros((len(PROMPTS), 1), np.int32), tokens], axis=1).astype(np.int32)
    full = np.asarray(jax.nn.log_softmax(forward(params, dec)))
    want = np.take_along_axis(full[:, :NEW], tokens[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(logps, want, rtol=0, atol=1e-5)


def test_bad_prompts_and_models_are_one_line_errors():
    gen = Seq2SeqGenerator(architectures.build(small_config()), {}, SamplingConfig(max_new_tokens=2))
    with pytest.raises(ConfigError, match="^every prompt needs at least one token$"):
        next(gen.stream([[5], []]))
    llama = architectures.build(small_config(architecture="llama"))
    with pytest.raises(ConfigError, match="^Seq2SeqGenerator decodes .*, not model.architecture=llama"):
        Seq2SeqGenerator(llama, {}, SamplingConfig())


def test_cache_layout():
    """Self-attention keys and values (L, B, max_new_tokens, N, H), cross-attention (L, B, Se, N, H), L the
    decoder's layers (here not the encoder's)."""
    c = small_config(num_decoder_layers=4)
    model = architectures.build(c)
    params = nn.unbox(jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 8), jnp.int32)), jax.random.key(0)))
    gen = Seq2SeqGenerator(model, params["params"], SamplingConfig(max_new_tokens=7))
    tokens = jax.ShapeDtypeStruct((2, 32), jnp.int32)
    cache, seen = jax.eval_shape(gen._encode_fn, params["params"], tokens, tokens)
    shape = (4, 2, 7, c.num_heads, c.resolved_head_dim)
    assert {k: v.shape for k, v in cache["self"].items()} == {"k": shape, "v": shape}
    cross = (4, 2, 32, *shape[3:])
    assert {k: v.shape for k, v in cache["cross"].items()} == {"k": cross, "v": cross}
    assert seen.shape == (2, c.vocab_size)


@pytest.mark.slow  # converts a run and generates through the CLI (~10 s); cached decoding is checked by default above
def test_jaxlm_generate_on_t5_and_bert_runs(tmp_path, capsys):
    """A converted T5 run prints its greedy completion (the prompt's tokens + EOS in, the decoder's tokens up
    to EOS out) and a batch from a prompt file; --chat with it and a BERT run are one-line errors."""
    from jaxlm.inference.load import load_run

    src = save_t5("t5_v1_1", str(tmp_path / "src"))
    save_tokenizer(src, vocab_size=99, fill=True)  # every id a word of its own
    run = str(tmp_path / "run")
    # No architecture or objective given: the checkpoint's T5 brings its own (span corruption).
    assert cli.main(["convert", "from-hf", src, run, "model.dtype=float32", "model.attention=xla"]) == 0
    capsys.readouterr()
    assert cli.main(["generate", run, "--prompt", "in the beginning", "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    loaded = load_run(run)
    tok = loaded.tokenizer
    prompt = [*tok.encode("in the beginning"), tok.eos_id()]
    row = generated(loaded.model, loaded.params, [prompt], max_new_tokens=6)[0].tolist()
    row = row[:row.index(tok.eos_id())] if tok.eos_id() in row else row
    assert printed == tok.decode(row) + "\n" and row  # something was generated

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("god created heaven\nlet there be light\n")
    assert cli.main(["generate", run, "--prompt-file", str(prompts), "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("god created heaven => ") and "\nlet there be light => " in out

    assert cli.main(["generate", run, "--prompt", "hi", "--chat"]) == 2
    err = capsys.readouterr().err
    assert "--chat renders a chat template for a decoder-only model" in err and err.count("\n") == 1

    # A BERT run: refused from its config alone, before any checkpoint is read.
    bert = tmp_path / "bert_run"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps(overrides.to_dict(overrides.load(["bert_tiny"]))))
    assert cli.main(["generate", str(bert), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "is an encoder (it fills in masked tokens)" in err and "jaxlm generate" in err and err.count("\n") == 1
