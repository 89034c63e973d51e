"""Multi-process start-up (`jax.distributed.initialize`) and cross-host agreement at step boundaries.

Where the process group comes from, first match wins:
1. explicit: `distributed.coordinator_address`, `num_processes`, `process_id` in the config, or else the
   environment variables JAXLM_COORDINATOR_ADDRESS, JAXLM_NUM_PROCESSES and JAXLM_PROCESS_ID;
2. a Cloud TPU VM (TPU chips present) or a SLURM job step with more than one task: JAX finds the
   coordinator, process count and id itself (GCE metadata, TPU_WORKER_HOSTNAMES, SLURM_* variables);
3. otherwise one process, and nothing is initialised.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import socket
import time

import jax

from jaxlm.core.config import ConfigError, DistributedConfig

log = logging.getLogger(__name__)

ENV_ADDRESS, ENV_COUNT, ENV_ID = "JAXLM_COORDINATOR_ADDRESS", "JAXLM_NUM_PROCESSES", "JAXLM_PROCESS_ID"
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process joins the group: `method` is explicit, tpu, slurm or single."""

    method: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def _env_int(env, name: str) -> int:
    try:
        return int(env[name])
    except (KeyError, ValueError):
        raise ConfigError(
            f"{ENV_ADDRESS} is set, so {name} must be an integer (it is {env.get(name)!r}); "
            f"set {ENV_COUNT} and {ENV_ID}, or the distributed.* config fields"
        ) from None


def on_tpu_vm() -> bool:
    # TPU chips appear as /dev/accel* (v2-v4) or /dev/vfio/N (v5e, v5p, v6e).
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def detect(config: DistributedConfig, environ=None) -> Launch:
    """Decides how to start, without starting anything (so that it can be tested anywhere)."""
    env = os.environ if environ is None else environ
    address = config.coordinator_address or env.get(ENV_ADDRESS, "")
    if address:
        if config.coordinator_address:
            num, pid = config.num_processes, config.process_id
        else:
            num, pid = _env_int(env, ENV_COUNT), _env_int(env, ENV_ID)
        if num < 1 or not 0 <= pid < num:
            raise ConfigError(
                f"process id {pid} with {num} processes: set distributed.num_processes >= 1 and "
                f"0 <= distributed.process_id < num_processes (or {ENV_COUNT}/{ENV_ID})"
            )
        if ":" not in address:
            raise ConfigError(f"coordinator address {address!r} needs a port, e.g. 10.0.0.2:8476")
        return Launch("explicit", address, num, pid)
    if config.num_processes > 1 or config.process_id >= 0:
        raise ConfigError("distributed.num_processes/process_id need distributed.coordinator_address (host:port)")
    if all(v in env for v in SLURM_VARS) and int(env["SLURM_NTASKS"] or 1) > 1:
        return Launch("slurm")
    if environ is None and on_tpu_vm():
        return Launch("tpu")
    return Launch("single")


def initialize(config: DistributedConfig = DistributedConfig()) -> Launch:
    """Joins the multi-process runtime if there is one. Call before anything touches a device."""
    launch = detect(config)
    if launch.method == "single" or jax.distributed.is_initialized():
        return launch
    # CPU processes need a cross-process collectives backend (tests, and CPU clusters); the accelerator
    # backends have their own, and ignore this setting.
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeout = config.init_timeout_s
    if launch.method == "explicit":
        log.info("joining %d processes through %s as process %d (giving up after %ds)",
                 launch.num_processes, launch.coordinator_address, launch.process_id, timeout)
        if launch.process_id != 0:
            # JAX aborts the whole process (no Python exception) when it cannot reach the coordinator,
            # so find out first, and say so in one line.
            timeout = _wait_for_coordinator(launch.coordinator_address, timeout)
    jax.distributed.initialize(launch.coordinator_address, launch.num_processes, launch.process_id,
                               initialization_timeout=max(int(timeout), 1))
    log.info("joined %d processes (%s); this is process %d with %d local devices", jax.process_count(),
             launch.method, jax.process_index(), jax.local_device_count())
    return launch


def _wait_for_coordinator(address: str, timeout_s: float) -> float:
    """Waits until the coordinator accepts TCP connections; returns the time left of `timeout_s`."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
                return max(deadline - time.monotonic(), 1.0)
        except (OSError, ValueError) as e:
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"cannot reach the coordinator {address} after distributed.init_timeout_s={timeout_s}s "
                    f"({e}); start process 0 first, check the address and port (reachable from every host), "
                    f"or raise the timeout"
                ) from None
        time.sleep(0.5)


def _client():
    from jax._src import distributed as jax_distributed  # the coordination service client Orbax uses too

    return jax_distributed.global_state.client


class Agreement:
    """The bitwise OR of small integer flags over all processes, taken at the same step on every host.

    Each host writes its flags into the coordinator's key-value store and waits at a barrier for the
    others, so that a SIGTERM seen by any one host stops every host at the same step boundary. It is
    host-side only: the device queue keeps running while the hosts agree.
    """

    def __init__(self, timeout_s: float):
        self.timeout_ms = int(timeout_s * 1000)
        self.previous: str | None = None

    def __call__(self, step: int | str, flags: int) -> tuple[int, list[int]]:
        """Returns (OR of all flags, the processes whose flags were non-zero)."""
        if jax.process_count() == 1:
            return flags, [0] if flags else []
        client, me = _client(), jax.process_index()
        prefix = f"jaxlm/agree/{step}"
        client.key_value_set(f"{prefix}/{me}", str(flags))
        try:
            client.wait_at_barrier(prefix, self.timeout_ms)
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(
                f"process {me}: not every host reached the end of step {step} within "
                f"{self.timeout_ms // 1000}s; a host may have died or hung ({str(e).splitlines()[0][:200]})"
            ) from None
        values = {int(k.rsplit("/", 1)[1]): int(v) for k, v in client.key_value_dir_get(f"{prefix}/")}
        # Everyone has passed this barrier, so everyone has read the previous step's keys.
        if me == 0 and self.previous:
            client.key_value_delete(f"{self.previous}/")
        self.previous = prefix
        combined = 0
        for v in values.values():
            combined |= v
        return combined, sorted(p for p, v in values.items() if v)
