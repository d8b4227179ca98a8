"""Speed and memory of nanolora, side by side with transformers + peft in the same run.

    python bench.py                                  # CPU, SmolLM2-135M-Instruct, every measure
    python bench.py --only generate,quantize         # some of: machine generate quantize train fsdp
    python bench.py --only dora                      # DoRA against LoRA and PEFT's DoRA (not by default)
    python bench.py --only threads                   # CPU threads: alone and beside a second run (not by default)
    python bench.py --device cuda --config_json configs/llama3-8b.json   # random weights of a shape
    python bench.py --device cuda --config_json configs/llama3-8b.json --only train --seq_len 2048 \
        --micro_batch_size 1 --gradient_checkpointing   # QLoRA's goal shape: peak <= 6 GB, >= 2x transformers

On CUDA the model is built in bf16 on the device, the peak is that of the training steps alone,
and MFU and the decode floor are taken against a known card's data-sheet peaks (KNOWN_CARDS).

Machines are noisy: every figure that matters is printed as a ratio against the reference
measured in the same run, alternating runs. Training runs each in a fresh process so that its
peak memory (RSS on CPU, max allocated on CUDA) is its own: bench_worker.py is what runs there.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from bench_worker import our_model, sync, train_worker
from common import default_device, default_dtype
from hub import DEFAULT_MODEL, resolve_checkpoint
from model import Config


# Dense bf16 tensor-core peaks (no sparsity) and HBM bandwidths from the vendors' data sheets, by
# a piece of torch.cuda.get_device_name(); any other card is measured by machine().
KNOWN_CARDS = {  # name: (bf16 FLOP/s, bytes/s)
    "H200": (989e12, 4.8e12), "H100 NVL": (835e12, 3.9e12), "H100 PCIe": (756e12, 2.0e12),
    "H100": (989e12, 3.35e12),  # SXM
    "A100-SXM4-80GB": (312e12, 2.04e12), "A100-SXM4-40GB": (312e12, 1.56e12), "A100 80GB PCIe": (312e12, 1.94e12),
    "A100": (312e12, 1.56e12), "L40S": (362e12, 0.864e12), "L4": (121e12, 0.3e12), "A10G": (70e12, 0.6e12),
    "RTX 4090": (165e12, 1.0e12),
}


def card_peaks(device):
    """(name, bf16 FLOP/s, HBM bytes/s) of a known CUDA card, or None."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next(((name, *v) for k, v in KNOWN_CARDS.items() if k in name), None)


def timed(fn, device, repeat=3, best=False):
    """Median (or best) seconds of fn() over repeat runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return min(times) if best else statistics.median(times)


def machine(device):
    """Measured matmul rate (FLOP/s, fp32 on CPU, bf16 on CUDA) and copy bandwidth (bytes/s)."""
    cuda = torch.device(device).type == "cuda"
    n, dtype = (8192, torch.bfloat16) if cuda else (2048, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    flops = 2 * n**3 / timed(lambda: a @ b, device, 10, best=True)  # the machine's best, for MFU
    src = torch.rand(256 * 2**20 // 4, device=device)  # 256 MiB, larger than any cache; written, so
    # its pages are real (an untouched buffer reads as the shared zero page, far too fast)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / timed(lambda: dst.copy_(src), device, 5)  # read + write
    return flops, bandwidth


def load_models(args, dtype):
    """(ours, transformers' or None), in eval mode, with the same weights."""
    ours = our_model(args, dtype).eval()
    try:
        import transformers
    except ImportError:
        print("transformers is not installed: no reference figures", file=sys.stderr)
        return ours, None
    if args.config_json:
        config = transformers.AutoConfig.for_model(**json.load(open(args.config_json)))
        ref = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).to(args.device)
        ref.load_state_dict(ours.state_dict(), strict=False)  # same weights, names match
    else:
        ref = transformers.AutoModelForCausalLM.from_pretrained(resolve_checkpoint(args.model_path), dtype=dtype)
    return ours, ref.to(args.device).eval()


def bench_generate(args, dtype, bandwidth):
    from generate import generate

    ours, ref = load_models(args, dtype)
    prompt = [i % ours.config.vocab_size for i in range(100, 132)]  # 32 tokens, valid for any vocabulary
    n = args.new_tokens
    stats = {}

    def run_ours():
        list(generate(ours, prompt, n, stats=stats))

    def run_ref(new):
        ids = torch.tensor([prompt], device=args.device)
        sync(args.device)
        t = time.perf_counter()
        ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                     pad_token_id=0)
        sync(args.device)
        return time.perf_counter() - t

    ours_s, ref_s = [], []
    run_ours()
    if ref is not None:
        run_ref(n)
    for _ in range(3):  # alternate, so both see the same machine
        run_ours()
        ours_s.append(stats["decode_s"] / (stats["new_tokens"] - 1))
        if ref is not None:  # decoding alone: n new tokens minus the prefill and first token
            ref_s.append((run_ref(n) - run_ref(1)) / (n - 1))
    # each decoded token reads every weight once: the embedding table only if it is also lm_head
    weights = {p.data_ptr(): p.numel() * p.element_size() for p in ours.parameters()}
    if not ours.config.tie_word_embeddings:
        weights.pop(ours.model.embed_tokens.weight.data_ptr())
    weight_bytes = sum(weights.values())
    tok_s = 1 / statistics.median(ours_s)
    floor = bandwidth / weight_bytes
    print(f"generate: ours {tok_s:.1f} tok/s (decode, greedy, {n} new tokens, batch 1, {dtype})")
    print(f"  bandwidth floor: {weight_bytes / 1e6:.0f} MB of weights per token at {bandwidth / 1e9:.1f} GB/s = "
          f"{floor:.1f} tok/s; ours reaches {tok_s / floor:.0%} of it")
    if ref_s:
        ref_tok_s = 1 / statistics.median(ref_s)
        print(f"  transformers generate: {ref_tok_s:.1f} tok/s (decode, same settings); "
              f"ours / transformers = {tok_s / ref_tok_s:.2f}x")


def bench_quantize(args):
    """NF4 quantization speed against bitsandbytes, then the loaded QLoRA model's bytes against bf16."""
    from quant import quantize_nf4

    ours = our_model(args, torch.bfloat16)
    weights = [m.weight.data for n, m in ours.named_modules()
               if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]
    n_params = sum(w.numel() for w in weights)
    ours_s = timed(lambda: [quantize_nf4(w) for w in weights], args.device)
    line = (f"quantize: NF4 of {len(weights)} linear weights ({n_params / 1e6:.0f}M params, bf16, double quant): "
            f"ours {ours_s:.2f} s")
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        print(line + " (bitsandbytes not installed: no reference)")
    else:
        ref_s = timed(lambda: [bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
                               for w in weights], args.device)
        print(line + f", bitsandbytes {ref_s:.2f} s; ours speed / bitsandbytes = {ref_s / ours_s:.2f}x")
    b = held_bytes(ours)
    del ours, weights  # free the bf16 model before loading the NF4 one (an 8B shape on a GPU)
    a = held_bytes(our_model(args, torch.bfloat16, quantize="nf4"))
    print(f"QLoRA model loaded: {a / 2**20:.0f} MiB of tensors against {b / 2**20:.0f} MiB in bf16 = {a / b:.2f}x "
          f"(embeddings and norms stay bf16)")


def held_bytes(model):
    """Bytes of the distinct storages behind a model's parameters and buffers (tied weights once)."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()]}.values())


def lora_train_flops_per_token(config, seq_len, r):
    """Model FLOPs per trained token: the frozen matmuls run forward (2 per weight) and backward
    for the input gradient only (2 more; frozen weights get no gradient), LoRA's A and B
    forward and both backward passes (6 per parameter), attention scores and mixing
    (2 matmuls of 2*T/2*H*D per token on average under the causal mask, x3 with backward).
    The first block's q, k, v (frozen weight and LoRA A) need no input gradient: below them is
    only the frozen embedding."""
    c = config
    per_layer = c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads) \
        + 3 * c.hidden_size * c.intermediate_size
    frozen = c.num_hidden_layers * per_layer + c.hidden_size * c.vocab_size
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    lora = c.num_hidden_layers * r * ((c.hidden_size + q) * 2 + (c.hidden_size + kv) * 2
                                      + 3 * (c.hidden_size + c.intermediate_size))
    attention = c.num_hidden_layers * 2 * 2 * (seq_len / 2) * c.num_attention_heads * c.head_dim
    qkv_out = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    first_qkv_input_grad = 2 * c.hidden_size * qkv_out + 2 * c.hidden_size * r * 3
    return 4 * frozen + 6 * lora + 3 * attention - first_qkv_input_grad


def best_of(args, runs):
    """{name: result} of worker processes {name: their flags}, run in turn args.repeat times
    (these machines are noisy): each keeps its best tokens/s and lowest peak memory. A run that
    fails is said and left out."""
    best = {}
    for _ in range(args.repeat):
        for name, flags in runs.items():
            if best.get(name, {}) is None:
                continue
            r = subprocess.run(worker_command(args) + flags, capture_output=True, text=True)
            if r.returncode != 0:
                print(f"  {name}: failed: {last_error(r)}")
                best[name] = None
                continue
            res = json.loads(r.stdout.strip().splitlines()[-1])
            old = best.get(name, {"tok_s": 0, "peak_bytes": float("inf")})
            best[name] = {**res, "tok_s": max(res["tok_s"], old["tok_s"]),
                          "peak_bytes": min(res["peak_bytes"], old["peak_bytes"])}
    return {name: res for name, res in best.items() if res is not None}


def last_error(r):
    """What a failed worker (a subprocess.run result) said last, or its exit code."""
    return r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit code {r.returncode}"


def worker_command(args):
    """The command line of one train_worker process with this run's shape (--impl etc. to add)."""
    cmd = [sys.executable, __file__, "--worker", "--device", args.device, "--steps", str(args.steps),
           "--seq_len", str(args.seq_len), "--micro_batch_size", str(args.micro_batch_size),
           "--lora_r", str(args.lora_r)]
    cmd += ["--config_json", args.config_json] if args.config_json else ["--model_path", args.model_path]
    return cmd + (["--gradient_checkpointing"] if args.gradient_checkpointing else [])


def bench_dora(args):
    """A DoRA training step against a LoRA one (ours, on a plain and on an NF4 base), and against
    PEFT's DoRA, alternating fresh processes in one run; each keeps its best speed and lowest peak memory."""
    runs = {"ours LoRA": ["--impl", "ours"], "ours DoRA": ["--impl", "ours", "--dora"],
            "ours QLoRA": ["--impl", "ours", "--qlora"], "ours QLoRA-DoRA": ["--impl", "ours", "--qlora", "--dora"]}
    try:
        import peft  # noqa: F401
        runs["peft DoRA"] = ["--impl", "transformers", "--dora"]
    except ImportError:
        print("peft is not installed: no PEFT DoRA figures", file=sys.stderr)
    best = best_of(args, runs)
    mem = "max allocated" if torch.device(args.device).type == "cuda" else "peak RSS"
    print(f"train DoRA: r={args.lora_r} all-linear, seq {args.seq_len}, micro batch {args.micro_batch_size}")
    for name, res in best.items():
        print(f"  {name:15s} {res['tok_s']:8.0f} tok/s  {res['peak_bytes'] / 2**20:8.0f} MiB {mem}")
    pairs = [("ours DoRA", "ours LoRA"), ("ours QLoRA-DoRA", "ours QLoRA"), ("ours DoRA", "peft DoRA")]
    for a, b in [(a, b) for a, b in pairs if a in best and b in best]:
        print(f"  {a} / {b}: {best[a]['tok_s'] / best[b]['tok_s']:.2f}x tokens/s, "
              f"{best[a]['peak_bytes'] / best[b]['peak_bytes']:.2f}x peak memory")


def bench_train(args, flops):
    config = Config.from_dict(json.load(open(args.config_json))) if args.config_json else \
        Config.from_json(resolve_checkpoint(args.model_path) / "config.json")
    impls = ["ours"]
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
        impls.append("transformers+peft")
    except ImportError:
        print("transformers/peft are not installed: no reference figures", file=sys.stderr)
    per_token = lora_train_flops_per_token(config, args.seq_len, args.lora_r)
    for qlora in (False, True):
        kind = "QLoRA (NF4)" if qlora else "LoRA"
        mem = "max allocated" if torch.device(args.device).type == "cuda" else "peak RSS"
        dtype = "bf16" if args.device.startswith("cuda") else "fp32"
        print(f"train {kind}: r={args.lora_r} all-linear, seq {args.seq_len}, micro batch {args.micro_batch_size}, "
              f"{dtype}{', grad ckpt' if args.gradient_checkpointing else ''}, MFU against {flops / 1e12:.2f} TFLOP/s")
        results = best_of(args, {impl: ["--impl", impl.split("+")[0]] + ["--qlora"] * qlora for impl in impls})
        for impl, res in results.items():
            mfu = res["tok_s"] * per_token / flops
            est = res["estimate_bytes"]
            est = f"  (memory_report: {est / 2**20:.0f} MiB before activations)" if est else ""
            print(f"  {impl:18s} {res['tok_s']:8.0f} tok/s  {res['peak_bytes'] / 2**20:8.0f} MiB {mem}  "
                  f"MFU {mfu:.1%}{est}")
        if len(results) == 2:
            o, h = results["ours"], results["transformers+peft"]
            print(f"  ours / transformers+peft: {o['tok_s'] / h['tok_s']:.2f}x tokens/s, "
                  f"{o['peak_bytes'] / h['peak_bytes']:.2f}x peak memory")


def bench_threads(args):
    """One training run (ours) on its own, then beside a second one started just before it with the
    same choice, for each way of choosing CPU threads: every core (torch's default), one thread,
    train.py's (common.following_free_cores: the cores free now, checked again between steps every
    10 s), and every core with GNU OpenMP's threads sleeping when idle instead of spinning
    (OMP_WAIT_POLICY=passive, read as the runtime starts). Tokens/s of the measured run; the one
    beside it is stopped after."""
    n = os.cpu_count() or 1
    choices = {f"{n} threads (torch's default)": {"OMP_NUM_THREADS": str(n)}, "1 thread": {"OMP_NUM_THREADS": "1"},
               "train.py's, following free cores": {},
               f"{n} threads, OMP_WAIT_POLICY=passive": {"OMP_NUM_THREADS": str(n), "OMP_WAIT_POLICY": "passive"}}
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")}
    cmd = worker_command(args) + ["--impl", "ours", "--auto_threads"]
    print(f"threads: ours, LoRA r={args.lora_r}, seq {args.seq_len}, micro batch {args.micro_batch_size}, {n} cores; "
          f"best of {args.repeat}, tokens/s")
    for name, env in choices.items():
        res = {}
        for beside in (False, True):
            for _ in range(args.repeat):
                other = subprocess.Popen(cmd[:cmd.index("--steps") + 1] + ["1000000"] + cmd[cmd.index("--steps") + 2:],
                                         env={**base, **env}, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL) if beside else None
                r = subprocess.run(cmd, env={**base, **env}, capture_output=True, text=True)
                if other:
                    other.kill()
                    other.wait()
                if r.returncode:
                    sys.exit(f"bench.py: threads, {name}: {last_error(r)}")
                out = json.loads(r.stdout.strip().splitlines()[-1])
                res[beside] = max(res.get(beside, 0), out["tok_s"])
                res[f"threads{beside}"] = out["threads"]
        print(f"  {name:34s} alone {res[False]:7.0f} ({res['threadsFalse']} threads)   beside another run "
              f"{res[True]:7.0f} ({res['threadsTrue']} threads)   beside / alone {res[True] / res[False]:.2f}x")


def bench_fsdp(args):
    """Peak memory per process of 2 processes of train.py, DDP against --fsdp, run one after the
    other: tests/measure_peak.py in each process (after a short warm-up run, so that code pages are
    not counted) beside the total that --estimate_memory gives for the same run."""
    import re
    import tempfile

    if args.config_json:
        return print("fsdp: needs a checkpoint (--model_path), not --config_json")
    flags = ["--model_path", args.model_path, "--micro_batch_size", str(args.micro_batch_size),
             "--effective_batch_size", str(2 * args.micro_batch_size), "--max_steps", str(args.steps),
             "--max_seq_len", str(args.seq_len), "--lora_r", str(args.lora_r), "--save_every", "0"]
    flags += ["--load_in_4bit"] if args.qlora else []
    peaks = {}
    for name, extra in (("DDP", []), ("FSDP", ["--fsdp"])):
        with tempfile.TemporaryDirectory() as tmp:
            r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
                                "tests/measure_peak.py", args.model_path, *flags, *extra, "--output_dir", f"{tmp}/out"],
                               env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}, capture_output=True, text=True)
        if r.returncode:
            return print(f"fsdp: {name} failed:\n{r.stderr[-2000:]}")
        peaks[name] = [int(v) for _, v in sorted(re.findall(r"^peak (\d+) (\d+)$", r.stdout, re.M))]
        estimate = int(re.search(r"^estimate (\d+)$", r.stdout, re.M)[1])
        print(f"fsdp: 2 processes, {name}{' QLoRA' if args.qlora else ''}: peak per process "
              f"{', '.join(f'{p / 2**20:.0f}' for p in peaks[name])} MiB "
              f"(--estimate_memory: {estimate / 2**20:.0f} MiB)")
    print(f"  FSDP / DDP: {max(peaks['FSDP']) / max(peaks['DDP']):.2f}x peak memory per process")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=DEFAULT_MODEL)
    p.add_argument("--config_json", help="random weights of this config.json's shape instead of a checkpoint")
    p.add_argument("--device", default=default_device())
    p.add_argument("--only", default="machine,generate,quantize,train",
                   help="some of: machine generate quantize train dora fsdp threads (default: %(default)s)")
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--micro_batch_size", type=int, default=4)
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="timed training steps per process")
    p.add_argument("--repeat", type=int, default=2, help="training processes per implementation")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", default="ours", help=argparse.SUPPRESS)
    p.add_argument("--qlora", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dora", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--auto_threads", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return train_worker(args)
    only = set(args.only.split(","))
    torch.manual_seed(0)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    print(f"device: {args.device} ({where}), "
          f"torch {torch.__version__}, model: {args.config_json or args.model_path}")
    flops, bandwidth = machine(args.device) if only & {"machine", "generate", "train"} else (None, None)
    if "machine" in only:
        print(f"machine: matmul {flops / 1e9:.1f} GFLOP/s, copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    card = card_peaks(args.device)
    if card and flops:  # MFU and the decode floor against the data sheet's peaks, not the measured ones
        print(f"peaks assumed for MFU and the decode floor: {card[0]}, dense bf16 {card[1] / 1e12:.0f} TFLOP/s, "
              f"HBM {card[2] / 1e12:.2f} TB/s (data sheet; measured here: {flops / 1e12:.0f} TFLOP/s, "
              f"copy {bandwidth / 1e12:.2f} TB/s)")
        flops, bandwidth = card[1], card[2]
    dtype = default_dtype(args.device)
    if "generate" in only:
        bench_generate(args, dtype, bandwidth)
    if "quantize" in only:
        bench_quantize(args)
    if "train" in only:
        bench_train(args, flops)
    if "dora" in only:
        bench_dora(args)
    if "fsdp" in only:
        bench_fsdp(args)
    if "threads" in only:
        bench_threads(args)


if __name__ == "__main__":
    main()
