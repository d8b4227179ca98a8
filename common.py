"""What every script shares, kept out of model.py so that model.py opens with the model: the
errors that end a script with one line, the default device and dtype, and atomic writes.
"""
import os
import shutil
import sys
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
