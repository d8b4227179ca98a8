"""common.py: how many CPU threads a run takes, and folders written atomically."""
import io
import os

import pytest
import torch

import common
from common import written_atomically


def test_cpu_threads_leave_the_cores_busy_now_alone(monkeypatch, tmp_path):
    # The runnable count of /proc/loadavg decides, not the load average: a high average with
    # only this process runnable (a run just finished) keeps every thread; three others
    # runnable on 4 cores leave 1; the least of the samples counts (a passing command is not
    # busy); OMP_NUM_THREADS set: that; no /proc: torch's own count.
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(common, "TORCH_THREADS", 4)
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("3.90 3.10 2.00 1/80 4242\n")
    assert common.runnable_now(loadavg, samples=1) == 1
    samples = iter(["0.1 0.1 0.1 5/80 1", "0.1 0.1 0.1 2/80 1", "0.1 0.1 0.1 6/80 1"])
    with monkeypatch.context() as m:
        m.setattr(common, "open", lambda path: io.StringIO(next(samples)), raising=False)  # common's open only
        assert common.runnable_now(samples=3, interval=0) == 2
    monkeypatch.setattr(common, "runnable_now", lambda: 1)
    assert common.cpu_threads() == 4
    monkeypatch.setattr(common, "runnable_now", lambda: 4)
    assert common.cpu_threads() == 1
    monkeypatch.setattr(common, "runnable_now", lambda: (_ for _ in ()).throw(FileNotFoundError("/proc/loadavg")))
    assert common.cpu_threads() == 4
    monkeypatch.setattr(common, "runnable_now", lambda: 4)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert common.cpu_threads() == 4


def test_threads_follow_the_free_cores_between_steps_and_are_restored_after(monkeypatch):
    # following_free_cores on 4 cores: the first check takes cpu_threads() (3 others runnable: 1
    # thread); a check within `every` seconds of the last reads nothing; later ones take the cores
    # other processes used since the last decision (the machine's busy seconds less this process's,
    # over the wall time): 0.2 of a core -> 4 threads, 2.6 -> 1 (rounded: 4 - 3), 1.4 -> 3; each
    # change said once; the count from before comes back after; nothing on a GPU or under OMP_NUM_THREADS.
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(common, "TORCH_THREADS", 4)
    threads, said, clock = [2], [], [0.0]
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads[-1])
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    monkeypatch.setattr(common.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(common, "runnable_now", lambda: 4)
    # (machine busy, own) cumulative seconds at t = 0, 10, 20, 30
    seconds = {0: (100, 10), 10: (110, 18), 20: (150, 32), 30: (180, 48)}
    monkeypatch.setattr(common, "busy_cpu_seconds", lambda: seconds[clock[0]])
    with common.following_free_cores("cpu", said.append, every=10) as check:
        for t in (0, 5, 10, 20, 30):
            clock[0] = t
            check()
    assert threads == [2, 1, 4, 1, 3, 2] and len(said) == 4 and "1 threads, not 2" in said[0]
    with common.following_free_cores("cuda", said.append) as check:
        check()
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    with common.following_free_cores("cpu", said.append) as check:
        check()
    assert threads[-1] == 2 and len(said) == 4


def test_written_atomically_leaves_the_old_folder_after_a_failure(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "a.txt").write_text("old")
    with pytest.raises(OSError):
        with written_atomically(target) as tmp:
            tmp.mkdir()
            (tmp / "a.txt").write_text("half")
            raise OSError("disk full")
    assert (target / "a.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    with written_atomically(target) as tmp:
        tmp.mkdir()
        (tmp / "b.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["b.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
