"""What the project starts, it stops: a process that ignores SIGTERM is killed, its group with it."""
import os
import subprocess
import sys
import time

from kd_sentiment.core import processes

# A parent and a child that both ignore SIGTERM, as a hung server and its worker would.
STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"])
print(child.pid, flush=True)
time.sleep(120)
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def test_a_group_that_ignores_sigterm_is_killed_and_reaped():
    process = subprocess.Popen([sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE, text=True,
                               start_new_session=True)
    child = int(process.stdout.readline())
    started = time.monotonic()
    processes.stop(process, grace_s=1, group=True)
    assert time.monotonic() - started < 10
    assert process.returncode == -9  # killed after the grace, and reaped (returncode is set)
    deadline = time.monotonic() + 5
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child), "the worker outlived its server"
    process.stdout.close()


def test_a_process_that_ended_is_only_reaped():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    while not os.path.exists(f"/proc/{process.pid}") or alive(process.pid):
        time.sleep(0.05)
    processes.stop(process, grace_s=1)
    assert process.returncode == 0
