"""The one run assembly: a config and a mesh become the run every command trains, plans, benchmarks or
loads for inference.

    spec = build(config)                  model, optimizer with its trainable mask, init function
    abstract = abstract_state(spec, mesh) shapes and shardings; nothing allocated
    run = assemble(config, mesh, ...)     the state (restored, initialised, or loaded from a base) and
                                          the checkpointer
    compiled = compile_step(...)          the one step factory, bound to the run's objective
    result = run_loop(...)                the one loop, with the hooks every run registers

Pretraining, SFT, DPO and reward models, fully or through LoRA/QLoRA, differ only in the objective (`OBJECTIVES`), the
trainable subset, and where the starting weights come from.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import optax

from jaxlm.core import distributed, flops, sharded_init
from jaxlm.core.config import Config, ConfigError
from jaxlm.core.sharding import BATCH_AXES
from jaxlm.core.train_state import TrainState
from jaxlm.data.objective_rows import target_length
from jaxlm.model import architectures, attention, context_parallel, lora as lora_lib, pipeline
from jaxlm.model.pipeline import Pipeline
from jaxlm.training import base, hooks, objectives, optim
from jaxlm.training.checkpoint import Checkpointer
from jaxlm.training.losses import resolve_chunks
from jaxlm.training.loop import Loop, LoopResult
from jaxlm.training.metrics import MetricsWriter
from jaxlm.training.preemption import StepBoundary, StopRequest
from jaxlm.training.step import make_step
from jaxlm.training.watchdog import Watchdog

log = logging.getLogger("jaxlm.train")


@dataclasses.dataclass
class ModelSpec:
    """What every site that trains, plans, benchmarks or loads a model builds from a config."""

    config: Config
    model: nn.Module
    tx: optax.GradientTransformation
    init: Callable[[], TrainState]  # boxed params and optimizer state, for sharded_init
    apply_fn: Callable  # the model's apply, or LoRA's (adapters merged on the fly)
    trainable: str | None  # None: every param trains; "lora": only params["lora"]
    lora: lora_lib.Lora | None

    def checkpointed(self, state: TrainState) -> TrainState:
        """The part of the state a checkpoint holds: all of it, or for LoRA all but the frozen base."""
        return state if self.lora is None else without_base(state, self.lora)


def without_base(state: TrainState, lo) -> TrainState:
    """The state less its frozen base (which is loaded from the run's start): for LoRA the adapters, for a
    full model no params at all."""
    return state.replace(params=None if lo is None else {"lora": state.params["lora"]})


def build(config: Config, impl: str | None = None) -> ModelSpec:
    """The model and its optimizer; with `lora.targets`, adapters train and the base is frozen."""
    t = config.train
    pipe = Pipeline(t.pipeline_microbatches, t.pipeline_repeats)
    model = architectures.build(config.model, impl or _attention(config), pipe)
    c, steps, seed = config.lora, config.train.steps, config.train.seed
    if not c.targets:
        tx = optim.build_optimizer(config.optim, steps, sharded_init.abstract_params(model))
        return ModelSpec(config, model, tx, sharded_init.make_init_fn(model, tx, seed), model.apply, None, None)
    lo = lora_lib.Lora(model, c, sharded_init.boxed_params(model))
    tx = optim.build_optimizer(config.optim, steps, lo.abstract_params(seed), trainable=lo.trainable)
    return ModelSpec(config, model, tx, lo.make_init_fn(tx, seed), lo.apply, "lora", lo)


def _attention(config: Config) -> str:
    """The attention kernel: `model.attention` resolved for the platform. Prefix-LM rows need the XLA path
    (cuDNN's and splash's masks are causal), which `auto` then picks."""
    chosen = config.model.attention
    prefix = config.objective.kind == "prefix_lm" or config.objective.prefix_lm
    if prefix and chosen in ("cudnn", "splash"):
        raise ConfigError(f"model.attention={chosen} has no prefix-LM mask (objective.kind={config.objective.kind}); "
                          "use model.attention=auto or xla")
    return "xla" if prefix else attention.resolve(chosen)


def abstract_state(spec: ModelSpec, mesh) -> TrainState:
    return sharded_init.abstract_state(spec.init, mesh)


def initial_state(spec: ModelSpec, abstract: TrainState, mesh, base_params=None) -> TrainState:
    """A fresh state: random, or with `base_params` in place (never first built at random), quantized for
    QLoRA; LoRA adapters fresh (B = 0) or the ones `model.init_from` continues."""
    lo, c = spec.lora, spec.config.lora
    if base_params is None:
        state = sharded_init.materialize(spec.init, abstract)
    else:
        state = sharded_init.materialize(spec.init, abstract, keep=lambda s: without_base(s, lo))
        if lo is not None and c.quantize != "none":  # under jit: each code and scale is made on its shards
            from jaxlm.model.quantize import quantize_sharded

            base_params = quantize_sharded(base_params, c.quantize, c.block_size, sharded_init.boxed_params(spec.model), mesh)
        target = abstract.params if lo is None else abstract.params["base"]
        base_params = jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), base_params, target)
        state = state.replace(params=base_params if lo is None else {"base": base_params, **state.params})
    adapters = base.initial_adapters(spec.config, lo) if lo is not None else None
    if adapters is not None:  # continue from saved or PEFT adapters instead of fresh ones
        adapters = jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), adapters, abstract.params["lora"])
        state = state.replace(params={**state.params, "lora": adapters})
    return state


@dataclasses.dataclass
class Run:
    spec: ModelSpec
    mesh: Any
    abstract: TrainState
    state: TrainState
    data_state: dict | None  # the data position saved with the restored checkpoint
    ckpt: Checkpointer
    start: int  # the step the run continues from
    resumed: bool


def assemble(spec: ModelSpec, mesh, ckpt_dir: str, base_params=None,
             before_restore: Callable[[TrainState], None] | None = None) -> Run:
    """The run's state: the latest checkpoint in `ckpt_dir` if there is one (model, optimizer, step, RNG and
    data position together), else a fresh state. A full model resumes straight into its shards, never built
    first; a LoRA run rebuilds its frozen base from `base_params` and restores the adapters over it.
    `before_restore(starting state)` runs on the starting model first (DPO computes its reference there)."""
    config = spec.config
    abstract = abstract_state(spec, mesh)
    ckpt = Checkpointer(ckpt_dir, config.checkpoint)
    # The newest intact step: a damaged one is skipped with a warning (Checkpointer.restore_latest).
    latest = lambda target: ckpt.restore_latest(target) if config.checkpoint.resume else None
    try:
        if spec.lora is None and before_restore is None:
            restored = latest(abstract)
            state, data_state = restored[1:] if restored else (initial_state(spec, abstract, mesh, base_params), None)
        else:
            state, data_state = initial_state(spec, abstract, mesh, base_params), None
            if before_restore is not None:
                before_restore(state)
            restored = latest(spec.checkpointed(abstract))
            if restored is not None:
                _, saved, data_state = restored
                state = saved if spec.lora is None else saved.replace(
                    params={**state.params, "lora": saved.params["lora"]})
    except BaseException:
        ckpt.close()
        raise
    if restored is not None:
        log.info("resumed from %s at step %d", ckpt.directory, int(state.step))
    return Run(spec, mesh, abstract, state, data_state, ckpt, int(state.step), restored is not None)


def objective(config: Config, spec: ModelSpec, train: bool = True) -> objectives.Objective:
    """The objective of `config.task`; dropout (LoRA adapter dropout) only when training."""
    dropout = train and spec.lora is not None and config.lora.dropout > 0
    return OBJECTIVES[config.task](config, spec.apply_fn, dropout)


def _dpo(config: Config, apply_fn: Callable, dropout: bool) -> objectives.Objective:
    from jaxlm.training import dpo

    return dpo.objective(apply_fn, config.finetune.beta, dropout, config.train.loss_chunks)


def _rl(config: Config, apply_fn: Callable, dropout: bool) -> objectives.Objective:
    from jaxlm.training import rl

    return rl.objective(apply_fn, config, dropout)


def _reward(config: Config, apply_fn: Callable, dropout: bool) -> objectives.Objective:
    from jaxlm.training import reward

    return reward.objective(apply_fn, dropout)


def _next_token(config: Config, apply_fn: Callable, dropout: bool) -> objectives.Objective:
    return objectives.next_token(apply_fn, config.optim.z_loss, dropout, config.train.loss_chunks)


# task -> objective(config, apply_fn, dropout). A new training mode is a new entry here, not a new step.
OBJECTIVES: dict[str, Callable] = {"pretrain": _next_token, "sft": _next_token, "dpo": _dpo, "reward": _reward, "grpo": _rl, "ppo": _rl}


def step_function(spec: ModelSpec, objective_: objectives.Objective):
    """The un-jitted train step of this run (the planner compiles it for other devices)."""
    o, t = spec.config.optim, spec.config.train
    return make_step(objective_, spec.tx, spec.trainable, optim.schedule(o, t.steps), o.grad_accum)


def compile_step(spec: ModelSpec, objective_: objectives.Objective, state: TrainState, batch):
    """The train step, jitted with the state donated and compiled once for `batch`; logs its memory."""
    compiled = jax.jit(step_function(spec, objective_), donate_argnums=0).lower(state, batch).compile()
    try:
        m = compiled.memory_analysis()
        gib = 1 << 30
        log.info("compiled step: arguments %.2f GiB, outputs %.2f GiB, temporaries %.2f GiB per device",
                 m.argument_size_in_bytes / gib, m.output_size_in_bytes / gib, m.temp_size_in_bytes / gib)
    except (AttributeError, NotImplementedError):  # some backends do not report memory
        pass
    return compiled


def check_batch(config: Config, mesh) -> None:
    """Each micro-batch must split evenly over the batch axes of the mesh, into the pipeline's micro-batches
    and, with context parallelism, each row over the sequence axis. Logs the pipeline's bubble."""
    sizes = dict(mesh.shape)
    microbatches = check_parallelism(config, sizes)
    if microbatches:
        stages, repeats = sizes["stage"], config.train.pipeline_repeats
        log.info("pipeline: %d stages, %d micro-batches, %d layer chunks per stage: bubble %.1f%% of the step",
                 stages, microbatches, repeats, 100 * pipeline.bubble_fraction(stages, microbatches, repeats))


def check_parallelism(config: Config, sizes: dict[str, int]) -> int:
    """`check_batch` for mesh axis sizes (also the planner's check for a target). Returns the pipeline's
    micro-batch count, 0 without stages."""
    t = config.train
    micro = t.batch_size // config.optim.grad_accum
    ways = math.prod(sizes[a] for a in BATCH_AXES)
    if micro % ways:
        fewer = ("; with fewer rows than batch shards, split each row over devices instead with mesh.sequence "
                 "(context parallelism)") if micro < ways else ""
        raise ConfigError(f"train.batch_size/optim.grad_accum={micro} is not divisible by the "
                          f"{ways}-way batch sharding (mesh data*fsdp*expert); change one of them{fewer}")
    experts, ep, m = config.model.num_experts, sizes["expert"], config.mesh
    if experts and experts % ep:  # the config's own check cannot see a -1 axis resolved on these devices
        raise ConfigError(f"mesh.expert={m.expert} (x mesh.dcn_expert={m.dcn_expert}) makes a {ep}-way expert axis "
                          f"on this mesh, which does not divide model.num_experts={experts}; set mesh.expert to a "
                          f"divisor of it")
    stages, seq = sizes["stage"], sizes["sequence"]
    if seq > 1:
        context_parallel.check_length(t.seq_len, seq)
    resolve_chunks(t.loss_chunks, micro, t.seq_len, config.model.vocab_size, sizes)
    if stages > 1:
        if seq > 1:
            raise ConfigError(f"mesh.stage={stages} and mesh.sequence={seq} cannot be combined; use one of them")
        if not config.model.scan_layers:
            raise ConfigError(f"mesh.stage={stages} needs model.scan_layers=true (the stages split the stacked layers)")
        pipeline.check_layers(config.model.num_layers, stages, t.pipeline_repeats)
        return pipeline.microbatches_for(Pipeline(t.pipeline_microbatches, t.pipeline_repeats), stages, micro // ways)
    return 0


def run_loop(run: Run, run_dir: str, compiled, first_batch, batches, evaluate=None,
             writer: MetricsWriter | None = None, extra_hooks=()) -> tuple[TrainState, LoopResult]:
    """The one training loop with the hooks every run has: metrics and progress, evaluation, checkpoints
    with preemption handling, profiling and the hang watchdog."""
    config, t, d = run.spec.config, run.spec.config.train, run.spec.config.distributed
    writer = writer or MetricsWriter(run_dir)
    watchdog = Watchdog(d.watchdog_s, jax.process_index(), jax.process_count())
    loop = Loop(t.steps, run.mesh, t.on_nonfinite, watchdog)
    peak = (t.peak_flops or flops.peak_flops_per_device()) * jax.device_count()
    loop.add_hook(hooks.LogMetrics(writer, t.log_every, run.start, t.steps, flops.flops_per_token(config.model, t.seq_len, target_length(config)),
                                   peak, t.progress and jax.process_index() == 0))
    if evaluate:
        loop.add_hook(hooks.Evaluate(evaluate, writer, t.eval_every, t.steps))
    # Hosts agree at step boundaries; a host that never arrives is an error after this long.
    agreement = distributed.Agreement(timeout_s=max(2 * d.watchdog_s, 3600.0))
    stop = StopRequest()
    boundary = StepBoundary(stop, config.checkpoint.every_minutes, d.sync_every, agreement)
    loop.add_hook(hooks.Checkpoint(run.ckpt, config, boundary, stop, t.steps, run.spec.checkpointed))
    if t.profile_start:
        loop.add_hook(hooks.Profile(run_dir, t.profile_start, t.profile_steps))
    for hook in extra_hooks:  # the run's own (GRPO's rollouts follow the params), after the checkpoint
        loop.add_hook(hook)
    return loop.run(compiled, run.state, first_batch, batches, run.start)
