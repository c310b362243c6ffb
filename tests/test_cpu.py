"""The CPU budget (handlers/cpu.py): cgroup v1 and v2 quotas (ancestors included) and CPU affinity decide the
worker thread count, not the machine's core count."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from handlers.cpu import cgroup_cpu_limit
from tests.torchserve import ROOT


def fake_proc(tmp: Path, cgroup: str, mounts: list[tuple[str, str, str, str]]) -> Path:
    """/proc/self/{cgroup,mountinfo} with cgroup mounts (point, root, fstype, super options) under tmp."""
    proc = tmp / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup)
    lines = [f"{30 + i} 23 0:{28 + i} {root} {point} rw,relatime - {fstype} {fstype} {opts}"
             for i, (point, root, fstype, opts) in enumerate(mounts)]
    (proc / "mountinfo").write_text("22 1 8:1 / / rw - ext4 /dev/root rw\n" + "\n".join(lines) + "\n")
    return proc


def test_cgroup_v2_quota_of_the_process_group_and_its_parents(tmp_path):
    fs = tmp_path / "cgroup"
    (fs / "kubepods" / "pod1").mkdir(parents=True)
    (fs / "cpu.max").write_text("max 100000\n")
    (fs / "kubepods" / "cpu.max").write_text("300000 100000\n")            # 3 CPUs for all pods
    (fs / "kubepods" / "pod1" / "cpu.max").write_text("150000 100000\n")   # 1.5 for this one
    proc = fake_proc(tmp_path, "0::/kubepods/pod1\n", [(str(fs), "/", "cgroup2", "rw")])
    assert cgroup_cpu_limit(proc) == 1.5
    (fs / "kubepods" / "pod1" / "cpu.max").write_text("max 100000\n")      # no own limit: the parent's binds
    assert cgroup_cpu_limit(proc) == 3.0
    (fs / "kubepods" / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(proc) is None


def test_cgroup_v1_quota_from_the_cpu_controller(tmp_path):
    cpu, mem = tmp_path / "cpu,cpuacct", tmp_path / "memory"
    (cpu / "docker" / "abc").mkdir(parents=True)
    mem.mkdir()
    (cpu / "cpu.cfs_quota_us").write_text("-1\n")
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    (cpu / "docker" / "abc" / "cpu.cfs_quota_us").write_text("200000\n")
    (cpu / "docker" / "abc" / "cpu.cfs_period_us").write_text("100000\n")
    proc = fake_proc(tmp_path, "5:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n",
                     [(str(mem), "/", "cgroup", "rw,memory"), (str(cpu), "/", "cgroup", "rw,cpu,cpuacct")])
    assert cgroup_cpu_limit(proc) == 2.0
    # A cgroup namespace shows the group as "/" with the mount's root at the group: the mount point's own files.
    proc2 = tmp_path / "ns"
    proc2.mkdir()
    (proc2 / "cgroup").write_text("3:cpu,cpuacct:/\n")
    (proc2 / "mountinfo").write_text(f"40 23 0:40 /docker/abc {cpu / 'docker' / 'abc'} rw - cgroup cgroup rw,cpu\n")
    assert cgroup_cpu_limit(proc2) == 2.0


def test_no_cgroup_information_means_no_limit(tmp_path):
    assert cgroup_cpu_limit(tmp_path / "missing") is None


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset (util-linux)")
def test_handler_threads_follow_cpu_affinity():
    """Pinned to one CPU, a single worker gets one thread, not one per core of the machine."""
    code = ("import sys; sys.path.insert(0, '.'); from handlers.adapter import cpu_threads; "
            "print(cpu_threads(None, {'maxWorkers': 1}), cpu_threads(None, {'maxWorkers': 4}))")
    env = {"PATH": "/usr/bin:/bin"}  # no OMP_NUM_THREADS from the test runner
    r = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "1"]
