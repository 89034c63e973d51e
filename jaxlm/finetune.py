"""`jaxlm finetune`: SFT or DPO of a base model, fully or through LoRA / QLoRA, top to bottom.

config -> base model and tokenizer -> chat template -> data (bad rows counted) -> mesh -> state (base
params, adapters, optimizer with the trainable mask) -> [DPO: reference log-probs] -> compiled step ->
loop -> adapters, merged checkpoint (a run directory that `jaxlm generate` and `jaxlm convert to-hf` read).
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlm import attention, chat, dpo, lora as lora_lib, mesh as mesh_lib, optim, sft, sharded_init
from jaxlm.checkpoint import Checkpointer
from jaxlm.config import Config, ConfigError
from jaxlm.metrics import MetricsWriter
from jaxlm.model import Transformer
from jaxlm.overrides import to_dict
from jaxlm.sharding import batch_divisor, global_batch
from jaxlm.train import run_dir_of, write_json_atomic
from jaxlm.train_step import TrainState, make_finetune_step

log = logging.getLogger("jaxlm.finetune")
ADAPTER_DIR = "adapters"


@dataclasses.dataclass
class Base:
    config: Config  # with the base model's ModelConfig
    params: dict | None  # None: start from random weights
    tokenizer: object  # sentencepiece-like: encode, bos_id, eos_id
    tokenizer_path: str
    model_dir: str  # where its chat template and tokenizer files live ("" for none)


def load_base(config: Config, run_dir: str) -> Base:
    """The starting model: a jaxlm run directory, hf:DIR (converted once into <run>/base), or random weights."""
    from jaxlm.data import tokenizer as tokenizer_lib
    from jaxlm.hf import tokenizer as hf_tokenizer
    from jaxlm.inference import load_run

    ref = config.finetune.base or config.model.init_from
    if ref.startswith("hf:"):
        from jaxlm.hf import importer

        converted = os.path.join(run_dir, "base")
        if not os.path.isdir(converted):
            importer.convert(importer.hf_dir_of(ref), converted)
        ref = converted
    if ref:
        run = load_run(ref)
        tok_name = hf_tokenizer.copy_files(ref, run_dir)  # tokenizer and template travel with the finetuned run
        # The base fixes the shape and parameter layout; how to compute (dtype, remat, kernel) is this run's choice.
        m = config.model
        model = dataclasses.replace(run.config.model, dtype=m.dtype, remat=m.remat, attention=m.attention, init_from="")
        config = dataclasses.replace(config, model=model)
        return Base(config, run.params, run.tokenizer, os.path.join(run_dir, tok_name or ""), ref)
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
    """(state, apply_fn, trainable key, tx, lora or None): the sharded train state for full or LoRA finetuning."""
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
    state = sharded_init.materialize(init, abstract)
    if base_params is not None:
        if c.quantize != "none":
            from jaxlm.quantize import quantize_params

            base_params = quantize_params(base_params, c.quantize, c.block_size)
        target = abstract.params if lo is None else abstract.params["base"]
        base_params = jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), base_params, target)
        state = state.replace(params=base_params if lo is None else {**state.params, "base": base_params})
    return state, apply_fn, trainable, tx, lo


def finetune(config: Config) -> dict:
    """Finetunes per `config` (config.task is sft or dpo). Returns a summary of the run."""
    if config.task not in ("sft", "dpo"):
        raise ConfigError(f"task={config.task!r}: jaxlm finetune runs task=sft or task=dpo")
    if config.optim.grad_accum != 1:
        raise ConfigError("optim.grad_accum must be 1 for finetuning; lower train.batch_size instead")
    run_dir = run_dir_of(config)
    os.makedirs(run_dir, exist_ok=True)
    base = load_base(config, run_dir)
    config = base.config
    t = config.train
    if t.seq_len > config.model.max_seq_len:
        raise ConfigError(f"train.seq_len={t.seq_len} exceeds the base model's max_seq_len={config.model.max_seq_len}")
    write_json_atomic(os.path.join(run_dir, "config.json"), to_dict(config))
    # The run directory carries its tokenizer, so that generate and export need nothing else.
    name = "tokenizer.json" if base.tokenizer_path.endswith(".json") else "tokenizer.model"
    if base.tokenizer_path and os.path.abspath(base.tokenizer_path) != os.path.join(run_dir, name):
        import shutil

        shutil.copyfile(base.tokenizer_path, os.path.join(run_dir, f"{name}.tmp"))
        os.replace(os.path.join(run_dir, f"{name}.tmp"), os.path.join(run_dir, name))

    # Chat template: the given file, the base model's, or ChatML. Sentencepiece models get their BOS first.
    tok = base.tokenizer
    is_sp = type(tok).__name__ == "SentencePieceProcessor"
    template = chat.load(config.finetune.chat_template, base.model_dir,
                         prefix_ids=(tok.bos_id(),) if is_sp and tok.bos_id() >= 0 else ())
    with open(os.path.join(run_dir, "chat_template.jinja.tmp"), "w", encoding="utf-8") as f:
        f.write(template.source)
    os.replace(os.path.join(run_dir, "chat_template.jinja.tmp"), os.path.join(run_dir, "chat_template.jinja"))
    train_rows, eval_rows, report = build_data(config, template, tok, t.seq_len)

    mesh = mesh_lib.make_mesh(config.mesh)
    if t.batch_size % batch_divisor(mesh):
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by the {batch_divisor(mesh)}-way "
                          f"batch sharding (mesh data*fsdp*expert); change one of them")
    model = Transformer(config.model, attention.resolve(config.model.attention))
    dropout = bool(config.lora.targets) and config.lora.dropout > 0
    with jax.set_mesh(mesh):
        state, apply_fn, trainable, tx, lo = build_state(config, model, base.params, mesh)
        base_bytes = _nbytes(state.params if lo is None else state.params["base"])
        log.info("base params %.1f MiB%s", base_bytes / 2**20,
                 f" ({config.lora.quantize})" if config.lora.quantize != "none" else "")
        if config.task == "dpo":
            ref_params, ref_apply = _reference(config, state, apply_fn)
            for rows in (train_rows, eval_rows):
                if rows is not None:
                    dpo.fill_reference(ref_apply, ref_params, rows, t.batch_size, t.progress)
            make = lambda drop: dpo.make_loss(apply_fn, config.finetune.beta, drop)
        else:
            make = lambda drop: sft.make_loss(apply_fn, drop)
        loss, no_dropout = make(dropout), make(False)
        eval_loss = jax.jit(lambda p, b: no_dropout(p, b, None))
        evaluate = (lambda params: _evaluate(eval_loss, params, eval_rows, t.batch_size, mesh)) if eval_rows else None
        start_eval = evaluate(state.params) if evaluate else None
        step_fn = jax.jit(make_finetune_step(loss, tx, trainable, optim.schedule(config.optim, t.steps)),
                          donate_argnums=0)
        summary = _loop(config, run_dir, step_fn, state, train_rows, mesh, evaluate)
        state = summary.pop("state")
        summary.update(eval_before=start_eval, data=report.summary(), run_dir=run_dir, base_mib=base_bytes / 2**20)
        if lo is not None:
            lora_lib.save_adapters(os.path.join(run_dir, ADAPTER_DIR), jax.device_get(state.params["lora"]), config.lora)
            summary["adapters"] = os.path.join(run_dir, ADAPTER_DIR)
        if config.finetune.save_merged:
            from jaxlm.quantize import dequantize_params

            merged = state.params if lo is None else jax.jit(lo.merge)(state.params["base"], state.params["lora"])
            merged = dequantize_params(merged)  # QLoRA: the saved model is a plain float one
            save_merged(config, run_dir, merged, t.steps)
            summary["checkpoint"] = os.path.join(run_dir, "checkpoints")
    return summary


def _reference(config: Config, state, apply_fn):
    """(params, apply) of the frozen DPO reference: another run, else the starting model (the base alone for LoRA)."""
    if config.finetune.reference:
        from jaxlm.inference import load_run

        ref = load_run(config.finetune.reference)
        return ref.params, ref.model.apply
    # Computed before the first step, so the current params are the starting model (for LoRA: B = 0, the base).
    return state.params, apply_fn


def _evaluate(eval_loss, params, rows, batch_size: int, mesh) -> dict:
    n = len(next(iter(rows.values())))
    values, sums = [], {}
    for i in range(0, n - batch_size + 1, batch_size):
        value, metrics = jax.device_get(eval_loss(params, global_batch({k: v[i:i + batch_size] for k, v in rows.items()}, mesh)))
        values.append(float(value))
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    out = {k: v / max(len(values), 1) for k, v in sums.items() if k != "tokens"}
    out["loss"] = float(np.mean(values)) if values else float("nan")
    return out


def _loop(config: Config, run_dir: str, step_fn, state, rows, mesh, evaluate) -> dict:
    from tqdm import tqdm

    t = config.train
    writer = MetricsWriter(run_dir)
    batches = sft.batches(rows, t.batch_size, t.seed)
    bar = tqdm(total=t.steps, unit="step", disable=not t.progress or jax.process_index() != 0, dynamic_ncols=True)
    pending, window, last, t0, first = None, [], {}, time.perf_counter(), None
    try:
        for step in range(1, t.steps + 1):
            state, metrics = step_fn(state, global_batch(next(batches), mesh))
            if pending is not None:  # read the previous step's metrics: this one is already queued
                last = _read(*pending, config)
                if last["step"] > 1:  # step 1 includes compilation; it is timed on its own
                    window.append(last)
            pending = (step, metrics)
            if step == 1:
                jax.block_until_ready(state)
                first, t0 = time.perf_counter() - t0, time.perf_counter()
            if step % t.log_every == 0 and window:
                _log(writer, bar, window, step - 1, time.perf_counter() - t0)
                window, t0 = [], time.perf_counter()
            bar.update(1)
        last = _read(*pending, config)
        window += [last] if last["step"] > 1 else []
        if window:
            _log(writer, bar, window, t.steps, time.perf_counter() - t0)
        summary = {"state": state, "step": t.steps, **{k: v for k, v in last.items() if k != "step"},
                   "compile_and_first_step_s": first}
        if evaluate:
            summary["eval"] = evaluate(state.params)
            writer.write(t.steps, {f"eval/{k}": v for k, v in summary["eval"].items()})
    finally:
        bar.close()
        writer.close()
    return summary


def _read(step: int, metrics, config: Config) -> dict:
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not m["finite"]:
        from jaxlm.train import NonFiniteError

        raise NonFiniteError(f"non-finite loss or gradient at step {step} (loss={m['loss']}); the update was not "
                             f"applied. Lower optim.lr")
    return {"step": step, **m}


def _log(writer, bar, window: list[dict], step: int, seconds: float) -> None:
    """Writes the window's mean metrics and tokens/s (steps read one late, so the rate is approximate)."""
    keys = [k for k in window[-1] if k not in ("step", "finite")]
    mean = {k: float(np.mean([w[k] for w in window])) for k in keys}
    tokens_per_s = sum(w["tokens"] for w in window) / max(seconds, 1e-9)
    writer.write(step, {f"train/{k}": v for k, v in mean.items() if k != "tokens"} | {"perf/tokens_per_s": tokens_per_s})
    extra = f" | margin {mean['margin']:.3f} | acc {mean['reward_accuracy']:.2f}" if "margin" in mean else ""
    bar.set_postfix_str(f"loss {mean['loss']:.3f}{extra} | {tokens_per_s:,.0f} tok/s")


def _nbytes(tree) -> int:
    """Bytes of the arrays in a pytree; a quantized weight counts its codes and scales."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def save_merged(config: Config, run_dir: str, params, step: int) -> None:
    """The merged model as a jaxlm checkpoint at `step` (params only, no optimizer state)."""
    state = TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=optax.EmptyState(),
                       rng=jax.random.key_data(jax.random.key(config.train.seed)))
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), dataclasses.replace(config.checkpoint, async_save=False))
    ckpt.save(step, state, None, to_dict(config), force=True)
    ckpt.close()
