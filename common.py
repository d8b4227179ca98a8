"""What every script shares, kept out of model.py so that model.py opens with the model: the
errors that end a script with one line, the default device and dtype, how many CPU threads
to train with, a module swapped by name, and atomic writes.
"""
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch


class InputError(Exception):
    """Bad input from the user (a file, a flag, a value): scripts print the one-line message,
    which names what is wrong and where, and exit with code 2, never with a traceback."""


class CheckpointError(InputError):
    """A checkpoint folder that cannot be used as asked; the message names the file or key."""


@contextmanager
def exit_on_input_error(script):
    """Around a script's work: an InputError ends the script with one line, `script: error: ...`,
    on stderr and exit code 2 (argparse's, for a bad flag), never with a traceback."""
    try:
        yield
    except InputError as e:
        print(f"{script}: error: {e}", file=sys.stderr)
        sys.exit(2)


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device):
    """bf16 on a GPU (half the memory of fp32, its fast matmuls); fp32 on a CPU, where bf16 is slow."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def runnable_now(loadavg="/proc/loadavg", samples=5, interval=0.02):
    """Threads running or waiting for a core right now, this one included: the 4th field of
    /proc/loadavg ("1/80": runnable/all), the least of a few samples 20 ms apart, so that a
    passing command is not counted. (Not the load average: it lags by minutes, and still counts
    a run that has just finished.)"""
    counts = []
    for i in range(samples):
        with open(loadavg) as f:
            counts.append(int(f.read().split()[3].split("/")[0]))
        if i < samples - 1:
            time.sleep(interval)
    return min(counts)


TORCH_THREADS = torch.get_num_threads()  # torch's default (one per core), before a run changes it


def cpu_threads():
    """Threads for training on the CPU: torch's default (one per core) less the cores that other
    processes keep busy now. Threads that outnumber the free cores spin-wait on each other (GNU
    OpenMP's default), and two runs sharing cores can each go many times slower than with fewer
    threads. OMP_NUM_THREADS, when set, decides; without /proc (macOS, Windows), torch's default."""
    if "OMP_NUM_THREADS" in os.environ:
        return TORCH_THREADS
    try:
        busy = runnable_now() - 1  # less this process's own thread
    except (OSError, ValueError, IndexError):
        return TORCH_THREADS
    return threads_beside(busy)


def threads_beside(busy):
    """torch's default, or fewer: the cores that `busy` cores' worth of other processes leave, at least 1."""
    return max(1, min(TORCH_THREADS, (os.cpu_count() or 1) - busy))


@contextmanager
def following_free_cores(device, say=print, every=10.0):
    """Yields check(), to call between training steps. On the CPU, its first call sets torch's
    threads to cpu_threads() (the cores busy now); later calls, once `every` seconds have passed,
    to the cores left over by what other processes used since the last decision: the machine's
    busy CPU time less this process's own (busy_cpu_seconds), over the wall time. An average over
    seconds of training, not a glance: two runs started together that look at the same moment
    see each other idle (each between steps), but not over their steps. So a run started beside
    this one, or one ending, moves the threads, and two runs settle on sharing the cores.
    OMP_NUM_THREADS set: it decides. Afterwards, the count from before."""
    before, last = torch.get_num_threads(), None  # last: (wall, machine busy, own) seconds

    def check():
        nonlocal last
        if torch.device(device).type != "cpu" or "OMP_NUM_THREADS" in os.environ:
            return
        if last is not None and time.monotonic() - last[0] < every:
            return
        try:
            now = (time.monotonic(), *busy_cpu_seconds())
        except (OSError, ValueError, IndexError):  # no /proc (macOS, Windows): torch's default
            return
        if last is None:
            new = cpu_threads()
        else:
            others = ((now[1] - last[1]) - (now[2] - last[2])) / (now[0] - last[0])  # cores' worth
            new = threads_beside(round(others))
        last, old = now, torch.get_num_threads()
        if new != old:
            say(f"cpu: {new} threads, not {old}: the cores other processes leave free; "
                "OMP_NUM_THREADS=N to choose")
            torch.set_num_threads(new)
    try:
        yield check
    finally:
        torch.set_num_threads(before)


def busy_cpu_seconds(stat="/proc/stat"):
    """(seconds all cores have spent busy since boot, seconds this process has run on them): the
    first line of /proc/stat (user, nice, system, idle, iowait, irq, softirq, steal, in clock ticks)
    less idle and iowait, and os.times()."""
    with open(stat) as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]
    own = os.times()
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK"), own.user + own.system


def replace_module(root, name, module):
    """Put `module` in place of root's submodule `name` ("model.layers.0.mlp.up_proj")."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent), child, module)


@contextmanager
def written_atomically(path):
    """Yield a temporary path beside `path` for a file or folder to be written there; when the block
    completes, it is renamed to `path` (replacing it). Whoever reads `path`, or resumes after a crash,
    finds the old one or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    remove(tmp)  # left by a crash
    try:
        yield tmp
        if path.is_dir():  # os.replace renames over a file or an empty folder only
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        remove(tmp)  # after a failure


def remove(path):
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
