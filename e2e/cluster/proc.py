"""Daemon processes identified by PID and start time, so a reused PID is never mistaken for ours."""

import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# Children started by this Python process, kept so they can be reaped instead of lingering as zombies.
_children: dict[int, subprocess.Popen] = {}


@dataclass(frozen=True)
class Proc:
    name: str
    pid: int
    start_time: int  # /proc/<pid>/stat field 22, in clock ticks since boot

    def to_json(self) -> dict:
        return asdict(self)


def start_time(pid: int) -> int | None:
    """The process's start time, or None when it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its closing one.
    fields = stat[stat.rindex(")") + 2:].split()
    state, started = fields[0], int(fields[19])
    return None if state in ("Z", "X") else started


def reap(pid: int) -> None:
    """Collect our own exited child so it does not linger as a zombie."""
    if pid in _children and _children[pid].poll() is not None:
        del _children[pid]


def alive(proc: Proc) -> bool:
    reap(proc.pid)
    return start_time(proc.pid) == proc.start_time


def spawn(name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> Proc:
    """Start argv detached in its own session (it outlives the caller), output appended to log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True, env={**os.environ, **(env or {})})
    _children[child.pid] = child
    started = start_time(child.pid)
    return Proc(name, child.pid, started if started is not None else -1)


def stop(procs: list[Proc], timeout: float = 15.0) -> list[Proc]:
    """Stop each process in turn (SIGTERM, SIGKILL after timeout); return any still alive after.

    One at a time because a server whose backend vanished under it (the API server without
    etcd) spends its whole grace period retrying.
    """
    return [p for p in procs if not _stop_one(p, timeout)]


def _stop_one(proc: Proc, timeout: float) -> bool:
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        if not alive(proc):
            return True
        _signal(proc, sig)
        deadline = time.monotonic() + wait
        while alive(proc) and time.monotonic() < deadline:
            time.sleep(0.05)
    return not alive(proc)


def _signal(proc: Proc, sig: int) -> None:
    try:
        os.kill(proc.pid, sig)
    except ProcessLookupError:
        pass


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"(no log at {path})"
