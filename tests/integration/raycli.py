"""Start and stop a real multi-node Ray cluster on loopback with the ``ray`` CLI, for tests.

Never ``ray stop`` (it kills every Ray process on the machine): the cluster is
stopped by the PIDs of the processes whose command line names its own temp
directory or GCS port.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def ray_env(**extra) -> dict:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", **extra)
    # Job drivers run `python` from the raylet's PATH: put this interpreter's first.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def ray_cli(*args, timeout=180, env=None) -> subprocess.CompletedProcess:
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    return subprocess.run([ray, *args], capture_output=True, text=True, timeout=timeout, env=env or ray_env())


def pids_of(*needles: str) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(n in cmd for n in needles) and int(d) != os.getpid():
            out.append(int(d))
    return out


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    return kids


def cluster_pids(temp_dir: str, gcs_port: int) -> set[int]:
    """The cluster's processes and all their descendants (agents rename themselves ray::...)."""
    kids = _children()
    todo = pids_of(temp_dir, f":{gcs_port}")
    seen: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid not in seen and pid != os.getpid():
            seen.add(pid)
            todo.extend(kids.get(pid, []))
    return seen


def stop_cluster(temp_dir: str, gcs_port: int, *, grace_s: float = 1.0) -> None:
    """SIGTERM the cluster's processes, then SIGKILL whatever is left after ``grace_s``.

    The grace is short on purpose: the raylets, the GCS and the runtime-env agents of a
    ``ray start`` cluster do not exit on SIGTERM at all (they sat out a 10 s grace every time,
    then died on SIGKILL), and a test cluster has nothing to flush.
    """
    pids = cluster_pids(temp_dir, gcs_port)
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        pids |= cluster_pids(temp_dir, gcs_port)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in pids):
            time.sleep(0.2)
