"""Will it fit? The memory one training process needs, from config.json alone.

    python train.py --model_path meta-llama/Llama-3.1-70B --load_in_4bit --fsdp --world_size 2 --estimate_memory

The model is built on the meta device with the run's settings (NF4 base, LoRA targets and rank),
so the weights are counted from the very tensors training would hold, never read. Per process:
  base weights  by kind (nf4: codes and statistics; bf16/fp32: embeddings, norms, lm_head...)
  LoRA weights, their gradients and the optimizer states (AdamW: two fp32 moments)
  activations   what autograd keeps for backward at micro_batch_size x max_seq_len tokens
  transient     the largest short-lived buffer: a dequantized weight, a chunk of the loss, the
                block FSDP gathers (and the next one, prefetched)
With --fsdp every parameter, its gradient and its optimizer state are split over world_size ranks
(dim 0, padded); activations are not (each rank runs its own micro batch).

memory_report(model) counts a model already built instead: the bytes its tensors hold.
"""
import math

import torch
import torch.nn as nn

from adapters import apply_lora, lora_layers
from common import replace_module
from hub import read_config
from loss import LOSS_CHUNK
from model import Transformer
from quant import NF4Linear, is_nf4_target

GiB = 2**30
# Optimizer state bytes per trainable parameter: AdamW keeps two fp32 moments; the 8-bit
# variants keep two uint8 moments (ignoring their per-block absmax, ~1%, and bitsandbytes'
# fp32 fallback for tensors under 4096 elements).
OPTIMIZER_BYTES_PER_PARAM = {"adamw": 8, "adamw8bit": 2, "paged_adamw8bit": 2}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def meta_model(config, dtype, quantize, lora):
    """The model as training builds it, on the meta device: no memory, exact shapes and dtypes."""
    with torch.device("meta"):
        model = Transformer(config).to(dtype)
    if quantize:
        for name, m in list(model.named_modules()):
            if is_nf4_target(name, m):
                replace_module(model, name, NF4Linear(m.in_features, m.out_features, m.bias is not None,
                                                      compute_dtype=dtype, device="meta"))
    apply_lora(model, verbose=False, **lora)
    return model


def shard_bytes(t, world):
    """Bytes of this rank's piece of t: FSDP cuts dim 0 into world pieces, padding the last."""
    if world == 1 or t.dim() == 0:
        return t.numel() * t.element_size()
    return math.ceil(t.shape[0] / world) * (t.numel() // t.shape[0]) * t.element_size()


def activation_bytes_per_token(c, b, lora_b, targets, r, recipes=True):
    """Bytes autograd keeps for backward, per token and block (b: compute dtype bytes, lora_b:
    the adapters'). Counted from what each op saves: norms keep their input (and an fp32 copy in
    bf16), attention keeps q, k, v and its output, SwiGLU keeps gate and up, every adapter keeps
    its input in the adapter's dtype (a copy when that differs) and its r-wide product A x. The
    normed inputs and SwiGLU's product are recipes (activations.recomputed), except in a block that
    gradient checkpointing recomputes (recipes=False)."""
    C, I = c.hidden_size, c.intermediate_size
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    norm = (1 if recipes else 2) * C * b + (4 * C if b < 4 else 0)  # input, [normalized output], fp32 copy
    attention = (2 * q + 2 * kv) * b + q * b  # q, k, v, output; output reshaped for o_proj
    mlp = (2 if recipes else 3) * I * b  # gate, up, [silu(gate) * up, the input of down_proj]
    inputs = {"q_proj": C, "k_proj": C, "v_proj": C, "o_proj": q, "gate_proj": C, "up_proj": C, "down_proj": I}
    adapters = sum(r * lora_b + (inputs[t] * lora_b if lora_b != b else 0) for t in targets if t in inputs)
    return 2 * norm + attention + mlp + adapters


def estimate(config, *, quantize=False, dtype=torch.bfloat16, lora_r=16, target_modules="all-linear",
             micro_batch_size=1, max_seq_len=2048, optimizer="adamw", fsdp=False, world_size=1,
             gradient_checkpointing=False, fused_loss=True, cpu_offload=False):
    """{name: bytes} per process for a run with these settings (see the module docstring)."""
    world = world_size if fsdp else 1
    model = meta_model(config, dtype, quantize, dict(r=lora_r, alpha=2 * lora_r, target_modules=target_modules))
    nf4 = {id(p) for m in model.modules() if isinstance(m, NF4Linear) for n, p in m.named_parameters() if n != "bias"}
    r = {"base nf4": 0, "base bf16": 0, "base fp32": 0, "lora": 0}
    n_lora = 0
    for p in model.parameters():
        if p.requires_grad:
            r["lora"] += shard_bytes(p, world)
            n_lora += shard_bytes(p, world) // p.element_size()
        else:
            r["base nf4" if id(p) in nf4 else f"base {DTYPE_NAMES[p.dtype]}"] += shard_bytes(p, world)
    r["grads"] = r["lora"]
    r["optimizer"] = n_lora * OPTIMIZER_BYTES_PER_PARAM[optimizer]

    b = torch.finfo(dtype).bits // 8
    layers = [m for _, m in lora_layers(model)]
    lora_b = layers[0].lora_A[layers[0].active].weight.element_size() if layers else b
    targets = {n.rsplit(".", 1)[-1] for n, _ in lora_layers(model)}
    tokens, c = micro_batch_size * max_seq_len, config
    per_block = tokens * activation_bytes_per_token(c, b, lora_b, targets, lora_r)
    recomputed_block = tokens * activation_bytes_per_token(c, b, lora_b, targets, lora_r, recipes=False)
    outside = tokens * (2 * c.hidden_size * b + 4 * c.hidden_size)  # embeddings' output, final norm
    r["activations (no checkpointing)"] = c.num_hidden_layers * per_block + outside
    r["activations (checkpointing)"] = c.num_hidden_layers * tokens * c.hidden_size * b + recomputed_block + outside

    # transients: a dequantized weight (forward and backward of an NF4 layer), the loss (logits
    # in the compute dtype and in fp32), and under FSDP what is gathered whole beside them
    biggest = max((m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear)), default=0)
    dequant = biggest * b
    rows = min(tokens, LOSS_CHUNK) if fused_loss else tokens
    loss = rows * c.vocab_size * (b + 4 + (0 if fused_loss else 4))  # (+ the softmax when not fused)
    if world > 1:
        r["transient"], r["transient is"] = fsdp_transient(model, world, dequant, loss)
    else:
        r["transient"] = max(dequant, loss)
        r["transient is"] = "dequantized weight" if dequant >= loss else ("loss chunk" if fused_loss else "logits")
    acts = r["activations (checkpointing)" if gradient_checkpointing else "activations (no checkpointing)"]
    weights = sum(v for k, v in r.items() if k.startswith("base") or k in ("lora", "grads", "optimizer"))
    # FSDP's CPU offload keeps the shards, their gradients and the optimizer in host memory: the
    # device holds only what is gathered, and the activations
    r["host"] = weights if cpu_offload else 0
    r["total"] = (0 if cpu_offload else weights) + acts + r["transient"]
    return r


def fsdp_transient(model, world, dequant, loss):
    """(bytes, what) of the most that FSDP holds gathered whole at once, with what runs beside it:
    the root unit (the final norm; with tied embeddings, the one table too) for the whole step; a
    block's all-gather buffer and its parameters and the next block, prefetched; untied, lm_head
    while the loss runs and the embeddings while they look up (fsdp.shard_root)."""
    gathered = lambda m: sum(p.numel() * p.element_size() - shard_bytes(p, world) for p in m.parameters())
    untied = {"embeddings": model.model.embed_tokens, "lm_head": model.lm_head}
    units = {} if model.config.tie_word_embeddings else untied
    root = gathered(model) - gathered(model.model.layers) - sum(gathered(m) for m in units.values())
    block = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    # the block computing, the next one's all-gather input, output, and parameters copied out
    block = 3 * block + block // world
    head, embed = (gathered(units[k]) if units else 0 for k in ("lm_head", "embeddings"))
    return max((root + block + dequant, "gathered root and blocks"),
               (root + head + loss, "gathered root, lm_head + loss" if units else "gathered root + loss"),
               (root + embed, "gathered root and embeddings"))


def estimate_for_run(cfg):
    """estimate() for a TrainConfig (train.py --estimate_memory): bf16 unless --precision fp32."""
    dtype = torch.float32 if cfg.precision == "fp32" else torch.bfloat16
    r = estimate(read_config(cfg.model_path), quantize=cfg.load_in_4bit, dtype=dtype, lora_r=cfg.lora_r,
                 target_modules=cfg.targets(), micro_batch_size=cfg.micro_batch_size, max_seq_len=cfg.max_seq_len,
                 optimizer=cfg.optimizer, fsdp=cfg.fsdp, world_size=cfg.world_size,
                 gradient_checkpointing=cfg.gradient_checkpointing, fused_loss=cfg.loss == "fused",
                 cpu_offload=cfg.fsdp_cpu_offload)
    r["settings"] = (f"{cfg.model_path}: {'QLoRA (NF4)' if cfg.load_in_4bit else 'LoRA'}, "
                     f"{'bf16' if dtype == torch.bfloat16 else 'fp32'}, r={cfg.lora_r}, "
                     f"{'FSDP over' if cfg.fsdp else 'whole model on each of'} {cfg.world_size} process(es), "
                     f"{cfg.micro_batch_size} x {cfg.max_seq_len} tokens per micro batch, "
                     f"gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}")
    r["checkpointing"] = cfg.gradient_checkpointing
    return r


def format_estimate(r):
    gib = lambda n: f"{n / GiB:10.2f} GiB"
    lines = [f"estimated memory per process, {r['settings']}"]
    held = ("base nf4", "base bf16", "base fp32", "lora", "grads", "optimizer")
    lines += [f"  {k:<32}{gib(r[k])}" for k in held if r[k]]
    used = "activations (checkpointing)" if r["checkpointing"] else "activations (no checkpointing)"
    for k in ("activations (no checkpointing)", "activations (checkpointing)"):
        lines.append(f"  {k:<32}{gib(r[k])}" + ("  <- this run" if k == used else ""))
    lines.append(f"  {'largest transient':<32}{gib(r['transient'])}  ({r['transient is']})")
    if r["host"]:
        lines.append(f"  {'total on the device':<32}{gib(r['total'])}  "
                     f"(the weights above in host memory: {gib(r['host']).strip()})")
    else:
        lines.append(f"  {'total':<32}{gib(r['total'])}")
    return "\n".join(lines)


def memory_report(model: nn.Module, optimizer: str = "adamw") -> dict:
    """Bytes held by the model for training: frozen base weights by kind, trainable params,
    their grads, and the optimizer state estimate. Trainable = requires_grad."""
    nf4 = {id(p) for m in model.modules() if isinstance(m, NF4Linear)
           for name, p in m.named_parameters(recurse=False) if name != "bias"}
    base, trainable_params, trainable_bytes = {}, 0, 0
    for t in [*model.parameters(), *model.buffers()]:
        nbytes = t.numel() * t.element_size()
        if t.requires_grad:
            trainable_params += t.numel()
            trainable_bytes += nbytes
        else:
            kind = "nf4" if id(t) in nf4 else DTYPE_NAMES.get(t.dtype, str(t.dtype).removeprefix("torch."))
            base[kind] = base.get(kind, 0) + nbytes
    optimizer_bytes = trainable_params * OPTIMIZER_BYTES_PER_PARAM[optimizer]
    base_bytes = sum(base.values())
    return {"base": base, "base_bytes": base_bytes, "trainable_params": trainable_params,
            "trainable_bytes": trainable_bytes, "grad_bytes": trainable_bytes, "optimizer": optimizer,
            "optimizer_bytes": optimizer_bytes, "total_bytes": base_bytes + 2 * trainable_bytes + optimizer_bytes}


def format_memory_report(r: dict) -> str:
    mib = lambda b: f"{b / 2**20:9.2f} MiB"  # noqa: E731
    kinds = ", ".join(f"{k} {mib(v).strip()}" for k, v in sorted(r["base"].items()))
    return "\n".join([
        f"base weights {mib(r['base_bytes'])}  ({kinds})",
        f"trainable    {mib(r['trainable_bytes'])}  ({r['trainable_params']:,} params)",
        f"grads        {mib(r['grad_bytes'])}",
        f"optimizer    {mib(r['optimizer_bytes'])}  ({r['optimizer']})",
        f"total        {mib(r['total_bytes'])}",
    ])
