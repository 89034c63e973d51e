"""Learning from rewards on the shared loop (GRPO and PPO): rollouts from the policy being trained, scored
by reward functions and/or a reward model, turned into batches for the one step factory.

Every `rl.iterations` train steps start a rollout: the next batch_size / group_size prompts (a seeded
permutation per pass over the prompts), each sampled group_size times with the KV-cache generator on the
training mesh, from the current params (a LoRA policy's merged). The sampler's log-prob of every drawn
token is the "old" log-prob of the ratio; the reference's (the frozen start: a LoRA policy with its adapters
off, so no second copy) is computed once per rollout. A completion ends at EOS or with the chat template's
end-of-turn text (both trained on). GRPO normalises the rewards within each group; PPO puts them on each
completion's last token, with -rl.beta x the log-ratio to the reference on every token, and takes GAE
advantages against the value head's values at the rollout (`policy_gradient`).

Everything a rollout draws follows from the step: which prompts, and the sampling seed. Each rollout is
saved in `<run>/rollouts/` before its first update, so a run resumed between two updates of one rollout
trains on the very same batch: resuming equals never stopping, bit for bit.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.core import atomic
from jaxlm.core.config import MAX_SEED, Config, ConfigError, SamplingConfig
from jaxlm.core.sharding import local_rows, whole_batch
from jaxlm.data import chat, verses, words
from jaxlm.training import policy_gradient as pg, reward_functions
from jaxlm.training.dpo import prompt_messages
from jaxlm.training.objectives import Objective, per_token_losses
from jaxlm.training.sft import Report, read_jsonl

log = logging.getLogger("jaxlm.rl")
ROLLOUTS = "rollouts"
BUILT_IN = {verses.SOURCE: verses.rows, words.SOURCE: words.rows}  # rl.prompts that name a built-in task


@dataclasses.dataclass
class Prompts:
    rows: list[dict]  # as read: what the reward functions see
    ids: list[list[int]]  # rendered with the chat template's generation prompt, encoded
    stop: str = ""  # the template's end-of-turn text: a completion ends with it (or with EOS)


def load_prompts(config: Config, template: chat.Template, encode) -> tuple[Prompts, Report]:
    """The usable prompts of rl.prompts; malformed ones and those whose completion would not fit the context
    (prompt + rl.max_new_tokens > train.seq_len) are counted and skipped."""
    if not config.rl.prompts:
        raise ConfigError(f"task={config.task} needs rl.prompts: a JSONL file of {{\"prompt\": ...}} rows, or one "
                          f"of the built-in tasks {', '.join(BUILT_IN)}")
    report, rows, ids = Report(), [], []
    room = config.train.seq_len - config.rl.max_new_tokens
    if config.rl.prompts in BUILT_IN:
        built = BUILT_IN[config.rl.prompts](seed=config.train.seed)
        source = [(f"{config.rl.prompts}#{i}", row) for i, row in enumerate(built)]
    else:
        source = read_jsonl(os.path.expanduser(config.rl.prompts))
    for where, row in source:
        try:
            if not isinstance(row, dict):
                raise ValueError("row is not an object")
            messages = prompt_messages(row.get("prompt"))
            tokens = list(template.prefix_ids) + encode(template.render(messages, add_generation_prompt=True))
        except (ValueError, chat.TemplateError) as e:
            report.reject(str(e), where)
            continue
        if len(tokens) > room:
            report.reject(f"longer than the context (train.seq_len - rl.max_new_tokens = {room} tokens)", where)
            continue
        report.used += 1
        rows.append(row)
        ids.append(tokens)
    if not rows:
        raise ConfigError(f"rl.prompts={config.rl.prompts} has no usable prompt ({report.summary()})")
    return Prompts(rows, ids, template.stop_string or ""), report


def aggregation(rl) -> str:
    return {"grpo": "sequence", "dr_grpo": "constant", "dapo": "token"}[rl.loss]


def objective(apply_fn, config: Config, dropout: bool = False) -> Objective:
    """On a rollout batch (`RolloutSource`): GRPO's clipped ratio objective with the KL penalty, or PPO's with
    per-token advantages plus the value head's clipped loss."""
    rl = config.rl

    def loss(params, batch, rng):
        out = per_token_losses(apply_fn, params, batch, batch["targets"], rng, dropout, config.train.loss_chunks)
        eps_high = rl.epsilon_high or rl.epsilon
        if config.task == "ppo":
            return pg.ppo_loss(-out.nll, batch["old_logp"], batch["ref_logp"], batch["advantages"], out.values,
                               batch["old_values"], batch["returns"], batch["loss_mask"], rl.epsilon, eps_high,
                               rl.value_clip, rl.vf_coef)
        return pg.grpo_loss(-out.nll, batch["old_logp"], batch["ref_logp"], batch["advantages"], batch["loss_mask"],
                            rl.beta, rl.epsilon, eps_high, aggregation(rl), rl.max_new_tokens)

    return Objective(config.task, loss, per_token=False)


class Follow:
    """A loop hook that hands the rollout source the params after every step."""

    def __init__(self, source: "RolloutSource"):
        self.source = source

    def before_step(self, loop, step: int) -> None:
        pass

    def after_step(self, loop, step: int, state) -> None:
        self.source.params = state.params

    def close(self, loop) -> None:
        pass


class RolloutSource:
    """The loop's batches for GRPO and PPO: a new rollout every `rl.iterations` steps, the same batch in between."""

    def __init__(self, run, prompts: Prompts, tokenizer, ref_params, run_dir: str, writer, sampler):
        """`ref_params`: the starting model's params for a full finetune; None for LoRA (adapters off).
        `sampler(model, params, sampling, mesh)`: the KV-cache generator (`jaxlm.inference.generate.Generator`,
        handed in by the command: inference is a layer above training)."""
        spec, config = run.spec, run.spec.config
        self.spec, self.config, self.rl, self.mesh = spec, config, config.rl, run.mesh
        self.prompts, self.tokenizer, self.ref_params, self.writer = prompts, tokenizer, ref_params, writer
        self.dir = os.path.join(run_dir, ROLLOUTS)
        self.step, self.params, self.batch, self.cycle = run.start, run.state.params, None, None
        self._handed, self._tokens = None, 0.0  # when the last rollout went to the loop, and its tokens
        self.sampling = SamplingConfig(temperature=self.rl.temperature, max_new_tokens=self.rl.max_new_tokens)
        self.generator = sampler(spec.model, None, self.sampling, run.mesh)
        self.scorer = reward_functions.Scorer(self.rl.reward, self.rl.reward_timeout, self.rl.max_failed_fraction)
        self.reward_model = (RewardModel(self.rl.reward_model, tokenizer, run.mesh, config.train.seq_len)
                             if self.rl.reward_model else None)
        on_mesh = not jax.sharding.get_abstract_mesh().empty  # replicated: every process reads the whole batch
        self._forward = jax.jit(lambda p, b: _logp_and_values(per_token_losses(spec.apply_fn, p, b, b["targets"])),
                                out_shardings=jax.sharding.PartitionSpec() if on_mesh else None)
        self._merge = jax.jit(spec.lora.merge) if spec.lora is not None else None
        # A LoRA policy's reference is its own base with zero adapters (exactly the starting model, and no second
        # copy); the base is read from the current params at each rollout, as a step donates the old ones.
        self._zero_adapters = jax.tree.map(jnp.zeros_like, run.state.params["lora"]) if spec.lora is not None else None

    def get_state(self) -> dict:
        return {"step": self.step}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        cycle = self.step // self.rl.iterations
        if cycle != self.cycle:
            self.batch, self.cycle = self._rollout(cycle), cycle
        self.step += 1
        return local_rows(self.batch, self.mesh)  # every process draws the whole batch; the loop takes each one's rows

    def close(self) -> None:
        self.scorer.close()

    def prompt_indices(self, cycle: int) -> list[int]:
        """The prompts of rollout `cycle`: consecutive places in passes over the prompts, each pass in its own
        seeded order."""
        n, per = len(self.prompts.rows), self.config.train.batch_size // self.rl.group_size
        out = []
        for place in range(cycle * per, (cycle + 1) * per):
            order = np.random.default_rng([self.config.train.seed, place // n]).permutation(n)
            out.append(int(order[place % n]))
        return out

    def _rollout(self, cycle: int) -> dict[str, np.ndarray]:
        path = os.path.join(self.dir, f"{cycle:06d}.npz")
        if os.path.isfile(path):  # resumed inside this rollout's updates: train on exactly what was drawn
            with np.load(path) as f:
                return {k: f[k] for k in f.files}
        update_s = self._wait_for_updates()
        t0 = time.perf_counter()
        idx, g = self.prompt_indices(cycle), self.rl.group_size
        prompt_ids = [self.prompts.ids[i] for i in idx for _ in range(g)]
        tokens, logps, lengths = self._sample(prompt_ids, cycle)
        seqs = [np.concatenate([p, tokens[r, :n]]).astype(np.int32) for r, (p, n) in enumerate(zip(prompt_ids, lengths))]
        t1 = time.perf_counter()
        texts = [self._text(row[:n]) for row, n in zip(tokens, lengths)]
        scored = self.scorer.score([self.prompts.rows[i] for i in idx], [texts[p * g:(p + 1) * g] for p in range(len(idx))])
        if self.reward_model is not None:
            scored.rewards += self.reward_model.score(seqs).reshape(len(idx), g)
        t2 = time.perf_counter()
        arrays = self._arrays(seqs, prompt_ids, logps, lengths)
        batch, keep, flat = (self._ppo if self.config.task == "ppo" else self._grpo)(arrays, scored)
        if jax.process_index() == 0:  # every process holds the same batch; one writes it
            os.makedirs(self.dir, exist_ok=True)
            with atomic.replacing(path) as tmp, open(tmp, "wb") as f:
                np.savez(f, **batch)
        times = {"rl/rollout_seconds": t1 - t0, "rl/scoring_seconds": t2 - t1, "rl/prepare_seconds": time.perf_counter() - t2}
        if update_s is not None:
            times.update({"rl/update_seconds": update_s, "rl/update_tokens_per_s": self.rl.iterations * self._tokens / update_s})
        self._tokens, self._handed = float(np.sum(batch["segment_ids"] > 0)), time.perf_counter()
        self._report(scored, keep, flat, logps, lengths, times)
        return batch

    def _wait_for_updates(self) -> float | None:
        """Seconds since the previous rollout was handed to the loop until its updates (rl.iterations steps,
        dispatched asynchronously) are done; None for a run's first rollout."""
        jax.block_until_ready(self.params)
        return None if self._handed is None else time.perf_counter() - self._handed

    def _sample(self, prompt_ids: list[list[int]], cycle: int):
        """(tokens (B, N), their log-probs (B, N), completion lengths (B,): through EOS or the end of turn)."""
        params = self.params if self._merge is None else self._merge(self.params["base"], self.params["lora"])
        self.generator.params = params
        self.generator.sampling = dataclasses.replace(
            self.sampling, seed=(self.config.train.seed * 1_000_003 + cycle) % MAX_SEED)
        drawn = list(self.generator.stream(prompt_ids, logprobs=True))
        tokens, logps = np.stack([t for t, _ in drawn], 1), np.stack([lp for _, lp in drawn], 1)
        return tokens, logps, np.array([self._length(row) for row in tokens])

    def _length(self, row: np.ndarray) -> int:
        """How many of the drawn tokens the completion is: through its first EOS, or through the token that
        completes the chat template's end-of-turn text (a template whose end marker the tokenizer spells
        in pieces, such as ChatML's "<|im_end|>" in sentencepiece), else all of them."""
        at_eos = np.flatnonzero(row == self.tokenizer.eos_id())
        n = int(at_eos[0]) + 1 if at_eos.size else len(row)
        stop = self.prompts.stop
        if not stop or stop not in self.tokenizer.decode(row[:n].tolist()):
            return n
        low, high = 1, n  # the shortest prefix whose text holds the stop: a prefix's text only grows
        while low < high:
            mid = (low + high) // 2
            low, high = (low, mid) if stop in self.tokenizer.decode(row[:mid].tolist()) else (mid + 1, high)
        return low

    def _text(self, completion: np.ndarray) -> str:
        """What the reward functions read: the completion's text before EOS and the end-of-turn text."""
        text = self.tokenizer.decode(completion[completion != self.tokenizer.eos_id()].tolist())
        return text.split(self.prompts.stop)[0] if self.prompts.stop else text

    def _grpo(self, batch, scored):
        """(batch, prompts kept, prompts of equal rewards) with GRPO's group-normalised advantages (B,) and the
        reference's log-probs."""
        adv, flat = pg.group_advantages(jnp.asarray(scored.rewards), scale=self.rl.loss != "dr_grpo")
        flat = np.asarray(flat)
        keep = scored.ok & ~(flat if self.rl.drop_zero_variance else np.zeros_like(flat))
        batch["loss_mask"] *= np.repeat(keep, self.rl.group_size)[:, None]
        batch["advantages"] = np.where(np.repeat(keep, self.rl.group_size), np.asarray(adv).reshape(-1), 0.0).astype(np.float32)
        batch["ref_logp"] = self._logp_values(self._reference(), batch)[0]
        return batch, keep, flat

    def _ppo(self, batch, scored):
        """(batch, prompts kept, prompts of equal rewards) with PPO's per-token rewards (the KL to the
        reference on every token, the score on the last), the value head's values, and GAE's advantages
        (whitened over the batch) and returns."""
        keep = scored.ok
        batch["loss_mask"] *= np.repeat(keep, self.rl.group_size)[:, None]
        batch["ref_logp"] = self._logp_values(self._reference(), batch)[0]
        batch["old_values"] = self._logp_values(self.params, batch)[1]
        mask, score = batch["loss_mask"], np.where(keep[:, None], scored.rewards, 0.0).reshape(-1)
        rewards = pg.rlhf_rewards(jnp.asarray(score), batch["old_logp"], batch["ref_logp"], mask, self.rl.beta)
        batch["scores"], batch["rewards"] = score.astype(np.float32), np.asarray(rewards, np.float32)  # for inspection
        adv, returns = pg.gae(rewards, jnp.asarray(batch["old_values"]), mask, self.rl.gamma, self.rl.lam)
        batch["advantages"] = np.asarray(pg.whiten(adv, mask), np.float32)
        batch["returns"] = np.asarray(returns, np.float32)
        return batch, keep, np.zeros_like(keep)

    def _arrays(self, seqs, prompt_ids, logps, lengths) -> dict[str, np.ndarray]:
        """The train batch: each prompt + completion (`seqs`) as inputs and shifted targets, the completion's
        tokens marked for the loss with their sampled log-probs."""
        b, t = len(seqs), self.config.train.seq_len
        out = {k: np.zeros((b, t), np.int32) for k in ("inputs", "targets", "positions", "segment_ids")}
        out.update(loss_mask=np.zeros((b, t), np.float32), old_logp=np.zeros((b, t), np.float32))
        for r, (seq, prompt, n) in enumerate(zip(seqs, prompt_ids, lengths)):
            m = len(seq) - 1
            out["inputs"][r, :m], out["targets"][r, :m] = seq[:-1], seq[1:]
            out["positions"][r, :m], out["segment_ids"][r, :m] = np.arange(m), 1
            first = len(prompt) - 1  # the target index of the first completion token
            out["loss_mask"][r, first:first + n] = 1.0
            out["old_logp"][r, first:first + n] = logps[r, :n]
        return out

    def _reference(self):
        return self.ref_params if self.ref_params is not None else {"base": self.params["base"], "lora": self._zero_adapters}

    def _logp_values(self, params, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """(log-probs of the targets, the value head's values or None), float32 (B, T), under `params`."""
        with jax.set_mesh(self.mesh):
            logp, values = jax.device_get(self._forward(params, whole_batch(batch, self.mesh)))
        return np.asarray(logp, np.float32), None if values is None else np.asarray(values, np.float32)

    def _report(self, scored, keep, flat, logps, lengths, times: dict) -> None:
        """Logs and writes the rollout's figures. The entropy is the drawn tokens' mean -log p: the policy's
        entropy per token in expectation (at rl.temperature=1; else the sampling distribution's cross-entropy)."""
        kept = scored.rewards[keep]
        drawn = np.arange(logps.shape[1])[None, :] < lengths[:, None]
        figures = {"rl/reward_mean": float(kept.mean()) if kept.size else float("nan"),
                   "rl/reward_std": float(kept.std()) if kept.size else float("nan"),
                   "rl/response_length": float(np.mean(lengths)), "rl/entropy": float(-logps[drawn].mean()),
                   "rl/groups_failed": int(sum(scored.failures.values())),
                   "rl/groups_zero_variance": int(np.sum(np.asarray(flat))), **times}
        log.info("rollout at step %d: reward %.3f +- %.3f, %.1f tokens per completion, %.1fs sampling, %.1fs "
                 "scoring%s", self.step, figures["rl/reward_mean"], figures["rl/reward_std"],
                 figures["rl/response_length"], times["rl/rollout_seconds"], times["rl/scoring_seconds"],
                 f", {figures['rl/groups_failed']} groups failed ({dict(scored.failures)})" if scored.failures else "")
        if jax.process_index() == 0:
            self.writer.write(self.step, figures)


def _logp_and_values(out) -> tuple[jax.Array, jax.Array | None]:
    return -out.nll, out.values


class RewardModel:
    """A reward-model run (`jaxlm finetune reward_tiny`) scoring prompt + completion at its last token. It must
    read the policy's tokens: a different tokenizer is refused at start."""

    def __init__(self, run_dir: str, tokenizer, mesh, width: int):
        from jaxlm.data import tokenizer as tokenizer_lib
        from jaxlm.training import base

        theirs = tokenizer_lib.load_for_run(base.directory(run_dir))
        if tokenizer_lib.file_hash(theirs.path) != tokenizer_lib.file_hash(tokenizer.path):
            raise ConfigError(f"rl.reward_model={run_dir} reads text with {theirs.path}, not the policy's tokenizer "
                              f"{tokenizer.path}; train the reward model from the same base")
        self.model, self.params = base.run_model(run_dir, mesh)
        if self.model.config.num_labels != 1:
            raise ConfigError(f"rl.reward_model={run_dir} is not a reward model (model.num_labels="
                              f"{self.model.config.num_labels}); train one with jaxlm finetune reward_tiny")
        self.mesh, self.width = mesh, width  # one padded width: one compiled program
        self._forward = jax.jit(lambda p, t, pos, seg: self.model.apply({"params": p}, t, pos, seg)[..., 0],
                                out_shardings=jax.sharding.PartitionSpec())

    def score(self, seqs: list[np.ndarray]) -> np.ndarray:
        """(B,) float32: the score at the last token of each prompt + completion (its EOS when it has one)."""
        width = self.width
        arrays = {k: np.zeros((len(seqs), width), np.int32) for k in ("inputs", "positions", "segment_ids")}
        for r, s in enumerate(seqs):
            arrays["inputs"][r, :len(s)], arrays["positions"][r, :len(s)] = s, np.arange(len(s))
            arrays["segment_ids"][r, :len(s)] = 1
        with jax.set_mesh(self.mesh):
            b = whole_batch(arrays, self.mesh)
            scores = np.asarray(jax.device_get(self._forward(self.params, b["inputs"], b["positions"], b["segment_ids"])))
        return scores[np.arange(len(seqs)), [len(s) - 1 for s in seqs]].astype(np.float32)
