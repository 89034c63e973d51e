"""What the training commands print from the typed summaries that training.pretrain.train (RunSummary)
and training.finetune.finetune (FinetuneSummary) return: both start with the same lines."""

from __future__ import annotations


def print_run(s) -> None:
    """The lines every training command starts its report with."""
    if s.stopped_by:
        print(f"stopped by {s.stopped_by} at step {s.step}; run the same command to resume")
    if s.changes:
        print("  changed since the last segment: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in s.changes.items()))
    print(f"run directory: {s.run_dir}")


def print_pretrain(s) -> None:
    print_run(s)
    print(f"  checkpoints: {s.checkpoints} (step {s.step})")
    print(f"  metrics: {s.run_dir}/metrics.jsonl, TensorBoard: {s.run_dir}/tensorboard")
    print(f"  config: {s.run_dir}/config.json, loss curve: {s.run_dir}/loss.png")
    if "loss" in s.metrics:
        line = f"  final train loss {s.metrics['loss']:.4f}"
        if "eval/loss" in s.metrics:
            line += f", eval loss {s.metrics['eval/loss']:.4f}"
        print(line)


def print_finetune(s) -> None:
    print_run(s)
    print(f"  data: {s.data}")
    m = s.metrics
    if "loss" in m:
        line = f"  final train loss {m['loss']:.4f}"
        accuracy = "reward_accuracy" if "reward_accuracy" in m else "accuracy"  # DPO's implied reward, or a reward model's
        if "margin" in m:
            line += f", margin {m['margin']:.4f}, {accuracy.replace('_', ' ')} {m[accuracy]:.2f}"
        if "eval/loss" in m:
            before = f"{s.eval_before['loss']:.4f} -> " if "loss" in s.eval_before else ""
            line += f"; eval loss {before}{m['eval/loss']:.4f}"
        if f"eval/{accuracy}" in m and accuracy == "accuracy":
            before = f"{s.eval_before['accuracy']:.2f} -> " if "accuracy" in s.eval_before else ""
            line += f", held-out pair accuracy {before}{m['eval/accuracy']:.2f}"
        print(line)
    print(f"  base params: {s.base_mib:.1f} MiB")
    if s.adapters:
        print(f"  LoRA adapters: {s.adapters}  (jaxlm peft export RUN OUT writes them for peft)")
    if s.merged:
        use = "" if s.scores else f"jaxlm generate {s.run_dir}; "
        print(f"  merged model: {s.merged}  ({use}jaxlm convert to-hf {s.run_dir} DIR)")

