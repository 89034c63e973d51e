"""Runs untrusted (model-written) Python in a child process that cannot outlive its timeout.

The child gets a fresh temporary directory, an isolated interpreter (`python -I`: no site-packages of
the user, no PYTHON* variables), an empty environment, no stdin, and resource limits on CPU time, memory,
file size and core dumps. It runs in its own session, and the whole process group is killed when the
time is up or the program ends, so grandchildren die too.

This is process isolation, not a security boundary: code that calls setsid() itself can escape the group,
and the file system and network are those of the user. Run untrusted evaluations in a container or VM.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import tempfile

MEMORY_LIMIT = 2 << 30
OUTPUT_LIMIT = 1 << 20


@dataclasses.dataclass(frozen=True)
class Outcome:
    passed: bool  # exited with status 0 within the timeout
    timed_out: bool
    returncode: int | None
    output: str  # the last part of stdout + stderr


# The child sets its own limits and then replaces itself with the program's interpreter: limits set in a
# preexec_fn would need a fork of this (multithreaded, JAX-running) process, which can deadlock.
_LIMITED_EXEC = """
import os, resource, sys
cpu, memory, fsize, path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
for limit, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, memory), (resource.RLIMIT_FSIZE, fsize),
                     (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
os.execv(sys.executable, [sys.executable, "-I", "-B", path])
"""


def run_python(program: str, timeout: float = 10.0) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="jaxlm-sandbox-") as workdir:
        path = os.path.join(workdir, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        limits = [str(int(timeout) + 1), str(MEMORY_LIMIT), str(OUTPUT_LIMIT * 10), path]
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _LIMITED_EXEC, *limits], cwd=workdir,
            env={"PATH": "/usr/bin:/bin", "HOME": workdir},
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
        timed_out = False
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid)
            out, _ = proc.communicate()
        finally:
            _kill_group(proc.pid)  # children left behind by a program that already exited
        text = out.decode("utf-8", errors="replace")[-4000:]
        return Outcome(proc.returncode == 0 and not timed_out, timed_out, None if timed_out else proc.returncode,
                       text)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
