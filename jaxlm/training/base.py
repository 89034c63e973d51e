"""Where a run's weights start: `model.init_from`, the one start-from setting.

- "" : random weights;
- "hf:DIR" : a Hugging Face checkpoint, streamed onto the mesh (its config.json sets the model's shape);
- a jaxlm run directory: that run's latest model checkpoint (its config sets the shape; a LoRA run's is
  its merged model);
- adapters to continue training (needs `lora.targets`): `RUN/adapters` (a finished LoRA run's, put back on
  that run's own base), a PEFT adapter directory (on its `base_model_name_or_path` when that is a local
  Hugging Face directory), or `BASE+ADAPTERS` to name the base explicitly.
The run computes as it is told (dtype, remat, attention kernel); the base fixes shape and layout.
"""

from __future__ import annotations

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.core import atomic, overrides, rundir, sharded_init
from jaxlm.core.config import Config, ConfigError, ModelConfig, validate, with_model
from jaxlm.core.sharding import path_str, tree_shardings
from jaxlm.hf import families, importer, peft, tokenizer as hf_tokenizer
from jaxlm.model import architectures, attention, lora as lora_lib
from jaxlm.training.checkpoint import Checkpointer

# Settings of the base model that a run starting from it chooses for itself.
COMPUTE = ("dtype", "remat", "attention", "init_from")


@dataclasses.dataclass(frozen=True)
class Start:
    """`model.init_from` read: the base weights ("" | "hf:DIR" | a run directory) and the adapters
    directory to continue from ("" for fresh adapters)."""

    base: str
    adapters: str = ""


def is_hf(ref: str) -> bool:
    return ref.startswith("hf:")


def directory(ref: str) -> str:
    """The directory a reference names (hf:DIR or a run directory)."""
    return os.path.abspath(os.path.expanduser(ref.removeprefix("hf:")))


def _adapter_kind(path: str) -> str:
    """"jaxlm", "peft" or "" for what adapters `path` holds."""
    if os.path.isfile(os.path.join(path, lora_lib.ADAPTER_FILE)):
        return "jaxlm"
    return "peft" if os.path.isfile(os.path.join(path, peft.CONFIG_FILE)) else ""


def parse(ref: str) -> Start:
    """The base and adapters `model.init_from=ref` names."""
    if not ref or is_hf(ref) and "+" not in ref:
        return Start(ref)
    if "+" in ref:
        base, adapters = ref.rsplit("+", 1)
        path = directory(adapters)
        if not _adapter_kind(path) and _adapter_kind(os.path.join(path, rundir.ADAPTERS)):
            path = os.path.join(path, rundir.ADAPTERS)  # a LoRA run directory: its adapters
        if not _adapter_kind(path):
            raise ConfigError(f"model.init_from={ref}: {path} holds neither {lora_lib.ADAPTER_FILE} (jaxlm adapters) "
                              f"nor {peft.CONFIG_FILE} (a PEFT adapter); BASE+ADAPTERS needs an adapter directory")
        return Start(base, path)
    path = directory(ref)
    kind = _adapter_kind(path)
    if kind == "jaxlm":
        run = os.path.dirname(path)
        if not os.path.isfile(os.path.join(run, rundir.CONFIG)):
            raise ConfigError(f"model.init_from={ref} holds adapters outside a run directory, so their base is "
                              f"unknown; name it: model.init_from=BASE+{ref}")
        return Start(parse(_run_config(run).model.init_from).base, path)
    if kind == "peft":
        return Start(_peft_base(ref, path), path)
    return Start(ref)


def _peft_base(ref: str, path: str) -> str:
    try:
        with open(os.path.join(path, peft.CONFIG_FILE)) as f:
            named = json.load(f).get("base_model_name_or_path") or ""
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"cannot read {os.path.join(path, peft.CONFIG_FILE)} (a PEFT adapter's config): {e}") from None
    local = os.path.abspath(os.path.join(path, os.path.expanduser(named))) if named else ""
    if not local or not os.path.isfile(os.path.join(local, "config.json")):
        raise ConfigError(f"the PEFT adapter {ref} names its base as {named!r}, not a local Hugging Face directory; "
                          f"name it: model.init_from=hf:BASE_DIR+{ref}")
    return "hf:" + local


def _run_config(run: str) -> Config:
    if not os.path.isfile(os.path.join(run, rundir.CONFIG)):
        raise ConfigError(f"model.init_from={run} is not a jaxlm run directory (no {rundir.CONFIG}) and has no "
                          f"hf: prefix; pass a run directory or hf:DIR for a Hugging Face checkpoint")
    return overrides.load([os.path.join(run, rundir.CONFIG)])


def resolve(config: Config) -> Config:
    """`config` with the model shape of its base, and the base's tokenizer for the data unless one is set."""
    start = parse(config.model.init_from)
    if start.adapters and not config.lora.targets:
        raise ConfigError(f"model.init_from={config.model.init_from} continues LoRA adapters, which needs "
                          f"lora.targets; set them (and lora.rank) as the adapters were trained")
    if not start.base:
        return config
    # The run chooses its head (a reward model starts from a language model): `load_params` swaps it.
    head = {"num_labels": config.model.num_labels, "value_head": config.model.value_head}
    if is_hf(start.base):
        # Resolved as the base's own task (its head decides which), then given this run's task and head.
        as_base = dataclasses.replace(config, task="reward" if _base_labels(start.base) == 1 else "pretrain")
        resolved = importer.resolve_init_from(as_base, directory(start.base))
        return validate(dataclasses.replace(resolved, task=config.task,
                                            model=dataclasses.replace(resolved.model, **head)))
    run = directory(start.base)
    model = dataclasses.replace(_run_config(run).model, **{k: getattr(config.model, k) for k in COMPUTE}, **head)
    data = config.data
    if not data.tokenizer:
        names = [n for n in rundir.TOKENIZER_FILES if os.path.isfile(os.path.join(run, n))]
        if names:
            data = dataclasses.replace(data, tokenizer=os.path.join(run, names[0]))
    return validate(dataclasses.replace(with_model(config, model), data=data))


def _base_labels(ref: str) -> int:
    """The base's model.num_labels: 0 for a language model."""
    if not is_hf(ref):
        return _run_config(directory(ref)).model.num_labels
    return families.num_labels(importer.read_config(directory(ref)))


def load_params(config: Config, model, mesh, progress: bool = True):
    """The base's params on `mesh`, each array born on its shards; None for random weights."""
    ref = parse(config.model.init_from).base
    if not ref:
        return None
    labels, value = _base_labels(ref), not is_hf(ref) and _run_config(directory(ref)).model.value_head
    base_model = dataclasses.replace(config.model, init_from="", num_labels=labels, value_head=value)
    same = (labels, value) == (config.model.num_labels, config.model.value_head)
    if is_hf(ref):
        params = importer.load_params(directory(ref), base_model, mesh, progress=progress)
    else:
        params = run_params(directory(ref), model if same else architectures.build(base_model), mesh)
    if labels != config.model.num_labels:
        params = new_head(params, model, mesh, config.train.seed)
    return params if value == config.model.value_head else value_head(params, model, mesh)


def new_head(params: dict, model, mesh, seed: int) -> dict:
    """`params` of a base with another head (a language model's vocabulary head, or another classifier's)
    with `model`'s head instead: the base's dropped, a `score` head drawn N(0, init_std) on its shards."""
    params = {k: v for k, v in params.items() if k not in ("lm_head", "score")}
    if not model.config.num_labels:
        raise ConfigError("a classifier base cannot become a language model: its vocabulary head is gone; "
                          "start from a language model")
    boxed = sharded_init.boxed_params(model)
    sharding = tree_shardings(boxed, mesh)["score"]
    shape = sharded_init.strip_boxes(boxed)["score"]
    init = jax.jit(lambda key: model.config.init_std * jax.random.normal(key, shape.shape, shape.dtype),
                   out_shardings=sharding)
    return {**params, "score": init(jax.random.fold_in(jax.random.key(seed), 0x5C0E))}


def value_head(params: dict, model, mesh) -> dict:
    """`params` with `model`'s value head (PPO's critic): a zero `value` on its shards (every value 0 at the
    start), or none."""
    params = {k: v for k, v in params.items() if k != "value"}
    if not model.config.value_head:
        return params
    sharding = tree_shardings(sharded_init.boxed_params(model), mesh)["value"]
    shape = sharded_init.abstract_params(model)["value"]  # (1, D)
    return {**params, "value": jax.jit(lambda: jnp.zeros(shape.shape, shape.dtype), out_shardings=sharding)()}


def run_model(ref: str, mesh) -> tuple[nn.Module, dict]:
    """The latest model of the run directory `ref` as that run computes it (a LoRA run's: merged), on `mesh`."""
    saved = _run_config(directory(ref)).model
    model = architectures.build(saved, attention.resolve(saved.attention))
    return model, run_params(directory(ref), model, mesh)


def run_params(run: str, model, mesh):
    """The params of `run`'s latest model checkpoint, for `model` (the run's shape), on `mesh`."""
    saved = _run_config(run)
    boxed = sharded_init.boxed_params(model)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            sharded_init.strip_boxes(boxed), tree_shardings(boxed, mesh))
    with Checkpointer(rundir.checkpoint_dir(run, saved.checkpoint.dir), saved.checkpoint) as ckpt:
        step = ckpt.latest_step()
        if step is None:
            raise ConfigError(f"{run} holds no complete checkpoint; train it first")
        return ckpt.restore_params(step, abstract)


def copy_files(config: Config, run_dir: str) -> None:
    """Copies what a run started from the base must carry: the tokenizer (and its Hugging Face files) and
    hf_config.json, so that generate and export need nothing else."""
    ref = parse(config.model.init_from).base
    if not ref:
        return
    src = directory(ref)
    if is_hf(ref):
        importer.copy_run_files(src, run_dir)
        return
    hf_tokenizer.copy_files(src, run_dir)
    if os.path.isfile(os.path.join(src, rundir.HF_CONFIG)):
        with open(os.path.join(src, rundir.HF_CONFIG)) as f:
            atomic.write_json(os.path.join(run_dir, rundir.HF_CONFIG), json.load(f))


def template_dir(config: Config) -> str:
    """Where the base's chat template and tokenizer files live ("" for none)."""
    ref = parse(config.model.init_from).base
    return directory(ref) if ref else ""


def initial_adapters(config: Config, lora: lora_lib.Lora) -> dict | None:
    """The adapters `model.init_from` continues from (None: fresh ones), as host float32 arrays shaped like
    `lora.init`'s, read from jaxlm adapters (`lora.save_adapters`) or a PEFT adapter directory.

    The saved rank must equal lora.rank (a ConfigError names the value to set). A different alpha is
    allowed: B is rescaled by saved_alpha / lora.alpha, so the update (alpha / r) * A @ B is unchanged.
    Layers a PEFT adapter leaves out (zero A and B, which never train: each one's gradient is through
    the other) get fresh A with B still zero, as `init` would give them."""
    path = parse(config.model.init_from).adapters
    if not path:
        return None
    if _adapter_kind(path) == "jaxlm":
        meta = _read_meta(os.path.join(path, lora_lib.ADAPTER_CONFIG))
        _check_rank(meta["rank"], lora, os.path.join(path, lora_lib.ADAPTER_CONFIG))
        adapters, alpha = lora_lib.load_adapters(path, lora), meta["alpha"]
    else:
        adapters, alpha = _peft_adapters(path, lora, config.model, config.train.seed)
    factor = alpha / lora.config.alpha
    return jax.tree_util.tree_map_with_path(
        lambda p, x: np.asarray(x, np.float32) * (factor if path_str(p).endswith("/b") else 1.0), adapters)


def _peft_adapters(path: str, lora: lora_lib.Lora, model: ModelConfig, seed: int) -> tuple[dict, float]:
    saved, adapters = peft.import_adapters(path, model)
    _check_rank(saved.rank, lora, os.path.join(path, peft.CONFIG_FILE))
    found = {path_str(p)[:-2] for p, _ in jax.tree_util.tree_flatten_with_path(adapters)[0]}
    if found != set(lora.targets):
        raise ConfigError(f"the PEFT adapter {path} adapts {sorted(found)[:4]} but lora.targets selects "
                          f"{sorted(lora.targets)[:4]}; set lora.targets={saved.targets}")
    fresh = sharded_init.strip_boxes(lora.init(jax.random.key(seed)))
    return _revive(adapters, fresh, lora), saved.alpha


def _read_meta(path: str) -> dict:
    try:
        with open(path) as f:
            meta = json.load(f)
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        return {"rank": int(meta["rank"]), "alpha": float(meta["alpha"])}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"cannot read {path} (written with the adapters by lora.save_adapters): {e!r}") from None


def _check_rank(rank: int, lora: lora_lib.Lora, path: str) -> None:
    if rank != lora.config.rank:
        raise ConfigError(f"{path} has LoRA rank {rank} but lora.rank={lora.config.rank}; set lora.rank={rank}")


def _revive(adapters, fresh, lora: lora_lib.Lora) -> dict:
    """Fresh A (from `fresh`) wherever a layer's A is all zero; B stays zero there, so the model is unchanged."""
    flat = {}
    for path, t in lora.targets.items():
        ad, new = lora_lib.lookup(adapters, path), lora_lib.lookup(fresh, path)
        a = np.asarray(ad["a"], np.float32)
        dead = ~np.any(a, axis=tuple(range(t.lead, a.ndim)))  # per layer of a scanned stack, else one flag
        dead = dead.reshape(*dead.shape, *(1,) * (a.ndim - t.lead))
        flat[path] = {"a": np.where(dead, np.asarray(new["a"]), a), "b": np.asarray(ad["b"])}
    return lora_lib.nest(flat)
