"""Running untrusted generated Python: a fresh interpreter in an empty temporary directory, in its own
session (the whole process group is killed at the wall-clock limit), with CPU-time, address-space, file-size
and core limits, a minimal environment, and no network: a new network namespace where the kernel allows one
(`unshare -n`), else a guard that replaces the socket constructors before the program runs.

It is a fence against accidents of generated code (endless loops, memory bombs, stray writes, network
calls), not a security boundary against a determined attacker: run evaluations on a machine you can lose.
"""
from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

SOCKET_GUARD = """\
import socket as _idlm_socket
def _idlm_no_network(*args, **kwargs):
    raise OSError("network access is disabled in the idlm sandbox")
_idlm_socket.socket = _idlm_socket.create_connection = _idlm_socket.getaddrinfo = _idlm_no_network
del _idlm_socket, _idlm_no_network
"""


@dataclass(frozen=True)
class SandboxResult:
    status: str  # passed | failed | timeout
    seconds: float
    detail: str = ""  # the last line of stderr for a failure

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.cache
def network_isolation() -> str:
    """`namespace` when `unshare -n` works here (root or user namespaces), else `guard`."""
    tool = shutil.which("unshare")
    if tool is None:
        return "guard"
    try:
        ok = subprocess.run([tool, "-n", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return "namespace" if ok else "guard"


def _limits(cpu_seconds: int, memory_bytes: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_python(program: str, timeout: float = 10.0, memory_mb: int = 1024) -> SandboxResult:
    """Run `program` with the limits above; `passed` when it exits with status 0 within `timeout` seconds."""
    isolation = network_isolation()
    cmd = [sys.executable, "-I", "-c", program if isolation == "namespace" else SOCKET_GUARD + program]
    if isolation == "namespace":
        cmd = [shutil.which("unshare") or "unshare", "-n"] + cmd
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="idlm-sandbox-") as cwd:
        env = {"PATH": os.defpath, "HOME": cwd, "TMPDIR": cwd, "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True, preexec_fn=functools.partial(_limits, int(timeout) + 1, memory_mb << 20),
        )
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return SandboxResult("timeout", time.perf_counter() - t0, f"no exit within {timeout:g} s")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    seconds = time.perf_counter() - t0
    if proc.returncode == 0:
        return SandboxResult("passed", seconds)
    lines = err.decode("utf-8", "replace").strip().splitlines()
    if proc.returncode < 0:
        detail = f"killed by signal {-proc.returncode}" + (" (CPU time limit)" if -proc.returncode == signal.SIGXCPU else "")
    else:
        detail = lines[-1][:300] if lines else f"exit status {proc.returncode}"
    return SandboxResult("failed", seconds, detail)
