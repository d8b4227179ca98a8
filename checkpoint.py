"""Training checkpoints: a run's state on disk, so an interrupted run resumes exactly.

    out/checkpoints/step-N/
        adapter_config.json, adapter_model.safetensors   the adapter at step N (PEFT's format)
        trainer_state.safetensors                        optimizer states and every rank's RNG state
        trainer_state.json                               the step, the epoch, the optimizer's scalars

Safetensors for tensors and JSON for the rest, never pickle. A checkpoint folder is written under
a temporary name and renamed, so it is complete whenever it exists. Under FSDP the adapter and the
optimizer states are gathered whole first, so a checkpoint is the same whatever the world size.
"""
import json
import shutil
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from tqdm import tqdm

from common import written_atomically
from peft_format import load_adapter_weights, save_adapter


def save_checkpoint(out, model, optimizer, state, keep=0, sharded=False):
    """out/checkpoints/step-N, complete whenever it exists; then all but the `keep` newest are deleted.
    Every rank calls it and rank 0 writes: `sharded` (FSDP), the adapter and the optimizer states
    are gathered whole first, so the files are the same as in one process."""
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    final = out / "checkpoints" / f"step-{state['step']}"
    if sharded:
        import fsdp  # only --fsdp runs enter fsdp.py (distributed.is_fsdp)
    with fsdp.gathered_lora(model) if sharded else nullcontext():
        opt_state = fsdp.full_optimizer_state(optimizer) if sharded else optimizer.state_dict()
        rng = {"cpu": every_rank(torch.get_rng_state())}
        if torch.cuda.is_available():
            rng["cuda"] = every_rank(torch.cuda.get_rng_state())
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        with written_atomically(final) as tmp:
            save_adapter(model, tmp)
            tensors, opt_json = flatten_optimizer(opt_state)
            for kind, states in rng.items():  # rng.cpu (rank 0), rng.cpu.1, ...: each rank's own dropout
                tensors.update({f"rng.{kind}" + (f".{r}" if r else ""): state for r, state in enumerate(states)})
            save_file(tensors, tmp / "trainer_state.safetensors")
            (tmp / "trainer_state.json").write_text(json.dumps({**state, "optimizer": opt_json}, indent=1))
    if keep:
        for old in checkpoints(out)[:-keep]:
            shutil.rmtree(old)
    size = sum(f.stat().st_size for f in final.iterdir())
    tqdm.write(f"saved {final} ({size / 1e6:.0f} MB, {time.perf_counter() - t0:.1f} s)")


def every_rank(state):
    """[rank 0's, rank 1's, ...] of a per-process tensor (a RNG state), gathered to every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [state]
    states = [torch.empty_like(state) for _ in range(dist.get_world_size())]
    dist.all_gather(states, state)  # on the host: train.py's process groups have gloo for CPU tensors
    return states


def checkpoints(out):
    """out/checkpoints/step-N folders, oldest first (by N as a number: step-9 before step-10)."""
    steps = {}
    for p in (out / "checkpoints").glob("step-*"):
        n = p.name.removeprefix("step-")
        if n.isdigit():  # not step-N.tmp, a checkpoint being written
            steps[int(n)] = p
    return [steps[n] for n in sorted(steps)]


def latest_checkpoint(out):
    found = checkpoints(out)
    return found[-1] if found else None


def load_checkpoint(path, model, optimizer, sharded=False):
    """The adapter's weights, optimizer states and this rank's RNG state from checkpoint `path`;
    returns its trainer_state.json. `sharded` (FSDP): each rank keeps its piece of each."""
    from safetensors.torch import load_file

    if sharded:
        import fsdp
    with fsdp.gathered_lora(model, write_back=True) if sharded else nullcontext():
        load_adapter_weights(model, path)
    tensors = load_file(path / "trainer_state.safetensors")
    state = json.loads((path / "trainer_state.json").read_text())
    opt_state = unflatten_optimizer(tensors, state.pop("optimizer"))
    if sharded:
        fsdp.load_optimizer_state(optimizer, opt_state)
    else:
        optimizer.load_state_dict(opt_state)
    keep_paged(optimizer)
    rank = f".{dist.get_rank()}" if dist.is_initialized() and dist.get_rank() else ""
    torch.set_rng_state(tensors.get(f"rng.cpu{rank}", tensors["rng.cpu"]))
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors.get(f"rng.cuda{rank}", tensors["rng.cuda"]))
    return state


def keep_paged(optimizer):
    """bitsandbytes' load_state_dict moves each loaded state with .to(param.device): a paged state
    (paged_adamw8bit) would come back as ordinary GPU memory, and never page out again. Each goes
    back into a buffer the optimizer makes as it does for a new state (paged when it pages those)."""
    if not getattr(optimizer, "is_paged", False):
        return
    for p, state in optimizer.state.items():
        for k, v in state.items():
            if k in ("state1", "state2") and v.is_cuda and not getattr(v, "is_paged", False):
                buffer = optimizer.get_state_buffer(p, dtype=v.dtype)
                if getattr(buffer, "is_paged", False):
                    state[k] = buffer.copy_(v)


def flatten_optimizer(sd):
    """Optimizer state -> ({"opt.<param>.<name>": tensor}, JSON-able rest). Nested dicts get dotted
    names: bitsandbytes' 8-bit optimizers keep their states one level down, as
    opt.0.__bnb_optimizer_quant_state__.state1."""
    tensors, scalars = {}, {}

    def walk(prefix, d):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(f"{prefix}.{k}", v)
            elif torch.is_tensor(v):
                # a copy: safetensors refuses tensors that share memory, and bitsandbytes gives every
                # parameter the same quantization maps (qmap1, qmap2); an adapter's state is small
                tensors[f"opt.{prefix}.{k}"] = v.clone(memory_format=torch.contiguous_format)
            else:
                scalars[f"{prefix}.{k}"] = v

    for idx, s in sd["state"].items():
        walk(str(idx), s)
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors, js):
    """The inverse of flatten_optimizer: dotted names back to nested dicts under each parameter."""
    state = {}
    named = [(k.removeprefix("opt."), v) for k, v in tensors.items() if k.startswith("opt.")]
    for key, v in named + list(js["scalars"].items()):
        idx, *path, name = key.split(".")
        d = state.setdefault(int(idx), {})
        for k in path:
            d = d.setdefault(k, {})
        d[name] = v
    return {"state": state, "param_groups": js["param_groups"]}
