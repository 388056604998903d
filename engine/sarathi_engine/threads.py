"""How many threads the engine's arithmetic may use.

The CPUs this process may run on (its affinity mask), capped by its cgroup's CPU quota (a
Kubernetes CPU limit), shared evenly by the ranks a pod runs. Torch's own default counts every
core of the machine: in a pod limited to 4 CPUs on a 64-core node, 64 threads in lockstep would
spend most of each step waiting for the ones the quota has throttled. OMP_NUM_THREADS, when set,
is the user's word and wins.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def quota_from_cpu_max(text: str) -> float | None:
    """cgroup v2's cpu.max ("max 100000" or "200000 100000") as CPUs, None when unlimited."""
    quota, _, period = text.strip().partition(" ")
    if quota == "max" or not period:
        return None
    return int(quota) / int(period)


def quota_from_cfs(quota_us: str, period_us: str) -> float | None:
    """cgroup v1's cpu.cfs_quota_us / cpu.cfs_period_us as CPUs, None when unlimited (-1)."""
    quota = int(quota_us.strip())
    return None if quota <= 0 else quota / int(period_us.strip())


def cgroup_dirs(proc_cgroup: str, root: Path = CGROUP_ROOT) -> list[Path]:
    """The folders whose CPU quota applies to this process, from /proc/self/cgroup: its own
    cgroup and every parent (a parent's limit binds too)."""
    dirs = []
    for line in proc_cgroup.splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: the unified hierarchy (beside v1's in hybrid mode)
            base = root if (root / "cgroup.controllers").exists() else root / "unified"
        elif "cpu" in controllers.split(","):  # v1
            base = root / controllers if (root / controllers).is_dir() else root / "cpu"
        else:
            continue
        parts = Path(path).parts[1:]
        dirs += [base.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]
    return dirs


def cgroup_quota(own: str | None = None, root: Path = CGROUP_ROOT) -> float | None:
    """The tightest CPU quota over this process's cgroups (`own`: /proc/self/cgroup's text), in
    CPUs; None when there is none."""
    if own is None:
        try:
            own = Path("/proc/self/cgroup").read_text()
        except OSError:
            return None
    quotas = []
    for folder in cgroup_dirs(own, root):
        try:
            if (folder / "cpu.max").exists():
                quotas.append(quota_from_cpu_max((folder / "cpu.max").read_text()))
            elif (folder / "cpu.cfs_quota_us").exists():
                quotas.append(quota_from_cfs((folder / "cpu.cfs_quota_us").read_text(),
                                             (folder / "cpu.cfs_period_us").read_text()))
        except (OSError, ValueError):
            continue
    quotas = [q for q in quotas if q is not None]
    return min(quotas) if quotas else None


def usable_cpus(affinity: int | None = None, quota: float | None = None) -> int:
    """CPUs this process can keep busy: its affinity, capped by the quota (rounded down: a thread
    on a fraction of a CPU holds back every other thread of a parallel region)."""
    cpus = affinity if affinity is not None else len(os.sched_getaffinity(0))
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return max(1, cpus)


def threads_per_rank(ranks_per_pod: int) -> int:
    return max(1, usable_cpus(quota=cgroup_quota()) // ranks_per_pod)


def set_engine_threads(ranks_per_pod: int = 1) -> int:
    """Give torch this rank's share of the usable CPUs, unless OMP_NUM_THREADS says otherwise;
    the count in use."""
    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(threads_per_rank(ranks_per_pod))
    return torch.get_num_threads()
