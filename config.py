"""The settings of a training run: TrainConfig, one dataclass whose fields are train.py's flags
(with their defaults and --help), the checks on them, and what a resumed run must share with
the run it continues. Its own file because train.py, memory.py (--estimate_memory) and the
tests read a run's settings without its loop.

    cfg = TrainConfig(lora_r=8, load_in_4bit=True)     # or parse_args(["--lora_r", "8", ...])
"""
import argparse
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from common import InputError
from hub import DEFAULT_MODEL
from tokenizer import TEMPLATES


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
    target_modules: str = flag("all-linear", "all-linear (the blocks' linears) or q_proj,v_proj,... "
                               "(lm_head, embed_tokens too)")
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
    wandb_project: str = flag(None, "also log metrics.jsonl's records to this Weights & Biases project "
                              "(pip install wandb)")
    wandb_run_name: str = flag(None, "the run's name on Weights & Biases (None: one it makes up)")


    def targets(self):
        """--target_modules as apply_lora takes it: "all-linear", or a list of names."""
        if self.target_modules == "all-linear":
            return "all-linear"
        return [t.strip() for t in self.target_modules.split(",")]

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
BOOKKEEPING = {"eval_every", "save_every", "keep_checkpoints", "log_every", "gradient_checkpointing", "compile",
               "output_dir", "resume", "eval_prompts", "wandb_project", "wandb_run_name", "fsdp_cpu_offload",
               "estimate_memory", "world_size"}


def parse_args(argv=None, description=None):
    """TrainConfig from the command line (--help: `description`, then the flags); with --resume,
    unset flags come from the run's train_config.json."""
    # Defaults are suppressed so that `given` holds only the flags actually typed.
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
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
