"""`jaxlm plan`: will this config fit on that hardware, and how fast will it go, before renting it.

For a target such as `v5p-256`, `v5e:8x8` or `h100x8` it reports the mesh and how it lies on the
topology, the memory per device (parameters, optimizer state, batch, saved activations, the largest
temporaries), whether it fits, the FLOPs per step and the step time at a stated MFU (with a pipeline's
bubble, and a mixture of experts' all-to-all time at the target's link bandwidth), and, when it does not fit,
the first of a list of changes that does: remat, loss tiling, an all-FSDP mesh, expert parallelism, context
parallelism, pipeline stages, and last gradient accumulation.

Every number says which method produced it: `analytic` (jaxlm/planning/memory.py, instant, no compiler),
`XLA AOT <platform>` (the real train step compiled for the target's devices through
`jax.experimental.topologies`: TPU needs `pip install "jaxlm[tpu-plan]"` for libtpu), or `config`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re

import numpy as np

from jaxlm.core import flops, mesh as mesh_lib
from jaxlm.core.config import Config, ConfigError
from jaxlm.model import pipeline
from jaxlm.planning import memory as plan_memory
from jaxlm.training import assembly
from jaxlm.training.losses import resolve_chunks

GIB = 1 << 30

# Per chip: HBM bytes, dense bf16 peak FLOP/s, whether the name counts TensorCores (2 per chip), and
# how many dimensions the ICI torus has.
TPUS = {
    "v4": (32 * GIB, flops.PEAK_FLOPS["TPU v4"], True, 3),
    "v5p": (95 * GIB, flops.PEAK_FLOPS["TPU v5p"], True, 3),
    "v5e": (16 * GIB, flops.PEAK_FLOPS["TPU v5e"], False, 2),
    "v6e": (32 * GIB, flops.PEAK_FLOPS["TPU v6e"], False, 2),
}
GPUS = {
    "h100": (80 * 10**9, flops.PEAK_FLOPS["NVIDIA H100"]),
    "h200": (141 * 10**9, flops.PEAK_FLOPS["NVIDIA H200"]),
    "a100": (80 * 10**9, flops.PEAK_FLOPS["NVIDIA A100"]),
    "b200": (180 * 10**9, flops.PEAK_FLOPS["NVIDIA B200"]),
}
# Interconnect bandwidth per device, one direction, bytes/s: (within a slice or node, across them). TPU ICI is
# the datasheet's bidirectional figure per chip halved (v4: 6 links of 50 GB/s); DCN is the datasheet's per
# chip (v5e: a host's 2 x 100 Gb/s NICs over its 8 chips; v4 and v6e not published: estimates). GPUs: NVLink
# within a node of 8, and one InfiniBand NIC per GPU between nodes (400 Gb/s; A100 systems 200 Gb/s).
LINKS = {
    "v4": (300e9, 3.125e9), "v5p": (600e9, 6.25e9), "v5e": (200e9, 3.125e9), "v6e": (400e9, 12.5e9),
    "h100": (450e9, 50e9), "h200": (450e9, 50e9), "a100": (300e9, 25e9), "b200": (900e9, 50e9),
}
GPUS_PER_NODE = 8
# Standard slice shapes by chip count (v4/v5p 3-D tori, v5e/v6e 2-D).
SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
             512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16", 8192: "16x16x32"}
SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
TARGET_HELP = ("v4-32, v5p-256, v5e-64, v6e-256 (names as in gcloud), v5e:8x8, v5p:4x4x8 (topologies), "
               "h100x8, h200x16, a100x8, b200x8 (GPUs)")
REMAT_ORDER = ("none", "dots", "save_attention_out", "dots_no_batch", "full")  # most memory first


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str  # tpu or gpu
    generation: str
    chips: int  # devices over all slices
    slices: int
    hbm: int  # bytes per device
    peak_flops: float  # per device
    topology: str = ""  # per slice, e.g. "v5e:8x8"; empty for GPUs
    ici_bw: float = 0.0  # bytes/s per device, one direction, within a slice (GPUs: within a node)
    dcn_bw: float = 0.0  # across slices (GPUs: across nodes)

    @property
    def per_slice(self) -> int:
        return self.chips // self.slices


def parse_target(name: str, slices: int = 1) -> Target:
    """`v5p-256` / `v5e:8x8` / `h100x8`; `slices` > 1 is multislice over DCN (TPU only)."""
    text = name.strip().lower().replace("v5litepod", "v5e")
    if slices < 1:
        raise ConfigError(f"--slices={slices} is out of range: must be >= 1")
    gpu = re.fullmatch(r"([a-z]\d+)x(\d+)", text)
    if gpu and gpu.group(1) in GPUS:
        hbm, peak = GPUS[gpu.group(1)]
        n = int(gpu.group(2))
        if n < 1:
            raise ConfigError(f"target {name!r}: {n} GPUs is out of range: must be >= 1, e.g. {gpu.group(1)}x8")
        if slices > 1:
            raise ConfigError("--slices is for TPU multislice; for GPUs give the total, e.g. h100x64")
        return Target(name, "gpu", gpu.group(1), n, 1, hbm, peak, "", *LINKS[gpu.group(1)])
    topo = re.fullmatch(r"(v\d[a-z]?):(\d+(?:x\d+)+)", text)
    named = re.fullmatch(r"(v\d[a-z]?)-(\d+)", text)
    gen = (topo or named).group(1) if (topo or named) else None
    if gen not in TPUS:
        raise ConfigError(f"unknown target {name!r}; expected one of {TARGET_HELP}")
    hbm, peak, counts_cores, dims = TPUS[gen]
    if topo:
        shape = topo.group(2)
        if len(shape.split("x")) != dims:
            raise ConfigError(f"target {name!r}: {gen} topologies have {dims} dimensions, e.g. "
                              f"{gen}:{(SHAPES_3D if dims == 3 else SHAPES_2D)[16]}")
        if min(int(s) for s in shape.split("x")) < 1:
            raise ConfigError(f"target {name!r}: topology dimension 0 is out of range: must be >= 1, e.g. "
                              f"{gen}:{(SHAPES_3D if dims == 3 else SHAPES_2D)[16]}")
        chips = math.prod(int(s) for s in shape.split("x"))
    else:
        n = int(named.group(2))
        if n < 1:
            raise ConfigError(f"target {name!r}: {n} {'TensorCores' if counts_cores else 'chips'} is out of range: "
                              f"must be >= 1, e.g. {gen}-{16 if counts_cores else 8}")
        chips = n // 2 if counts_cores else n
        shapes = SHAPES_3D if dims == 3 else SHAPES_2D
        if chips not in shapes or (counts_cores and n % 2):
            sizes = ", ".join(f"{gen}-{c * 2 if counts_cores else c}" for c in shapes)
            raise ConfigError(f"target {name!r} is not a standard {gen} slice; one of {sizes}")
        shape = shapes[chips]
    return Target(name, "tpu", gen, chips * slices, slices, hbm, peak, f"{gen}:{shape}", *LINKS[gen])


def target_devices(target: Target):
    """Compile-only devices of the target, or None (with the reason) when its compiler is missing."""
    if target.platform == "tpu":
        if importlib.util.find_spec("libtpu") is None:
            return None, 'libtpu is not installed (pip install "jaxlm[tpu-plan]")'
        from jax.experimental import topologies

        kwargs = {"chip_config_name": "megacore"} if target.generation in ("v4", "v5p") else {}
        dims = [int(n) for n in target.topology.split(":")[1].split("x")]
        if len(dims) == 2 and min(dims) < 2:  # smaller than the default 2x2 chips per host
            kwargs["chips_per_host_bounds"] = (min(dims[0], 2), min(dims[1], 2), 1)
        try:
            topo = topologies.get_topology_desc(topology_name=target.topology, platform="tpu",
                                                num_slices=target.slices, **kwargs)
        except Exception as e:  # noqa: BLE001 - JaxRuntimeError from the plugin
            return None, f"libtpu could not describe {target.topology}: {str(e).splitlines()[0][:150]}"
        return list(topo.devices), ""
    return None, "GPU targets are planned analytically (the CUDA compile-only plugin is not a jaxlm extra)"


@dataclasses.dataclass(frozen=True)
class AllToAll:
    """A step's expert all-to-alls, per device, under uniform routing: each sends its tokens x k assignments
    (rows of d_model values in the compute dtype) to the experts' devices, (ep - 1) / ep of them off-device."""

    count: int  # all-to-alls per step (0: no expert parallelism)
    ici_bytes: float  # sent to devices of the same slice (GPUs: node)
    dcn_bytes: float  # sent to other slices (nodes)
    seconds: float  # at the target's link bandwidths, not overlapped with compute (the experts wait for it)

    @property
    def bytes(self) -> float:
        return self.ici_bytes + self.dcn_bytes


def all_to_all(config: Config, target: Target, shape: dict) -> AllToAll:
    """Per MoE layer and micro-batch: 2 all-to-alls forward (to the experts and back) and 2 backward (their
    transposes), and 2 more when remat recomputes the layer's forward for the backward pass."""
    c, sizes = config.model, _sizes(shape)
    ep, layers = sizes["expert"], flops.moe_layer_count(config.model)
    if ep == 1 or not layers:
        return AllToAll(0, 0.0, 0.0, 0.0)
    count = layers * config.optim.grad_accum * (4 if c.remat == "none" else 6)
    each = plan_memory.micro_tokens(config, sizes) * c.experts_per_token * c.d_model * np.dtype(c.dtype).itemsize
    near = _expert_neighbours(target, shape)
    ici, dcn = count * each * (near - 1) / ep, count * each * (ep - near) / ep
    return AllToAll(count, ici, dcn, ici / target.ici_bw + dcn / target.dcn_bw)


def _expert_neighbours(target: Target, shape: dict) -> int:
    """How many of an expert group's devices share the fast links (the sender included): its ICI part on
    TPUs; on GPUs those in one node, where the group's devices lie `tensor` apart (the innermost mesh axis)."""
    if target.platform == "tpu":
        return shape["ici"]["expert"]
    stride = _sizes(shape)["tensor"]
    return max(1, min(_sizes(shape)["expert"], GPUS_PER_NODE // stride))


@dataclasses.dataclass
class Plan:
    target: Target
    mesh: dict  # {"ici": sizes, "dcn": sizes}
    placement: str
    memory: plan_memory.Memory
    compiled: plan_memory.Compiled | None
    compile_note: str
    step_flops: float
    mfu: float
    suggestion: str = ""
    loss_chunks: int = 1  # the loss's sequence pieces (1: whole logits)
    microbatches: int = 0  # pipeline micro-batches (0: no stages)
    bubble: float = 0.0  # the fraction of the step the pipeline stages idle
    all_to_all: AllToAll = AllToAll(0, 0.0, 0.0, 0.0)  # the experts' token exchange (MoE with mesh.expert > 1)

    @property
    def per_device(self) -> int:
        return self.compiled.total if self.compiled and not self.compiled.oom else self.memory.total

    @property
    def fits(self) -> bool:
        if self.compiled is not None:
            return self.compiled.oom is None and self.compiled.total <= self.target.hbm
        return self.memory.total <= self.target.hbm

    @property
    def step_time(self) -> float:
        """At the stated MFU while computing; a pipeline's bubble adds its idle ticks, and the experts'
        all-to-alls their transfer time."""
        compute = self.step_flops / (self.target.chips * self.target.peak_flops * self.mfu) / (1 - self.bubble)
        return compute + self.all_to_all.seconds


def _sizes(shape: dict) -> dict[str, int]:
    return {a: shape["ici"][a] * shape["dcn"][a] for a in mesh_lib.AXES}


def placement(config_mesh, mesh, target: Target, devices) -> str:
    """Which physical torus dimensions (or DCN) each mesh axis spans."""
    text = " x ".join(f"{a}={n}" for a, n in _sizes(mesh).items() if n > 1) or "single device"
    if devices is None or target.platform != "tpu":
        where = f"{target.topology or target.name}" + (f" x {target.slices} slices (DCN)" if target.slices > 1 else "")
        return f"{text} on {where}"
    grid = np.asarray(mesh_lib.make_mesh(config_mesh, devices).devices)
    coords = np.array([[*d.coords, getattr(d, "slice_index", 0)] for d in grid.flat]).reshape(*grid.shape, -1)
    names = ["x", "y", "z"][: len(devices[0].coords)] + ["DCN"]
    parts = []
    for i, axis in enumerate(mesh_lib.AXES):
        if grid.shape[i] == 1:
            continue
        moved = np.moveaxis(coords, i, 0)
        spans = [names[k] for k in range(coords.shape[-1]) if (moved[1:, ..., k] != moved[:1, ..., k]).any()]
        parts.append(f"{axis}={grid.shape[i]} over {'+'.join(spans) or '-'}")
    torus = target.topology + (f" x {target.slices} slices" if target.slices > 1 else "")
    return f"{', '.join(parts) or 'single device'} (torus {torus}, dims x/y/z)"


def make_plan(config: Config, target: Target, mfu: float = 0.4, method: str = "auto") -> Plan:
    """`method`: analytic, compile (fails without the target's compiler) or auto (compile if possible)."""
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu={mfu} must be in (0, 1]")
    shape = mesh_lib.mesh_shape(config.mesh, target.chips, target.slices)
    microbatches = _check_batch(config, shape)
    sizes, t = _sizes(shape), config.train
    bubble = pipeline.bubble_fraction(sizes["stage"], microbatches, t.pipeline_repeats) if microbatches else 0.0
    chunks = resolve_chunks(t.loss_chunks, t.batch_size // config.optim.grad_accum, t.seq_len,
                            config.model.vocab_size, sizes)
    memory = plan_memory.analytic(config, _sizes(shape), impl=_impl(config, target))
    devices, note = (None, "analytic only (--method analytic)") if method == "analytic" else target_devices(target)
    if devices is None and method == "compile":
        raise ConfigError(f"--method compile for {target.name}: {note}")
    compiled = plan_memory.compiled(config, devices) if devices is not None else None
    lengths = plan_memory.batch_lengths(config)
    step_flops = (flops.flops_per_token(config.model, config.train.seq_len, lengths["targets"]) * config.train.batch_size
                  * (lengths["inputs"] + (lengths["targets"] if config.model.encoder_decoder else 0)))
    plan = Plan(target, shape, placement(config.mesh, shape, target, devices), memory, compiled, note, step_flops, mfu,
                loss_chunks=chunks, microbatches=microbatches, bubble=bubble,
                all_to_all=all_to_all(config, target, shape))
    if not plan.fits:
        plan.suggestion = suggest(config, target)
    return plan


def _check_batch(config: Config, shape: dict) -> int:
    """The same rules `jaxlm train` enforces (batch, pipeline and sequence splits); returns the pipeline's
    micro-batch count (0 without stages)."""
    return assembly.check_parallelism(config, _sizes(shape))


def _impl(config: Config, target: Target) -> str:
    if config.model.attention != "auto":
        return config.model.attention
    return {"tpu": "splash", "gpu": "cudnn"}[target.platform]


def _with(config: Config, changes: dict) -> Config:
    """`config` with overrides {"section.field": value}."""
    for key, value in changes.items():
        section, field = key.split(".")
        config = dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **{field: value})})
    return config


def _levers(config: Config, target: Target) -> list[dict]:
    """Changes to try, cheapest first, each with the ones before it that still apply: loss tiling, an
    all-FSDP mesh, expert parallelism (MoE), context parallelism (long rows), pipeline stages (across
    slices, else within one; not for MoE), and last gradient accumulation, which shrinks the batch each
    step sees."""
    t, m, experts = config.train, config.mesh, config.model.num_experts
    base: dict = {"train.loss_chunks": 0} if t.loss_chunks == 1 else {}
    levers = [{}, base] if base else [{}]
    if (m.stage, m.data, m.fsdp, m.tensor, m.sequence, m.expert) != (1, 1, -1, 1, 1, 1):
        base = {**base, **{f"mesh.{a}": 1 for a in mesh_lib.AXES}, "mesh.fsdp": -1}
        levers.append(base)
    # Each device keeps E/ep experts: FSDP no longer gathers every expert of a layer, and the recomputed
    # layer holds fewer weights; the price is the all-to-all the plan reports. ep must divide E.
    levers += [{**base, "mesh.expert": n} for n in (2, 4, 8, 16, 32, 64)
               if experts and experts % n == 0 and target.per_slice % n == 0]
    if t.seq_len >= 8192:
        levers += [{**base, "mesh.sequence": n} for n in (2, 4, 8) if t.seq_len % (2 * n) == 0]
    stages = [] if experts else [target.slices] if target.slices > 1 else [2, 4, 8]  # MoE: no stages yet
    for n in stages:
        if n > 1 and config.model.num_layers % n == 0:
            key = "mesh.dcn_stage" if target.slices > 1 else "mesh.stage"
            others = {f"mesh.dcn_{a}": 1 for a in mesh_lib.AXES if a != "stage"} if target.slices > 1 else {}
            levers.append({**base, **others, key: n})
    b = t.batch_size
    levers += [{**base, "optim.grad_accum": a} for a in (2, 4, 8, 16, 32, 64)
               if a > config.optim.grad_accum and b % a == 0]
    return levers


def suggest(config: Config, target: Target) -> str:
    """The first change (by the analytic model) that fits: each of `_levers`, with the least remat that fits."""
    def fits(c: Config) -> bool:
        try:
            shape = mesh_lib.mesh_shape(c.mesh, target.chips, target.slices)
            _check_batch(c, shape)
        except ConfigError:
            return False
        return plan_memory.analytic(c, _sizes(shape), _impl(c, target)).total <= target.hbm * 0.95

    remats = REMAT_ORDER[REMAT_ORDER.index(config.model.remat):]
    for lever in _levers(config, target):
        for remat in remats:
            changes = {**lever, "model.remat": remat}
            if fits(_with(config, changes)):
                changed = {k: v for k, v in changes.items() if _with(config, {k: v}) != config}
                return " ".join(f"{k}={v}" for k, v in changed.items()) or "(fits as is)"
    return ("nothing tried fits (remat, loss tiling, all-FSDP, expert parallelism, context parallelism, pipeline "
            "stages, gradient accumulation up to 64); use more chips, a larger-HBM target, or "
            "model.param_dtype=bfloat16")


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / (1 << 20):.1f} MiB"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _moe_rows(config: Config, plan: Plan) -> dict:
    """The mixture of experts' rows: the experts' share of the memory and the step's all-to-all traffic."""
    c, m, a, t = config.model, plan.memory, plan.all_to_all, plan.target
    ep = _sizes(plan.mesh)["expert"]
    experts = (f"{_gib(m.expert_params)} (+ {_gib(m.expert_optimizer)} optimizer), "
               f"{c.num_experts // ep} of {c.num_experts} experts per device")
    if not a.count:
        traffic = "none: mesh.expert=1, every device holds every expert (gathered over FSDP)"
    else:
        per = 4 if c.remat == "none" else 6
        traffic = (f"{_gib(a.bytes)} sent per device in {a.count} all-to-alls ({flops.moe_layer_count(c)} MoE layers x "
                   f"{config.optim.grad_accum} micro-batches x {per}): {a.seconds:.3f} s at {t.ici_bw / 1e9:.0f} GB/s")
        if a.dcn_bytes:
            across = "slices" if t.platform == "tpu" else "nodes"
            traffic += f" ({_gib(a.dcn_bytes)} of it across {across} at {t.dcn_bw / 1e9:.1f} GB/s)"
    return {"active": _count(flops.active_params(c, m.param_count)),
            "experts": ("expert weights (in the above)", experts, "analytic (exact shapes)"),
            "traffic": ("expert all-to-all per step", traffic, "analytic (uniform routing)")}


def format_plan(config: Config, plan: Plan) -> str:
    t, m = plan.target, plan.memory
    c = plan.compiled
    moe = _moe_rows(config, plan) if config.model.num_experts else {}
    xla = f"XLA AOT {c.platform}" if c else ""
    rows = [
        ("target", f"{t.name}: {t.chips} {t.generation} {'chips' if t.platform == 'tpu' else 'GPUs'}, "
                   f"{_gib(t.hbm)} HBM and {t.peak_flops / 1e12:.0f} TFLOP/s bf16 each", "datasheet"),
        ("mesh", plan.placement, "config + topology" if c else "config"),
        ("model", f"{_count(m.param_count)} parameters" + (f", {moe['active']} active per token" if moe else ""),
         "analytic (exact shapes)"),
        ("parameters", _gib(m.params), "analytic (exact shapes)"),
        ("optimizer state", _gib(m.optimizer), "analytic (exact shapes)"),
        *([moe["experts"]] if moe else []),
        ("batch", _gib(m.batch), "analytic (exact shapes)"),
        (f"saved activations (remat={config.model.remat})", _gib(m.activations), "analytic"),
        ("largest temporaries (grads, logits, one layer)", _gib(m.temporaries), "analytic"),
        ("total per device", _gib(m.total), "analytic"),
    ]
    if c and c.oom:
        rows.append(("compiled step", f"OUT OF MEMORY: {c.oom}", xla))
    elif c:
        rows += [
            ("arguments (params, optimizer, batch)", _gib(c.argument), xla),
            ("temporaries", _gib(c.temp), xla),
            ("total per device", _gib(c.total), xla),
            ("analytic / compiled", f"{m.total / c.total:.2f}", "ratio"),
        ]
    else:
        rows.append(("compiled step", f"not compiled: {plan.compile_note}", "-"))
    fit_method = xla if c else "analytic"
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    if c and c.oom:
        answer = f"{verdict}: out of memory at compile time ({_gib(t.hbm)} per device)"
    else:
        answer = f"{verdict}: {_gib(plan.per_device)} of {_gib(t.hbm)}"
    rows += [
        ("fits", answer, fit_method),
        ("FLOPs per step", f"{plan.step_flops:.3e} ({config.train.batch_size} x {config.train.seq_len} tokens)",
         "analytic (6N active + attention)" if moe else "analytic (6N + attention)"),
        *([moe["traffic"]] if moe else []),
        ("step time", f"{plan.step_time:.3f} s at MFU {plan.mfu:.0%}"
                      + (f", {plan.all_to_all.seconds:.3f} s of it all-to-all" if plan.all_to_all.seconds else "")
                      + f" ({config.train.batch_size * config.train.seq_len / plan.step_time:,.0f} tokens/s)",
         "analytic"),
    ]
    tiled = f"{plan.loss_chunks} sequence pieces at a time" if plan.loss_chunks > 1 else "whole (untiled)"
    rows.insert(rows.index(next(r for r in rows if r[0] == "fits")),
                ("loss logits", tiled, "config" if config.train.loss_chunks else "auto (train.loss_chunks=0)"))
    if plan.microbatches:
        rows.append(("pipeline", f"{_sizes(plan.mesh)['stage']} stages x {plan.microbatches} micro-batches"
                                 f" x {config.train.pipeline_repeats} repeats: bubble {plan.bubble:.1%} of the step",
                     "analytic (S-1)/(M*R+S-1)"))
    if plan.suggestion:
        rows.append(("suggestion", plan.suggestion, "analytic search"))
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows if len(r[1]) < 90)
    lines = [f"{'':{width}}  {'value':{vwidth}}  method", "-" * (width + vwidth + 12)]
    lines += [f"{k:{width}}  {v:{vwidth}}  {how}" for k, v, how in rows]
    return "\n".join(lines)
