"""Fine-tune a LoRA (or QLoRA) adapter: a JSONL file + a base checkpoint -> a PEFT adapter.

    python train.py                                            # SmolLM2-135M-Instruct + bundled data
    python train.py --model_path DIR --data_path my.jsonl --load_in_4bit --output_dir out/mine
    torchrun --nproc-per-node=4 train.py --effective_batch_size 32 ...   # data parallel (DDP)
    torchrun --nproc-per-node=8 train.py --load_in_4bit --fsdp ...       # the model sharded (fsdp.py)
    python train.py --load_in_4bit --fsdp --world_size 8 --estimate_memory   # will it fit? (memory.py)
    python train.py --output_dir out/mine --resume             # continue an interrupted run

One optimizer step sees `effective_batch_size` rows: micro batches of `micro_batch_size` on each
of the world's processes, accumulated. The loss is the mean over every trained token of the
step, whatever the split, so 1 process x 4 micro batches and 4 processes x 1 give the same step.
Ctrl-C or SIGTERM finishes the step, saves a checkpoint and exits with 130 or 143.
The flags are config.py's TrainConfig; several processes come from distributed.py, and sharding
with --fsdp from fsdp.py: a run in one process takes neither.
"""
import json
import math
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from adapters import apply_lora, trainable_summary
from checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from common import InputError, default_dtype, exit_on_input_error, following_free_cores
from config import check_same_run, parse_args, read_run_config
import data
from data import IGNORE
import distributed
from hub import resolve_checkpoint
from loss import CausalLMLoss, fused_loss_applies
from model import Transformer
from observe import Observer, cut_back
from peft_format import save_adapter
from tokenizer import Tokenizer



# --- one optimizer step ------------------------------------------------------------------------

def lr_at(step, cfg, total_steps):
    """Linear warmup, then cosine / linear decay to zero, or constant."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    decay = {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}
    return cfg.learning_rate * decay[cfg.lr_scheduler]


def make_optimizer(cfg, params):
    if cfg.optimizer == "adamw":
        # fused: one kernel updates every tensor on CUDA (foreach, the default, a few per tensor
        # group); not for shards that FSDP offloads to host memory
        fused = all(p.is_cuda for p in params) or None
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=fused)
    import bitsandbytes as bnb  # 8-bit optimizer states: 2 bytes per parameter instead of 8
    opt = bnb.optim.PagedAdamW8bit if cfg.optimizer == "paged_adamw8bit" else bnb.optim.AdamW8bit
    return opt(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def forward_backward(loss_fn, micro, world=1):
    """Accumulate in .grad the gradient of the step's loss: the sum over the trained tokens of all
    micro batches (of all ranks) divided by their count. Returns that loss as a 0-dim tensor on
    the device, not yet read: the step reads its figures in one synchronization."""
    # counted on the host (len(keep) is a shape), summed over ranks on the host too
    n_targets = distributed.all_sum(torch.tensor(float(sum(len(b["keep"]) for b in micro))), world).item()
    loss_sum = 0
    for i, b in enumerate(micro):
        # DDP all-reduces gradients in backward: only the last micro batch of the step needs it
        sync = i == len(micro) - 1 or world == 1
        with distributed.no_sync(loss_fn) if not sync else nullcontext():
            loss = loss_fn(b["input_ids"], b["targets"], b["position_ids"], b["doc_ids"], b["keep"])
            (loss * (world / n_targets)).backward()  # DDP averages over ranks: * world makes it a sum
        loss_sum = loss_sum + loss.detach()
    return distributed.all_sum(loss_sum, world) / n_targets


def evaluate(loss_fn, rows, pad_id, micro_batch_size, device, rank, world):
    """Mean loss per trained token over rows (sharded over ranks) and its perplexity."""
    loss_fn.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for i in range(rank * micro_batch_size, len(rows), world * micro_batch_size):
            b = batch_to(data.collate(rows[i:i + micro_batch_size], pad_id), device)
            total[0] += loss_fn(b["input_ids"], b["targets"], b["position_ids"], b["doc_ids"], b["keep"]).double()
            total[1] += len(b["keep"])
    loss_fn.train()
    loss = (distributed.all_sum(total, world)[0] / total[1].clamp(min=1)).item()
    return loss, math.exp(min(loss, 50))


def batch_to(b, device):
    """A collated batch on the device, with `keep`: the flat indices of its trained positions,
    found here on the host (on a GPU, a boolean mask would make the host wait). On CUDA the
    copies come from pinned memory and do not block: the host runs ahead to the next kernels."""
    b = dict(b, keep=(b["targets"].view(-1) != IGNORE).nonzero().squeeze(1))
    cuda = torch.device(device).type == "cuda"
    return {k: None if v is None else (v.pin_memory() if cuda else v).to(device, non_blocking=cuda)
            for k, v in b.items()}


# --- setup -------------------------------------------------------------------------------------

def check_output_dir(cfg, out, say):
    """The checkpoint to resume from (or None); an earlier run is never overwritten."""
    if not cfg.resume:
        if latest_checkpoint(out) is not None or (out / "adapter_config.json").exists():
            raise InputError(f"{out} holds an earlier run: pass --resume to continue it, "
                             "or choose another --output_dir")
        return None
    check_same_run(cfg, read_run_config(out), say)
    resume_from = latest_checkpoint(out)
    if resume_from is None:
        raise InputError(f"--resume: no checkpoint in {out / 'checkpoints'}")
    return resume_from


def check_data_paths(cfg):
    """--data_path and --eval_data_path exist: checked before the model is found (or downloaded)."""
    for name in ("data_path", "eval_data_path"):
        path = getattr(cfg, name)
        if path and not Path(path).is_file():
            what = "is a directory, not a JSONL file" if Path(path).is_dir() else "no such file"
            raise InputError(f"--{name} {path}: {what}")


def load_data(cfg, tokenizer, say):
    """Training rows and evaluation rows (maybe none)."""
    rows, stats = data.load_dataset(cfg.data_path, tokenizer, cfg.max_seq_len, cfg.train_on_inputs, cfg.sample_packing)
    eval_rows = []
    if cfg.eval_data_path:
        eval_rows, _ = data.load_dataset(cfg.eval_data_path, tokenizer, cfg.max_seq_len, cfg.train_on_inputs,
                                         cfg.sample_packing)
    elif cfg.eval_split:
        rows, eval_rows = data.split(rows, cfg.eval_split, cfg.seed)
    say(f"data: {data.describe(stats)}")
    if len(rows) < cfg.effective_batch_size:
        raise InputError(f"{cfg.data_path}: {len(rows)} rows make no full step of "
                         f"--effective_batch_size {cfg.effective_batch_size}")
    return rows, eval_rows


def build_model(cfg, path, device, world, verbose):
    """The frozen base (NF4 with --load_in_4bit) in the run's precision, with LoRA adapters."""
    dtype = {None: default_dtype(device), "bf16": torch.bfloat16, "fp32": torch.float32}[cfg.precision]
    lora = dict(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=cfg.targets(),
                use_rslora=cfg.use_rslora, use_dora=cfg.use_dora)
    if cfg.fsdp:  # read block by block, each sharded before the next is read
        import fsdp  # here, not above: a run without --fsdp never enters fsdp.py (distributed.is_fsdp)
        model = fsdp.load_sharded(path, dtype, device, cfg.load_in_4bit, lora, cfg.fsdp_cpu_offload)
        if verbose:
            print(trainable_summary(model))
        return model.enable_gradient_checkpointing(cfg.gradient_checkpointing).train()
    model = Transformer.from_pretrained(path, dtype=dtype, device=device, quantize="nf4" if cfg.load_in_4bit else None)
    if cfg.enable_model_splitting:
        if torch.device(device).type != "cuda" or world > 1:
            raise InputError("--enable_model_splitting spreads one process over the visible GPUs: "
                             "it needs CUDA and no torchrun")
        model.split_layers([torch.device("cuda", i) for i in range(torch.cuda.device_count())])
    apply_lora(model, verbose=verbose, **lora)
    model.enable_gradient_checkpointing(cfg.gradient_checkpointing)
    if cfg.compile:
        model.compile_blocks()
    return model.train()


def make_loss(cfg, model, world, device):
    """CausalLMLoss, fused unless --loss plain or lm_head has an adapter; under torchrun, in DDP,
    or with --fsdp sharded (its own parameters: embeddings, final norm, lm_head; the blocks are already)."""
    loss_fn = CausalLMLoss(model, fused=cfg.loss == "fused" and fused_loss_applies(model))
    if cfg.fsdp:
        import fsdp
        return fsdp.shard_root(loss_fn, model, cfg.fsdp_cpu_offload)
    return loss_fn if world == 1 else distributed.ddp(loss_fn, device)


def start_output(out, cfg, step):
    """Write train_config.json; cut metrics.jsonl back to what step `step` had logged."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=1))
    cut_back(out / "metrics.jsonl", step)


class Diverged(Exception):
    """The loss became inf or NaN: not bad input, but the run cannot go on; main says so in one line, exit 1."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM stopped the run after saving a checkpoint; main exits 128 + signal."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = signum


@contextmanager
def catch_signals():
    """Within the block, Ctrl-C / SIGTERM only note the signal: the loop finishes its step, saves
    and stops. A second one leaves at once (KeyboardInterrupt, nothing saved)."""
    stop = {"signal": None}

    def handler(signum, frame):
        if stop["signal"] is not None:
            raise KeyboardInterrupt
        stop["signal"] = signum

    before = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in before.items():
            signal.signal(s, h)


# --- the run -----------------------------------------------------------------------------------

def train(cfg, rank=0, world=1, device="cpu"):
    """Train an adapter as cfg says and save it to cfg.output_dir; returns the model.
    Raises Interrupted once a Ctrl-C / SIGTERM run has saved its checkpoint. One function on
    purpose: setup, then the loop, read top to bottom in the order they run (the parts are named
    functions above)."""
    say = tqdm.write if rank == 0 else (lambda text: None)  # tqdm.write: printed above the progress bar
    out = Path(cfg.output_dir)
    torch.manual_seed(cfg.seed)
    if cfg.effective_batch_size % (cfg.micro_batch_size * world):  # each process gets whole micro batches
        raise InputError(f"--effective_batch_size {cfg.effective_batch_size} is not a multiple of "
                         f"--micro_batch_size {cfg.micro_batch_size} x {world} processes")
    resume_from = check_output_dir(cfg, out, say)
    check_data_paths(cfg)  # before the model is found, which may mean a download

    # data first: a bad file fails here, before the model is loaded or anything written
    path = resolve_checkpoint(cfg.model_path)
    tokenizer = Tokenizer(path, template=cfg.chat_template)
    rows, eval_rows = load_data(cfg, tokenizer, say)
    observer = Observer(cfg, out, tokenizer, rank)  # samples, loss.svg, wandb: what the run shows (rank 0)
    steps_per_epoch = data.steps_per_epoch(len(rows), cfg.effective_batch_size)
    total_steps = cfg.max_steps or cfg.num_epochs * steps_per_epoch
    save_every = cfg.save_every if cfg.save_every is not None else math.ceil(total_steps / 10)

    # model, loss, optimizer: only the adapters' A and B train
    model = build_model(cfg, path, device, world, verbose=rank == 0)
    loss_fn = make_loss(cfg, model, world, device)  # before the optimizer: FSDP replaces the parameters
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params)

    # resume: adapter weights, optimizer state, RNG state and step from the newest checkpoint
    step = 0
    if resume_from is not None:
        step = load_checkpoint(resume_from, model, optimizer, sharded=cfg.fsdp)["step"]
        say(f"resumed from {resume_from} (step {step})")
    if rank == 0:
        start_output(out, cfg, step)
    observer.start(model, step)

    t_start = time.perf_counter()
    with catch_signals() as stop, tqdm(total=total_steps, initial=step, disable=rank != 0, desc="train") as bar, \
            following_free_cores(device, say) as check_threads:
        while step < total_steps:
            check_threads()  # CPU: threads for the cores free now (a run beside this one starts, or ends)
            # this step's rows: the epoch's shuffle, cut into this rank's micro batches
            epoch, step_in_epoch = divmod(step, steps_per_epoch)
            order = data.epoch_order(len(rows), cfg.seed, epoch)
            idx = data.step_batches(order, step_in_epoch, cfg.effective_batch_size, cfg.micro_batch_size, rank, world)
            micro = [batch_to(data.collate([rows[i] for i in b], tokenizer.pad_id), device) for b in idx]

            # one optimizer step: accumulate the micro batches' gradients, clip, update
            t0 = time.perf_counter()
            lr = lr_at(step, cfg, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = forward_backward(loss_fn, micro, world)
            grad_norm = nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
            if cfg.fsdp:  # a DTensor: the same norm on every rank, replicated
                grad_norm = grad_norm.full_tensor()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            # the step's one synchronization: the host waits for the GPU here, and only here
            loss, grad_norm = torch.stack([loss, grad_norm.to(loss.device)]).tolist()
            if not math.isfinite(loss):
                raise Diverged(f"loss is {loss} at step {step}: lower --learning_rate, or use --precision fp32")

            # log: loss per trained token, learning rate, gradient norm, speed; and whether a
            # Ctrl-C / SIGTERM reached any rank (summed over ranks on the host)
            dt = time.perf_counter() - t0
            n_tokens = sum(len(rows[i]["input_ids"]) for b in idx for i in b)
            counts = torch.tensor([n_tokens, stop["signal"] is not None], dtype=torch.float64)
            n_tokens, signals = distributed.all_sum(counts, world).tolist()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{n_tokens / dt:.0f}")
            record = dict(step=step, epoch=round(step / steps_per_epoch, 4), loss=round(loss, 6), lr=lr,
                          grad_norm=round(grad_norm, 6), tokens_per_s=round(n_tokens / dt, 1),
                          elapsed_s=round(time.perf_counter() - t_start, 2))

            # evaluate: every eval_every steps and at the end
            at_eval = (cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps
            if eval_rows and at_eval:
                eval_loss, ppl = evaluate(loss_fn, eval_rows, tokenizer.pad_id, cfg.micro_batch_size,
                                          device, rank, world)
                record.update(eval_loss=round(eval_loss, 6), eval_ppl=round(ppl, 4))
                say(f"step {step}: eval loss {eval_loss:.4f}, perplexity {ppl:.2f}")
            if at_eval:  # answers to --eval_prompts; on rank 0, {"eval_right": n} for the record
                record.update(observer.sample(model, step))
            if rank == 0 and (step % cfg.log_every == 0 or step == total_steps
                              or {"eval_loss", "eval_right"} & set(record)):
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                observer.log(record)

            # checkpoint: every save_every steps, and when Ctrl-C / SIGTERM reached any rank
            interrupted = signals > 0
            if interrupted or (save_every and step % save_every == 0 and step < total_steps):
                save_checkpoint(out, model, optimizer, {"step": step, "epoch": epoch}, cfg.keep_checkpoints,
                                sharded=cfg.fsdp)
            if interrupted:
                distributed.barrier(world)  # the checkpoint is written before any rank leaves
                raise Interrupted(stop["signal"] or signal.SIGTERM,
                                  f"interrupted: saved {out}/checkpoints/step-{step}; "
                                  f"continue with: python train.py --output_dir {out} --resume")

    # the adapter, in PEFT's format
    if cfg.fsdp:
        import fsdp
    with fsdp.gathered_lora(model) if cfg.fsdp else nullcontext():  # FSDP: the shards gathered whole
        if rank == 0:
            save_adapter(model, out, base_model_name_or_path=cfg.model_path)
    observer.finish(step)
    say(f"adapter saved to {out} ({step} steps, {time.perf_counter() - t_start:.0f} s)")
    distributed.barrier(world)  # no rank tears the process group down while rank 0 still writes
    return model


def main(argv=None):
    with exit_on_input_error("train.py"):
        cfg = parse_args(argv, __doc__)
        if cfg.estimate_memory:
            import memory
            print(memory.format_estimate(memory.estimate_for_run(cfg)))
            return
    rank, world, device = distributed.setup(cfg.fsdp)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for --precision fp32; bf16 runs are the same
    try:
        with exit_on_input_error("train.py"):
            train(cfg, rank, world, device)
    except Interrupted as e:
        if rank == 0:
            print(f"train.py: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    except Diverged as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("train.py: interrupted, nothing saved", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
