"""The engine's thread count: affinity capped by the cgroup CPU quota, shared by a pod's ranks."""
from __future__ import annotations

from sarathi_engine import threads


def test_quota_files():
    assert threads.quota_from_cpu_max("max 100000\n") is None
    assert threads.quota_from_cpu_max("250000 100000\n") == 2.5
    assert threads.quota_from_cfs("-1\n", "100000\n") is None
    assert threads.quota_from_cfs("50000\n", "100000\n") == 0.5


def test_usable_cpus_rounds_a_quota_down_and_never_below_one():
    assert threads.usable_cpus(affinity=64, quota=None) == 64
    assert threads.usable_cpus(affinity=64, quota=4.0) == 4
    assert threads.usable_cpus(affinity=64, quota=2.5) == 2
    assert threads.usable_cpus(affinity=2, quota=8.0) == 2
    assert threads.usable_cpus(affinity=8, quota=0.5) == 1


def test_the_tightest_quota_of_the_process_cgroup_and_its_parents(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    pod = tmp_path / "kubepods" / "pod1"
    container = pod / "c1"
    container.mkdir(parents=True)
    (tmp_path / "kubepods" / "cpu.max").write_text("max 100000\n")
    (pod / "cpu.max").write_text("300000 100000\n")
    (container / "cpu.max").write_text("max 100000\n")
    dirs = threads.cgroup_dirs("0::/kubepods/pod1/c1\n", tmp_path)
    assert dirs == [container, pod, tmp_path / "kubepods", tmp_path]
    assert threads.cgroup_quota("0::/kubepods/pod1/c1\n", tmp_path) == 3.0
    (container / "cpu.max").write_text("150000 100000\n")
    assert threads.cgroup_quota("0::/kubepods/pod1/c1\n", tmp_path) == 1.5
    assert threads.cgroup_quota("0::/elsewhere\n", tmp_path) is None


def test_cgroup_v1_cpu_controller_paths(tmp_path):
    (tmp_path / "cpu,cpuacct").mkdir()
    dirs = threads.cgroup_dirs("4:memory:/x\n3:cpu,cpuacct:/kubepods/pod1\n", tmp_path)
    assert dirs == [tmp_path / "cpu,cpuacct" / "kubepods" / "pod1", tmp_path / "cpu,cpuacct" / "kubepods",
                    tmp_path / "cpu,cpuacct"]
    (tmp_path / "cpu,cpuacct" / "kubepods").mkdir()
    (tmp_path / "cpu,cpuacct" / "kubepods" / "cpu.cfs_quota_us").write_text("200000\n")
    (tmp_path / "cpu,cpuacct" / "kubepods" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.cgroup_quota("3:cpu,cpuacct:/kubepods/pod1\n", tmp_path) == 2.0
