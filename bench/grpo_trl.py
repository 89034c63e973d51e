"""GRPO speed: `jaxlm rl grpo_tiny` against TRL's `GRPOTrainer` (torch eager, CPU, float32), same setting.

    python bench/grpo_trl.py --init-from runs/tiny                    # 10 timed iterations per side
    python bench/grpo_trl.py --init-from runs/tiny --iterations 30 rl.group_size=8 train.batch_size=16
    python bench/grpo_trl.py --init-from runs/tiny lora.targets='()'  # full finetuning on both sides

Needs TRL (`pip install -e .[bench]`) and a jaxlm run to start from (`jaxlm train tiny` writes runs/tiny).
Both sides start from the same weights: the run is exported with `jaxlm convert to-hf` and TRL loads that
directory. Each side runs in its own process, one after the other (never at once). An iteration is one
rollout (batch / G prompts, G completions each) plus one update on it (rl.iterations=1, TRL's
num_iterations=1). After 2 warm-up iterations (compilation), each iteration's times are taken and the
median is printed:

  iter s        wall time of the whole iteration (rollout start to the next rollout's start)
  rollout s     the rollout phase: sampling, rewards, reference log-probs, batch building
  sample tok/s  completion tokens generated / sampling seconds (jaxlm: rl/rollout_seconds of metrics.jsonl;
                TRL: its `_generate_single_turn`)
  update tok/s  prompt + completion tokens of the batch / update seconds (= iter s - rollout s: the
                forward, backward and optimizer step with the loop's own bookkeeping)

Matched: weights, tokenizer, prompts (jaxlm's rl.prompts rendered with its chat template, the same prompts in
the same order per iteration; TRL gets the rendered text, checked to tokenize to jaxlm's ids), the reward
(jaxlm's rl.reward functions), G, batch, max_new_tokens, temperature (no top-k/top-p), beta, epsilon, loss
aggregation, lr, Adam betas and clipping, LoRA rank/alpha/targets (or full finetuning). Every completion is
exactly max_new_tokens long on both sides: jaxlm's sampler always draws max_new_tokens (an EOS only cuts
what is trained), and TRL gets min_new_tokens=max_new_tokens (EOS is never drawn). Not matched: each
side's own implementation (jaxlm samples from merged LoRA weights, pads every train row to train.seq_len and
scores rewards in a worker process; TRL samples through the unmerged adapters and trains on the batch's
longest row), the lr schedule's exact shape, and the threads (XLA takes every core; torch its default or
--torch-threads). TRL runs with OMP_WAIT_POLICY=PASSIVE unless it is set: torch's spinning OpenMP threads make
it 10-30x slower on a CPU shared with other work (OMP_WAIT_POLICY=ACTIVE on an idle machine for its best).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

WARMUP = 2  # iterations left out of the figures: compilation (jaxlm) and first-call costs (both)
HF_NAMES = {"attn/q": "q_proj", "attn/k": "k_proj", "attn/v": "v_proj", "attn/o": "o_proj",
            "mlp/gate": "gate_proj", "mlp/up": "up_proj", "mlp/down": "down_proj"}


def _read(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


def settings(config, model_dir: str) -> dict:
    """What both sides share, from jaxlm's resolved config; a setting TRL cannot mirror is refused."""
    import re

    rl, lo, o, t = config.rl, config.lora, config.optim, config.train
    if rl.iterations != 1 or rl.reward_model or not rl.reward:
        raise SystemExit("error: needs rl.iterations=1 and reward functions (rl.reward), no rl.reward_model")
    if lo.targets and (lo.quantize != "none" or lo.dropout):
        raise SystemExit("error: QLoRA (lora.quantize) and lora.dropout are not mirrored on the TRL side")
    modules = [hf for path, hf in HF_NAMES.items() if any(re.search(p, f"layers/{path}") for p in lo.targets)]
    if lo.targets and not modules:
        raise SystemExit(f"error: lora.targets={lo.targets} names no projection TRL can target")
    m = config.model
    return {"batch": t.batch_size, "group": rl.group_size, "max_new": rl.max_new_tokens,
            "temperature": rl.temperature, "beta": rl.beta, "epsilon": rl.epsilon,
            "epsilon_high": rl.epsilon_high or rl.epsilon, "loss": rl.loss, "reward": list(rl.reward),
            "lr": o.lr, "warmup": o.warmup_steps, "weight_decay": o.weight_decay, "b1": o.b1, "b2": o.b2,
            "eps": o.eps, "clip": o.clip_norm, "seed": t.seed, "seq_len": t.seq_len, "lora_modules": modules,
            "rank": lo.rank, "alpha": lo.alpha, "model_dir": model_dir,
            "shape": f"d_model {m.d_model}, {m.num_layers} layers, {m.num_heads}/{m.num_kv_heads} heads, "
                     f"mlp {m.mlp_dim}, vocab {m.vocab_size}, {m.dtype}"}


def prepare(words: list[str], steps: int, work: str) -> dict:
    """The settings, the starting model as a Hugging Face directory, and the prompts of every iteration in
    jaxlm's order (rendered text and token ids), written to `work`."""
    import types

    from jaxlm import cli
    from jaxlm.core import overrides
    from jaxlm.data import chat
    from jaxlm.training import base, finetune, rl
    from jaxlm.training.dpo import prompt_messages

    config = base.resolve(overrides.load(words))
    start = base.parse(config.model.init_from)
    if not start.base or start.adapters:
        raise SystemExit("error: give a jaxlm run (or hf:DIR) to start from, without adapters: --init-from RUN")
    model_dir = base.directory(start.base) if base.is_hf(start.base) else os.path.join(work, "hf")
    shared = settings(config, model_dir)  # refuses what TRL cannot mirror before any work
    if not base.is_hf(start.base) and cli.main(["convert", "to-hf", base.directory(start.base), model_dir]) != 0:
        raise SystemExit(f"error: jaxlm convert to-hf {start.base} failed")
    tok, _ = finetune.load_tokenizer(config)
    bos_first = not tok.special_tokens_in_text and tok.bos_id() >= 0
    template = chat.load(config.finetune.chat_template, base.template_dir(config),
                         prefix_ids=(tok.bos_id(),) if bos_first else ())
    prompts, _ = rl.load_prompts(config, template, lambda text: list(tok.encode(text)))
    view = types.SimpleNamespace(prompts=prompts, config=config, rl=config.rl)  # what prompt_indices reads
    order = [i for cycle in range(steps) for i in rl.RolloutSource.prompt_indices(view, cycle)]
    rows = [{"text": template.render(prompt_messages(prompts.rows[i]["prompt"]), add_generation_prompt=True),
             "ids": prompts.ids[i], "row": prompts.rows[i], "index": i} for i in order]
    _write(os.path.join(work, "prompts.json"), rows)
    _write(os.path.join(work, "settings.json"), shared)
    return shared


def run_jaxlm(words: list[str], steps: int, work: str) -> dict:
    """`jaxlm rl` in this process, each rollout timed from the moment the previous update's params are ready."""
    import jax

    from jaxlm import cli
    from jaxlm.training import rl

    s = prepare(words, steps, work)
    marks, original = [], rl.RolloutSource._rollout

    def timed(self, cycle):
        jax.block_until_ready(self.params)  # the update's tail is the update's time, not the sampler's
        t0 = time.perf_counter()
        batch = original(self, cycle)
        marks.append({"start": t0, "end": time.perf_counter(), "prompts": self.prompt_indices(cycle),
                      "tokens": int(batch["segment_ids"].sum()) + len(batch["segment_ids"])})
        return batch

    rl.RolloutSource._rollout = timed
    run = os.path.join(work, "jaxlm_run")
    if cli.main(["rl", *words, f"train.run_dir={run}", f"train.steps={steps}", "train.progress=False"]) != 0:
        raise SystemExit("error: jaxlm rl failed")
    with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as f:
        rollouts = [r for r in map(json.loads, f) if "rl/rollout_seconds" in r]
    expected = [p["index"] for p in _read(os.path.join(work, "prompts.json"))]
    per = s["batch"] // s["group"]
    iters = []
    for i in range(steps - 1):  # the last step's update has no next rollout to end it
        m, r = marks[i], rollouts[i]
        iters.append({"iter_s": marks[i + 1]["start"] - m["start"], "rollout_s": m["end"] - m["start"],
                      "sample_s": r["rl/rollout_seconds"], "gen_tokens": s["batch"] * s["max_new"],
                      "update_tokens": m["tokens"], "completion_len": r["rl/response_length"],
                      "prompts_match": m["prompts"] == expected[i * per:(i + 1) * per]})
    return {"iterations": iters, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def trl_config(s: dict, steps: int, work: str):
    """TRL's GRPOConfig mirroring jaxlm's settings `s`."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=os.path.join(work, "trl_out"), use_cpu=True, bf16=False, fp16=False, report_to="none",
        save_strategy="no", logging_steps=1, disable_tqdm=True, seed=s["seed"], max_steps=steps,
        per_device_train_batch_size=s["batch"], gradient_accumulation_steps=1, num_generations=s["group"],
        max_completion_length=s["max_new"], temperature=s["temperature"], top_k=0, top_p=1.0,
        generation_kwargs={"min_new_tokens": s["max_new"]},  # every completion max_new tokens, as jaxlm's
        num_iterations=1, beta=s["beta"], epsilon=s["epsilon"], epsilon_high=s["epsilon_high"],
        loss_type=s["loss"], scale_rewards="none" if s["loss"] == "dr_grpo" else "group",
        learning_rate=s["lr"], warmup_steps=s["warmup"], lr_scheduler_type="cosine",
        weight_decay=s["weight_decay"], adam_beta1=s["b1"], adam_beta2=s["b2"], adam_epsilon=s["eps"],
        max_grad_norm=s["clip"], gradient_checkpointing=False, shuffle_dataset=False, log_completions=False,
        dataloader_num_workers=0)


def reward_function(specs: list[str]):
    """jaxlm's rl.reward functions (summed), called as TRL calls a reward function."""
    from jaxlm.training import reward_functions

    fns = [reward_functions.load(spec) for spec in specs]

    def jaxlm_reward(prompts, completions, row, **_):
        return [float(sum(fn(prompt=json.loads(r), completion=c) for fn in fns)) for r, c in zip(row, completions)]

    return jaxlm_reward


def timed_method(obj, name: str, sink: list) -> None:
    """Replaces obj.name by a wrapper appending (seconds, args, result) of every call to `sink`."""
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = original(*args, **kwargs)
        sink.append((time.perf_counter() - t0, args, out))
        return out

    setattr(obj, name, wrapper)


def run_trl(steps: int, work: str) -> dict:
    """TRL's GRPOTrainer on the prepared model, prompts and settings; its rollout (`_generate_and_score_completions`)
    and sampling (`_generate_single_turn`) timed, iterations ended by a callback at each optimizer step."""
    import datasets
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    s, prompts = _read(os.path.join(work, "settings.json")), _read(os.path.join(work, "prompts.json"))
    data = datasets.Dataset.from_list([{"prompt": p["text"], "row": json.dumps(p["row"])} for p in prompts])
    model = AutoModelForCausalLM.from_pretrained(s["model_dir"], dtype=torch.float32)
    lora = peft.LoraConfig(r=s["rank"], lora_alpha=s["alpha"], lora_dropout=0.0, target_modules=s["lora_modules"],
                           task_type="CAUSAL_LM") if s["lora_modules"] else None
    ends = []

    class Marks(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    trainer = GRPOTrainer(model=model, reward_funcs=reward_function(s["reward"]), args=trl_config(s, steps, work),
                          train_dataset=data, processing_class=AutoTokenizer.from_pretrained(s["model_dir"]),
                          peft_config=lora, callbacks=[Marks()])
    samples, rollouts = [], []
    timed_method(trainer, "_generate_single_turn", samples)
    timed_method(trainer, "_generate_and_score_completions", rollouts)
    trainer.train()
    per, iters = s["batch"] // s["group"], []
    for i in range(steps - 1):  # as many as jaxlm's
        (sample_s, args, (completions, _)), (rollout_s, _, batch) = samples[i], rollouts[i]
        expected = [p["ids"] for p in prompts[i * per:(i + 1) * per] for _ in range(s["group"])]
        iters.append({"iter_s": ends[i + 1] - ends[i], "rollout_s": rollout_s, "sample_s": sample_s,
                      "gen_tokens": sum(map(len, completions)),
                      "update_tokens": int(batch["prompt_mask"].sum() + batch["completion_mask"].sum()),
                      "completion_len": sum(map(len, completions)) / len(completions),
                      "prompts_match": [list(x) for x in args[0]] == expected})
    return {"iterations": iters, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "torch_threads": torch.get_num_threads()}


def summarize(result: dict) -> dict:
    """Medians over the iterations after the warm-up; rates per iteration, then their median."""
    its = result["iterations"][WARMUP:]
    med = lambda f: statistics.median(f(r) for r in its)
    return {"n": len(its), "iter_s": med(lambda r: r["iter_s"]), "rollout_s": med(lambda r: r["rollout_s"]),
            "sample_s": med(lambda r: r["sample_s"]), "update_s": med(lambda r: r["iter_s"] - r["rollout_s"]),
            "sample_tps": med(lambda r: r["gen_tokens"] / r["sample_s"]),
            "update_tps": med(lambda r: r["update_tokens"] / (r["iter_s"] - r["rollout_s"])),
            "tokens": med(lambda r: r["update_tokens"]), "completion_len": med(lambda r: r["completion_len"]),
            "prompts_match": all(r["prompts_match"] for r in result["iterations"]),
            "peak_rss_mib": result["peak_rss_mib"]}


def child(side: str, words: list[str], steps: int, work: str, threads: int) -> None:
    """Runs one side in a process of its own, writing its figures to work/<side>.json."""
    if side == "trl" and threads:
        import torch

        torch.set_num_threads(threads)
    from jaxlm.core.config import ConfigError

    try:
        out = run_jaxlm(words, steps, work) if side == "jaxlm" else run_trl(steps, work)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    _write(os.path.join(work, f"{side}.json"), out)


def spawn(side: str, words: list[str], steps: int, work: str, threads: int) -> dict:
    print(f"running {side} ({steps} iterations) ...", file=sys.stderr, flush=True)
    # torch's OpenMP threads spin while they wait: on a CPU shared with other work that is 10-30x slower.
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    if side == "trl":
        env["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    done = subprocess.run([sys.executable, __file__, "--child", side, "--work", work, "--iterations",
                           str(steps - WARMUP - 1), "--torch-threads", str(threads), *words],
                          capture_output=True, text=True, env=env)
    if done.returncode:
        lines = [x for x in done.stderr.strip().splitlines() if x.strip()] or ["(no output)"]
        if lines[-1].startswith("error: "):  # the child's own one-line message
            raise SystemExit(f"{lines[-1]} ({side} side)")
        print("\n".join(lines[-15:]), file=sys.stderr)
        raise SystemExit(f"error: the {side} side failed (exit {done.returncode}): {lines[-1]}")
    return _read(os.path.join(work, f"{side}.json"))


def report(s: dict, jx: dict, tr: dict, trl_version: str, threads: int) -> None:
    mode = (f"LoRA r{s['rank']} alpha {s['alpha']:g} on {','.join(s['lora_modules'])}" if s["lora_modules"]
            else "full finetuning")
    print(f"GRPO, {s['shape']}; {mode}")
    print(f"batch {s['batch']} = {s['batch'] // s['group']} prompts x G={s['group']}, {s['max_new']} new tokens, "
          f"temperature {s['temperature']:g}, beta {s['beta']:g}, loss {s['loss']}, lr {s['lr']:g}; "
          f"median of {jx['n']} iterations after {WARMUP} warm-up")
    print(f"torch {threads} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
    head = (f"{'side':<16} {'iter s':>7} {'rollout s':>9} {'sample s':>8} {'sample tok/s':>12} {'update s':>8} "
            f"{'update tok/s':>12} {'tokens/iter':>11} {'compl len':>9} {'peak RSS MiB':>12}")
    print(head)
    for name, r in (("jaxlm", jx), (f"TRL {trl_version}", tr)):
        print(f"{name:<16} {r['iter_s']:7.3f} {r['rollout_s']:9.3f} {r['sample_s']:8.3f} {r['sample_tps']:12,.0f} "
              f"{r['update_s']:8.3f} {r['update_tps']:12,.0f} {r['tokens']:11.0f} {r['completion_len']:9.1f} "
              f"{r['peak_rss_mib']:12,.0f}")
    print(f"jaxlm speed / TRL speed (>1: jaxlm faster): iteration {tr['iter_s'] / jx['iter_s']:.2f}x, "
          f"rollout {tr['rollout_s'] / jx['rollout_s']:.2f}x, sampling {jx['sample_tps'] / tr['sample_tps']:.2f}x, "
          f"update {jx['update_tps'] / tr['update_tps']:.2f}x")
    if not (jx["prompts_match"] and tr["prompts_match"]):
        print("warning: the two sides did not see the same prompt tokens in every iteration", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="*", help="jaxlm preset (default grpo_tiny) and overrides; TRL mirrors them")
    parser.add_argument("--init-from", default="runs/tiny",
                        help="the jaxlm run (or hf:DIR) both sides start from (default: runs/tiny)")
    parser.add_argument("--iterations", type=int, default=10, help=f"timed iterations per side, after {WARMUP} warm-up")
    parser.add_argument("--work", help="keep the exported model, runs and figures here (default: a temporary folder)")
    parser.add_argument("--torch-threads", type=int, default=0, help="torch threads for TRL (default: torch's own)")
    parser.add_argument("--child", choices=("jaxlm", "trl"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.iterations < 1:
        parser.error("--iterations must be at least 1")
    steps = WARMUP + args.iterations + 1  # + 1: an update is timed up to the next rollout
    if args.child:
        return child(args.child, args.config, steps, args.work, args.torch_threads)
    missing = [m for m in ("trl", "torch", "peft", "datasets") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"error: {', '.join(missing)} not installed; pip install -e .[bench]")
    start = args.init_from.removeprefix("hf:")
    if not os.path.isdir(os.path.expanduser(start)):
        raise SystemExit(f"error: no model at {start}: train one with `jaxlm train tiny` (writes runs/tiny) "
                         f"or pass --init-from RUN")
    preset = [] if args.config and "=" not in args.config[0] else ["grpo_tiny"]
    words = [*preset, *args.config, f"model.init_from={args.init_from}"]
    with tempfile.TemporaryDirectory(prefix="grpo_trl_") as tmp:
        work = os.path.abspath(args.work or tmp)
        if os.path.isdir(work) and os.listdir(work):
            raise SystemExit(f"error: --work {work} is not empty (a jaxlm run there would resume, not start)")
        os.makedirs(work, exist_ok=True)
        jx = spawn("jaxlm", words, steps, work, args.torch_threads)
        tr = spawn("trl", words, steps, work, args.torch_threads)
        report(_read(os.path.join(work, "settings.json")), summarize(jx), summarize(tr),
               importlib.metadata.version("trl"), tr["torch_threads"])


if __name__ == "__main__":
    main()
