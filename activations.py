"""What autograd keeps of a transformer block for backward, and what it computes again instead.

Its own file because it is a concern of training memory, not of the architecture: model.py's
blocks call recomputed (a tensor kept as a recipe) and checkpointed (a block kept as its input),
and memory.py's estimate counts the bytes each keeps.
"""
from contextlib import contextmanager

import torch
from torch.utils.checkpoint import checkpoint


@contextmanager
def recomputed(t, fn, enabled=True):
    """Inside, where autograd saves `t` for backward (a LoRA A's input: frozen layers keep none),
    it keeps fn instead and calls it again in backward. For a t that is cheap to compute from
    tensors backward keeps anyway (a norm's input, SwiGLU's g and u): one t-sized activation
    less per use. fn() gives t's values bit for bit, as a new contiguous tensor, as t is.
    Off when not enabled (gradient checkpointing recomputes the whole block) and under
    torch.compile (its partitioner chooses what to recompute)."""
    if not enabled or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        yield
        return
    storage = t.untyped_storage().data_ptr()

    def pack(saved):  # saved: t or a view of it (a linear layer's flattened input), or another tensor
        if saved.untyped_storage().data_ptr() != storage:
            return saved
        return fn, saved.size(), saved.stride(), saved.storage_offset()

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        recipe, size, stride, offset = packed
        return recipe().as_strided(size, stride, offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def checkpointed(block, x, cos, sin, mask, start, offload=False):
    """block(x, ...) keeping only x for backward, which recomputes the block (non-reentrant: frozen
    inputs still give the LoRA weights their gradients). offload: x waits for backward in host
    memory (pinned on a GPU; both copies asynchronous, in stream order), and the device's copy is
    freed once the next block has read it. A copy's backward is a copy back: the numbers are the same.
    No recipes inside (recomputed): the block is recomputed whole."""
    if not offload:
        return checkpoint(block, x, cos, sin, mask, start, recompute=False, use_reentrant=False)
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=x.is_cuda).copy_(x, non_blocking=True)
    run = lambda h, *args: block(h.to(cos.device, non_blocking=True), *args, recompute=False)
    return checkpoint(run, host, cos, sin, mask, start, use_reentrant=False)
