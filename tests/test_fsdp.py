"""fsdp.py and memory.py on CPU (gloo, 2 processes): --fsdp against one process, resume under FSDP,
NF4 storage sharded and gathered, per-rank memory against DDP, --estimate_memory against a measured peak."""
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from config import parse_args
import data
from helpers import (ROOT, chat, config, losses, max_error, tiny_config, write_checkpoint, write_jsonl,
                    write_tiny_tokenizer)
import train

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone"]


def make_checkpoint(path, **kw):
    """A random model saved as a Hugging Face folder with a ChatML word-level tokenizer (ids < 128)."""
    from model import Transformer

    torch.manual_seed(0)
    model = Transformer(tiny_config(**kw))
    with torch.no_grad():
        model.lm_head.weight.mul_(8)  # wider logit gaps, so the loss can fall (see helpers.make_tiny_checkpoint)
    write_checkpoint(path, model)
    write_tiny_tokenizer(path)
    (path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "add_bos_token": False,
        "chat_template": "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + "
                         "'<|im_end|>\\n'}}{% endfor %}"}))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


def adapter(out):
    return load_file(out / "adapter_model.safetensors")


def spawn(worker, tmp_path, *args):
    """Run worker(rank, tmp_path, *args) in 2 processes (torch.multiprocessing), which join a gloo
    group through a file in tmp_path (no network port to collide with other tests')."""
    mp.start_processes(worker, args=(tmp_path, *args), nprocs=2, start_method="spawn")


def join_group(rank, tmp_path):
    """rank, world size, device, as distributed.setup returns them under torchrun."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=rank, world_size=2)
    return rank, 2, torch.device("cpu")


# lm_head's adapter is in the root unit
ALL_AND_HEAD = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head"


@pytest.mark.parametrize("flags", [["--target_modules", ALL_AND_HEAD],
                                   ["--load_in_4bit", "--gradient_checkpointing", "--fsdp_cpu_offload"]],
                         ids=["lora-with-lm_head", "qlora-checkpointing-offload"])
def test_fsdp_matches_one_process(tiny, tmp_path, flags):
    # One process, 4 micro batches of 2 per step, against torchrun --fsdp: 2 ranks x 2 micro batches
    # of 2 (accumulated without sync, then reduce-scattered). The same rows in each step: the same
    # loss at every step (fp32, atol 1e-5) and the same final adapter (max error 1e-4 of the largest entry).
    one = config(tiny, tmp_path, output_dir=str(tmp_path / "one"), num_epochs=4, effective_batch_size=8,
                 load_in_4bit="--load_in_4bit" in flags, gradient_checkpointing="--gradient_checkpointing" in flags,
                 target_modules=ALL_AND_HEAD if ALL_AND_HEAD in flags else "all-linear")
    train.train(one)
    args = ["train.py", "--model_path", str(tiny), "--data_path", one.data_path, "--output_dir", str(tmp_path / "two"),
            "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0", "--learning_rate", "1e-2",
            "--warmup_steps", "2", "--micro_batch_size", "2", "--effective_batch_size", "8", "--num_epochs", "4",
            "--save_every", "0", "--seed", "0", "--fsdp", *flags]
    r = subprocess.run(TORCHRUN + args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 4 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    full, sharded = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    assert full.keys() == sharded.keys() and max_error([sharded[k] for k in full], [full[k] for k in full]) < 1e-4
    assert json.loads((tmp_path / "two" / "adapter_config.json").read_text())["r"] == 8, "an ordinary PEFT adapter"


def test_fsdp_without_torchrun_is_a_world_of_one(tiny, tmp_path):
    # python train.py --fsdp: a process group of one; the same adapter as without --fsdp (bitwise on CPU).
    cfg = config(tiny, tmp_path, output_dir=str(tmp_path / "plain"), num_epochs=1)
    train.train(cfg)
    argv = ["--model_path", str(tiny), "--data_path", cfg.data_path, "--output_dir", str(tmp_path / "fsdp"),
            "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0", "--learning_rate", "1e-2",
            "--warmup_steps", "2", "--micro_batch_size", "2", "--effective_batch_size", "4", "--num_epochs", "1",
            "--save_every", "0", "--seed", "0", "--fsdp"]
    train.main(argv)
    assert not dist.is_initialized(), "the group of one is torn down"
    plain, sharded = adapter(tmp_path / "plain"), adapter(tmp_path / "fsdp")
    assert plain.keys() == sharded.keys() and all(torch.equal(plain[k], sharded[k]) for k in plain)


@pytest.mark.parametrize("flags, message", [
    (["--fsdp", "--enable_model_splitting"], "--fsdp and --enable_model_splitting exclude each other"),
    (["--fsdp_cpu_offload"], "--fsdp_cpu_offload needs --fsdp"),
    (["--fsdp", "--optimizer", "adamw8bit"],
     "--optimizer adamw8bit: bitsandbytes' 8-bit optimizers do not take sharded"),
    (["--estimate_memory", "--world_size", "0"], "--world_size must be positive"),
])
def test_bad_fsdp_flags_are_one_line_exit_2(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(flags)
    err = capsys.readouterr().err  # argparse's usage, then one line: "<program>: error: <message>"
    assert e.value.code == 2 and f"error: {message}" in err.splitlines()[-1]


def _resume_worker(rank, tmp_path, base):
    rank, world, device = join_group(rank, tmp_path)
    cfg = lambda name, **kw: dataclasses.replace(base, output_dir=str(tmp_path / name), **kw)
    train.train(cfg("full"), rank, world, device)
    real, calls = data.step_batches, []

    def step_batches(*a):  # SIGTERM reaches rank 0 while step 3 runs
        calls.append(1)
        if rank == 0 and len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a)

    data.step_batches = step_batches
    try:
        train.train(cfg("cut"), rank, world, device)
        raise AssertionError("the run was not interrupted")
    except train.Interrupted:
        pass
    data.step_batches = real
    train.train(cfg("cut", resume=True), rank, world, device)
    dist.destroy_process_group()


def test_fsdp_resume_after_interruption_gives_the_same_adapter(tiny, tmp_path):
    # 2 ranks under FSDP, dropout on (each rank's RNG state is saved); SIGTERM on one rank mid-step:
    # both finish the step, save step 3 (gathered), exit; --resume continues to the same adapter and
    # losses as the uninterrupted run (bitwise).
    # rows of different lengths: the ranks draw different numbers of dropout masks, so their RNG states differ
    rows = [chat(" ".join(f"w{j}" for j in range(i + 1)), f"w{i + 20} w{i + 40}") for i in range(8)]
    base = config(tiny, tmp_path, micro_batch_size=1, num_epochs=3, save_every=2, keep_checkpoints=0, lora_dropout=0.1,
                  fsdp=True, data_path=str(write_jsonl(tmp_path / "varied.jsonl", rows)))  # the ranks only read it
    spawn(_resume_worker, tmp_path, base)
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step-2", "step-3", "step-4"]
    full, resumed = adapter(tmp_path / "full"), adapter(tmp_path / "cut")
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    assert losses(tmp_path / "full") == losses(tmp_path / "cut")


def _nf4_worker(rank, tmp_path):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from quant import NF4Linear

    join_group(rank, tmp_path)
    torch.manual_seed(0)
    w = torch.randn(96, 70) * torch.rand(96, 1)  # 6720 weights: 105 blocks, 3360 packed bytes
    layer = NF4Linear.from_weight(w)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    expected = layer.dequantize()
    fully_shard(layer)
    pieces = {n: p.to_local().numel() for n, p in layer.named_parameters() if isinstance(p, DTensor)}
    layer.unshard()  # all-gathers the codes and statistics, as before a forward
    same = all(torch.equal(p, before[n]) for n, p in layer.named_parameters())
    if rank == 0:
        torch.save({"pieces": pieces, "sizes": {n: t.numel() for n, t in before.items()}, "same_bytes": same,
                    "same_weight": torch.equal(layer.dequantize(), expected),
                    "same_output": torch.equal(layer(torch.ones(3, 70)), torch.ones(3, 70) @ expected.T)},
                   tmp_path / "result.pt")
    dist.barrier()  # neither rank tears the group down while the other still uses it
    dist.destroy_process_group()


def test_nf4_storage_sharded_and_gathered_dequantizes_as_before(tmp_path):
    spawn(_nf4_worker, tmp_path)
    r = torch.load(tmp_path / "result.pt")
    assert r["pieces"] == {n: -(-s // 2) for n, s in r["sizes"].items()}, "each rank holds half of every tensor"
    assert r["same_bytes"], "gathered codes and statistics equal the ones quantize_nf4 wrote"
    assert r["same_weight"] and r["same_output"], "the gathered layer dequantizes and computes as before sharding"


@pytest.fixture(scope="module")
def weighty(tmp_path_factory):
    """A model whose weights (fp32, ~100 MB) dominate its training memory, with rows of 32 tokens."""
    root = tmp_path_factory.mktemp("weighty")
    ckpt = make_checkpoint(root / "ckpt", hidden_size=512, intermediate_size=2048, num_hidden_layers=6,
                           num_attention_heads=8, num_key_value_heads=4, vocab_size=4096)
    rows = [{"text": " ".join(f"w{(7 * i + j) % 120 + 3}" for j in range(64))} for i in range(8)]
    return ckpt, write_jsonl(root / "rows.jsonl", rows)


def measure(launcher, ckpt, rows, warmup, out, *flags):
    """{"peak": [bytes per rank], "estimate": bytes} from tests/measure_peak.py."""
    args = ["tests/measure_peak.py", str(warmup), "--model_path", str(ckpt), "--data_path", str(rows),
            "--output_dir", str(out), "--micro_batch_size", "2", "--effective_batch_size", "4", "--max_steps", "1",
            "--max_seq_len", "32", "--lora_r", "8", "--lora_dropout", "0", "--precision", "fp32", "--save_every", "0",
            *flags]
    r = subprocess.run(launcher + args, cwd=ROOT, env={**ENV, "MALLOC_MMAP_THRESHOLD_": "65536"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    peaks = dict(re.findall(r"^peak (\d) (\d+)$", r.stdout, re.M))
    estimate = int(re.search(r"^estimate (\d+)$", r.stdout, re.M)[1])
    return {"peak": [int(peaks[k]) for k in sorted(peaks)], "estimate": estimate}


def test_estimate_memory_reads_only_config_json_and_writes_nothing(tiny, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text((tiny / "config.json").read_text())  # no weights, no tokenizer
    r = subprocess.run([sys.executable, "train.py", "--model_path", str(tmp_path / "model"), "--output_dir",
                        str(tmp_path / "out"), "--estimate_memory", "--load_in_4bit", "--fsdp", "--world_size", "8"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for line in ("base nf4", "lora", "grads", "optimizer", "activations (no checkpointing)",
                 "activations (checkpointing)", "largest transient", "total", "FSDP over 8"):
        assert line in r.stdout, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "nothing written"


def test_estimate_is_within_15_percent_of_the_measured_peak(weighty, tiny, tmp_path):
    # One process, LoRA on an fp32 base: --estimate_memory's total against the measured peak.
    ckpt, rows = weighty
    m = measure([sys.executable], ckpt, rows, tiny, tmp_path / "one")
    assert abs(m["estimate"] - m["peak"][0]) < 0.15 * m["peak"][0], m


def test_fsdp_rank_holds_about_half_of_what_a_ddp_rank_holds(weighty, tiny, tmp_path):
    # Each rank's measured peak under --fsdp against DDP's: the base (nearly all of it) is halved;
    # and --estimate_memory --fsdp --world_size 2 within 15% of the FSDP ranks' peak.
    ckpt, rows = weighty
    ddp = measure(TORCHRUN, ckpt, rows, tiny, tmp_path / "ddp")
    fsdp = measure(TORCHRUN, ckpt, rows, tiny, tmp_path / "fsdp", "--fsdp")
    assert len(ddp["peak"]) == len(fsdp["peak"]) == 2
    assert max(fsdp["peak"]) < 0.7 * min(ddp["peak"]), (fsdp, ddp)
    assert abs(fsdp["estimate"] - max(fsdp["peak"])) < 0.15 * max(fsdp["peak"]), fsdp


def _units_worker(rank, tmp_path, ckpt):
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    import fsdp
    import loss

    join_group(rank, tmp_path)
    torch.manual_seed(0)
    model = fsdp.load_sharded(ckpt, torch.float32, "cpu", False, dict(r=4, alpha=8, target_modules="all-linear"))
    loss_fn = fsdp.shard_root(loss.CausalLMLoss(model, fused=True), model)
    seen = []  # the lm_head weight the fused loss computes with: a whole plain tensor, or a shard
    apply = loss.LinearCrossEntropy.apply
    loss.LinearCrossEntropy.apply = lambda h, w, t: seen.append((isinstance(w, DTensor), tuple(w.shape))) or apply(
        h, w, t)
    ids = torch.arange(32).view(2, 16) % 100 + 3
    value = loss_fn(ids, torch.roll(ids, -1, 1), None, None)
    value.backward()
    tables = {"embed_tokens": model.model.embed_tokens.weight, "lm_head": model.lm_head.weight}
    if rank == 0:
        torch.save({"loss": value.item(), "seen": seen,
                    "units": [isinstance(m, FSDPModule) for m in (model.model.embed_tokens, model.lm_head)],
                    "rows": {n: w.to_local().shape[0] if isinstance(w, DTensor) else None for n, w in tables.items()}},
                   tmp_path / "result.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_embeddings_and_lm_head_are_units_of_their_own_unless_tied(tmp_path, tied):
    # Under FSDP, two tables (untied) are each an FSDP unit: the fused loss computes with lm_head
    # gathered whole (it reads the weight, so loss.py gathers it), and after backward each rank
    # holds half of each table again. Tied, the one table stays in the root. Either way the loss
    # equals one process's on the same batch (fp32, within 1e-5).
    from adapters import apply_lora
    from loss import CausalLMLoss
    from model import Transformer

    ckpt = make_checkpoint(tmp_path / "ckpt", tie_word_embeddings=tied)
    spawn(_units_worker, tmp_path, ckpt)
    r = torch.load(tmp_path / "result.pt")
    model = Transformer.from_pretrained(ckpt)
    apply_lora(model, r=4, alpha=8, target_modules="all-linear", verbose=False)
    ids = torch.arange(32).view(2, 16) % 100 + 3
    one = CausalLMLoss(model, fused=True)(ids, torch.roll(ids, -1, 1), None, None).item()
    assert abs(r["loss"] - one) < 1e-5, (r["loss"], one)
    assert r["seen"] == [(False, (128, 64))], "lm_head whole and plain when the fused loss runs"
    assert r["units"] == [not tied, not tied], "units of their own when untied; tied, in the root"
    assert r["rows"] == {"embed_tokens": 64, "lm_head": 64}, "each rank holds half of each table after the step"
