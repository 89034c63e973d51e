"""`jaxlm finetune`: SFT or DPO of a base model, fully or through LoRA / QLoRA, top to bottom.

config -> multi-host setup -> mesh -> base model and tokenizer -> chat template -> data (bad rows counted)
-> state (base params, adapters, optimizer with the trainable mask) -> [DPO: reference log-probs] -> restore
the latest checkpoint -> compiled step -> `train.Loop` (logging, evals, checkpoints, preemption, watchdog)
-> adapters and merged model (a run directory that `jaxlm generate` and `jaxlm convert to-hf` read).

Checkpoints: a full finetune checkpoints its whole train state in `<run>/checkpoints`, which is also the
model that generate and export read. A LoRA run checkpoints only the adapters, their optimizer state and
the step in `<run>/train_state` (the frozen base is rebuilt from `finetune.base` on resume), and writes the
merged model to `<run>/checkpoints` when it finishes.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from jaxlm import attention, chat, distributed, dpo, lora as lora_lib, mesh as mesh_lib, optim, sft, sharded_init
from jaxlm.checkpoint import Checkpointer
from jaxlm.config import Config, ConfigError
from jaxlm.core import atomic, rundir
from jaxlm.model import Transformer
from jaxlm.overrides import to_dict
from jaxlm.sharding import batch_divisor, global_batch
from jaxlm.train import Loop, run_dir_of, write_json_atomic
from jaxlm.train_step import TrainState, make_finetune_step

log = logging.getLogger("jaxlm.finetune")
ADAPTER_DIR, TRAIN_STATE_DIR = "adapters", "train_state"


@dataclasses.dataclass
class Base:
    config: Config  # with the base model's ModelConfig
    params: dict | None  # None: start from random weights
    tokenizer: object  # sentencepiece-like: encode, bos_id, eos_id
    tokenizer_path: str
    model_dir: str  # where its chat template and tokenizer files live ("" for none)


def load_base(config: Config, run_dir: str, mesh, primary: bool = True) -> Base:
    """The starting model: a jaxlm run directory, hf:DIR (streamed onto `mesh`), or random weights."""
    from jaxlm.data import tokenizer as tokenizer_lib
    from jaxlm.hf import families, importer, tokenizer as hf_tokenizer
    from jaxlm.inference import load_run

    ref = config.finetune.base or config.model.init_from
    m = config.model
    if ref.startswith("hf:"):
        hf_dir = importer.hf_dir_of(ref)
        model = dataclasses.replace(families.model_config(importer.read_config(hf_dir), m), init_from="")
        params = importer.load_params(hf_dir, model, mesh, progress=config.train.progress)
        # Tokenizer, chat template and the Hugging Face config.json travel with the run, for generate and export.
        tok_name = importer.copy_run_files(hf_dir, run_dir) if primary else None
        return Base(dataclasses.replace(config, model=model), params, tokenizer_lib.load_for_run(hf_dir),
                    os.path.join(run_dir, tok_name or ""), hf_dir)
    if ref:
        run = load_run(ref)
        if primary:
            tok_name = hf_tokenizer.copy_files(ref, run_dir)
            if os.path.isfile(os.path.join(ref, importer.HF_CONFIG_FILE)):
                with open(os.path.join(ref, importer.HF_CONFIG_FILE)) as f:
                    write_json_atomic(os.path.join(run_dir, importer.HF_CONFIG_FILE), json.load(f))
        else:
            tok_name = None
        # The base fixes the shape and parameter layout; how to compute (dtype, remat, kernel) is this run's choice.
        model = dataclasses.replace(run.config.model, dtype=m.dtype, remat=m.remat, attention=m.attention, init_from="")
        return Base(dataclasses.replace(config, model=model), run.params, run.tokenizer,
                    os.path.join(run_dir, tok_name or ""), ref)
    if config.data.tokenizer:
        return Base(config, None, tokenizer_lib.load(config.data.tokenizer), config.data.tokenizer, "")
    # Random weights and no tokenizer given: train one on the finetuning text itself (tests, smoke runs).
    texts = [str(m.get("content", "")) for _, row in read_rows(config) if isinstance(row, dict)
             for m in (row.get("messages") or []) if isinstance(m, dict)]
    texts += [str(row.get(k, "")) for _, row in read_rows(config) if isinstance(row, dict)
              for k in ("prompt", "response", "chosen", "rejected") if isinstance(row.get(k), str)]
    sp, path = tokenizer_lib.get(texts + [chat.CHATML], config.model.vocab_size, config.data.tokenizer_type, "",
                                 config.data.cache_dir)
    return Base(config, None, sp, path, "")


def chatterbot_rows(language: str) -> list[tuple[str, dict]]:
    """Conversations of chatterbot-corpus (user and assistant alternating), as chat-message rows."""
    import importlib.util

    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None:
        raise ConfigError("finetune.data=chatterbot:... needs the chatterbot-corpus package: "
                          "pip install chatterbot-corpus==1.3.3")
    folder = os.path.join(os.path.dirname(spec.origin), "data", language)
    files = sorted(glob.glob(os.path.join(folder, "*.yml")))
    if not files:
        raise ConfigError(f"chatterbot-corpus has no language '{language}'; try english or chinese")
    rows = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
        for k, turns in enumerate(doc.get("conversations") or []):
            turns = turns if isinstance(turns, list) else [turns]
            messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": "" if t is None else str(t)}
                        for i, t in enumerate(turns)]
            rows.append((f"{os.path.basename(path)}#{k}", {"messages": messages}))
    return rows


def read_rows(config: Config) -> list[tuple[str, object]]:
    data = config.finetune.data
    if data.startswith("chatterbot:"):
        return chatterbot_rows(data.split(":", 1)[1])
    return sft.read_jsonl(os.path.expanduser(data))


def build_data(config: Config, template: chat.Template, tokenizer, seq_len: int):
    """(train rows, eval rows or None, report): arrays with a leading row axis, ready for `sft.batches`."""
    rows = read_rows(config)
    order = np.random.default_rng(config.train.seed).permutation(len(rows))
    rows = [rows[i] for i in order]
    report = sft.Report()
    encode = lambda text: list(tokenizer.encode(text))
    if config.task == "dpo":
        data = dpo.build_rows(rows, template, encode, seq_len, report)
        n = len(data["ref_chosen"])
    else:
        examples = sft.build_examples(rows, template, encode, seq_len, report)
        n = len(examples)
    log.info("finetuning data %s: %s", config.finetune.data, report.summary())
    if n == 0:
        raise ConfigError(f"finetune.data={config.finetune.data} has no usable row ({report.summary()})")
    # Hold out whole examples for an eval loss, when there are enough of them.
    n_eval = max(int(n * config.data.eval_fraction), config.train.batch_size) if n >= 4 * config.train.batch_size else 0
    if config.task == "dpo":
        split = lambda sl: {k: v[sl] for k, v in data.items()}
        return split(slice(n_eval, None)), (split(slice(0, n_eval)) if n_eval else None), report
    train = sft.pack(examples[n_eval:], seq_len, config.finetune.pack)
    held = sft.pack(examples[:n_eval], seq_len, pack_rows=False) if n_eval else None  # >= batch_size rows
    return train, held, report


def build_state(config: Config, model: Transformer, base_params, mesh):
    """(state, abstract state, apply_fn, trainable key, tx, lora or None): the sharded train state for full or
    LoRA finetuning, with the base params in place."""
    c, steps, seed = config.lora, config.train.steps, config.train.seed
    if not c.targets:
        tx = optim.build_optimizer(config.optim, steps, sharded_init.abstract_params(model))
        init = sharded_init.make_init_fn(model, tx, seed)
        apply_fn, trainable, lo = model.apply, None, None
    else:
        boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
        lo = lora_lib.Lora(model, c, boxed)
        tx = optim.build_optimizer(config.optim, steps, lo.abstract_params(seed), trainable=lo.trainable)
        init = lo.make_init_fn(tx, seed)
        apply_fn, trainable = lo.apply, "lora"
    abstract = sharded_init.abstract_state(init, mesh)
    if base_params is None:
        state = sharded_init.materialize(init, abstract)
    else:  # the loaded base replaces the random one, which is therefore never computed
        state = sharded_init.materialize(init, abstract, keep=lambda s: without_base(s, lo))
        if c.quantize != "none":  # under jit: each code and scale is made on its own shards
            from jaxlm.quantize import quantize_sharded

            base_params = quantize_sharded(base_params, c.quantize, c.block_size, boxed, mesh)
        target = abstract.params if lo is None else abstract.params["base"]
        base_params = jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), base_params, target)
        state = state.replace(params=base_params if lo is None else {"base": base_params, **state.params})
    if c.init_from:  # continue from saved or PEFT adapters instead of fresh ones
        directory = os.path.expanduser(c.init_from)
        if os.path.isfile(os.path.join(directory, ADAPTER_DIR, lora_lib.ADAPTER_FILE)):
            directory = os.path.join(directory, ADAPTER_DIR)  # a finetuned run directory
        adapters = lora_lib.initial_adapters(directory, lo, config.model, seed)
        adapters = jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), adapters, abstract.params["lora"])
        state = state.replace(params={**state.params, "lora": adapters})
    return state, abstract, apply_fn, trainable, tx, lo


def without_base(state: TrainState, lo) -> TrainState:
    """The state less its frozen base (which comes from `finetune.base`): for LoRA the adapters, for a full
    finetune no params at all."""
    return state.replace(params=None if lo is None else {"lora": state.params["lora"]})


def finetune(config: Config) -> dict:
    """Finetunes per `config` (config.task is sft or dpo), resuming from the run's latest checkpoint.
    Returns a summary of the run."""
    if config.task not in ("sft", "dpo"):
        raise ConfigError(f"task={config.task!r}: jaxlm finetune runs task=sft or task=dpo")
    t, accum = config.train, config.optim.grad_accum
    if config.lora.init_from and not config.lora.targets:
        raise ConfigError("lora.init_from needs lora.targets (the adapted weights); set them as the adapters were trained")
    if accum < 1 or t.batch_size % accum:
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by optim.grad_accum={accum}")
    run_dir = run_dir_of(config)
    # 1. Multi-host runtime, then the mesh: the base is loaded straight onto it.
    distributed.initialize(config.distributed)
    primary = jax.process_index() == 0
    if not primary:
        logging.getLogger("jaxlm").setLevel(logging.WARNING)
    os.makedirs(run_dir, exist_ok=True)
    mesh = mesh_lib.make_mesh(config.mesh)
    if (t.batch_size // accum) % batch_divisor(mesh):
        raise ConfigError(f"train.batch_size/optim.grad_accum={t.batch_size // accum} is not divisible by the "
                          f"{batch_divisor(mesh)}-way batch sharding (mesh data*fsdp*expert); change one of them")

    # 2. Base model and tokenizer; the run directory carries the tokenizer, so generate and export need nothing else.
    base = load_base(config, run_dir, mesh, primary)
    config = base.config
    if t.seq_len > config.model.max_seq_len:
        raise ConfigError(f"train.seq_len={t.seq_len} exceeds the base model's max_seq_len={config.model.max_seq_len}")
    tok = base.tokenizer
    is_sp = not tok.special_tokens_in_text
    # Chat template: the given file, the base model's, or ChatML. Sentencepiece models get their BOS first.
    template = chat.load(config.finetune.chat_template, base.model_dir,
                         prefix_ids=(tok.bos_id(),) if is_sp and tok.bos_id() >= 0 else ())
    if primary:
        write_json_atomic(os.path.join(run_dir, "config.json"), to_dict(config))
        _copy_tokenizer(base.tokenizer_path, run_dir)
        atomic.write_text(os.path.join(run_dir, rundir.CHAT_TEMPLATE), template.source)

    # 3. Data: every row encoded once, bad rows counted by reason.
    train_rows, eval_rows, report = build_data(config, template, tok, t.seq_len)

    model = Transformer(config.model, attention.resolve(config.model.attention))
    dropout = bool(config.lora.targets) and config.lora.dropout > 0
    with jax.set_mesh(mesh):
        # 4. State: base params (quantized for QLoRA), adapters or full params, optimizer.
        state, abstract, apply_fn, trainable, tx, lo = build_state(config, model, base.params, mesh)
        base.params = None  # the state holds the (possibly quantized) base now
        base_bytes = _nbytes(state.params if lo is None else state.params["base"])
        log.info("base params %.1f MiB%s", base_bytes / 2**20,
                 f" ({config.lora.quantize})" if config.lora.quantize != "none" else "")
        checkpointed = (lambda s: s) if lo is None else (lambda s: without_base(s, lo))
        model_dir = config.checkpoint.dir or os.path.join(run_dir, "checkpoints")  # what generate and export read
        ckpt_dir = model_dir if lo is None else os.path.join(run_dir, TRAIN_STATE_DIR)
        ckpt = Checkpointer(ckpt_dir, config.checkpoint)
        latest = ckpt.latest_step() if config.checkpoint.resume else None
        done = latest is not None and latest >= t.steps

        # 5. DPO reference log-probs, from the starting model: computed before any checkpoint is restored.
        if config.task == "dpo" and not done:
            ref_params, ref_apply = _reference(config, state, apply_fn)
            for rows in (train_rows, eval_rows):
                if rows is not None:
                    dpo.fill_reference(ref_apply, ref_params, rows, t.batch_size, t.progress and primary)
            del ref_params
        make = (lambda drop: dpo.make_loss(apply_fn, config.finetune.beta, drop)) if config.task == "dpo" else (
            lambda drop: sft.make_loss(apply_fn, drop))
        eval_loss = jax.jit(lambda p, b: make(False)(p, b, None))
        evaluate = (lambda params: _evaluate(eval_loss, params, eval_rows, t.batch_size, mesh)) if eval_rows else None
        start_eval = evaluate(state.params) if evaluate and latest is None else None

        # 6. Resume: the latest checkpoint's step, optimizer state and RNG (and adapters or params).
        if latest is not None:
            restored, _ = ckpt.restore(latest, checkpointed(abstract))
            state = restored if lo is None else restored.replace(params={**state.params, "lora": restored.params["lora"]})
            log.info("resumed from %s at step %d", ckpt.directory, latest)
        start = int(state.step)

        # 7. Compile once, then the shared training loop (logging, evals, checkpoints, preemption, watchdog).
        if start < t.steps:
            batches = sft.RowBatches(train_rows, t.batch_size, t.seed, start)
            step_fn = make_finetune_step(make(dropout), tx, trainable, optim.schedule(config.optim, t.steps), accum)
            first = global_batch(next(batches), mesh)
            compiled = jax.jit(step_fn, donate_argnums=0).lower(state, first).compile()
            loop = Loop(config, run_dir, ckpt, mesh, evaluate, checkpointed)
            if start_eval:
                loop.writer.write(0, start_eval)
            state, summary = loop.run(compiled, state, first, batches, start)
        else:
            log.info("the run is already complete at step %d (train.steps=%d); writing its outputs", start, t.steps)
            ckpt.close()
            summary = {"run_dir": run_dir, "step": start, "checkpoints": ckpt.directory, "stopped_by": None}
        summary.update(data=report.summary(), base_mib=base_bytes / 2**20, run_dir=run_dir)
        evals = {k[5:]: v for k, v in summary.items() if k.startswith("eval/")}
        if evals:
            summary["eval"] = evals
        if start_eval:
            summary["eval_before"] = {k[5:]: v for k, v in start_eval.items()}
        if summary["stopped_by"]:
            return summary  # a checkpoint holds the position; the same command resumes

        # 8. Outputs: adapters on their own, and the merged model for generate and export.
        if lo is not None:
            adapters = multihost_utils.process_allgather(state.params["lora"], tiled=True)  # every host takes part
            if primary:
                lora_lib.save_adapters(os.path.join(run_dir, ADAPTER_DIR), adapters, config.lora)
            summary["adapters"] = os.path.join(run_dir, ADAPTER_DIR)
            if config.finetune.save_merged:
                from jaxlm.quantize import dequantize_params

                merged = dequantize_params(jax.jit(lo.merge)(state.params["base"], state.params["lora"]))
                save_merged(config, model_dir, merged, t.steps)  # QLoRA: the saved model is a plain float one
                summary["checkpoint"] = model_dir
        else:
            summary["checkpoint"] = ckpt.directory
    return summary


def _copy_tokenizer(path: str, run_dir: str) -> None:
    """Copies the tokenizer into the run directory (atomically), unless it is there already."""
    from jaxlm.data import tokenizer as tokenizer_lib

    if path:
        tokenizer_lib.copy_into(path, run_dir)


def _reference(config: Config, state, apply_fn):
    """(params, apply) of the frozen DPO reference: another run, else the starting model (the base alone for LoRA)."""
    if config.finetune.reference:
        from jaxlm.inference import load_run

        ref = load_run(config.finetune.reference)
        return ref.params, ref.model.apply
    # Computed before the first step, so the current params are the starting model (for LoRA: B = 0, the base).
    return state.params, apply_fn


def _evaluate(eval_loss, params, rows, batch_size: int, mesh) -> dict[str, float]:
    """{"eval/loss", and the loss's other metrics}: means over the whole batches of the held-out rows."""
    n = len(next(iter(rows.values())))
    local = sft.process_rows(batch_size)
    values, sums = [], {}
    for i in range(0, n - batch_size + 1, batch_size):
        batch = {k: v[i:i + batch_size][local] for k, v in rows.items()}
        value, metrics = jax.device_get(eval_loss(params, global_batch(batch, mesh)))
        values.append(float(value))
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    out = {f"eval/{k}": v / max(len(values), 1) for k, v in sums.items() if k not in ("tokens", "weight")}
    out["eval/loss"] = float(np.mean(values)) if values else float("nan")
    return out


def _nbytes(tree) -> int:
    """Bytes of the arrays in a pytree; a quantized weight counts its codes and scales."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def save_merged(config: Config, directory: str, params, step: int) -> None:
    """The merged model as a jaxlm checkpoint at `step` (params only, no optimizer state); kept if already there."""
    state = TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=optax.EmptyState(),
                       rng=jax.random.key_data(jax.random.key(config.train.seed)))
    ckpt = Checkpointer(directory, dataclasses.replace(config.checkpoint, async_save=False))
    if step not in ckpt.manager.all_steps():
        ckpt.save(step, state, None, to_dict(config), force=True)
    ckpt.close()
