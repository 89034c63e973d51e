"""GRPO through `jaxlm rl`: the trainer's log-probs of the sampled completions equal the sampler's, a run
stopped between two updates of one rollout resumes to the uninterrupted run's adapters bit for bit, and bad
prompts and reward functions are counted or named."""

import json
import os

import numpy as np
import pytest

from jaxlm import cli

QUESTIONS = ["What is your name?", "Say hello.", "Tell me a joke.", "How are you?", "What is two plus two?",
             "Name a colour.", "Is fire hot?", "Where is Paris?"]
SMALL = ["model.vocab_size=384", "model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
         "model.mlp_dim=64", "train.seq_len=64", "rl.max_new_tokens=12", "train.progress=False"]


@pytest.fixture
def prompts(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.dirname(__file__))  # the reward functions' module, for the worker too
    monkeypatch.setenv("PYTHONPATH", os.path.dirname(__file__))
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": q} for q in QUESTIONS] + [{"prompt": "word " * 80}, {"nothing": 1}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _rl(tmp_path, prompts, run, *extra, reward="rewards_for_tests:length", preset="grpo_tiny"):
    return cli.main(["rl", preset, f"rl.prompts={prompts}", f"finetune.data={prompts}", f"train.run_dir={run}",
                     f"data.cache_dir={tmp_path}/cache", f"rl.reward=('{reward}',)", *SMALL, *extra])


def test_trainer_log_probs_equal_the_samplers_and_bad_prompts_are_counted(tmp_path, prompts, capsys):
    """A full finetune's first rollout: its reference log-probs (the trainer's forward over prompt +
    completion with the starting params) equal the sampler's log-probs of the same tokens within 1e-5."""
    run = tmp_path / "full"
    assert _rl(tmp_path, prompts, run, "train.steps=1", "lora.targets=()") == 0
    out = capsys.readouterr().out
    assert "8 used; 1 skipped: longer than the context" in out and "1 skipped: 'prompt' must be" in out, out
    with np.load(run / "rollouts" / "000000.npz") as f:
        mask, old, ref = f["loss_mask"] > 0, f["old_logp"], f["ref_logp"]
    assert mask.sum() >= 8 * 4  # every completion has tokens
    np.testing.assert_allclose(ref[mask], old[mask], rtol=0, atol=1e-5)
    rollout = [json.loads(line) for line in open(run / "metrics.jsonl") if "rl/reward_mean" in line]
    assert rollout and rollout[0]["rl/reward_mean"] > 0 and rollout[0]["rl/rollout_seconds"] > 0


def test_a_completion_ends_with_eos_or_the_templates_end_of_turn(tmp_path):
    """ChatML's "<|im_end|>" is several sentencepiece pieces: the completion ends with the token that
    completes it (the reward functions read the text before it), or at EOS, or runs to the end."""
    from jaxlm.data import chat, tokenizer as tokenizer_lib
    from jaxlm.training import rl

    tok, _ = tokenizer_lib.get(QUESTIONS * 4 + [chat.CHATML], 384, "bpe", "", str(tmp_path / "cache"))
    source = object.__new__(rl.RolloutSource)  # only the tokenizer and the stop are read
    source.tokenizer, source.prompts = tok, rl.Prompts([], [], "<|im_end|>")
    row = np.array(tok.encode("Paris.<|im_end|>\nmore words"))
    n = source._length(row)
    assert "<|im_end|>" in tok.decode(row[:n].tolist()) and "<|im_end|>" not in tok.decode(row[:n - 1].tolist())
    assert n < len(row) and source._text(row[:n]) == "Paris."
    plain = np.array(tok.encode("Paris is in France"))
    assert source._length(plain) == len(plain)
    with_eos = np.concatenate([plain[:2], [tok.eos_id()], plain[2:]])
    assert source._length(with_eos) == 3 and source._text(with_eos[:3]) == tok.decode(plain[:2].tolist())


def test_ppo_rollout_and_step(tmp_path, prompts):
    """PPO with LoRA from random weights: at the first rollout the policy is its reference (adapters off), so
    the sampler's log-probs equal the reference's within 1e-5; the advantages are whitened over the
    completion tokens; the step reports the value loss and the rollouts the entropy and update time."""
    run = tmp_path / "ppo"
    assert _rl(tmp_path, prompts, run, "train.steps=4", preset="ppo_tiny") == 0
    with np.load(run / "rollouts" / "000000.npz") as f:
        mask, batch = f["loss_mask"] > 0, {k: f[k] for k in f.files}
    assert {"old_values", "returns", "advantages"} <= set(batch) and batch["advantages"].shape == mask.shape
    np.testing.assert_allclose(batch["ref_logp"][mask], batch["old_logp"][mask], rtol=0, atol=1e-5)
    adv = batch["advantages"][mask]
    assert abs(adv.mean()) < 1e-4 and abs(adv.std() - 1) < 1e-3 and not batch["advantages"][~mask].any()
    # Each completion's score (the reward function's: its word count) on its last token, after the prompt,
    # and -rl.beta x the log-ratio to the reference on every token.
    kl_part = -0.05 * (batch["old_logp"] - batch["ref_logp"]) * mask
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
    np.testing.assert_allclose((batch["rewards"] - kl_part)[np.arange(len(last)), last], batch["scores"], atol=1e-6)
    assert batch["scores"].max() > 0 and np.all(np.argmax(mask, axis=1) > 0)  # completions follow prompts
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    rollouts, steps = [r for r in rows if "rl/entropy" in r], [r for r in rows if "train/value_loss" in r]
    assert [r["step"] for r in rollouts] == [0, 2] and rollouts[0]["rl/entropy"] > 0
    assert "rl/update_seconds" in rollouts[1] and rollouts[1]["rl/update_tokens_per_s"] > 0
    assert steps and steps[-1]["train/value_loss"] > 0 and 0 <= steps[-1]["train/clip_fraction"] <= 1


def test_ppo_settings_that_cannot_work_are_one_line(tmp_path, prompts, capsys):
    assert _rl(tmp_path, prompts, tmp_path / "p", "model.value_head=False", preset="ppo_tiny") == 2
    assert "PPO, and only PPO, trains a value head" in capsys.readouterr().err
    assert _rl(tmp_path, prompts, tmp_path / "p", "lora.targets=('attn/q$',)", preset="ppo_tiny") == 2
    assert "add '^value$' to lora.targets" in capsys.readouterr().err
    assert _rl(tmp_path, prompts, tmp_path / "p", "rl.group_size=1") == 2
    assert "rl.group_size must be 2 or more" in capsys.readouterr().err


@pytest.mark.slow  # three `jaxlm rl` runs with checkpoints every step, for each of GRPO and PPO: ~90 s
@pytest.mark.parametrize("preset", ["grpo_tiny", "ppo_tiny"])
def test_resumed_between_updates_of_one_rollout_equals_uninterrupted(tmp_path, prompts, preset):
    """Two updates per rollout; the run stops after step 3 (inside the second rollout), and the resumed run
    trains on the saved rollout: its adapters (PPO's: with the value head's) equal the uninterrupted run's
    bit for bit."""
    common = ["train.steps=4", "rl.iterations=2", "checkpoint.every=1", "checkpoint.async_save=False"]
    assert _rl(tmp_path, prompts, tmp_path / "whole", *common, preset=preset) == 0
    assert _rl(tmp_path, prompts, tmp_path / "split", *common, "train.stop_at=3", preset=preset) == 0
    assert not os.path.exists(tmp_path / "split" / "adapters")
    assert _rl(tmp_path, prompts, tmp_path / "split", *common, preset=preset) == 0
    a, b = (open(tmp_path / d / "adapters" / "adapters.safetensors", "rb").read() for d in ("whole", "split"))
    assert a == b
    for name in ("000000.npz", "000001.npz"):
        with np.load(tmp_path / "whole" / "rollouts" / name) as x, np.load(tmp_path / "split" / "rollouts" / name) as y:
            assert all(np.array_equal(x[k], y[k]) for k in x.files)


def test_bad_reward_functions_and_settings_are_one_line(tmp_path, prompts, capsys):
    assert _rl(tmp_path, prompts, tmp_path / "r", reward="rewards_for_tests:nope") == 2
    assert "rewards_for_tests has no function nope" in capsys.readouterr().err
    assert _rl(tmp_path, prompts, tmp_path / "r", "rl.group_size=3") == 2
    assert "must be a multiple of rl.group_size=3" in capsys.readouterr().err


def test_the_built_in_verse_task():
    from jaxlm.data import verses

    rows = verses.rows(count=50, seed=1)
    assert len(rows) == 50 and all(r["prompt"].startswith(verses.INSTRUCTION) for r in rows)
    row = {"prompt": "Continue the verse: In the beginning God created", "answer": "the heaven and the earth."}
    assert verses.continuation_f1(row, "the heaven and the earth.") == 1.0
    assert verses.continuation_f1(row, "Rome fell") == 0.0
    # "the heaven" of 5 answer words: precision 2/2, recall 2/5; words past answer + 2 are not read
    assert abs(verses.continuation_f1(row, "The HEAVEN!") - 2 * 1 * 0.4 / 1.4) < 1e-9
    assert verses.continuation_f1(row, "the heaven and the earth and all the host") == 2 * (5 / 7) * 1 / (5 / 7 + 1)


def test_the_built_in_word_task():
    from jaxlm.data import words

    rows = words.rows(count=80, seed=3)
    assert rows == words.rows(count=80, seed=3) and {r["words"] for r in rows} == set(range(3, 9))
    assert all(f"in {r['words']} words" in r["prompt"] for r in rows)
    row = {"words": 4}
    assert words.bible_words(row, "The LORD is good.") == 1.0
    assert words.bible_words(row, "The computer is good.") == 0.5 * 3 / 4 + 0.5  # "computer" is not in the KJV
    assert words.bible_words(row, "And God said, Let there be light") == 0.5 + 0.5 * (1 - 3 / 4)
    assert words.bible_words(row, "light " * 9) == 0.5 and words.bible_words(row, "!?") == 0.0


@pytest.mark.slow  # an SFT base, a reward model from it, then GRPO scored by that model: ~60 s
def test_grpo_scored_by_a_reward_model_run(tmp_path, prompts, capsys):
    from test_reward import SMALL as RM_SMALL, _prefs

    _prefs(tmp_path)
    base, rm = str(tmp_path / "lm"), str(tmp_path / "rm")
    assert cli.main(["finetune", "sft_tiny", f"finetune.data={tmp_path}/sft.jsonl", f"train.run_dir={base}",
                     "train.steps=2", "lora.targets=()", "finetune.pack=False", f"data.cache_dir={tmp_path}/cache",
                     *RM_SMALL]) == 0
    assert cli.main(["finetune", "reward_tiny", f"finetune.data={tmp_path}/prefs.jsonl", f"train.run_dir={rm}",
                     f"model.init_from={base}", "train.steps=2", *RM_SMALL[-4:]]) == 0
    run = tmp_path / "grpo"
    assert cli.main(["rl", "grpo_tiny", f"rl.prompts={prompts}", f"train.run_dir={run}", f"model.init_from={base}",
                     f"rl.reward_model={rm}", "rl.reward=()", "train.steps=2", "train.seq_len=128",
                     "rl.max_new_tokens=12", "train.progress=False"]) == 0
    rollouts = [json.loads(line) for line in open(run / "metrics.jsonl") if "rl/reward_mean" in line]
    assert len(rollouts) == 2 and all(r["rl/reward_std"] > 0 for r in rollouts)  # scores differ per completion
    # A policy reading text with another tokenizer (one trained on the prompts) cannot use this reward model.
    capsys.readouterr()
    assert _rl(tmp_path, prompts, tmp_path / "other", f"rl.reward_model={rm}", "train.steps=1") == 2
    assert "not the policy's tokenizer" in capsys.readouterr().err
