"""Cost of the per-step cross-host agreement (jaxlm.core.distributed.Agreement) that makes SIGTERM on any host
stop every host at the same step: N processes on loopback, each agreeing R times; prints the latency.

    .venv/bin/python bench/agreement.py --processes 2 --rounds 300

On a pod the coordinator is one RPC hop away instead of loopback; the figure here is the floor. With
`distributed.sync_every=1` it is paid once per step, on the host only (the device keeps computing).
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time


def worker(pid: int, count: int, port: int, rounds: int) -> None:
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    from jaxlm.core import distributed
    from jaxlm.core.config import DistributedConfig

    distributed.initialize(DistributedConfig(coordinator_address=f"127.0.0.1:{port}", num_processes=count,
                                             process_id=pid, init_timeout_s=60))
    agree = distributed.Agreement(timeout_s=60)
    times = []
    for step in range(1, rounds + 1):
        began = time.perf_counter()
        flags, _ = agree(step, 1 if (pid == count - 1 and step == rounds) else 0)
        times.append(time.perf_counter() - began)
    assert flags == 1  # the last round's stop request reached every process
    if pid == 0:
        times = sorted(times[10:])  # skip warm-up
        print(f"{count} processes, {len(times)} agreements: median {statistics.median(times) * 1e3:.2f} ms, "
              f"p90 {times[int(0.9 * len(times))] * 1e3:.2f} ms, max {times[-1] * 1e3:.2f} ms per step")
    jax.distributed.shutdown()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        worker(args.worker, args.processes, args.port, args.rounds)
        return 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, __file__, "--processes", str(args.processes), "--rounds",
                               str(args.rounds), "--worker", str(i), "--port", str(port)])
             for i in range(args.processes)]
    return max(p.wait() for p in procs)


if __name__ == "__main__":
    sys.exit(main())
