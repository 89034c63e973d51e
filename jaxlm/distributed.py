"""Multi-process start-up: `jax.distributed.initialize` when the environment says there are many hosts.

Single-process runs (a laptop, one GPU, one TPU VM host) skip it. An explicit coordinator is given with
JAXLM_COORDINATOR_ADDRESS, JAXLM_NUM_PROCESSES and JAXLM_PROCESS_ID; multi-host Cloud TPU VMs and SLURM
jobs are detected by JAX itself.
"""

from __future__ import annotations

import os

import jax

from jaxlm.config import ConfigError


def _multi_host_environment() -> bool:
    tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
    return "," in tpu_hosts or slurm_tasks > 1


def initialize(timeout_s: int = 300) -> None:
    address = os.environ.get("JAXLM_COORDINATOR_ADDRESS")
    if address:
        try:
            num, pid = int(os.environ["JAXLM_NUM_PROCESSES"]), int(os.environ["JAXLM_PROCESS_ID"])
        except (KeyError, ValueError):
            raise ConfigError(
                "JAXLM_COORDINATOR_ADDRESS needs integer JAXLM_NUM_PROCESSES and JAXLM_PROCESS_ID"
            ) from None
        jax.distributed.initialize(address, num, pid, initialization_timeout=timeout_s)
    elif _multi_host_environment():
        jax.distributed.initialize(initialization_timeout=timeout_s)
