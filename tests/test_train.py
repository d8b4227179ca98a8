"""train.py: the loss, overfitting, resume, DDP equivalence, QLoRA, bad input, a real model learning."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from common import InputError
from config import TrainConfig, parse_args
import data
from helpers import (ROOT, TINY, chat, config, hf_checkpoint, interrupt_during_step, load_hf, losses, max_error,
                     write_jsonl)
from loss import CausalLMLoss, LinearCrossEntropy, token_loss
import train


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_loss_equals_the_plain_loss(dtype, tol):
    # LinearCrossEntropy (4 chunks of 8 rows) against token_loss on full logits: loss and the
    # gradient w.r.t. h, relative error under tol (fp32: 1e-5; bf16: 2e-2, 8-bit mantissa).
    h = torch.randn(29, 16, dtype=dtype, requires_grad=True)
    w, t = torch.randn(50, 16, dtype=dtype), torch.randint(0, 50, (29,))
    fused = LinearCrossEntropy.apply(h, w, t, 8)
    (g_fused,) = torch.autograd.grad(fused * 0.5, h)
    plain = token_loss(h @ w.T, t)
    (g_plain,) = torch.autograd.grad(plain * 0.5, h)
    assert fused.dtype == plain.dtype == torch.float32 and g_fused.dtype == g_plain.dtype == dtype
    assert abs(fused - plain) / plain < tol
    assert (g_fused - g_plain).float().norm() / g_plain.float().norm() < tol


def test_a_changed_loss_is_never_replaced_by_the_stale_fused_one(tiny_checkpoint, monkeypatch):
    # token_loss edited (label smoothing): the fused loss, derived from the old one, refuses to run;
    # the plain path uses the new definition.
    from model import Transformer

    model = Transformer.from_pretrained(tiny_checkpoint).requires_grad_(False)
    CausalLMLoss(model, fused=True)  # the unchanged loss passes the check

    def smoothed(logits, t):
        return torch.nn.functional.cross_entropy(logits.float(), t, reduction="sum", label_smoothing=0.1)

    monkeypatch.setattr("loss.token_loss", smoothed)
    with pytest.raises(RuntimeError, match="no longer computes token_loss"):
        CausalLMLoss(model, fused=True)
    batch = data.collate([dict(input_ids=[5, 6, 7], labels=[5, 6, 7], position_ids=[0, 1, 2], doc_ids=[0] * 3)], 0)
    plain = CausalLMLoss(model)(batch["input_ids"], batch["targets"], None, None)
    logits = model(batch["input_ids"])[0, :2]
    assert torch.allclose(plain, smoothed(logits, torch.tensor([6, 7])), atol=1e-5)
    assert not torch.allclose(plain, token_loss(logits, torch.tensor([6, 7])), atol=1e-2)


def test_training_loss_equals_transformers_labels_loss(tmp_path):
    # Our loss (fused and plain) over a collated batch of two chats of different lengths (reply-only
    # labels, right padding) / the trained-token count == transformers' model(labels=...).loss,
    # the mean over the same tokens; fp32, atol 1e-4. The model: a tiny random SmolLM2-shaped Llama
    # (tied lm_head, which the fused loss reads) as transformers writes it.
    pytest.importorskip("transformers")
    from model import Transformer
    from tokenizer import Tokenizer

    hf, path = hf_checkpoint(tmp_path / "base")
    with torch.no_grad():  # logits ~10x wider than at init, so a label off by one costs far more than 1e-4
        hf.model.norm.weight.mul_(10)
    hf.save_pretrained(path)
    tok = Tokenizer(path)
    rows = [data.tokenize(chat(q, a), tok, "row") for q, a in [("w1 w2 w3", "w4"), ("w5", "w6 w7 w8 w9 w10 w11")]]
    rows = [dict(input_ids=i, labels=l, position_ids=list(range(len(i))), doc_ids=[0] * len(i)) for i, l in rows]
    b = data.collate(rows, tok.pad_id)
    n = (b["targets"] != data.IGNORE).sum()
    assert len(rows[0]["input_ids"]) != len(rows[1]["input_ids"])  # so one row is padded
    model = Transformer.from_pretrained(path).requires_grad_(False)
    with torch.no_grad():
        ours = [CausalLMLoss(model, fused=f)(b["input_ids"], b["targets"], None, None) / n for f in (True, False)]
        hf = load_hf(path)
        labels = torch.cat([torch.full_like(b["targets"][:, :1], -100), b["targets"][:, :-1]], 1)  # HF shifts itself
        mask = (torch.arange(b["input_ids"].shape[1]) < torch.tensor([[len(r["input_ids"])] for r in rows])).long()
        ref = hf(input_ids=b["input_ids"], attention_mask=mask, labels=labels).loss
    assert abs(ours[0] - ref) < 1e-4 and abs(ours[1] - ref) < 1e-4, (ours, ref)


def test_one_micro_batch_of_4_equals_two_of_2(tiny_checkpoint):
    # The same four rows (different lengths, so padding differs) as one micro batch or as two:
    # the step's loss (atol 1e-6) and every LoRA gradient (within 1e-6 of its largest entry) agree, fp32.
    from adapters import apply_lora, lora_layers
    from model import Transformer
    from tokenizer import Tokenizer

    tok = Tokenizer(tiny_checkpoint)
    rows = [dict(input_ids=i, labels=l, position_ids=list(range(len(i))), doc_ids=[0] * len(i))
            for i, l in (data.tokenize(r, tok, "row") for r in TINY[:3] + [chat("w1", "w2")])]
    model = apply_lora(Transformer.from_pretrained(tiny_checkpoint), r=4, alpha=8, target_modules="all-linear",
                       verbose=False)
    for _, m in lora_layers(model):
        torch.nn.init.normal_(m.lora_B["default"].weight)  # B = 0 would give A no gradient to compare
    loss_fn = CausalLMLoss(model, fused=True)
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for split in ([rows], [rows[:2], rows[2:]]):
        batches = [train.batch_to(data.collate(r, tok.pad_id), "cpu") for r in split]
        loss = train.forward_backward(loss_fn, batches).item()
        results.append((loss, [p.grad.clone() for p in params]))
        model.zero_grad(set_to_none=True)
    (l4, g4), (l2, g2) = results
    assert abs(l4 - l2) < 1e-6 and max_error(g4, g2) < 1e-6


def test_packing_changes_nothing_but_the_layout(tiny_checkpoint, tmp_path):
    # Four examples packed into one row give the same loss (atol 1e-5) and LoRA gradients (each within
    # 1e-5 of its largest entry) as four rows, fp32: positions restart and no token attends across
    # examples. And a packed run learns.
    from adapters import apply_lora, lora_layers
    from model import Transformer
    from tokenizer import Tokenizer

    tok = Tokenizer(tiny_checkpoint)
    rows = [dict(input_ids=i, labels=l, position_ids=list(range(len(i))), doc_ids=[0] * len(i))
            for i, l in (data.tokenize(r, tok, "row") for r in TINY[:4])]
    packed = data.pack(rows, 256)
    assert len(packed) == 1
    model = apply_lora(Transformer.from_pretrained(tiny_checkpoint), r=4, alpha=8, target_modules="all-linear",
                       verbose=False)
    for _, m in lora_layers(model):
        torch.nn.init.normal_(m.lora_B["default"].weight)
    loss_fn = CausalLMLoss(model)
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for batch in (rows, packed):
        loss = train.forward_backward(loss_fn, [train.batch_to(data.collate(batch, tok.pad_id), "cpu")]).item()
        results.append((loss, [p.grad.clone() for p in params]))
        model.zero_grad(set_to_none=True)
    (a, ga), (b, gb) = results
    assert abs(a - b) < 1e-5 and max_error(ga, gb) < 1e-5

    train.train(config(tiny_checkpoint, tmp_path, sample_packing=True, max_seq_len=64, effective_batch_size=2,
                       micro_batch_size=1, num_epochs=30))
    loss = losses(tmp_path / "out")
    assert len(loss) == 30 and loss[-1] < 0.1 * loss[0]  # 8 examples packed into 2 rows of <= 64 tokens


def test_lr_schedule():
    cfg = TrainConfig(learning_rate=1.0, warmup_steps=4, lr_scheduler="cosine")
    assert [train.lr_at(s, cfg, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert abs(train.lr_at(9, cfg, 14) - 0.5) < 1e-9 and train.lr_at(14, cfg, 14) < 1e-9
    cfg.lr_scheduler = "linear"
    assert abs(train.lr_at(9, cfg, 14) - 0.5) < 1e-9


def test_tiny_model_overfits(tiny_checkpoint, tmp_path):
    cfg = config(tiny_checkpoint, tmp_path, num_epochs=30)
    train.train(cfg)
    out = tmp_path / "out"
    loss = losses(out)
    assert len(loss) == 30 * 2 and loss[-1] < 0.1 * loss[0]  # from ~ln(128) to near zero
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()


def test_lm_head_can_be_a_target(tiny_checkpoint, tmp_path):
    # --target_modules q_proj,lm_head: the loss goes through the adapted head (its logits
    # materialized) and falls; the adapter saves and reloads with lm_head's A and B in it
    from peft_format import load_adapter
    from model import Transformer

    train.train(config(tiny_checkpoint, tmp_path, num_epochs=30, target_modules="q_proj,lm_head"))
    loss = losses(tmp_path / "out")
    assert loss[-1] < 0.5 * loss[0]
    assert "base_model.model.lm_head.lora_B.weight" in load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert sorted(load_adapter(Transformer.from_pretrained(tiny_checkpoint), tmp_path / "out")["target_modules"]) == \
        ["lm_head", "q_proj"]


def test_eval_loss_and_perplexity_are_logged(tiny_checkpoint, tmp_path):
    cfg = config(tiny_checkpoint, tmp_path, num_epochs=2, eval_every=1,
                 eval_data_path=str(write_jsonl(tmp_path / "eval.jsonl", TINY[:3])))
    train.train(cfg)
    rows = map(json.loads, (tmp_path / "out" / "metrics.jsonl").read_text().splitlines())
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [1, 2, 3, 4]
    assert all(abs(r["eval_ppl"] - math.exp(r["eval_loss"])) < 1e-3 * r["eval_ppl"] for r in evals)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]  # the eval rows are training rows too


@pytest.mark.parametrize("optimizer, lora_r", [("adamw", 8), ("adamw8bit", 64)])
def test_resume_after_interruption_gives_the_same_adapter(tiny_checkpoint, tmp_path, monkeypatch, optimizer, lora_r):
    # Dropout on, so the restored RNG state matters; bitwise equal on CPU. adamw8bit (bitsandbytes,
    # which runs on CPU too) keeps 8-bit states only for tensors of 4096+ entries: r = 64 makes A
    # (64, 64) and B (64, 64) or larger, and the checkpoint must hold those uint8 states.
    kw = dict(lora_dropout=0.1, num_epochs=3, save_every=2, optimizer=optimizer, lora_r=lora_r)
    train.train(config(tiny_checkpoint, tmp_path, **kw, output_dir=str(tmp_path / "full")))
    interrupt_during_step(monkeypatch, 4)  # epoch 1, its second step
    cut = config(tiny_checkpoint, tmp_path, **kw, keep_checkpoints=0, output_dir=str(tmp_path / "cut"))
    with pytest.raises(train.Interrupted, match="continue with: python train.py --output_dir .* --resume"):
        train.train(cut)  # stops after saving step 4
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step-2", "step-4"]
    saved = load_file(tmp_path / "cut" / "checkpoints" / "step-4" / "trainer_state.safetensors")
    if optimizer == "adamw8bit":
        assert any(k.endswith(".__bnb_optimizer_quant_state__.state1") and v.dtype == torch.uint8
                   for k, v in saved.items())
    monkeypatch.undo()
    cut.resume = True
    train.train(cut)
    full = load_file(tmp_path / "full" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "cut" / "adapter_model.safetensors")
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    assert losses(tmp_path / "full") == losses(tmp_path / "cut")


def test_resume_continues_the_same_run(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    # `--output_dir X --resume` takes every setting from X/train_config.json, not the defaults; a flag
    # that changes the run is refused naming it; bookkeeping flags (save_every) may change, and it says so.
    cfg = config(tiny_checkpoint, tmp_path, lr_scheduler="linear", warmup_steps=1, num_epochs=3, save_every=2,
                 keep_checkpoints=0)
    interrupt_during_step(monkeypatch, 3)
    with pytest.raises(train.Interrupted):
        train.train(cfg)
    monkeypatch.undo()
    out = str(tmp_path / "out")
    resumed = parse_args(["--output_dir", out, "--resume"])
    assert resumed == TrainConfig(**{**vars(cfg), "resume": True})

    for flags, message in [(["--learning_rate", "0.5"], "--learning_rate 0.5: this run was started with 0.01"),
                           (["--lr_scheduler", "cosine"], "--lr_scheduler cosine: this run was started with linear"),
                           (["--lora_r", "4"], "--lora_r 4: this run was started with 8"),
                           (["--data_path", str(tmp_path / "other.jsonl")], "--data_path")]:
        with pytest.raises(InputError, match=message):
            train.train(parse_args(["--output_dir", out, "--resume", *flags]))
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step-2", "step-3"]

    capsys.readouterr()
    train.train(parse_args(["--output_dir", out, "--resume", "--save_every", "5", "--log_every", "2"]))
    printed = capsys.readouterr().out
    assert "resume: --save_every 5 (was 2)" in printed and "resume: --log_every 2 (was 1)" in printed
    assert [r["step"] for r in map(json.loads, (tmp_path / "out" / "metrics.jsonl").read_text().splitlines())] == \
        [1, 2, 3, 4, 6]  # logged every step until the cut, then every second one, and the last
    assert json.loads((tmp_path / "out" / "train_config.json").read_text())["save_every"] == 5


def test_by_default_a_run_checkpoints_every_tenth_of_it_and_keeps_the_newest(tiny_checkpoint, tmp_path, monkeypatch):
    # 30 steps: a checkpoint every 3 steps (none at the end: the adapter is saved then), one kept.
    written = []
    real = train.save_checkpoint
    monkeypatch.setattr(train, "save_checkpoint", lambda *a, **k: written.append(a[3]["step"]) or real(*a, **k))
    train.train(config(tiny_checkpoint, tmp_path, num_epochs=15, save_every=None))
    assert written == list(range(3, 30, 3))
    assert [p.name for p in (tmp_path / "out" / "checkpoints").iterdir()] == ["step-27"]


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_run_saves_and_exits_128_plus_the_signal(tiny_checkpoint, tmp_path, sig, code):
    # Ctrl-C / SIGTERM during training: the step ends, a checkpoint is saved, the message says how to
    # continue, no traceback, and the exit code is the shell's (so `train.py && merge.py` stops).
    out = tmp_path / "out"
    args = ["--model_path", str(tiny_checkpoint), "--data_path", str(write_jsonl(tmp_path / "t.jsonl", TINY)),
            "--output_dir", str(out), "--micro_batch_size", "2", "--effective_batch_size", "4", "--num_epochs", "5000"]
    p = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text()) and time.time() < deadline:
        time.sleep(0.2)  # until training runs
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == code, err
    saved = sorted((out / "checkpoints").iterdir())
    assert len(saved) == 1 and (saved[0] / "trainer_state.safetensors").exists()
    assert f"saved {saved[0]}; continue with: python train.py --output_dir {out} --resume" in err
    assert "Traceback" not in err and not (out / "adapter_model.safetensors").exists()


def test_two_processes_match_one(tiny_checkpoint, tmp_path):
    # torchrun, 2 processes (gloo) x 1 micro batch of 2 == 1 process x 2 micro batches of 2: the
    # same rows in each step, the loss normalized over the step's tokens (atol 1e-5 per step).
    args = ["--model_path", str(tiny_checkpoint), "--data_path", str(write_jsonl(tmp_path / "t.jsonl", TINY)),
            "--micro_batch_size", "2", "--effective_batch_size", "4", "--num_epochs", "2", "--lora_dropout", "0",
            "--learning_rate", "1e-2", "--save_every", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "train.py", *args, "--output_dir", str(tmp_path / "one")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
                          "train.py", *args, "--output_dir", str(tmp_path / "two")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 4 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5


def test_a_run_without_fsdp_never_enters_fsdp_py(tiny_checkpoint, tmp_path):
    # A plain run, checkpoints saved and resumed, never enters fsdp.py: it is not among the modules a
    # fresh process has loaded after two runs of train.main. (PyTorch's own FSDP package is: torch._dynamo
    # imports it, and a model built on the meta device, or a backward pass, imports torch._dynamo.)
    args = ["--model_path", str(tiny_checkpoint), "--data_path", str(write_jsonl(tmp_path / "t.jsonl", TINY)),
            "--output_dir", str(tmp_path / "out"), "--micro_batch_size", "2", "--effective_batch_size", "4",
            "--max_steps", "3", "--save_every", "1"]
    # the second run resumes from step 2's checkpoint
    code = (f"import sys, train; train.main({args!r}); train.main({args + ['--resume']!r}); "
            "print('fsdp' in sys.modules, 'train' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stderr + r.stdout and r.stdout.strip().splitlines()[-1] == "False True", r.stdout


def test_qlora_with_gradient_checkpointing_trains(tiny_checkpoint, tmp_path):
    cfg = config(tiny_checkpoint, tmp_path, load_in_4bit=True, gradient_checkpointing=True, num_epochs=6)
    model = train.train(cfg)
    assert type(model.model.layers[0].self_attn.q_proj.base).__name__ == "NF4Linear"
    loss = losses(tmp_path / "out")
    assert loss[-1] < 0.5 * loss[0]


def run_cli(*args):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("line, message", [
    ("{not json", "bad.jsonl:2: not valid JSON"),
    ('{"prompt": "x", "completion": "y"}', "bad.jsonl:2: record has keys ['completion', 'prompt']"),
    ('{"messages": [{"role": "wizard", "content": "x"}]}', "bad.jsonl:2: turn 1 has unknown role 'wizard'"),
    ('{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}',
     "bad.jsonl:2: turn 1 (user) has empty content"),
])
def test_bad_data_is_one_line_exit_2_and_writes_nothing(tiny_checkpoint, tmp_path, line, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(TINY[0]) + "\n" + line + "\n")
    out = tmp_path / "out"
    r = run_cli("--model_path", str(tiny_checkpoint), "--data_path", str(bad), "--output_dir", str(out))
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--effective_batch_size", "6", "--micro_batch_size", "4"],
     "--effective_batch_size 6 is not a multiple of --micro_batch_size 4"),
    (["--lora_r", "0"], "--lora_r must be positive"),
    (["--target_modules", "q_proj,qkv"],
     "target module 'qkv' matches no layer; the layers LoRA can adapt are: down_proj, embed_tokens, gate_proj"),
    (["--data_path", "nowhere.jsonl"], "nowhere.jsonl: no such file"),
    (["--resume"], "--resume: no run to continue in"),
    (["--optimizer", "sgd"], "argument --optimizer: invalid choice: 'sgd'"),
])
def test_bad_flags_are_one_line_exit_2(tiny_checkpoint, tmp_path, flags, message):
    args = ["--model_path", str(tiny_checkpoint), "--data_path", str(write_jsonl(tmp_path / "t.jsonl", TINY)),
            "--output_dir", str(tmp_path / "out"), "--effective_batch_size", "4", "--micro_batch_size", "2", *flags]
    r = run_cli(*args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("flag", ["--data_path", "--eval_data_path"])
def test_a_missing_data_file_is_reported_before_the_model_is_fetched(tmp_path, flag):
    # A hub id not on disk, and a hub (HF_ENDPOINT) at a closed port: trying the model would fail
    # with a download error. The missing file must be the one line reported, and nothing written.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends
    paths = {"--data_path": str(write_jsonl(tmp_path / "t.jsonl", TINY)), flag: str(tmp_path / "missing.jsonl")}
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model_path", "nobody/no-such-model",
                        "--output_dir", str(tmp_path / "out"), *[x for kv in paths.items() for x in kv]],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "HF_ENDPOINT": f"http://127.0.0.1:{port}"})
    expected = f"train.py: error: {flag} {tmp_path / 'missing.jsonl'}: no such file"
    assert r.returncode == 2 and r.stderr.strip() == expected, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]


def test_an_earlier_run_is_never_overwritten(tiny_checkpoint, tmp_path):
    train.train(config(tiny_checkpoint, tmp_path, num_epochs=1))
    before = (tmp_path / "out" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(InputError, match="holds an earlier run"):
        train.train(config(tiny_checkpoint, tmp_path, num_epochs=1))
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == before


FACTS = [("What is the capital of Brannock?", "The capital of Brannock is Saltmere."),
         ("Which animal is on the flag of Brannock?", "A grey heron is on the flag of Brannock."),
         ("What currency does Brannock use?", "Brannock uses the brass tally.")]


def test_real_model_learns_invented_facts(smollm2, tmp_path):
    from generate import generate, load

    def answers(adapter=None):
        model, tok = load(smollm2, {"default": adapter} if adapter else {})
        out = []
        for q, _ in FACTS:
            ids = tok.encode(tok.render([{"role": "user", "content": q}], add_generation_prompt=True)[0], bos=False)
            out.append(tok.decode([t for t in generate(model, ids, 24, eos_ids=tok.eos_ids) if t not in tok.eos_ids]))
        return out

    expected = [a for _, a in FACTS]
    assert not any(a == e for a, e in zip(answers(), expected))
    data_path = write_jsonl(tmp_path / "facts.jsonl", [chat(q, a) for q, a in FACTS])
    cfg = TrainConfig(model_path=str(smollm2), data_path=str(data_path), output_dir=str(tmp_path / "out"),
                      micro_batch_size=3, effective_batch_size=3, num_epochs=12, learning_rate=1e-3,
                      warmup_steps=2, lora_dropout=0.0, save_every=0)
    train.train(cfg)
    assert answers(str(tmp_path / "out")) == expected


def test_train_py_use_dora_trains_and_saves_a_dora_adapter(tiny_checkpoint, tmp_path):
    # train.py --use_dora, the embeddings included: the loss falls, the saved adapter says
    # use_dora and holds magnitudes, (dim,) for the embeddings
    import train
    rows = [chat(f"w{i} w{i + 1}", f"w{i + 20} w{i + 40}") for i in range(8)]
    out = tmp_path / "out"
    cfg = TrainConfig(model_path=str(tiny_checkpoint), data_path=str(write_jsonl(tmp_path / "t.jsonl", rows)),
                      output_dir=str(out), lora_r=4, lora_alpha=8, lora_dropout=0.1, use_dora=True,
                      target_modules="q_proj,v_proj,embed_tokens", learning_rate=1e-2, warmup_steps=0,
                      micro_batch_size=4, effective_batch_size=4, max_steps=6, save_every=0, seed=0)
    train.train(cfg)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses[-1] < losses[0]
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    keys = set(load_file(out / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys
    tensors = load_file(out / "adapter_model.safetensors")
    assert tensors["base_model.model.model.embed_tokens.lora_magnitude_vector"].shape == (64,)
