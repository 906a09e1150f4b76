"""Stopping the processes the project starts (model servers, benchmark workers), always all the way."""
from __future__ import annotations

import os
import signal
import subprocess

GRACE_S = 30  # how long a process gets to finish after being asked to stop, before it is killed


def stop(process: subprocess.Popen, grace_s: float = GRACE_S, group: bool = False) -> None:
    """SIGTERM `process` (its whole process group where `group`: a server that forks workers, started
    with start_new_session=True), wait up to `grace_s`, then SIGKILL and wait: it is never left
    running or unreaped. A process that has already ended is only reaped."""
    def send(sig: int) -> None:
        try:
            os.killpg(process.pid, sig) if group else process.send_signal(sig)
        except ProcessLookupError:  # ended (and, for a group, all of its members) in the meantime
            pass

    if process.poll() is None:
        send(signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        process.wait()
    if group:  # workers that outlived their parent's exit
        send(signal.SIGKILL)
