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
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
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
