"""Writes metrics to TensorBoard and a JSONL log, and draws the loss curve at the end of a run.

Only process 0 writes; on other processes every method is a no-op.
"""

from __future__ import annotations

import json
import os

import jax


class MetricsWriter:
    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in metrics.items():
            self.tb.add_scalar(name, value, step)
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")

    def close(self) -> None:
        if not self.enabled:
            return
        self.tb.close()
        self.jsonl.close()
        plot_loss_curve(os.path.join(self.run_dir, "metrics.jsonl"), os.path.join(self.run_dir, "loss.png"))


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss_curve(metrics_path: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(metrics_path) if os.path.isfile(metrics_path) else []
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("train/loss", "train"), ("eval/loss", "eval")):
        points = sorted({r["step"]: r[key] for r in rows if key in r}.items())
        if points:
            ax.plot(*zip(*points), label=label, marker="o" if key.startswith("eval") else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
