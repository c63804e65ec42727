"""sds3d/threads.py: OpenMP waiting set before torch loads, and the thread governor of `generate`.

The governor's arithmetic is checked on a fake /proc/stat and fake clocks against hand-computed
figures: what the other processes used = busy time of our CPUs - our own CPU time, per second.
"""

import types

import pytest
import torch

from sds3d import threads
from sds3d.threads import ThreadGovernor, configure_openmp, openmp_waiting


def test_benchmarks_record_how_openmp_waits():
    assert openmp_waiting(configure_openmp({})) == f"GOMP_SPINCOUNT={threads.SPIN_COUNT}"
    assert openmp_waiting({"OMP_WAIT_POLICY": "PASSIVE"}) == "OMP_WAIT_POLICY=PASSIVE"
    assert "default" in openmp_waiting({})


def test_configure_openmp_sets_a_short_spin_unless_the_user_chose():
    assert configure_openmp({}) == {"GOMP_SPINCOUNT": threads.SPIN_COUNT}
    assert configure_openmp({"OMP_WAIT_POLICY": "ACTIVE"}) == {"OMP_WAIT_POLICY": "ACTIVE"}
    assert configure_openmp({"GOMP_SPINCOUNT": "5"}) == {"GOMP_SPINCOUNT": "5"}


def _stat(busy0: int, busy1: int, idle: int = 1000) -> str:
    """A /proc/stat with cpu0/cpu1 busy for busy0/busy1 ticks (all 'user') and `idle` idle ticks each."""
    return (f"cpu  {busy0 + busy1} 0 0 {2 * idle} 0 0 0 0 0 0\n"
            f"cpu0 {busy0} 0 0 {idle} 0 0 0 0 0 0\ncpu1 {busy1} 0 0 {idle} 0 0 0 0 0 0\nintr 1 2 3\n")


@pytest.fixture
def fake_machine(tmp_path, monkeypatch):
    """A 2-CPU machine whose /proc/stat, wall clock and process CPU clock the test sets."""
    clock = types.SimpleNamespace(wall=100.0, own=10.0)
    fake_time = types.SimpleNamespace(monotonic=lambda: clock.wall, process_time=lambda: clock.own,
                                      time=lambda: clock.wall)
    monkeypatch.setattr(threads, "time", fake_time)
    monkeypatch.setattr(threads.os, "sysconf", lambda name: 100 if name == "SC_CLK_TCK" else 0)
    stat = tmp_path / "stat"
    stat.write_text(_stat(0, 0))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield clock, stat
    torch.set_num_threads(before)


def test_governor_follows_the_cores_others_leave(fake_machine):
    clock, stat = fake_machine
    governor = ThreadGovernor(stat=stat)
    governor.cpus = [0, 1]
    # 2 s later: 3.0 CPU-seconds busy on our CPUs (300 ticks), 1.0 of them ours -> others used 1.0 core
    clock.wall, clock.own = 102.0, 11.0
    stat.write_text(_stat(200, 100))
    assert governor.update() == 1 and torch.get_num_threads() == 1
    # the next 2 s: 2.0 busy, all of it ours (one thread on one core) -> the other core is free again
    clock.wall, clock.own = 104.0, 13.0
    stat.write_text(_stat(300, 200))
    assert governor.update() == 2 and torch.get_num_threads() == 2
    # a light neighbour (0.3 of a core) is not worth a thread: 2 - 0.3 + 0.3 rounds down to 2
    clock.wall, clock.own = 106.0, 16.4
    stat.write_text(_stat(500, 440))  # 4.4 s busy, 3.4 ours... others 1.0 s / 2 s = 0.5 core
    assert governor.others() == pytest.approx(0.5)
    clock.wall, clock.own = 108.0, 20.0
    stat.write_text(_stat(700, 620))  # 3.8 s busy, 3.6 ours -> others 0.1 core
    assert governor.update() is None and torch.get_num_threads() == 2  # unchanged
    # never above the count the run started with, and close() restores it
    torch.set_num_threads(1)
    capped = ThreadGovernor(stat=stat)
    capped.cpus = [0, 1]
    clock.wall = 110.0
    stat.write_text(_stat(700, 620))
    assert capped.update() is None and torch.get_num_threads() == 1
    torch.set_num_threads(2)
    governor.close()
    assert torch.get_num_threads() == 2


def test_governor_waits_for_its_interval(fake_machine):
    clock, stat = fake_machine
    governor = ThreadGovernor(stat=stat, interval_s=2.0)
    governor.cpus = [0, 1]
    clock.wall, clock.own = 101.0, 10.0
    stat.write_text(_stat(100, 100))  # a neighbour on both cores, but only 1 s has passed
    assert governor.update() is None and torch.get_num_threads() == 2
