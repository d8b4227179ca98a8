"""Fully sharded data parallel training with PyTorch's FSDP2 (torch.distributed.fsdp.fully_shard).

DDP keeps a whole model on every rank. FSDP cuts every parameter along dim 0 into one piece per
rank (the last padded), so each rank holds 1/world of the frozen base (NF4 or 16-bit), of the
LoRA weights, of their gradients and of the optimizer states. Each transformer block is one FSDP
unit, so are the embeddings and lm_head (when they are two tables, not one tied), and the root
(the final norm, with the module the step calls) is another. What is gathered, and when:
  forward   a block's parameters are all-gathered just before it runs and freed after it
            (reshard_after_forward), so one block is whole at a time (two while the next is
            gathered); the embeddings while they look up, lm_head while the loss runs; the root
            is whole for the whole step, its forward containing the others';
  backward  each block is gathered again; its LoRA gradients are reduce-scattered, each rank
            keeping the sum over ranks of its own piece (divided by world: the mean, as DDP);
  step      the optimizer updates only this rank's pieces (DTensors), no communication;
  saving    the LoRA weights (and their optimizer states) are gathered whole, rank 0 writes them:
            the adapter on disk is an ordinary PEFT adapter, the same as in one process.
Loading never holds the whole model in 16 bits: blocks are read one at a time from the safetensors
files (memory-mapped), quantized, given their LoRA weights and sharded before the next is read.

    model = load_sharded(path, torch.bfloat16, device, quantize=True, lora=dict(r=16, ...))
    loss_fn = shard_root(CausalLMLoss(model), model)  # the module whose forward runs model and loss
"""
from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from adapters import apply_lora, lora_layers, targetable_layers
from common import replace_module
from model import open_checkpoint, rope_inv_freq
from quant import NF4Linear, is_nf4_target


def _shard(module, cpu_offload):
    # CPU offload pins the host copies for fast copies to the GPU; a CPU run has nothing to pin
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    fully_shard(module, offload_policy=offload)
    # Gradients: reduce with SUM, then divide by world (the mean, as DDP), rather than the default
    # ReduceOp.AVG, which backends implement unevenly (gloo's all-reduce has none). The tests
    # compare against one process, not against FSDP itself, so a sum would show.
    module.set_force_sum_reduction_for_comms(True)


def load_sharded(path, dtype, device, quantize, lora, cpu_offload=False):
    """A Transformer from checkpoint folder `path` with LoRA (apply_lora's keyword arguments) and
    every block sharded over the process group; shard_root(...) must follow, around the module
    that calls the model. Peak memory: about one block in `dtype`, plus this rank's shards."""
    config, model, read = open_checkpoint(path)

    # LoRA first, around empty stand-ins of the frozen weights: apply_lora draws the initial A
    # weights from the RNG in the same order as in one process (the same adapter at step 0),
    # and the stand-ins cost nothing; the real weights replace them block by block.
    for layer in targetable_layers(model).values():
        if not isinstance(layer, nn.Linear):
            continue  # the embeddings: no adapter under --fsdp (train.py refuses it), read whole below
        for k, p in list(layer.named_parameters(recurse=False)):
            setattr(layer, k, nn.Parameter(torch.empty(0), requires_grad=False))
    apply_lora(model, verbose=False, **lora)

    def load(module, prefix):
        """Read the frozen weights of `module` (a block, or the root's own layers) into place."""
        for name, sub in list(module.named_modules()):
            if {"lora_A", "lora_B"} & set(name.split(".")):
                continue  # LoRA weights: already real, from apply_lora
            own = dict(sub.named_parameters(recurse=False))
            key = ".".join(c for c in f"{prefix}{name}".split(".") if c not in ("", "base"))  # the checkpoint's name
            if not own or (config.tie_word_embeddings and key == "lm_head"):
                continue
            tensors = {k: read(f"{key}.{k}").to(device=device, dtype=dtype) for k in own}
            if quantize and is_nf4_target(key, sub):
                replace_module(module, name, NF4Linear.from_weight(tensors["weight"], tensors.get("bias")))
            else:
                for k, t in tensors.items():
                    setattr(sub, k, nn.Parameter(t, requires_grad=False))

    for i, block in enumerate(model.model.layers):
        load(block, f"model.layers.{i}.")
        _shard(block, cpu_offload)  # each rank keeps its piece; the whole block is freed
    for name in ("model.embed_tokens", "model.norm", "lm_head"):
        load(model.get_submodule(name), name + ".")
    if config.tie_word_embeddings:
        head = model.lm_head.base if hasattr(model.lm_head, "base") else model.lm_head
        head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(config).to(device)
    return model


def shard_root(root, model, cpu_offload=False):
    """Shard what is left outside the blocks: the embeddings and lm_head each as a unit of its own,
    then the rest (the final norm; tied embeddings and lm_head, one tensor, which FSDP cannot give
    to two units) as one unit around `root`, the module whose forward the training step calls
    (the model, or a loss around it). Call it before making the optimizer: sharding replaces each
    parameter by a new one. (A Llama 3 vocabulary is 128k rows: 2 GiB for the two tables of 8B in
    bf16, 8 GiB for 405B, which the root would otherwise keep whole through the step.)"""
    if not model.config.tie_word_embeddings:
        _shard(model.model.embed_tokens, cpu_offload)
        _shard(model.lm_head, cpu_offload)  # the fused loss gathers it itself (loss.py): it reads the weight
    _shard(root, cpu_offload)
    return root


@contextmanager
def gathered_lora(model, write_back=False):
    """Inside, every rank's LoRA weights are whole ordinary tensors, so save_adapter writes the
    usual PEFT file; on leaving, the shards are put back (with write_back, after taking this rank's
    piece of what was written into the whole tensors). Every rank must enter: it all-gathers."""
    swapped = []  # (module, attribute, shard)
    for _, layer in lora_layers(model):
        for name, p in list(layer.named_parameters()):
            if isinstance(p, DTensor) and p.requires_grad:  # the adapter's tensors, not the frozen base
                owner, _, attr = name.rpartition(".")
                owner = layer.get_submodule(owner)
                setattr(owner, attr, nn.Parameter(p.full_tensor().detach(), requires_grad=False))
                swapped.append((owner, attr, p))
    try:
        yield model
    finally:
        for owner, attr, shard in swapped:
            if write_back:
                with torch.no_grad():
                    whole = getattr(owner, attr)
                    piece = distribute_tensor(whole.to(shard.device), shard.device_mesh, shard.placements)
                    shard.to_local().copy_(piece.to_local())
            setattr(owner, attr, shard)


def full_optimizer_state(optimizer):
    """optimizer.state_dict() with every sharded state gathered whole: the same layout as in one
    process, so a checkpoint does not depend on the world size. Every rank must call it."""
    sd = optimizer.state_dict()  # its per-parameter dicts are the optimizer's own: build new ones
    whole = lambda v: v.full_tensor() if isinstance(v, DTensor) else v
    return {**sd, "state": {idx: {k: whole(v) for k, v in state.items()} for idx, state in sd["state"].items()}}


def load_optimizer_state(optimizer, sd):
    """optimizer.load_state_dict for whole states (full_optimizer_state's layout): under FSDP each
    state is first cut into this rank's piece, placed like the parameter it belongs to."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for idx, state in sd["state"].items():
        p = params[int(idx)]
        for k, v in state.items():
            if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape:
                state[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
    optimizer.load_state_dict(sd)
