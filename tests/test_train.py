"""train.py: the loss, overfitting, resume, DDP equivalence, QLoRA, bad input, a real model learning."""
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import data
import train
from conftest import ROOT, chat, write_jsonl
from model import InputError

# Eight examples of word-level "chat" for the tiny model: the reply is a fixed function of the question.
TINY = [chat(f"w{i} w{i + 1}", f"w{i + 20} w{i + 40} w{i + 60}") for i in range(8)]


def config(ckpt, tmp_path, **kw):
    d = dict(model_path=str(ckpt), data_path=str(write_jsonl(tmp_path / "train.jsonl", TINY)),
             output_dir=str(tmp_path / "out"), lora_r=8, lora_alpha=16, lora_dropout=0.0, learning_rate=1e-2,
             warmup_steps=2, micro_batch_size=2, effective_batch_size=4, num_epochs=3, save_every=0, seed=0)
    return train.TrainConfig(**{**d, **kw})


def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_linear_cross_entropy_equals_plain_cross_entropy():
    # Loss and gradient w.r.t. h of the chunked, fused version equal logits -> cross_entropy (fp32, atol 1e-5).
    h = torch.randn(37, 16, requires_grad=True)
    w, t = torch.randn(50, 16), torch.randint(0, 50, (37,))
    fused = train.LinearCrossEntropy.apply(h, w, t, 8)
    (g_fused,) = torch.autograd.grad(fused * 0.5, h)
    plain = torch.nn.functional.cross_entropy(h @ w.T, t, reduction="sum")
    (g_plain,) = torch.autograd.grad(plain * 0.5, h)
    assert torch.allclose(fused, plain, atol=1e-4) and torch.allclose(g_fused, g_plain, atol=1e-5)


def test_lr_schedule():
    cfg = train.TrainConfig(learning_rate=1.0, warmup_steps=4, lr_scheduler="cosine")
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
    from lora import load_adapter
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
    evals = [r for r in map(json.loads, (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [1, 2, 3, 4]
    assert all(abs(r["eval_ppl"] - math.exp(r["eval_loss"])) < 1e-3 * r["eval_ppl"] for r in evals)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]  # the eval rows are training rows too


def test_resume_after_interruption_gives_the_same_adapter(tiny_checkpoint, tmp_path, monkeypatch):
    # Dropout on, so the restored RNG state matters; bitwise equal on CPU.
    cfg = config(tiny_checkpoint, tmp_path, lora_dropout=0.1, num_epochs=3, save_every=2, output_dir=str(tmp_path / "full"))
    train.train(cfg)
    real = data.step_batches

    def interrupt_at_step_4(order, step, *a):  # a SIGTERM arrives during global step 4 (epoch 1, step 1)
        if step == 1 and order == data.epoch_order(len(order), 0, 1):
            os.kill(os.getpid(), signal.SIGTERM)
        return real(order, step, *a)

    monkeypatch.setattr(data, "step_batches", interrupt_at_step_4)
    cut = config(tiny_checkpoint, tmp_path, lora_dropout=0.1, num_epochs=3, save_every=2, output_dir=str(tmp_path / "cut"))
    assert train.train(cut) is None  # stopped after saving step 4
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step-2", "step-4"]
    monkeypatch.setattr(data, "step_batches", real)
    cut.resume = True
    train.train(cut)
    full = load_file(tmp_path / "full" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "cut" / "adapter_model.safetensors")
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    assert losses(tmp_path / "full") == losses(tmp_path / "cut")


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
    ('{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}', "bad.jsonl:2: turn 1 (user) has empty content"),
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
    (["--effective_batch_size", "6", "--micro_batch_size", "4"], "--effective_batch_size 6 is not a multiple of --micro_batch_size 4"),
    (["--lora_r", "0"], "--lora_r must be positive"),
    (["--target_modules", "q_proj,qkv"], "target module 'qkv' matches no layer; the model's linear layers are: down_proj, gate_proj"),
    (["--data_path", "nowhere.jsonl"], "nowhere.jsonl: no such file"),
    (["--resume"], "--resume: no checkpoint in"),
    (["--optimizer", "sgd"], "argument --optimizer: invalid choice: 'sgd'"),
])
def test_bad_flags_are_one_line_exit_2(tiny_checkpoint, tmp_path, flags, message):
    args = ["--model_path", str(tiny_checkpoint), "--data_path", str(write_jsonl(tmp_path / "t.jsonl", TINY)),
            "--output_dir", str(tmp_path / "out"), "--effective_batch_size", "4", "--micro_batch_size", "2", *flags]
    r = run_cli(*args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


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
    cfg = train.TrainConfig(model_path=str(smollm2), data_path=str(data_path), output_dir=str(tmp_path / "out"),
                            micro_batch_size=3, effective_batch_size=3, num_epochs=12, learning_rate=1e-3,
                            warmup_steps=2, lora_dropout=0.0, save_every=0)
    train.train(cfg)
    assert answers(str(tmp_path / "out")) == expected
