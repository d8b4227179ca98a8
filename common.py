"""What every script shares, kept out of model.py so that model.py opens with the model: the
errors that end a script with one line, the default device and dtype, how many CPU threads
to train with, a module swapped by name, and atomic writes.
"""
import math
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
    return max(1, min(TORCH_THREADS, (os.cpu_count() or 1) - busy))


@contextmanager
def following_free_cores(device, say=print, every=10.0):
    """Yields check(), to call between training steps: on the CPU, it sets torch's threads to
    cpu_threads() when `every` seconds have passed since it last did (the first call always does),
    so a run started beside this one, or one ending, moves them, and two runs started at the same
    moment settle on sharing the cores. A check costs ~0.1 s of sleep (runnable_now's samples).
    Afterwards, the count from before."""
    before, last = torch.get_num_threads(), -math.inf

    def check():
        nonlocal last
        if torch.device(device).type != "cpu" or time.monotonic() - last < every:
            return
        last, old, new = time.monotonic(), torch.get_num_threads(), cpu_threads()
        if new != old:
            say(f"cpu: {new} threads, not {old}: the cores other processes leave free now; "
                "OMP_NUM_THREADS=N to choose")
            torch.set_num_threads(new)
    try:
        yield check
    finally:
        torch.set_num_threads(before)


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
