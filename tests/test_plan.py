"""`jaxlm plan`: targets, the analytic memory model against real arrays and against XLA's TPU compiler,
and the llama3_8b fit answers from the real ahead-of-time compile.

The TPU tests need libtpu (`pip install "jaxlm[tpu-plan]"`) and are skipped without it. Each full-size
compile takes minutes, so one stays in the slow pass and the rest are marked tpu_aot, which only
`pytest -m tpu_aot` runs.
"""

import dataclasses
import importlib.util
import os
import subprocess
import sys

import jax
import pytest
from conftest import small_config

from jaxlm.core import mesh as mesh_lib, overrides, sharded_init
from jaxlm.core.config import ConfigError
from jaxlm.model.transformer import Transformer
from jaxlm.planning import plan, memory as plan_memory
from jaxlm.training import optim

# Compile-only TPU use: quiet libtpu's host probing, and let several test processes load it.
for key, value in (("TPU_ACCELERATOR_TYPE", "v5litepod-4"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                   ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    os.environ.setdefault(key, value)

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason='libtpu not installed (pip install "jaxlm[tpu-plan]")')
GIB = 1 << 30


def with_(config, section, **fields):
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **fields)})


@pytest.mark.parametrize("name,chips,topology,hbm_gib", [
    ("v5p-256", 128, "v5p:4x4x8", 95), ("v5p-64", 32, "v5p:2x4x4", 95), ("v4-32", 16, "v4:2x2x4", 32),
    ("v5e:8x8", 64, "v5e:8x8", 16), ("v5litepod-16", 16, "v5e:4x4", 16), ("v6e-256", 256, "v6e:16x16", 32),
    ("v5e:1x1", 1, "v5e:1x1", 16),
])
def test_tpu_targets(name, chips, topology, hbm_gib):
    t = plan.parse_target(name)
    assert (t.platform, t.chips, t.topology, t.hbm) == ("tpu", chips, topology, hbm_gib * GIB)


def test_gpu_and_multislice_targets_and_errors():
    t = plan.parse_target("h100x8")
    assert (t.platform, t.chips, t.hbm) == ("gpu", 8, 80 * 10**9)
    t = plan.parse_target("v6e-256", slices=2)
    assert (t.chips, t.slices, t.per_slice, t.topology) == (512, 2, 256, "v6e:16x16")
    for bad, match in (("v9-8", "unknown target"), ("v5p-100", "not a standard v5p slice"),
                       ("v5e:2x2x2", "v5e topologies have 2 dimensions"), ("tpu", "unknown target")):
        with pytest.raises(ConfigError, match=match):
            plan.parse_target(bad)


def test_mesh_that_does_not_match_the_topology_is_an_error():
    config = overrides.load(["llama3_8b", "mesh.fsdp=3"])
    with pytest.raises(ConfigError, match="multiply to 3 but there are 64 devices"):
        plan.make_plan(config, plan.parse_target("v5e:8x8"), method="analytic")
    config = overrides.load(["llama3_8b", "train.batch_size=32"])
    with pytest.raises(ConfigError, match="not divisible by the 64-way batch sharding"):
        plan.make_plan(config, plan.parse_target("v5e:8x8"), method="analytic")


def test_analytic_state_bytes_equal_the_real_sharded_arrays():
    """Parameters and optimizer state per device, from shapes alone, against arrays built on a 2x4 mesh."""
    config = with_(small_config(vocab_size=512, d_model=64, num_heads=8, num_kv_heads=4), "mesh",
                   fsdp=2, tensor=4)
    model = Transformer(config.model)
    tx = optim.build_optimizer(config.optim, config.train.steps, sharded_init.abstract_params(model))
    mesh = mesh_lib.make_mesh(config.mesh)
    with jax.set_mesh(mesh):
        state, _ = sharded_init.create(sharded_init.make_init_fn(model, tx, 0), mesh)

    def on_device0(tree):
        dev = jax.devices()[0]
        return sum(s.data.nbytes for leaf in jax.tree.leaves(tree) for s in leaf.addressable_shards if s.device == dev)

    memory = plan_memory.analytic(config, mesh_lib.mesh_shape(config.mesh, 8)["ici"])
    assert memory.params == on_device0(state.params)
    assert memory.optimizer == on_device0(state.opt_state)


def test_plan_report_names_its_methods_and_suggests_a_fix():
    # Untiled, the float32 logits of 16 rows x 8192 tokens x 128256 vocabulary per chip are 67 GB.
    config = overrides.load(["llama3_8b", "train.loss_chunks=1"])
    result = plan.make_plan(config, plan.parse_target("v5p-64"), mfu=0.5, method="analytic")
    assert not result.fits and result.compiled is None
    assert result.suggestion == "train.loss_chunks=0"
    fixed = plan.make_plan(overrides.load(["llama3_8b"]), plan.parse_target("v5p-64"), method="analytic")
    assert fixed.fits and fixed.loss_chunks == 64  # tiled by default, without gradient accumulation
    assert "64 sequence pieces at a time" in plan.format_plan(overrides.load(["llama3_8b"]), fixed)
    # 6N + attention FLOPs per token times the tokens of a step; the time at the stated MFU.
    assert result.step_flops == pytest.approx(2.4286e17, rel=1e-3)
    assert result.step_time == pytest.approx(result.step_flops / (32 * 459e12 * 0.5))
    text = plan.format_plan(config, result)
    for row in ("parameters", "optimizer state", "saved activations (remat=full)", "largest temporaries",
                "DOES NOT FIT", "FLOPs per step", "at MFU 50%", "suggestion", "fsdp=32 on v5p:2x4x4"):
        assert row in text, row
    assert "analytic (exact shapes)" in text and "not compiled: analytic only" in text


def test_plan_suggests_pipeline_stages_across_slices_and_reports_the_bubble():
    # 8B on 4 slices of v5e-8 (16 GB chips) replicated over DCN: the weights and Adam state do not fit; stages
    # across the slices divide them by 4.
    words = ["llama3_8b", "mesh.dcn_data=-1", "train.batch_size=64", "train.seq_len=2048"]
    target = plan.parse_target("v5e-8", slices=4)
    result = plan.make_plan(overrides.load(words), target, method="analytic")
    assert not result.fits and result.suggestion == "mesh.dcn_data=1 mesh.dcn_stage=4"
    staged = overrides.load(words[:1] + words[2:] + ["mesh.dcn_stage=4"])
    fixed = plan.make_plan(staged, target, method="analytic")
    assert fixed.fits and fixed.microbatches == 8  # 64 rows / 8-way fsdp = 8 per shard: up to 4 per stage
    assert fixed.bubble == pytest.approx(3 / 11)
    # Each stage holds a quarter of the layers (the embedding and head are on every stage).
    assert fixed.memory.params < result.memory.params / 2.5
    assert fixed.step_time == pytest.approx(fixed.step_flops / (32 * 197e12 * 0.4) / (1 - 3 / 11))
    assert "4 stages x 8 micro-batches x 1 repeats: bubble 27.3%" in plan.format_plan(staged, fixed)


def test_fewer_rows_than_batch_shards_points_at_context_parallelism():
    config = overrides.load(["llama3_8b", "train.seq_len=131072", "train.batch_size=8"])
    with pytest.raises(ConfigError, match="split each row over devices instead with mesh.sequence"):
        plan.make_plan(config, plan.parse_target("v5p-64"), method="analytic")
    cp = plan.make_plan(overrides.load(["llama3_8b", "train.seq_len=131072", "train.batch_size=8",
                                        "mesh.sequence=8"]), plan.parse_target("v5p-64"), method="analytic")
    assert cp.fits
    # fsdp=4 x sequence=8: an eighth of 2 rows per device, the saved activations of 32k tokens.
    assert cp.memory.activations == plan.make_plan(
        overrides.load(["llama3_8b", "train.seq_len=32768", "train.batch_size=32"]), plan.parse_target("v5p-64"),
        method="analytic").memory.activations


# --- mixture of experts ------------------------------------------------------------------------------

def test_mixtral_plan_shows_expert_memory_and_all_to_all_rows():
    config = overrides.load(["mixtral_8x7b", "mesh.fsdp=8", "mesh.expert=8", "optim.grad_accum=8"])
    result = plan.make_plan(config, plan.parse_target("v5p-128"), method="analytic")
    text = plan.format_plan(config, result)
    for row in ("46.70B parameters, 12.88B active per token", "expert weights (in the above)",
                "1 of 8 experts per device", "expert all-to-all per step", "1536 all-to-alls (32 MoE layers x 8 "
                "micro-batches x 6)", "6N active", "of it all-to-all"):
        assert row in text, row
    # 64 rows x 4096 tokens per device, over 8 micro-batches: 4096 tokens x 2 experts x 4096 bfloat16 values
    # per all-to-all, 7/8 of them to the other 7 devices of the expert group, all over ICI.
    each = 4096 * 2 * 4096 * 2
    a = result.all_to_all
    assert (a.count, a.dcn_bytes) == (32 * 8 * 6, 0.0) and a.bytes == pytest.approx(a.count * each * 7 / 8)
    assert a.seconds == pytest.approx(a.bytes / 600e9)  # v5p: 1200 GB/s bidirectional ICI per chip
    compute = result.step_flops / (64 * 459e12 * 0.4)
    assert result.step_time == pytest.approx(compute + a.seconds)
    # Counting active parameters: 6 x 12.75B matmul parameters per token, plus attention.
    assert result.step_flops == pytest.approx((6 * 12_748_587_008 + 12 * 32 * 32 * 128 * 4096) * 512 * 4096)


def test_expert_weight_memory_scales_down_with_mesh_expert():
    # fsdp stays 8 and data fills the rest, so the expert axis alone splits the experts further.
    sizes = lambda ep: {"stage": 1, "data": 64 // (8 * ep), "fsdp": 8, "sequence": 1, "expert": ep, "tensor": 1}
    config = lambda ep: overrides.load(["mixtral_8x7b", "mesh.data=-1", "mesh.fsdp=8", f"mesh.expert={ep}"])
    memory = {ep: plan_memory.analytic(config(ep), sizes(ep), "splash") for ep in (1, 2, 8)}
    experts = 32 * 8 * 3 * 4096 * 14336 * 4 / 8  # float32, all 8 experts of 32 layers, over fsdp=8
    for ep, m in memory.items():
        assert m.expert_params == experts / ep and m.expert_optimizer == 2 * experts / ep  # Adam's two moments
        assert m.params - m.expert_params == memory[1].params - memory[1].expert_params  # the rest is unchanged
    assert memory[8].params < memory[2].params < memory[1].params
    # The price: each device receives up to ep x its assignments (the all-to-all's worst-case buffer).
    assert memory[8].temporaries > memory[2].temporaries


def test_all_to_all_bytes_zero_without_expert_parallelism():
    target = plan.parse_target("v5p-128")

    def traffic(*words):
        config = overrides.load(["mixtral_8x7b", *words])
        return plan.all_to_all(config, target, mesh_lib.mesh_shape(config.mesh, 64))

    assert traffic() == plan.AllToAll(0, 0.0, 0.0, 0.0)
    assert traffic("mesh.fsdp=8", "mesh.data=-1") == plan.AllToAll(0, 0.0, 0.0, 0.0)
    two, eight = traffic("mesh.expert=2"), traffic("mesh.expert=8")
    assert 0 < two.bytes < eight.bytes and two.count == eight.count == 32 * 6
    # Without remat the forward is not recomputed: 4 all-to-alls per MoE layer instead of 6.
    assert traffic("mesh.expert=8", "model.remat=none").bytes == pytest.approx(eight.bytes * 4 / 6)
    dense = overrides.load(["llama3_8b"])
    assert plan.all_to_all(dense, target, mesh_lib.mesh_shape(dense.mesh, 64)).count == 0
    # Over two slices with the expert axis across them, half of each device's assignments cross DCN.
    config = overrides.load(["mixtral_8x7b", "mesh.expert=4", "mesh.dcn_expert=2"])
    two_slices = plan.parse_target("v5p-128", slices=2)
    a = plan.all_to_all(config, two_slices, mesh_lib.mesh_shape(config.mesh, 128, 2))
    assert a.dcn_bytes == pytest.approx(a.bytes * 4 / 7) and a.ici_bytes == pytest.approx(a.bytes * 3 / 7)
    assert a.seconds == pytest.approx(a.ici_bytes / 600e9 + a.dcn_bytes / 6.25e9)


def test_plan_suggests_expert_parallelism_for_moe_and_never_pipeline_stages():
    # All-FSDP gathers all 8 experts of a layer (2.6 GiB in bfloat16) for the forward and the backward;
    # two expert groups halve that, and Mixtral on 16 GB chips then fits.
    config = overrides.load(["mixtral_8x7b", "train.batch_size=64", "train.seq_len=512"])
    result = plan.make_plan(config, plan.parse_target("v5e-64"), method="analytic")
    assert not result.fits and result.suggestion == "mesh.expert=2"
    levers = plan._levers(config, plan.parse_target("v5e-64"))
    assert {"mesh.expert": 8} in levers and not any("mesh.stage" in lever for lever in levers)
    dense_levers = plan._levers(overrides.load(["llama3_8b"]), plan.parse_target("v5e-64"))
    assert not any("mesh.expert" in lever for lever in dense_levers)


def test_expert_axis_that_does_not_divide_the_experts_is_one_line_error():
    # mesh.expert=-1 fills 64 devices, which the config alone cannot know: the planner (and `jaxlm train`,
    # through the same check) reject it on the resolved mesh.
    config = overrides.load(["mixtral_8x7b", "mesh.fsdp=1", "mesh.expert=-1"])
    with pytest.raises(ConfigError, match=r"^mesh.expert=-1 .* 64-way expert axis .* model.num_experts=8; ") as e:
        plan.make_plan(config, plan.parse_target("v5p-128"), method="analytic")
    assert "\n" not in str(e.value)
    from jaxlm.training import assembly

    sizes = {"stage": 1, "data": 1, "fsdp": 2, "sequence": 1, "expert": 16, "tensor": 1}
    with pytest.raises(ConfigError, match="mesh.expert"):
        assembly.check_parallelism(overrides.load(["mixtral_8x7b", "train.batch_size=32"]), sizes)
    for words, match in ((["mesh.expert=3"], "mesh.expert=3 .* does not divide model.num_experts=8"),
                         (["model.experts_per_token=9"], "model.experts_per_token=9 exceeds model.num_experts=8")):
        with pytest.raises(ConfigError, match=match):
            overrides.load(["mixtral_8x7b", *words])


def test_cli_plan_help():
    proc = subprocess.run([sys.executable, "-m", "jaxlm.cli", "plan", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "--target" in proc.stdout and "tpu-plan" in proc.stdout


# --- the real ahead-of-time compile for TPU ----------------------------------------------------------

def compile_plan(words, target):
    return plan.make_plan(overrides.load(words), plan.parse_target(target), method="compile")


@needs_libtpu  # a few seconds: the one TPU compile in the default run (CI installs the tpu-plan extra)
def test_llama3_8b_with_adamw_does_not_fit_one_v5e_chip():
    # Even one sequence: 8.03B float32 parameters plus two Adam moments are 96 GB before any activation.
    result = compile_plan(["llama3_8b", "train.batch_size=1"], "v5e:1x1")
    assert result.compiled is not None and result.compiled.platform == "tpu"
    assert not result.fits
    assert result.compiled.oom or result.compiled.argument > 90 * 10**9


@needs_libtpu
@pytest.mark.tpu_aot
def test_llama3_8b_with_adamw_fits_v5e_8x8():
    result = compile_plan(["llama3_8b", "optim.grad_accum=8"], "v5e:8x8")
    assert result.compiled is not None and result.compiled.oom is None
    assert result.fits, plan.format_plan(overrides.load(["llama3_8b", "optim.grad_accum=8"]), result)
    assert "over" in result.placement  # mapped onto the physical torus


# (overrides, target): shapes, meshes and remat policies the model was not fitted on. The 2-D mesh case runs in
# the slow pass; the others only with -m tpu_aot.
VALIDATION = [
    pytest.param(["model.remat=full", "train.batch_size=32"], "v5e:2x4", marks=pytest.mark.tpu_aot),
    pytest.param(["model.remat=save_attention_out", "mesh.data=2", "mesh.fsdp=4", "train.batch_size=32"], "v5e:2x4",
                 marks=pytest.mark.tpu_aot),
    pytest.param(["model.remat=dots", "mesh.fsdp=4", "mesh.tensor=2", "train.batch_size=32"], "v5e:2x4",
                 marks=pytest.mark.slow),
    pytest.param(["model.remat=none", "train.batch_size=8"], "v5e:2x4", marks=pytest.mark.tpu_aot),
]
MEDIUM = ["llama3_1b", "model.vocab_size=50000", "model.d_model=2048", "model.num_layers=4", "model.num_heads=16",
          "model.num_kv_heads=8", "model.head_dim=128", "model.mlp_dim=5632", "train.seq_len=1024",
          "model.max_seq_len=4096", "model.tie_embeddings=False"]


@needs_libtpu
@pytest.mark.parametrize("words,target", VALIDATION, ids=[p.values[0][0] for p in VALIDATION])
def test_analytic_memory_within_15_percent_of_the_tpu_compiler(words, target):
    result = compile_plan(MEDIUM + words, target)
    assert result.compiled.oom is None
    ratio = result.memory.total / result.compiled.total
    assert 0.85 <= ratio <= 1.15, f"analytic {result.memory.total / GIB:.2f} GiB vs XLA {result.compiled.total / GIB:.2f} GiB"


@pytest.mark.slow  # two compiles of a train step on 4 devices (~12 s)
@pytest.mark.parametrize("words, keys", [
    (["t5_tiny", "train.batch_size=8", "train.seq_len=64", "model.vocab_size=512"], 8),
    (["tiny", "objective.kind=prefix_lm", "train.batch_size=8", "train.seq_len=64", "model.vocab_size=512"], 6),
])
def test_compiled_plan_runs_the_architectures_own_batch(words, keys):
    """The compiled step of an encoder-decoder reads decoder rows of the targets' length; a prefix-LM one its
    prefix mask: the batch `jaxlm train` feeds, not a decoder-only one."""
    config = overrides.load(words + ["mesh.fsdp=4"])
    lengths = plan_memory.batch_lengths(config)
    assert len(lengths) == keys
    if config.model.encoder_decoder:
        assert lengths["inputs"] == 64 and lengths["targets"] == lengths["decoder_inputs"] == 14  # T5: 70 raw tokens, 10 noise in 3 spans
    compiled = plan_memory.compiled(config, jax.devices()[:4])
    assert compiled.oom is None and compiled.total > 0
