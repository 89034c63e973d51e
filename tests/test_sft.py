"""SFT: chat rendering, assistant-only loss masks, packing that keeps conversations apart, bad rows, end to end."""

import json

import jax
import numpy as np
import pytest
from conftest import small_config

from jaxlm import cli
from jaxlm.core.config import ConfigError
from jaxlm.data import chat
from jaxlm.model.transformer import Transformer
from jaxlm.training import finetune, sft
from jaxlm.training.objectives import next_token

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name?"},
        {"role": "assistant", "content": "Bot."}]


def encode(text):  # a byte-level tokenizer: every character is visible in the tokens
    return list(text.encode("utf-8"))


def decode(ids):
    return bytes(ids).decode("utf-8")


def test_loss_mask_covers_exactly_the_assistant_turns():
    template = chat.Template(chat.CHATML, prefix_ids=(1,))
    tokens, mask = sft.encode_conversation(CHAT, template, encode)
    assert tokens[0] == 1 and mask[0] == 0
    assert decode(tokens[1:]) == template.render(CHAT)
    trained = decode([t for t, m in zip(tokens, mask) if m])
    assert trained == "Hello!<|im_end|>\nBot.<|im_end|>\n"
    # Rows of packed examples: a target is trained only where its example's mask says so.
    rows = sft.pack([(np.array(tokens), np.array(mask))], seq_len=len(tokens) + 5)
    assert decode(rows["targets"][0][rows["loss_mask"][0] == 1].tolist()) == trained


def test_no_loss_on_prompt_tokens():
    config = small_config(vocab_size=256, max_seq_len=256)
    model = Transformer(config.model)
    template = chat.Template(chat.CHATML)
    rows = sft.pack([tuple(map(np.array, sft.encode_conversation(CHAT, template, encode)))], seq_len=256)
    params = jax.jit(model.init)(jax.random.key(0), rows["inputs"][:, :8])["params"]
    def loss(b):  # the mean over assistant tokens: the objective's sum over its weight
        value, sums = jax.jit(next_token(model.apply).loss)(params, b, None)
        return value / sums["weight"]
    base = float(loss(rows))
    prompt = (rows["loss_mask"] == 0)
    changed = dict(rows, targets=np.where(prompt, (rows["targets"] + 7) % 256, rows["targets"]))
    assert float(loss(changed)) == base  # prompt targets do not count
    answer = dict(rows, targets=np.where(prompt, rows["targets"], (rows["targets"] + 7) % 256))
    assert float(loss(answer)) != base
    # Reference: the mean of -log p(target) over the assistant positions only.
    logits = jax.jit(model.apply)({"params": params}, rows["inputs"], rows["positions"], rows["segment_ids"])
    logp = jax.nn.log_softmax(logits)[0, np.arange(256), rows["targets"][0]]
    m = rows["loss_mask"][0] == 1
    np.testing.assert_allclose(base, -float(logp[m].mean()), rtol=1e-6)


def test_packed_conversations_do_not_see_each_other():
    config = small_config(vocab_size=256, max_seq_len=160)
    model = Transformer(config.model)
    template = chat.Template(chat.CHATML)
    a = tuple(map(np.array, sft.encode_conversation(CHAT[1:3], template, encode)))
    b = tuple(map(np.array, sft.encode_conversation(CHAT[3:], template, encode)))
    packed = sft.pack([a, b], seq_len=160)
    alone = sft.pack([b], seq_len=160)
    assert packed["inputs"].shape[0] == 1 and set(np.unique(packed["segment_ids"])) == {0, 1, 2}
    params = jax.jit(model.init)(jax.random.key(0), packed["inputs"][:, :8])["params"]
    apply = jax.jit(model.apply)
    run = lambda r: apply({"params": params}, r["inputs"], r["positions"], r["segment_ids"])
    n_a, n_b = len(a[0]) - 1, len(b[0]) - 1
    np.testing.assert_allclose(run(packed)[0, n_a:n_a + n_b], run(alone)[0, :n_b], rtol=1e-5, atol=1e-5)


def test_bad_rows_are_counted_and_reported():
    strict = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
              "{% endif %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
              "{% if add_generation_prompt %}assistant: {% endif %}")
    rows = [("r1", {"messages": CHAT}),  # the template refuses system messages
            ("r2", {"messages": []}),  # empty conversation
            ("r3", {"prompt": "Hi", "response": "x" * 100}),  # longer than the sequence
            ("r4", {"messages": CHAT[1:2]}),  # no assistant turn
            ("r5", {"text": "neither format"}),
            ("r6", {"prompt": "Hi", "response": "Hello"})]
    report = sft.Report()
    examples = sft.build_examples(rows, chat.Template(strict), encode, seq_len=40, report=report)
    assert report.used == len(examples) == 1
    assert report.bad == {"chat template cannot render (no system role)": 1, "empty conversation": 1,
                          "longer than train.seq_len=40": 1, "no assistant turn": 1,
                          "row has neither 'messages' nor 'prompt' and 'response' (nor 'input' and 'target')": 1}
    assert "r3" in report.summary()
    with pytest.raises(ConfigError, match="does not parse"):
        chat.Template("{% for %}")


def test_chatterbot_english_and_chinese_render(tmp_path):
    for language in ("english", "chinese"):
        rows = finetune.chatterbot_rows(language)
        assert len(rows) > 400
        report = sft.Report()
        examples = sft.build_examples(rows, chat.Template(chat.CHATML), encode, seq_len=1024, report=report)
        assert report.used > 0.95 * len(rows)
        text = decode(examples[0][0].tolist())
        assert text.startswith("<|im_start|>user\n") and "<|im_start|>assistant\n" in text


def test_bad_jsonl_line_names_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n{not json\n")
    with pytest.raises(ConfigError, match=r"data.jsonl:2 is not valid JSON"):
        sft.read_jsonl(str(path))


@pytest.mark.slow  # a whole `jaxlm finetune` run (~30 s on 2 cores)
def test_jaxlm_finetune_sft_runs_end_to_end_and_lowers_the_loss(tmp_path, capsys):
    data = tmp_path / "chats.jsonl"
    pairs = [("What is your name?", "I am a bot."), ("How are you?", "Fine, thanks."), ("Hi", "Hello there.")]
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs * 12))
    argv = ["finetune", "sft_tiny", f"finetune.data={data}", f"train.run_dir={tmp_path}/run", "train.steps=12",
            "train.seq_len=48", "train.progress=False", "finetune.drop_repeats=False", "model.vocab_size=384", "model.d_model=32",
            "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1", "model.mlp_dim=64",
            "optim.lr=1e-2", "optim.warmup_steps=1", "data.eval_fraction=0.25", f"data.cache_dir={tmp_path}/cache",
            "lora.dropout=0.1", "lora.targets=('attn/(q|k|v|o)$','mlp/(gate|up|down)$')"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    before, after = [float(x) for x in out.split("eval loss ")[1].split()[0:3:2]]
    assert after < before - 0.25, out  # held-out chats (the same three exchanges), LoRA from random weights
    assert (tmp_path / "run" / "adapters" / "adapters.safetensors").is_file()
    # The merged model is a run directory the rest of jaxlm reads.
    from jaxlm.inference.load import load_run

    run = load_run(str(tmp_path / "run"))
    assert run.step == 12 and "layers" in run.params


def test_finetune_help_and_bad_input_get_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["finetune", "--help"])
    assert exit_info.value.code == 0 and "task=dpo" in capsys.readouterr().out
    assert cli.main(["finetune", "sft_tiny", f"finetune.data={tmp_path}/missing.jsonl",
                     f"train.run_dir={tmp_path}/run", f"data.tokenizer={tmp_path}/none.model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxlm: error:")
    assert cli.main(["finetune", "sft_tiny", "lora.quantize=nf4", "lora.targets=()"]) == 2
    assert "needs LoRA targets" in capsys.readouterr().err
