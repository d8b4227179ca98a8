"""The training objective: cross-entropy of the next token over the trained positions.

`token_loss` is the definition, the one to change (label smoothing, a z-loss, ...).
`CausalLMLoss` runs the model and applies it where the labels are learned (replies, not
prompts), as one module, so DistributedDataParallel sees the whole forward. `--loss fused`
(train.py's default) computes the same numbers with `LinearCrossEntropy`, which never holds the
whole (tokens x vocabulary) logits: it is derived by hand from token_loss, and checked against
it whenever it is used, so an edited token_loss is never silently replaced by the old one.

    loss_sum = CausalLMLoss(model)(input_ids, targets, position_ids, doc_ids, keep)  # a 0-dim fp32 tensor
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from data import IGNORE
from distributed import is_fsdp

LOSS_CHUNK = 256  # rows of LinearCrossEntropy's chunk: one (256, vocab) fp32 buffer at a time


def token_loss(logits, targets):
    """The training objective: cross-entropy of each trained position's next token, summed.
    logits (N, vocab), targets (N,). The loop divides by the step's count of trained tokens."""
    return F.cross_entropy(logits.float(), targets, reduction="sum")


class CausalLMLoss(nn.Module):
    """model + token_loss as one module, so DistributedDataParallel sees the whole forward.

    fused=True computes the same value and gradient with LinearCrossEntropy (no full logits);
    it needs a frozen plain lm_head, and checks that it still equals token_loss."""

    def __init__(self, model, fused=False):
        super().__init__()
        self.model = model
        self.fused = fused
        if fused:
            if not fused_loss_applies(model):
                raise ValueError("the fused loss needs a frozen nn.Linear lm_head")
            check_fused_loss(model.lm_head.weight)

    def forward(self, input_ids, targets, position_ids, doc_ids, keep=None):
        """keep: the flat indices of the trained positions (B * T numbering), found on the host
        (train.batch_to): found here, on a GPU, the host would wait for it (a synchronization)."""
        h = self.model.hidden(input_ids, position_ids, doc_ids)  # (B, T, C)
        if keep is None:  # logits only where a token is trained (replies, not prompts)
            keep = (targets.view(-1) != IGNORE).nonzero().squeeze(1)
        h, targets = h.flatten(0, 1).index_select(0, keep), targets.view(-1).index_select(0, keep)  # (N, C), (N,)
        head = self.model.lm_head
        if not self.fused:
            return token_loss(head(h), targets)  # the (N, vocab) logits, then the loss
        if not is_fsdp(head):
            return LinearCrossEntropy.apply(h, head.weight, targets)  # the same, chunk by chunk
        # --fsdp with lm_head a unit of its own: its weight is read, not called, so FSDP's hooks do
        # not gather it. Gathered here, and freed after: backward needs only the saved grad_h.
        head.unshard()
        try:
            return LinearCrossEntropy.apply(h, head.weight, targets)
        finally:
            head.reshard()


def fused_loss_applies(model):
    """LinearCrossEntropy takes lm_head as one frozen matrix: not when lm_head has an adapter."""
    return type(model.lm_head) is nn.Linear and not model.lm_head.weight.requires_grad


class LinearCrossEntropy(torch.autograd.Function):
    """token_loss(h @ W.T, targets) for a frozen W, a chunk of rows at a time.

    The logits (N x vocab: 49k wide for SmolLM2, 128k for Llama 3) are the largest activation
    of training. Here the gradient w.r.t. h is computed in the forward pass chunk by chunk
    (d loss / d logits = softmax - onehot), so the whole logits never exist, nor are recomputed.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk=LOSS_CHUNK):
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        for i in range(0, len(h), chunk):
            logits = (h[i:i + chunk] @ weight.T).float()  # (n, V), fp32 as token_loss does
            t = targets[i:i + chunk]
            target_logit = logits.gather(1, t[:, None]).squeeze(1)
            # log-sum-exp by hand, exponentiating in place: the chunk's only (n, V) buffer
            top = logits.amax(-1, keepdim=True)
            p = logits.sub_(top).exp_()
            total = p.sum(-1)
            loss += (top.squeeze(1) + total.log() - target_logit).sum()
            if grad_h is not None:
                p.div_(total[:, None])  # softmax
                p[torch.arange(len(t), device=p.device), t] -= 1
                grad_h[i:i + chunk] = p.to(h.dtype) @ weight
            del logits, p  # freed before the next chunk's logits exist: one (n, V) buffer at a time
        ctx.save_for_backward(grad_h)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), None, None, None


def check_fused_loss(weight, n=8):
    """LinearCrossEntropy is derived by hand from token_loss: if token_loss is changed (label
    smoothing, a z-loss...), they differ, and training must not go on with the old one."""
    g = torch.Generator(device=weight.device).manual_seed(0)
    h = torch.randn(n, weight.shape[1], generator=g, device=weight.device, dtype=weight.dtype, requires_grad=True)
    t = torch.randint(0, weight.shape[0], (n,), generator=g, device=weight.device)
    with torch.enable_grad():
        plain, fused = token_loss(h @ weight.T, t), LinearCrossEntropy.apply(h, weight, t)
        (g_plain,), (g_fused,) = torch.autograd.grad(plain, h), torch.autograd.grad(fused, h)
    tol = 1e-2 if weight.dtype != torch.float32 else 1e-4  # bf16: 8 bits of mantissa
    if not (torch.allclose(plain, fused, rtol=tol, atol=tol) and torch.allclose(g_plain, g_fused, rtol=tol, atol=tol)):
        raise RuntimeError("LinearCrossEntropy no longer computes token_loss: change it to match, "
                           "or train with --loss plain")
