"""How one run becomes several processes: torchrun's ranks, the process group, sums over ranks,
and the loss module wrapped for DDP. A run without torchrun takes none of this but `setup`
(which says it is rank 0 of 1) and `all_sum` (which returns its argument); FSDP's sharding is
fsdp.py.

    rank, world, device = setup(fsdp=False)          # from torchrun's RANK, WORLD_SIZE, LOCAL_RANK
    loss_fn = ddp(loss_fn, device)                   # gradients all-reduced in backward
    with no_sync(loss_fn): ...backward()             # all but the step's last micro batch
"""
import os
import sys
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn

from common import default_device

# On GPUs, NCCL for CUDA tensors and gloo for CPU ones: the step's counts are summed on the host,
# and FSDP's offloaded shards and gradients are CPU DTensors (clip_grad_norm_, full_tensor()).
BACKEND = "cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo"


def setup(fsdp=False):
    """rank, world size, device: torchrun's environment if present, else one process (which FSDP
    still runs as a process group of one)."""
    if "RANK" not in os.environ:
        if fsdp:
            dist.init_process_group(BACKEND, store=dist.HashStore(), rank=0, world_size=1)
        return 0, 1, torch.device(default_device())
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(BACKEND, device_id=device if device.type == "cuda" else None)
    return rank, world, device


def all_sum(x, world):
    """x summed over the ranks, in place (x itself with one process)."""
    if world > 1:
        dist.all_reduce(x)
    return x


def ddp(loss_fn, device):
    """DDP around the module the step calls: its gradients are all-reduced (averaged) in backward."""
    on_cuda = torch.device(device).type == "cuda"
    return nn.parallel.DistributedDataParallel(loss_fn, device_ids=[device] if on_cuda else None)


@contextmanager
def no_sync(loss_fn):
    """Inside, backward accumulates gradients without reducing them over ranks: all but the last
    micro batch of a step. DDP's no_sync, or its FSDP equivalent."""
    if not is_fsdp(loss_fn):
        with loss_fn.no_sync():
            yield
        return
    loss_fn.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        loss_fn.set_requires_gradient_sync(True)


def barrier(world):
    """Every rank waits here for the others (nothing to wait for alone)."""
    if world > 1:
        dist.barrier()


def is_fsdp(module):
    """Whether FSDP shards `module`, asked without importing PyTorch's FSDP package: a module can be
    an FSDPModule only once the package is imported (by fsdp.py under --fsdp; by torch._dynamo,
    which a model built on the meta device, or a backward pass, loads). Why not import it above:
    a train.py that imports fsdp.py starts 0.46 s slower and 45 MiB larger, so `--help` or a bad
    flag answers later (`/usr/bin/time python train.py --help`: 1.02 s, 1.48 s with fsdp imported)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(module, fsdp.FSDPModule)
