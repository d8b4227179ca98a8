"""bench.py: the FLOP count behind MFU, and the script running end to end (figures not asserted)."""
import json
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from adapters import apply_lora
import bench
from helpers import ROOT, tiny_config
from loss import CausalLMLoss
from model import Transformer


def test_flops_per_token_match_torchs_flop_counter():
    # The matmul FLOPs of one training step of a tiny LoRA model, counted by torch's
    # FlopCounterMode (forward and backward), equal bench.lora_train_flops_per_token x tokens
    # less its attention term, exactly. (The counter has no formula for the CPU attention kernel;
    # bench charges attention the causal half of the T x T scores, 3x for backward.)
    config, B, T, r = tiny_config(), 2, 16, 4
    model = Transformer(config).train()
    apply_lora(model, r=r, alpha=8, target_modules="all-linear", verbose=False)
    ids, targets = torch.randint(0, config.vocab_size, (2, B, T))
    with FlopCounterMode(display=False) as counter:
        CausalLMLoss(model)(ids, targets, None, None).backward()
    matmuls = sum(n for op, n in counter.get_flop_counts()["Global"].items()
                  if op in (torch.ops.aten.mm, torch.ops.aten.addmm))
    attention = 3 * config.num_hidden_layers * 2 * 2 * (T / 2) * config.num_attention_heads * config.head_dim
    assert matmuls == B * T * (bench.lora_train_flops_per_token(config, T, r) - attention)


def test_bench_runs_every_measure_on_a_tiny_config(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    config = tmp_path / "tiny.json"
    c = tiny_config()
    config.write_text(json.dumps(dict(model_type="llama", vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                      intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
                                      num_attention_heads=c.num_attention_heads,
                                      num_key_value_heads=c.num_key_value_heads,
                                      max_position_embeddings=c.max_position_embeddings)))
    out = subprocess.run([sys.executable, "bench.py", "--config_json", str(config),
                          "--only", "generate,quantize,train,dora", "--steps", "1", "--repeat", "1", "--seq_len", "32",
                          "--new_tokens", "4"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)  # a guard, not a timing
    assert out.returncode == 0, out.stderr[-2000:]
    for line in ("ours / transformers = ", "QLoRA model loaded: ", "train LoRA: ", "ours / transformers+peft: ",
                 "ours DoRA / ours LoRA: ", "ours QLoRA-DoRA / ours QLoRA: ", "ours DoRA / peft DoRA: "):
        assert line in out.stdout, out.stdout
    # transformers+peft+bitsandbytes QLoRA beside ours on a config too (random weights saved, then loaded quantized)
    assert out.stdout.count("ours / transformers+peft: ") == 2 and "failed" not in out.stdout, out.stdout


def test_known_cards_are_named_by_their_data_sheet_peaks(monkeypatch):
    # MFU and the decode floor use the card's dense bf16 peak and HBM bandwidth when the name is
    # known (longer names first: an H100 NVL is not an SXM H100, an L40S is not an L4); None otherwise.
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    for name, want in (("NVIDIA H100 80GB HBM3", (989e12, 3.35e12)), ("NVIDIA H100 NVL", (835e12, 3.9e12)),
                       ("NVIDIA H200", (989e12, 4.8e12)), ("NVIDIA A100-SXM4-80GB", (312e12, 2.04e12)),
                       ("NVIDIA L40S", (362e12, 0.864e12)), ("NVIDIA L4", (121e12, 0.3e12))):
        assert bench.card_peaks("cuda") == (name, *want)
    name = "NVIDIA GeForce GTX 1080"
    assert bench.card_peaks("cuda") is None
    assert bench.card_peaks("cpu") is None
