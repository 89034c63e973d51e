"""`jaxlm peft export` and `jaxlm peft import`: LoRA adapters to and from the Hugging Face peft library."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("peft", help="export or import PEFT LoRA adapters",
                              description="Move LoRA adapters between jaxlm and the Hugging Face peft library "
                                          "(adapter_config.json + adapter_model.safetensors; LLaMA-family models).")
    peft_sub = p.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    q = peft_sub.add_parser("export", help="a LoRA finetuning run's adapters -> PEFT adapter directory",
                            description="Write <run>/adapters as a PEFT adapter that peft loads onto the base "
                                        "model exported with `jaxlm convert to-hf` (or the original HF model).")
    q.add_argument("run_dir", help="a run directory written by `jaxlm finetune` with lora.targets set")
    q.add_argument("out", help="the adapter directory to create (must not exist or be empty)")
    q.add_argument("--base-model", default="", help="base_model_name_or_path to record in adapter_config.json")
    q.set_defaults(func=export)
    q = peft_sub.add_parser("import", help="PEFT adapter + jaxlm base run -> run directory with it merged",
                            description="Read a PEFT LoRA adapter (rsLoRA too; not DoRA) for a base run directory "
                                        "(e.g. from `jaxlm convert from-hf`) and write a new run directory with "
                                        "the adapter merged in and saved in jaxlm's format under adapters/.")
    q.add_argument("adapter_dir", help="the PEFT adapter directory")
    q.add_argument("base_run", help="the jaxlm run directory of the base model")
    q.add_argument("out", help="the run directory to create (must not exist or be empty)")
    q.set_defaults(func=import_adapter)


def export(args) -> int:
    from jaxlm.conversion import peft_runs

    out = peft_runs.export_run(args.run_dir, args.out, args.base_model)
    print(f"PEFT adapter: {out}  (peft.PeftModel.from_pretrained(base_model, {out!r}))")
    return 0


def import_adapter(args) -> int:
    from jaxlm.conversion import peft_runs

    out = peft_runs.import_run(args.adapter_dir, args.base_run, args.out)
    print(f"run directory: {out}  (the base with the adapter merged; the adapter itself in {out}/adapters)")
    return 0
