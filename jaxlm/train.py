"""`jaxlm train`: the pretraining entry point, top to bottom in the order the data flows.

config -> multi-host setup -> mesh -> data -> model + optimizer -> sharded state -> restore -> compiled
step -> loop with hooks (log, eval, checkpoint, profile) -> final checkpoint and plots.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Callable

import jax
import numpy as np

from jaxlm import attention, distributed, flops, mesh as mesh_lib, optim, sharded_init
from jaxlm.checkpoint import Checkpointer
from jaxlm.config import Config, ConfigError
from jaxlm.data import pipeline
from jaxlm.hf import importer as hf_importer, tokenizer as hf_tokenizer
from jaxlm.inference import TOKENIZER_FILE
from jaxlm.metrics import MetricsWriter
from jaxlm.model import Transformer, count_params
from jaxlm.overrides import to_dict
from jaxlm.preemption import StepBoundary, StopRequest
from jaxlm.sharding import batch_divisor, global_batch
from jaxlm.train_step import make_eval_step, make_train_step
from jaxlm.watchdog import Watchdog

log = logging.getLogger("jaxlm.train")


class NonFiniteError(RuntimeError):
    pass


def run_dir_of(config: Config) -> str:
    return os.path.abspath(os.path.expanduser(config.train.run_dir.format(name=config.name)))


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def train(config: Config) -> dict:
    """Trains per `config`. Returns a summary (run_dir, final step, last losses)."""
    if config.model.init_from:  # the Hugging Face checkpoint's config.json sets the model's shape
        config = hf_importer.resolve_init_from(config)
    run_dir = run_dir_of(config)
    # 1. Multi-host runtime first: every later step may talk to other processes.
    distributed.initialize(config.distributed)
    primary = jax.process_index() == 0
    if not primary:  # only process 0 logs progress; every host still reports warnings and errors
        logging.getLogger("jaxlm").setLevel(logging.WARNING)
    if primary:
        os.makedirs(run_dir, exist_ok=True)
        write_json_atomic(os.path.join(run_dir, "config.json"), to_dict(config))

    # 2. Mesh, and the batch layout it implies.
    mesh = mesh_lib.make_mesh(config.mesh)
    t = config.train
    if (t.batch_size // config.optim.grad_accum) % batch_divisor(mesh):
        raise ConfigError(
            f"train.batch_size/optim.grad_accum={t.batch_size // config.optim.grad_accum} is not divisible "
            f"by the {batch_divisor(mesh)}-way batch sharding (mesh data*fsdp*expert); change one of them"
        )

    # 3. Data: tokenizer, packed rows, and the checkpointable grain iterator. The tokenizer is copied into
    # the run directory, so that the run alone is enough to generate from or evaluate its checkpoints.
    data = pipeline.prepare(config)
    if primary:
        if config.model.init_from:  # chat template, token ids and config, for finetuning and export
            hf_importer.copy_run_files(hf_importer.hf_dir_of(config.model.init_from), run_dir)
        name = hf_tokenizer.TOKENIZER_JSON if data.tokenizer_path.endswith(".json") else TOKENIZER_FILE
        tmp = os.path.join(run_dir, f"{name}.tmp.{os.getpid()}")
        shutil.copyfile(data.tokenizer_path, tmp)
        os.replace(tmp, os.path.join(run_dir, name))

    # 4. Model and optimizer. The model speaks logical axis names; the rule table maps them to the mesh.
    impl = attention.resolve(config.model.attention)
    model = Transformer(config.model, impl)
    params_shape = sharded_init.abstract_params(model)
    tx = optim.build_optimizer(config.optim, t.steps, params_shape)
    lr_schedule = optim.schedule(config.optim, t.steps)

    with jax.set_mesh(mesh):
        # 5. Sharded state: shapes and shardings first (nothing allocated yet).
        init = sharded_init.make_init_fn(model, tx, t.seed)
        abstract = sharded_init.abstract_state(init, mesh)
        log.info("mesh %s | %s parameters | attention %s", mesh_lib.describe(mesh),
                 f"{count_params(params_shape):,}", impl)

        # 6. Restore the latest complete checkpoint (state and data position together), or initialise
        # with each device building only its own shard.
        ckpt = Checkpointer(config.checkpoint.dir or os.path.join(run_dir, "checkpoints"), config.checkpoint)
        restored = ckpt.restore_latest(abstract) if config.checkpoint.resume else None
        if restored is not None:  # (step, state, data position); damaged newer steps are skipped with a warning
            _, state, data_state = restored
            log.info("resumed from %s at step %d", ckpt.directory, int(state.step))
        elif config.model.init_from:
            hf_dir = hf_importer.hf_dir_of(config.model.init_from)
            state, data_state = hf_importer.state_from_hf(init, abstract, hf_dir, config.model, mesh), None
            log.info("initialised from the Hugging Face checkpoint %s", hf_dir)
        else:
            state, data_state = sharded_init.materialize(init, abstract), None
        start = int(state.step)
        if start >= t.steps:
            log.info("the run is already complete at step %d (train.steps=%d); raise train.steps to go on",
                     start, t.steps)
            ckpt.close()
            return {"run_dir": run_dir, "step": start, "checkpoints": ckpt.directory, "stopped_by": None}
        # Step s always reads batch s, so without a usable saved position (none yet, or written by a
        # different number of processes) the step itself is the position.
        batches = pipeline.BatchIterator(data.train, t.batch_size, t.seed, config.data.workers,
                                         start=start, saved=data_state)

        # 7. Compile once, with the state donated, and report its memory.
        step_fn = make_train_step(model.apply, tx, config.optim.z_loss, config.optim.grad_accum, lr_schedule)
        first = global_batch(next(batches), mesh)
        compiled = jax.jit(step_fn, donate_argnums=0).lower(state, first).compile()
        _log_memory(compiled)
        eval_set = (
            [global_batch(b, mesh) for b in pipeline.eval_batches(data.eval, t.batch_size, t.eval_batches)]
            if data.eval is not None and t.eval_batches else []
        )
        task_eval = _task_evaluator(config, model, data.tokenizer_path) if t.eval_tasks else None
        evaluate = _evaluator(jax.jit(make_eval_step(model.apply)), eval_set, task_eval)

        # 8. The loop. Metrics are fetched one step late, so the host never waits on the device.
        loop = Loop(config, run_dir, ckpt, mesh, evaluate)
        _, summary = loop.run(compiled, state, first, batches, start)
    return summary


def _evaluator(eval_fn: Callable, eval_set: list, task_eval: Callable | None) -> Callable | None:
    """params -> {"eval/...": value}: held-out loss over `eval_set`, then `train.eval_tasks`."""
    if not eval_set and task_eval is None:
        return None

    def evaluate(params) -> dict[str, float]:
        out = {}
        if eval_set:
            nll, tokens = 0.0, 0.0
            for batch in eval_set:
                m = jax.device_get(eval_fn(params, batch))
                nll += float(m["nll"])
                tokens += float(m["tokens"])
            loss = nll / max(tokens, 1.0)
            out.update({"eval/loss": loss, "eval/perplexity": float(np.exp(min(loss, 50.0)))})
        if task_eval:
            out.update({f"eval/{task}/{key}": float(value) for task, result in task_eval(params).items()
                        for key, value in result.items() if isinstance(value, (int, float)) and key != "seconds"})
        return out

    return evaluate


def _task_evaluator(config: Config, model, tokenizer_path: str) -> Callable[[dict], dict[str, dict]]:
    """params -> results of `train.eval_tasks`, run with the training mesh's params as they are."""
    from jaxlm.evaluation import runner
    from jaxlm.scoring import Scorer

    for task in config.train.eval_tasks:
        runner.check_task(task)
    tokenizer = hf_tokenizer.load(tokenizer_path)
    texts = runner.heldout_texts(config) if "perplexity" in config.train.eval_tasks else None
    limit = config.train.eval_limit or None
    scorer = Scorer(model, None)  # kept across evals: its jitted forward compiles once per shape
    return lambda params: runner.run_tasks(model, params, tokenizer, config, list(config.train.eval_tasks),
                                           texts=texts, limit=limit, progress=False, scorer=scorer)


def _log_memory(compiled) -> None:
    try:
        m = compiled.memory_analysis()
        gib = 1 << 30
        log.info("compiled step: arguments %.2f GiB, outputs %.2f GiB, temporaries %.2f GiB per device",
                 m.argument_size_in_bytes / gib, m.output_size_in_bytes / gib, m.temp_size_in_bytes / gib)
    except (AttributeError, NotImplementedError):  # some backends do not report memory
        pass


class Loop:
    """Runs the steps and fires the hooks; holds the only mutable bookkeeping of a run.

    Shared by pretraining and finetuning. A step returns metrics with at least "loss", "grad_norm", "tokens"
    and "finite" (others, such as DPO's "margin", are averaged and logged too). `evaluate(params)` returns
    {"eval/...": value}; `checkpointed(state)` is the part of the state a checkpoint holds (LoRA leaves out
    the frozen base, which the run rebuilds from its source).
    """

    def __init__(self, config: Config, run_dir: str, ckpt: Checkpointer, mesh, evaluate: Callable | None = None,
                 checkpointed: Callable = lambda state: state):
        self.config, self.run_dir, self.ckpt, self.mesh = config, run_dir, ckpt, mesh
        self.evaluate, self.checkpointed = evaluate, checkpointed
        self.writer = MetricsWriter(run_dir)
        self.stop = StopRequest()
        d = config.distributed
        # Hosts agree at step boundaries; a host that never arrives is an error after this long.
        agreement = distributed.Agreement(timeout_s=max(2 * d.watchdog_s, 3600.0))
        self.boundary = StepBoundary(self.stop, config.checkpoint.every_minutes, d.sync_every, agreement)
        self.watchdog = Watchdog(d.watchdog_s, jax.process_index(), jax.process_count())
        t = config.train
        peak = t.peak_flops or flops.peak_flops_per_device()
        self.peak_total = peak * jax.device_count()
        self.flops_per_token = flops.flops_per_token(config.model, t.seq_len)
        self.pending = None  # (step, device metrics) not yet read
        self.window = Window()
        self.last = {}
        self.skipped = 0
        self.read_step = 0

    def run(self, step_fn, state, first_batch, batches, start: int) -> tuple[object, dict]:
        """Steps from `start` to train.steps (or a stop); returns (final state, summary)."""
        t = self.config.train
        total = t.steps
        bar = _progress(start, total, enabled=t.progress and jax.process_index() == 0)
        self.stop.install()
        self.watchdog.start()
        self.watchdog.beat(start + 1)  # the watchdog names the oldest step not yet finished
        step, batch = start, first_batch
        profiling = False
        try:
            while step < total:
                if t.profile_start and step == t.profile_start:
                    jax.profiler.start_trace(os.path.join(self.run_dir, "profile"))
                    profiling = True
                state, metrics = step_fn(state, batch)
                self._read_pending()  # the previous step's metrics; this step is already queued
                step += 1
                self.pending = (step, metrics)
                if profiling and step >= t.profile_start + t.profile_steps:
                    jax.block_until_ready(state)
                    jax.profiler.stop_trace()
                    profiling = False
                if step % t.log_every == 0:
                    self._log(bar, step)
                if self.evaluate and (step % t.eval_every == 0 or step == total):
                    self._evaluate(state, step)
                self.watchdog.beat(step, "cross-host agreement after step")
                decision = self.boundary.check(step)  # the same answer on every host
                self.watchdog.beat(step if self.pending else step + 1)
                if step == t.stop_at and not self.stop.requested:
                    self.stop.signal = f"train.stop_at={t.stop_at}"
                stopping = decision.stop is not None or step == t.stop_at
                permanent = step % self.config.checkpoint.every == 0 or step == total or stopping
                if permanent or decision.temporary_checkpoint:
                    self._read_pending()  # never checkpoint past a step we have not checked
                    self.watchdog.beat(step, "checkpoint save")
                    self.ckpt.save(step, self.checkpointed(state), batches.get_state(), to_dict(self.config),
                                   force=True, temporary=not permanent)
                    self.boundary.saved()
                    self.watchdog.beat(step + 1)
                    if not permanent:
                        log.info("step %d: time-based temporary checkpoint saved", step)
                if stopping:
                    log.info("stopped by %s after step %d; checkpoint saved", self.stop.signal, step)
                    break
                if step < total:
                    batch = global_batch(next(batches), self.mesh)
            self._read_pending()
            self._log(bar, step)
        finally:
            self.watchdog.stop()
            self.stop.uninstall()
            if profiling:
                jax.profiler.stop_trace()
            bar.close()
            self.ckpt.close()
            self.writer.close()
        return state, {"run_dir": self.run_dir, "step": step, "skipped": self.skipped, **self.last,
                       "checkpoints": self.ckpt.directory, "stopped_by": self.stop.signal}

    def _read_pending(self) -> None:
        if self.pending is None:
            return
        step, metrics = self.pending
        self.pending = None
        self.read_step = step
        m = jax.device_get(metrics)
        self.watchdog.beat(step + 1)
        if not bool(m["finite"]):
            if self.config.train.on_nonfinite == "stop":
                raise NonFiniteError(
                    f"non-finite loss or gradient at step {step} (loss={float(m['loss'])}, "
                    f"grad_norm={float(m['grad_norm'])}); the update was not applied and not checkpointed. "
                    f"Lower optim.lr, or set train.on_nonfinite=skip"
                )
            self.skipped += 1
            log.warning("step %d: non-finite loss or gradient, update skipped", step)
            return
        self.window.add(m)
        self.last.update({k: float(v) for k, v in m.items() if k not in ("finite", "tokens")})

    def _log(self, bar, dispatched: int) -> None:
        """Logs the steps read so far (up to one behind `dispatched`, so that logging never waits)."""
        w, step = self.window, self.read_step
        bar.update(dispatched - bar.n)
        if not w.n:
            return
        elapsed = time.perf_counter() - w.t0
        tokens_per_s = w.tokens / elapsed
        mfu = tokens_per_s * self.flops_per_token / self.peak_total
        means = w.means()
        # grad_norm and lr as at the last step read; everything else averaged over the window.
        scalars = {f"train/{k}": v for k, v in means.items()} | {
            "train/grad_norm": self.last["grad_norm"], "train/lr": self.last.get("lr", 0.0),
            "perf/tokens_per_s": tokens_per_s, "perf/mfu": mfu, "train/skipped_steps": self.skipped}
        self.writer.write(step, scalars)
        extra = f" | margin {means['margin']:.3f} | acc {means['reward_accuracy']:.2f}" if "margin" in means else ""
        bar.set_postfix_str(f"loss {means['loss']:.3f}{extra} | {tokens_per_s:,.0f} tok/s | MFU {mfu:.1%}")
        self.window = Window()

    def _evaluate(self, state, step: int) -> None:
        self._read_pending()  # finish the training step first, so its time counts as training
        self.watchdog.beat(step, "eval after step")
        began = time.perf_counter()
        scalars = self.evaluate(state.params)
        self.writer.write(step, scalars)
        self.last.update(scalars)
        if "eval/loss" in scalars:
            self.last["eval_loss"] = scalars["eval/loss"]
        log.info("step %d: %s", step, ", ".join(f"{k[5:]} {v:.4g}" for k, v in scalars.items()))
        # Evaluation time is not training time: move the throughput window's start past it.
        self.window.t0 += time.perf_counter() - began


def _progress(start: int, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True, smoothing=0)


class Window:
    """Sums of the step metrics read since the last log line."""

    def __init__(self):
        self.n, self.tokens, self.sums, self.t0 = 0, 0.0, {}, time.perf_counter()

    def add(self, metrics: dict) -> None:
        self.n += 1
        self.tokens += float(metrics["tokens"])
        for k, v in metrics.items():
            if k not in ("finite", "tokens", "grad_norm", "lr"):
                self.sums[k] = self.sums.get(k, 0.0) + float(v)

    def means(self) -> dict[str, float]:
        return {k: v / self.n for k, v in self.sums.items()}
