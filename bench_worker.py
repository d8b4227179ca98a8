"""One training configuration of bench.py, measured in the process it runs in.

    python bench.py --worker --impl ours --steps 3 [--qlora] [--dora] [--auto_threads]   # one JSON line

Its own file because it is the other side of bench.py: bench.py starts a fresh process for
every training run (so that its peak memory, RSS on CPU or max allocated on CUDA, is its own)
and compares their figures; this is what runs inside one: ours or transformers + peft built for
the shape, a warm-up step, the timed steps, and the figures printed as a JSON line. bench.py's
other benchmarks build our model the same way (our_model).
"""
import json
import sys
import time
from contextlib import nullcontext

import torch

from common import default_dtype, following_free_cores
from data import IGNORE
from hub import resolve_checkpoint
from model import Config, Transformer


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def our_model(args, dtype, quantize=None):
    """Our model: the checkpoint, or (seeded) random weights of --config_json's shape."""
    if not args.config_json:
        return Transformer.from_pretrained(resolve_checkpoint(args.model_path), dtype=dtype, device=args.device,
                                           quantize=quantize)
    from quant import quantize_model

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in dtype where it will run: no fp32 copy first (1.5x the model at peak)
    try:
        with torch.device(args.device):
            model = Transformer(Config.from_dict(json.load(open(args.config_json))))
    finally:
        torch.set_default_dtype(default)
    return quantize_model(model) if quantize else model


def ours_to_train(args, dtype):
    """(model, loss of a batch of ids): ours with LoRA on every linear layer, the fused loss."""
    from adapters import apply_lora
    from loss import CausalLMLoss

    model = our_model(args, dtype, quantize="nf4" if args.qlora else None)
    apply_lora(model, r=args.lora_r, alpha=2 * args.lora_r, dropout=0.0, target_modules="all-linear",
               use_dora=args.dora, verbose=False)
    model.enable_gradient_checkpointing(args.gradient_checkpointing)
    loss_fn = CausalLMLoss(model, fused=True).train()

    def loss_of(ids):
        targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], IGNORE)], 1)
        return loss_fn(ids, targets, None, None) / (targets != IGNORE).sum()
    return model, loss_of


def reference_to_train(args, dtype):
    """(model, loss of a batch of ids): transformers + peft (+ bitsandbytes for QLoRA), the same shape."""
    import peft
    import transformers

    kw = {}
    if args.qlora:
        kw["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    if args.config_json and args.qlora:  # transformers quantizes only while loading: save random weights first
        import tempfile
        config = transformers.AutoConfig.for_model(**json.load(open(args.config_json)))
        with tempfile.TemporaryDirectory() as tmp:
            transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(tmp)
            model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, device_map=args.device,
                                                                      **kw)
    elif args.config_json:
        config = transformers.AutoConfig.for_model(**json.load(open(args.config_json)))
        with torch.device(args.device):  # built in dtype on the device, as ours
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(resolve_checkpoint(args.model_path), dtype=dtype,
                                                                  device_map=args.device, **kw)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = peft.get_peft_model(model, peft.LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                                        target_modules="all-linear", task_type="CAUSAL_LM",
                                                        use_dora=args.dora)).train()

    def loss_of(ids):
        return model(input_ids=ids, labels=ids).loss
    return model, loss_of


def train_worker(args):
    """One training configuration in this process; prints a JSON line with its figures."""
    torch.manual_seed(0)
    cuda = torch.device(args.device).type == "cuda"
    dtype = default_dtype(args.device)
    B, T = args.micro_batch_size, args.seq_len
    model, loss_of = (ours_to_train if args.impl == "ours" else reference_to_train)(args, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (B, T), device=args.device)

    def step():
        check_threads()
        loss_of(ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if cuda:  # the peak of training: not the model's build or load
        torch.cuda.reset_peak_memory_stats()
    follow = following_free_cores(args.device, lambda text: print(text, file=sys.stderr)) if args.auto_threads \
        else nullcontext(lambda: None)  # --auto_threads: threads as train.py chooses them, step by step
    with follow as check_threads:
        step()  # warm-up (also allocates the optimizer state)
        sync(args.device)
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync(args.device)
        dt = (time.perf_counter() - t) / args.steps
        threads = torch.get_num_threads()
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss()
    estimate = None
    if args.impl == "ours":  # weights + LoRA + gradients + AdamW state, before activations
        from memory import memory_report
        estimate = memory_report(model)["total_bytes"]
    print(json.dumps({"tok_s": B * T / dt, "peak_bytes": peak, "estimate_bytes": estimate,
                      "threads": threads}))


def peak_rss():
    """This process's peak resident memory in bytes. (Not getrusage's ru_maxrss: Linux carries
    it over fork and exec, so a worker would inherit the bench's own peak.)"""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
