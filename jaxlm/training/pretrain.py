"""`jaxlm train`: pretraining, top to bottom in the order the data flows.

config -> starting weights' shape -> run directory check -> multi-host setup -> mesh -> data -> the one
run assembly (model, optimizer, state restored / initialised / loaded) -> the run directory is written ->
compiled step -> the one loop with its hooks -> summary.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable

import jax

from jaxlm.core import distributed, mesh as mesh_lib, rundir
from jaxlm.core.config import Config, ConfigError
from jaxlm.core.overrides import to_dict
from jaxlm.core.sharded_init import abstract_params
from jaxlm.core.sharding import global_batch
from jaxlm.data import pipeline, tokenizer as tokenizer_lib
from jaxlm.model.transformer import count_params
from jaxlm.training import assembly, base
from jaxlm.training.checkpoint import latest_step
from jaxlm.training.evaluate import Evaluator

log = logging.getLogger("jaxlm.train")


@dataclasses.dataclass
class RunSummary:
    """What a training command reports when it ends."""

    run_dir: str
    step: int
    checkpoints: str
    stopped_by: str | None = None  # a signal or train.stop_at: the same command resumes
    skipped: int = 0
    metrics: dict = dataclasses.field(default_factory=dict)  # latest "loss", "grad_norm", "eval/..." values
    changes: dict = dataclasses.field(default_factory=dict)  # settings changed since the run's last segment


def run_dir_of(config: Config) -> str:
    return os.path.abspath(os.path.expanduser(config.train.run_dir.format(name=config.name)))


def open_run(config: Config, ckpt_dir: str) -> tuple[rundir.RunDir, dict, int | None]:
    """The run directory, checked against `config` before anything is written to it: a run that has a
    checkpoint accepts only the changes resuming allows. Returns (run dir, allowed changes, the newest step
    to resume from or None)."""
    rd = rundir.RunDir(run_dir_of(config))
    latest = latest_step(ckpt_dir) if config.checkpoint.resume else None
    return rd, rd.check_resume(to_dict(config), latest is not None), latest


def start(config: Config):
    """Multi-host runtime and mesh: every later step may talk to other processes."""
    distributed.initialize(config.distributed)
    if jax.process_index() != 0:  # only process 0 logs progress; every host still reports warnings and errors
        logging.getLogger("jaxlm").setLevel(logging.WARNING)
    mesh = mesh_lib.make_mesh(config.mesh)
    assembly.check_batch(config, mesh)
    return mesh


# (config, model, tokenizer path) -> (params -> results of `train.eval_tasks`). The evaluation harness sits
# above training, so the command that runs training hands it in (`evaluation.runner.in_training`).
TaskEvaluator = Callable[[Config, Any, str], Callable[[Any], dict]]


def train(config: Config, tasks: TaskEvaluator | None = None) -> RunSummary:
    """Pretrains per `config`, resuming from the run's latest checkpoint."""
    if config.train.eval_tasks and tasks is None:
        raise ConfigError("train.eval_tasks needs the evaluation harness: run `jaxlm train`, or pass "
                          "tasks=jaxlm.evaluation.runner.in_training")
    config = base.resolve(config)
    ckpt_dir = rundir.checkpoint_dir(run_dir_of(config), config.checkpoint.dir)
    rd, changes, latest = open_run(config, ckpt_dir)
    mesh = start(config)
    data = pipeline.prepare(config)  # fails on bad data before the run directory is touched
    spec = assembly.build(config)
    t = config.train
    with jax.set_mesh(mesh):
        log.info("mesh %s | %s parameters | attention %s", mesh_lib.describe(mesh),
                 f"{count_params(abstract_params(spec.model)):,}", spec.model.impl)
        # A run that resumes does not need its base weights.
        params = None if latest is not None else base.load_params(config, spec.model, mesh, t.progress)
        run = assembly.assemble(spec, mesh, ckpt_dir, params)
        if run.start >= t.steps:
            run.ckpt.close()
            log.info("the run is already complete at step %d (train.steps=%d); raise train.steps to go on",
                     run.start, t.steps)
            return RunSummary(rd.directory, run.start, run.ckpt.directory)
        if jax.process_index() == 0:
            _write_run_files(rd, config, run.start, data.tokenizer_path)
        # Step s always reads batch s, so without a usable saved position (none yet, or written by a
        # different number of processes) the step itself is the position.
        batches = pipeline.BatchIterator(data.train, t.batch_size, t.seed, config.data.workers,
                                         start=run.start, saved=run.data_state, transform=data.transform)
        objective = assembly.objective(config, spec)
        first = global_batch(next(batches), mesh)
        compiled = assembly.compile_step(spec, objective, run.state, first)
        evaluate = _evaluator(config, spec, data, mesh, tasks)
        _, result = assembly.run_loop(run, rd.directory, compiled, first, batches, evaluate)
    return RunSummary(rd.directory, result.step, run.ckpt.directory, result.stopped_by, result.skipped,
                      result.last, changes)


def _write_run_files(rd: rundir.RunDir, config: Config, start: int, tokenizer_path: str) -> None:
    """The config of this segment, the tokenizer (so that the run alone is enough to generate from or
    evaluate), and the base's files."""
    rd.begin_segment(to_dict(config), start)
    tokenizer_lib.copy_into(tokenizer_path, rd.directory)
    base.copy_files(config, rd.directory)


def _evaluator(config: Config, spec, data, mesh, tasks: TaskEvaluator | None) -> Evaluator | None:
    """Held-out loss over `train.eval_batches` fixed batches, then `train.eval_tasks`."""
    t = config.train
    held_out = (pipeline.eval_batches(data.eval, t.batch_size, t.eval_batches, data.transform)
                if data.eval is not None and t.eval_batches else [])
    batches = [global_batch(b, mesh) for b in held_out]
    run_tasks = tasks(config, spec.model, data.tokenizer_path) if t.eval_tasks else None
    evaluator = Evaluator(assembly.objective(config, spec, train=False), batches, run_tasks)
    return evaluator if evaluator else None
