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
"""
import argparse
import json
import math
import os
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from adapters import apply_lora, count_parameters
from checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from common import InputError, default_device, default_dtype, exit_on_input_error
import data
from data import IGNORE
import fsdp
from hub import DEFAULT_MODEL, resolve_checkpoint
from loss import CausalLMLoss, fused_loss_applies
from model import Transformer
from observe import Observer, cut_back
from peft_format import save_adapter
from tokenizer import TEMPLATES, Tokenizer


def flag(default, help, choices=None):
    """A TrainConfig field; `help` is what `python train.py --help` shows beside --name."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    # what to train, on what, and where the results go
    model_path: str = flag(DEFAULT_MODEL, "checkpoint folder or hub id")
    data_path: str = flag("data/brannock_chat.jsonl", "training JSONL (messages, ShareGPT, Alpaca or text)")
    eval_data_path: str = flag(None, "evaluation JSONL")
    eval_split: float = flag(0.0, "or hold out this fraction of the training rows")
    output_dir: str = flag("out/lora", "adapter, checkpoints/, train_config.json, metrics.jsonl")
    # the adapter
    lora_r: int = flag(16, "rank of A (r, in) and B (out, r)")
    lora_alpha: float = flag(32.0, "scaling = alpha / r (usually alpha = 2r)")
    lora_dropout: float = flag(0.05, "dropout on the adapter's input")
    use_rslora: bool = flag(False, "scaling = alpha / sqrt(r)")
    use_dora: bool = flag(False, "DoRA: a trained magnitude per output row times LoRA's direction")
    target_modules: str = flag("all-linear", "all-linear (the blocks' linears) or q_proj,v_proj,... (lm_head, embed_tokens too)")
    load_in_4bit: bool = flag(False, "QLoRA: NF4-quantize the frozen base")
    # the schedule
    num_epochs: int = flag(5, "passes over the training rows")
    max_steps: int = flag(0, "optimizer steps; 0: num_epochs worth")
    micro_batch_size: int = flag(4, "rows per forward pass, per process")
    effective_batch_size: int = flag(8, "rows per optimizer step, all processes together")
    learning_rate: float = flag(5e-4, "peak learning rate")
    warmup_steps: int = flag(5, "linear warmup from 0")
    lr_scheduler: str = flag("cosine", "decay after warmup", ("cosine", "linear", "constant"))
    weight_decay: float = flag(0.0, "AdamW's decoupled weight decay")
    max_grad_norm: float = flag(1.0, "clip the gradient norm; 0: no clipping")
    optimizer: str = flag("adamw", "adamw: 8 bytes of state per trained parameter, one fused kernel on CUDA "
                          "(the fast one); adamw8bit: 2 bytes, but bitsandbytes waits for the GPU after each "
                          "tensor (slower); paged_adamw8bit: the same, paged out to host memory under pressure",
                          ("adamw", "adamw8bit", "paged_adamw8bit"))
    seed: int = flag(42, "LoRA init, dropout and the order of rows")
    # the rows
    max_seq_len: int = flag(512, "longer examples are truncated (and counted)")
    sample_packing: bool = flag(False, "pack several examples per row")
    train_on_inputs: bool = flag(False, "learn prompts too, not only replies")
    chat_template: str = flag(None, "override the detected template", TEMPLATES)
    # how it is computed
    precision: str = flag(None, "default: bf16 on CUDA, fp32 on CPU", ("bf16", "fp32"))
    loss: str = flag("fused", "plain: logits, then cross_entropy; fused: the same in chunks, no full logits "
                     "(when lm_head has no adapter)", ("fused", "plain"))
    compile: bool = flag(False, "torch.compile each block: faster steps after the first ones, which compile")
    gradient_checkpointing: str = flag(None, "recompute blocks in backward: less memory; offload: "
                                       "their inputs wait in host memory (the longest sequences)", ("on", "offload"))
    enable_model_splitting: bool = flag(False, "spread layers over the visible GPUs (one process)")
    fsdp: bool = flag(False, "shard base, adapters, gradients and optimizer states over the processes (FSDP2)")
    fsdp_cpu_offload: bool = flag(False, "with --fsdp: keep the shards in host memory between uses")
    # will it fit? print the memory each process needs, then exit
    estimate_memory: bool = flag(False, "print the estimated memory per process (reads config.json only) and exit")
    world_size: int = flag(1, "with --estimate_memory: the number of processes")
    # bookkeeping: may change when resuming
    eval_every: int = flag(0, "steps between evaluations; 0: at the end only")
    save_every: int = flag(None, "steps between checkpoints; default: a tenth of the run; 0: none")
    keep_checkpoints: int = flag(1, "how many of the newest checkpoints to keep; 0: all")
    log_every: int = flag(1, "steps between lines of metrics.jsonl")
    resume: bool = flag(False, "continue the run in output_dir, with its own settings")
    eval_prompts: str = flag(None, 'JSONL of {"prompt", "expected"} (and "tools": expected may be a tool name): '
                             "greedy answers at each evaluation into samples.jsonl, a before/after table at the end")
    wandb_project: str = flag(None, "also log metrics.jsonl's records to this Weights & Biases project (pip install wandb)")
    wandb_run_name: str = flag(None, "the run's name on Weights & Biases (None: one it makes up)")


    def targets(self):
        """--target_modules as apply_lora takes it: "all-linear", or a list of names."""
        return "all-linear" if self.target_modules == "all-linear" else [t.strip() for t in self.target_modules.split(",")]

    def problem(self):
        """What is wrong with these settings, as argparse says it ("--flag must be ..."), or None."""
        bounds = [("lora_r", self.lora_r > 0, "must be positive"),
                  ("micro_batch_size", self.micro_batch_size > 0, "must be positive"),
                  ("max_seq_len", self.max_seq_len > 1, "must be at least 2"),
                  ("learning_rate", self.learning_rate > 0, "must be positive"),
                  ("eval_split", 0 <= self.eval_split < 1, "must be in [0, 1)"),
                  ("lora_dropout", 0 <= self.lora_dropout < 1, "must be in [0, 1)"),
                  ("num_epochs", self.num_epochs > 0 or self.max_steps > 0, "must be positive"),
                  ("world_size", self.world_size > 0, "must be positive")]
        for name, ok, what in bounds:
            if not ok:
                return f"--{name} {what}"
        fsdp = "do not work with --fsdp yet"
        exclusions = [
            (self.eval_data_path and self.eval_split, "--eval_data_path and --eval_split exclude each other"),
            (self.fsdp and self.enable_model_splitting,
             "--fsdp and --enable_model_splitting exclude each other (FSDP spreads the model over processes)"),
            (self.fsdp_cpu_offload and not self.fsdp, "--fsdp_cpu_offload needs --fsdp"),
            # both start from the frozen weight (DoRA's magnitude is its row norms), which --fsdp
            # reads only after the adapters are made
            (self.fsdp and (self.use_dora or "embed_tokens" in self.target_modules),
             f"--use_dora and an embed_tokens target {fsdp}"),
            # rank 0 generates alone, and a sharded model needs every rank
            (self.fsdp and self.eval_prompts, f"--eval_prompts {fsdp}: use it in a run without --fsdp"),
            (self.fsdp and self.compile, f"--compile and --fsdp {fsdp}: compiling FSDP's hooks is untested here"),
            (self.fsdp and self.optimizer != "adamw", f"--optimizer {self.optimizer}: bitsandbytes' 8-bit optimizers "
             "do not take sharded parameters; use adamw with --fsdp")]
        return next((what for bad, what in exclusions if bad), None)


# Settings that do not change what a run computes: --resume may be given new values for these.
BOOKKEEPING = {"eval_every", "save_every", "keep_checkpoints", "log_every", "gradient_checkpointing", "compile", "output_dir",
               "resume", "eval_prompts", "wandb_project", "wandb_run_name", "fsdp_cpu_offload", "estimate_memory",
               "world_size"}


def parse_args(argv=None):
    """TrainConfig from the command line; with --resume, unset flags come from the run's train_config.json."""
    # Defaults are suppressed so that `given` holds only the flags actually typed.
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS)
    for f in fields(TrainConfig):
        # "(default: False)" says nothing; what None means is in the help text itself
        default = "" if f.default in (None, False) else f" (default: {f.default})"
        kw = {"help": f.metadata["help"] + default}
        if f.type is bool:
            p.add_argument(f"--{f.name}", action="store_true", **kw)
        elif f.name == "gradient_checkpointing":  # --gradient_checkpointing alone means "on"
            p.add_argument(f"--{f.name}", nargs="?", const="on", choices=f.metadata["choices"], **kw)
        else:
            p.add_argument(f"--{f.name}", type=f.type, choices=f.metadata["choices"], **kw)
    given = vars(p.parse_args(argv))
    saved = read_run_config(Path(given.get("output_dir", TrainConfig.output_dir))) if given.get("resume") else {}
    cfg = TrainConfig(**{**saved, **given})
    if problem := cfg.problem():
        p.error(problem)
    return cfg


def read_run_config(out):
    """The TrainConfig fields a run in `out` was started with (its train_config.json)."""
    path = out / "train_config.json"
    if not path.exists():
        raise InputError(f"--resume: no run to continue in {out} (no train_config.json)")
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    names = {f.name for f in fields(TrainConfig)} - {"output_dir", "resume"}
    return {k: v for k, v in saved.items() if k in names}


def check_same_run(cfg, saved, say):
    """--resume continues the run as it was started: a setting that changes it is refused."""
    for name, was in saved.items():
        now = getattr(cfg, name)
        if now == was:
            continue
        if name not in BOOKKEEPING:
            raise InputError(f"--{name} {now}: this run was started with {was} "
                             f"({cfg.output_dir}/train_config.json); --resume continues the same run")
        say(f"resume: --{name} {now} (was {was})")


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
    n_targets = all_sum(torch.tensor(float(sum(len(b["keep"]) for b in micro))), world).item()
    loss_sum = 0
    for i, b in enumerate(micro):
        # DDP all-reduces gradients in backward: only the last micro batch of the step needs it
        sync = i == len(micro) - 1 or world == 1
        with fsdp.no_sync(loss_fn) if not sync else nullcontext():
            loss = loss_fn(b["input_ids"], b["targets"], b["position_ids"], b["doc_ids"], b["keep"])
            (loss * (world / n_targets)).backward()  # DDP averages over ranks: * world makes it a sum
        loss_sum = loss_sum + loss.detach()
    return all_sum(loss_sum, world) / n_targets


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
    loss = (all_sum(total, world)[0] / total[1].clamp(min=1)).item()
    return loss, math.exp(min(loss, 50))


def batch_to(b, device):
    """A collated batch on the device, with `keep`: the flat indices of its trained positions,
    found here on the host (on a GPU, a boolean mask would make the host wait). On CUDA the
    copies come from pinned memory and do not block: the host runs ahead to the next kernels."""
    b = dict(b, keep=(b["targets"].view(-1) != IGNORE).nonzero().squeeze(1))
    cuda = torch.device(device).type == "cuda"
    return {k: None if v is None else (v.pin_memory() if cuda else v).to(device, non_blocking=cuda) for k, v in b.items()}


# --- setup -------------------------------------------------------------------------------------

# On GPUs, NCCL for CUDA tensors and gloo for CPU ones: the step's counts are summed on the host,
# and FSDP's offloaded shards and gradients are CPU DTensors (clip_grad_norm_, full_tensor()).
BACKEND = "cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo"


def setup_distributed(fsdp=False):
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


def cpu_threads():
    """Threads for training on the CPU: torch's default (one per core) less the cores that other
    processes keep busy now. Threads that outnumber the free cores spin-wait on each other (GNU
    OpenMP's default), and two runs sharing cores can each go many times slower than with fewer
    threads. OMP_NUM_THREADS, when set, decides; without /proc (macOS, Windows), torch's default."""
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    try:
        busy = runnable_now() - 1  # less this process's own thread
    except (OSError, ValueError, IndexError):
        return torch.get_num_threads()
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - busy))


def all_sum(x, world):
    if world > 1:
        dist.all_reduce(x)
    return x


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
    lora = dict(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=cfg.targets(), use_rslora=cfg.use_rslora,
                use_dora=cfg.use_dora)
    if cfg.fsdp:  # read block by block, each sharded before the next is read
        model = fsdp.load_sharded(path, dtype, device, cfg.load_in_4bit, lora, cfg.fsdp_cpu_offload)
        if verbose:
            trainable, total = count_parameters(model)
            print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")
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
        return fsdp.shard_root(loss_fn, cfg.fsdp_cpu_offload)
    if world == 1:
        return loss_fn
    on_cuda = torch.device(device).type == "cuda"
    return nn.parallel.DistributedDataParallel(loss_fn, device_ids=[device] if on_cuda else None)


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
        step = load_checkpoint(resume_from, model, optimizer)["step"]
        say(f"resumed from {resume_from} (step {step})")
    if rank == 0:
        start_output(out, cfg, step)
    observer.start(model, step)

    t_start = time.perf_counter()
    with catch_signals() as stop, tqdm(total=total_steps, initial=step, disable=rank != 0, desc="train") as bar:
        while step < total_steps:
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
            if isinstance(grad_norm, DTensor):  # FSDP: the same norm on every rank, replicated
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
            n_tokens, signals = all_sum(torch.tensor([n_tokens, stop["signal"] is not None], dtype=torch.float64), world).tolist()
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
                save_checkpoint(out, model, optimizer, {"step": step, "epoch": epoch}, cfg.keep_checkpoints)
            if interrupted:
                if world > 1:
                    dist.barrier()  # the checkpoint is written before any rank leaves
                raise Interrupted(stop["signal"] or signal.SIGTERM,
                                  f"interrupted: saved {out}/checkpoints/step-{step}; "
                                  f"continue with: python train.py --output_dir {out} --resume")

    # the adapter, in PEFT's format
    with fsdp.gathered_lora(model):
        if rank == 0:
            save_adapter(model, out, base_model_name_or_path=cfg.model_path)
    observer.finish(step)
    say(f"adapter saved to {out} ({step} steps, {time.perf_counter() - t_start:.0f} s)")
    if world > 1:
        dist.barrier()  # no rank tears the process group down while rank 0 still writes
    return model


def main(argv=None):
    with exit_on_input_error("train.py"):
        cfg = parse_args(argv)
        if cfg.estimate_memory:
            import memory
            print(memory.format_estimate(memory.estimate_for_run(cfg)))
            return
    rank, world, device = setup_distributed(cfg.fsdp)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for --precision fp32; bf16 runs are the same
    threads = cpu_threads()
    if device.type == "cpu" and threads != torch.get_num_threads():
        print(f"cpu: {threads} threads, not {torch.get_num_threads()}: other processes keep cores busy now; "
              "OMP_NUM_THREADS=N to choose")
        torch.set_num_threads(threads)
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
