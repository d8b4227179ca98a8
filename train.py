"""Fine-tune a LoRA (or QLoRA) adapter: a JSONL file + a base checkpoint -> a PEFT adapter.

    python train.py                                            # SmolLM2-135M-Instruct + bundled data
    python train.py --model_path DIR --data_path my.jsonl --load_in_4bit --output_dir out/mine
    torchrun --nproc-per-node=4 train.py --effective_batch_size 32 ...   # data parallel (DDP)
    python train.py --output_dir out/mine --resume             # continue an interrupted run

One optimizer step sees `effective_batch_size` rows: micro batches of `micro_batch_size` on each
of the world's processes, accumulated. The loss is the mean over every trained token of the
step, whatever the split, so 1 process x 4 micro batches and 4 processes x 1 give the same step.
"""
import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from itertools import chain
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import data
from hub import DEFAULT_MODEL, resolve_checkpoint
from lora import apply_lora, load_adapter_weights, save_adapter
from model import InputError, Transformer
from tokenizer import TEMPLATES, Tokenizer


@dataclass
class TrainConfig:
    model_path: str = field(default=DEFAULT_MODEL, metadata={"help": "checkpoint folder or hub id"})
    data_path: str = field(default="data/brannock_chat.jsonl", metadata={"help": "training JSONL (messages, ShareGPT, Alpaca or text)"})
    eval_data_path: str = field(default=None, metadata={"help": "evaluation JSONL"})
    eval_split: float = field(default=0.0, metadata={"help": "or hold out this fraction of the training rows"})
    output_dir: str = field(default="out/lora", metadata={"help": "adapter, checkpoints/ and metrics.jsonl go here"})
    lora_r: int = field(default=16, metadata={"help": "rank of A (r, in) and B (out, r)"})
    lora_alpha: float = field(default=32.0, metadata={"help": "scaling = alpha / r (usually alpha = 2r)"})
    lora_dropout: float = 0.05
    use_rslora: bool = field(default=False, metadata={"help": "scaling = alpha / sqrt(r)"})
    target_modules: str = field(default="all-linear", metadata={"help": "comma-separated (q_proj,v_proj,...; lm_head too) or all-linear (the blocks' linears)"})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: NF4-quantize the frozen base"})
    num_epochs: int = 5
    max_steps: int = field(default=0, metadata={"help": "optimizer steps; 0: num_epochs worth"})
    micro_batch_size: int = field(default=4, metadata={"help": "rows per forward pass, per process"})
    effective_batch_size: int = field(default=8, metadata={"help": "rows per optimizer step, all processes"})
    learning_rate: float = 5e-4
    warmup_steps: int = 5
    lr_scheduler: str = field(default="cosine", metadata={"choices": ("cosine", "linear", "constant")})
    weight_decay: float = 0.0
    max_grad_norm: float = field(default=1.0, metadata={"help": "0: no clipping"})
    max_seq_len: int = field(default=512, metadata={"help": "longer examples are truncated (and counted)"})
    sample_packing: bool = field(default=False, metadata={"help": "pack several examples per row"})
    train_on_inputs: bool = field(default=False, metadata={"help": "learn prompts too, not only replies"})
    chat_template: str = field(default=None, metadata={"choices": TEMPLATES, "help": "override the detected template"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute blocks in backward: less memory"})
    optimizer: str = field(default="adamw", metadata={"choices": ("adamw", "adamw8bit", "paged_adamw8bit")})
    precision: str = field(default=None, metadata={"choices": ("bf16", "fp32"), "help": "default: bf16 on CUDA, fp32 on CPU"})
    eval_every: int = field(default=0, metadata={"help": "steps between evaluations; 0: at the end only"})
    save_every: int = field(default=50, metadata={"help": "steps between checkpoints; 0: none"})
    log_every: int = 1
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint in output_dir"})
    seed: int = 42
    enable_model_splitting: bool = field(default=False, metadata={"help": "spread layers over the visible GPUs (one process)"})


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        kw = {"help": f.metadata.get("help", "") + f" (default: {f.default})"}
        if f.type is bool:
            p.add_argument(f"--{f.name}", action="store_true", **kw)
        else:
            p.add_argument(f"--{f.name}", type=f.type, default=f.default, choices=f.metadata.get("choices"), **kw)
    cfg = TrainConfig(**vars(p.parse_args(argv)))
    checks = [("lora_r", cfg.lora_r > 0, "must be positive"), ("micro_batch_size", cfg.micro_batch_size > 0, "must be positive"),
              ("max_seq_len", cfg.max_seq_len > 1, "must be at least 2"), ("learning_rate", cfg.learning_rate > 0, "must be positive"),
              ("eval_split", 0 <= cfg.eval_split < 1, "must be in [0, 1)"), ("lora_dropout", 0 <= cfg.lora_dropout < 1, "must be in [0, 1)"),
              ("num_epochs", cfg.num_epochs > 0 or cfg.max_steps > 0, "must be positive")]
    for name, ok, what in checks:
        if not ok:
            p.error(f"--{name} {what}")
    if cfg.eval_data_path and cfg.eval_split:
        p.error("--eval_data_path and --eval_split exclude each other")
    return cfg


class CausalLMLoss(nn.Module):
    """The training objective as one module, so DistributedDataParallel sees the whole forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, targets, position_ids, doc_ids):
        h = self.model.hidden(input_ids, position_ids, doc_ids)  # (B, T, C)
        keep = targets != -100  # logits only where a token is trained (replies, not prompts)
        h, targets = h[keep], targets[keep]  # (N, C), (N,)
        head = self.model.lm_head
        if isinstance(head, nn.Linear) and not head.weight.requires_grad:
            return LinearCrossEntropy.apply(h, head.weight, targets)
        return nn.functional.cross_entropy(head(h).float(), targets, reduction="sum")


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i cross_entropy(h_i @ W.T, t_i) for a frozen W, a chunk of rows at a time.

    The logits (N x vocab: 49k wide for SmolLM2, 128k for Llama 3) are the largest activation
    of training. Here the gradient w.r.t. h is computed in the forward pass chunk by chunk
    (d loss / d logits = softmax - onehot), so the whole logits never exist, nor are recomputed.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk=512):
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        for i in range(0, len(h), chunk):
            logits = (h[i:i + chunk] @ weight.T).float()  # (n, V), fp32 as the reference does
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
        ctx.save_for_backward(grad_h)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), None, None, None


def lr_at(step, cfg, total_steps):
    """Linear warmup, then cosine / linear decay to zero, or constant."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    decay = {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}
    return cfg.learning_rate * decay[cfg.lr_scheduler]


def make_optimizer(cfg, params):
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    import bitsandbytes as bnb  # 8-bit optimizer states: 2 bytes per parameter instead of 8
    opt = bnb.optim.PagedAdamW8bit if cfg.optimizer == "paged_adamw8bit" else bnb.optim.AdamW8bit
    return opt(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


# --- checkpoints: safetensors for tensors, JSON for the rest, never pickle ---------------------

def save_checkpoint(out, model, optimizer, state):
    """out/checkpoints/step-N, written in a temporary folder and renamed into place, so a
    checkpoint folder is complete whenever it exists."""
    from safetensors.torch import save_file

    final = out / "checkpoints" / f"step-{state['step']}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, tmp)
    tensors, opt_json = flatten_optimizer(optimizer.state_dict())
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, tmp / "trainer_state.safetensors")
    (tmp / "trainer_state.json").write_text(json.dumps({**state, "optimizer": opt_json}, indent=1))
    os.replace(tmp, final)


def latest_checkpoint(out):
    steps = [(int(p.name.split("-")[1]), p) for p in (out / "checkpoints").glob("step-*") if p.name.split("-")[1].isdigit()]
    return max(steps)[1] if steps else None


def load_checkpoint(path, model, optimizer):
    from safetensors.torch import load_file

    load_adapter_weights(model, path)
    tensors = load_file(path / "trainer_state.safetensors")
    state = json.loads((path / "trainer_state.json").read_text())
    optimizer.load_state_dict(unflatten_optimizer(tensors, state.pop("optimizer")))
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return state


def flatten_optimizer(sd):
    """Optimizer state -> ({"opt.<param>.<name>": tensor}, JSON-able rest)."""
    tensors, scalars = {}, {}
    for idx, s in sd["state"].items():
        for k, v in s.items():
            if torch.is_tensor(v):
                tensors[f"opt.{idx}.{k}"] = v.contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors, js):
    state = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, idx, k = key.split(".", 2)
            state.setdefault(int(idx), {})[k] = v
    for key, v in js["scalars"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": js["param_groups"]}


# --- the run -------------------------------------------------------------------------------

def setup_distributed():
    """rank, world size, device: torchrun's environment if present, else one process."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        return rank, world, torch.device("cuda", local)
    dist.init_process_group("gloo")
    return rank, world, torch.device("cpu")


def all_sum(x, world):
    if world > 1:
        dist.all_reduce(x)
    return x


def evaluate(loss_fn, rows, pad_id, micro_batch_size, device, rank, world):
    """Mean loss per trained token over rows (sharded over ranks) and its perplexity."""
    loss_fn.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for i in range(rank * micro_batch_size, len(rows), world * micro_batch_size):
            b = batch_to(data.collate(rows[i:i + micro_batch_size], pad_id), device)
            total[0] += loss_fn(b["input_ids"], b["targets"], b["position_ids"], b["doc_ids"]).double()
            total[1] += (b["targets"] != -100).sum()
    loss_fn.train()
    loss = (all_sum(total, world)[0] / total[1].clamp(min=1)).item()
    return loss, math.exp(min(loss, 50))


def batch_to(b, device):
    return {k: v.to(device) if v is not None else None for k, v in b.items()}


def train(cfg, rank=0, world=1, device="cpu"):
    out = Path(cfg.output_dir)
    torch.manual_seed(cfg.seed)
    say = print if rank == 0 else (lambda *a, **k: None)
    if cfg.effective_batch_size % (cfg.micro_batch_size * world):
        raise InputError(f"--effective_batch_size {cfg.effective_batch_size} is not a multiple of "
                         f"--micro_batch_size {cfg.micro_batch_size} x {world} processes")
    resume_from = latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and resume_from is None:
        raise InputError(f"--resume: no checkpoint in {out / 'checkpoints'}")
    if not cfg.resume and (latest_checkpoint(out) is not None or (out / "adapter_config.json").exists()):
        raise InputError(f"{out} holds an earlier run: pass --resume to continue it, or choose another --output_dir")

    # Data first: a bad file fails here, before anything is loaded or written.
    path = resolve_checkpoint(cfg.model_path)
    tokenizer = Tokenizer(path, template=cfg.chat_template)
    rows, stats = data.load_dataset(cfg.data_path, tokenizer, cfg.max_seq_len, cfg.train_on_inputs, cfg.sample_packing)
    eval_rows = []
    if cfg.eval_data_path:
        eval_rows, _ = data.load_dataset(cfg.eval_data_path, tokenizer, cfg.max_seq_len, cfg.train_on_inputs, cfg.sample_packing)
    elif cfg.eval_split:
        rows, eval_rows = data.split(rows, cfg.eval_split, cfg.seed)
    say(f"data: {data.describe(stats)}")
    steps_per_epoch = data.steps_per_epoch(len(rows), cfg.effective_batch_size)
    if steps_per_epoch == 0:
        raise InputError(f"{cfg.data_path}: {len(rows)} rows make no full step of --effective_batch_size {cfg.effective_batch_size}")
    total_steps = cfg.max_steps or cfg.num_epochs * steps_per_epoch

    on_cuda = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if (cfg.precision or ("bf16" if on_cuda else "fp32")) == "bf16" else torch.float32
    model = Transformer.from_pretrained(path, dtype=dtype, device=device, quantize="nf4" if cfg.load_in_4bit else None)
    if cfg.enable_model_splitting:
        if not on_cuda or world > 1:
            raise InputError("--enable_model_splitting spreads one process over the visible GPUs: it needs CUDA and no torchrun")
        model.split_layers([torch.device("cuda", i) for i in range(torch.cuda.device_count())])
    targets = "all-linear" if cfg.target_modules == "all-linear" else [t.strip() for t in cfg.target_modules.split(",")]
    apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=targets,
               use_rslora=cfg.use_rslora, verbose=rank == 0)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params)
    loss_fn = CausalLMLoss(model)
    if world > 1:
        loss_fn = nn.parallel.DistributedDataParallel(loss_fn, device_ids=[device] if on_cuda else None)

    step = 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer)
        step = state["step"]
        say(f"resumed from {resume_from} (step {step})")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=1))
        metrics_path = out / "metrics.jsonl"
        if metrics_path.exists():  # keep only what the resumed-from step had logged
            kept = [l for l in metrics_path.read_text().splitlines() if json.loads(l)["step"] <= step]
            metrics_path.write_text("".join(l + "\n" for l in kept))
        metrics = open(metrics_path, "a")

    stop = {"signal": None}
    for sig in (signal.SIGINT, signal.SIGTERM):  # finish the step, save, exit
        signal.signal(sig, lambda s, f: stop.update(signal=s))
    bar = tqdm(total=total_steps, initial=step, disable=rank != 0, desc="train", dynamic_ncols=True)
    t_start, tokens_seen = time.perf_counter(), 0
    while step < total_steps:
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        order = data.epoch_order(len(rows), cfg.seed, epoch)
        idx = data.step_batches(order, step_in_epoch, cfg.effective_batch_size, cfg.micro_batch_size, rank, world)
        micro = [batch_to(data.collate([rows[i] for i in b], tokenizer.pad_id), device) for b in idx]
        # Normalize by the trained tokens of the whole step, summed over all ranks. DDP averages
        # gradients over ranks, hence the factor world.
        n_targets = all_sum(sum((b["targets"] != -100).sum() for b in micro).float(), world)
        lr = lr_at(step, cfg, total_steps)
        for g in optimizer.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        loss_sum = 0.0
        for i, b in enumerate(micro):
            sync = i == len(micro) - 1 or world == 1
            with loss_fn.no_sync() if not sync else nullcontext():
                loss = loss_fn(b["input_ids"], b["targets"], b["position_ids"], b["doc_ids"])
                (loss * world / n_targets).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss = (all_sum(torch.as_tensor(loss_sum, dtype=torch.float32, device=device).clone(), world) / n_targets).item()
        if not math.isfinite(loss):
            raise InputError(f"loss is {loss} at step {step}: lower --learning_rate, or use --precision fp32")
        n_tokens = all_sum(torch.tensor(float(sum(len(rows[i]["input_ids"]) for i in chain(*idx))), device=device), world).item()
        tokens_seen += n_tokens
        dt = time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{n_tokens / dt:.0f}")
        record = {}
        if step % cfg.log_every == 0 or step == total_steps:
            record.update(step=step, epoch=epoch + (step_in_epoch + 1) / steps_per_epoch, loss=round(loss, 6), lr=lr,
                          grad_norm=round(float(grad_norm), 6), tokens_per_s=round(n_tokens / dt, 1),
                          elapsed_s=round(time.perf_counter() - t_start, 2))
        if eval_rows and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps):
            eval_loss, ppl = evaluate(loss_fn, eval_rows, tokenizer.pad_id, cfg.micro_batch_size, device, rank, world)
            record.update(step=step, eval_loss=round(eval_loss, 6), eval_ppl=round(ppl, 4))
            if rank == 0:
                bar.write(f"step {step}: eval loss {eval_loss:.4f}, perplexity {ppl:.2f}")
        if rank == 0 and record:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        interrupted = all_sum(torch.tensor(float(stop["signal"] is not None), device=device), world).item() > 0
        if rank == 0 and ((cfg.save_every and step % cfg.save_every == 0 and step < total_steps) or interrupted):
            save_checkpoint(out, model, optimizer, {"step": step, "epoch": epoch})
        if interrupted:
            bar.close()
            say(f"interrupted: saved {out / 'checkpoints' / f'step-{step}'}; continue with --resume")
            return None
    bar.close()
    if rank == 0:
        save_adapter(model, out, base_model_name_or_path=cfg.model_path)
        say(f"adapter saved to {out} ({tokens_seen / (time.perf_counter() - t_start):.0f} tok/s)")
    if world > 1:
        dist.barrier()  # no rank tears the process group down while rank 0 still writes
    return model


def main(argv=None):
    cfg = parse_args(argv)
    rank, world, device = setup_distributed()
    try:
        train(cfg, rank, world, device)
    except (InputError, data.DataError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
