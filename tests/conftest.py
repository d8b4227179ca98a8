"""Shared fixtures, and the rule that nothing hides: under CI=true a skipped test fails.

Tests that need the real model use the `smollm2` fixture; everything else runs on tiny models and
tokenizers made here. Tests marked `cuda` need a GPU and are the only ones allowed to skip in CI:
`python -m pytest -m cuda tests` runs just them.
"""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model import Config  # noqa: E402

SMOLLM2 = ROOT / "checkpoints" / "HuggingFaceTB" / "SmolLM2-135M-Instruct"


def in_ci():
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped without one (run them: python -m pytest -m cuda tests)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    # In CI every test runs: a skip (missing checkpoint, missing comparison package) is a failure,
    # except for the GPU tests, which a CPU runner cannot run.
    report = yield
    if report.skipped and in_ci() and not hasattr(report, "wasxfail") and item.get_closest_marker("cuda") is None:
        fail_skip(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    # the same for a whole module skipped while collected (a module-level importorskip)
    report = yield
    if report.skipped and in_ci():
        fail_skip(report)
    return report


def fail_skip(report):
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr  # (file, line, reason)
    report.outcome = "failed"
    report.longrepr = f"skipped under CI=true, where only tests marked cuda may skip: {reason}"


@pytest.fixture
def smollm2():
    """Path of the real SmolLM2-135M-Instruct checkpoint; skips the test when it is absent."""
    if not (SMOLLM2 / "model.safetensors").exists():
        # any command with the default model downloads it from the Hugging Face Hub into SMOLLM2
        pytest.skip(f"needs the real model at {SMOLLM2}; download it once (270 MB) from the repository root "
                    "with: python generate.py --prompt Hi --max_new_tokens 1")
    return SMOLLM2


def tiny_config(**kw):
    """A random-weights model small enough for any test: 2 layers, GQA 4/2 heads."""
    d = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return Config(**{**d, **kw})


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def write_tiny_tokenizer(path, vocab_size=128, specials=("<unk>", "<|im_start|>", "<|im_end|>"), bos=None):
    """A word-level tokenizer.json (ids < vocab_size: the specials, then w0, w1, ...), for tiny
    models. bos: a special token its post-processor prepends, as Llama's tokenizer.json does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = list(specials)
    words = specials + [f"w{i}" for i in range(vocab_size - len(specials))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=specials[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, words.index(bos))])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))


SMOLLM2_CHAT_TEMPLATE = (  # tokenizer_config.json's chat_template, as SmolLM2-135M-Instruct ships it
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
    "message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")


def write_chatml_tokenizer(path):
    """A small stand-in for SmolLM2's tokenizer, for tests that need a real tokenizer but no model.

    SmolLM2's pipeline (single digits, GPT-2 byte-level BPE: any text round-trips, and BPE merges
    can cross the boundary between prompt and reply) with ~740 merges learnt from the bundled
    data (deterministic), its specials as ids 0-2, and its tokenizer_config.json: ChatML with the
    default system prompt, pad == eos == <|im_end|>, no BOS on raw text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([line for f in sorted((ROOT / "data").glob("*.jsonl")) for line in f.read_text().splitlines()],
                            trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>",
        "add_bos_token": False, "chat_template": SMOLLM2_CHAT_TEMPLATE}))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return path


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A random tiny model saved as a Hugging Face folder, with a ChatML word-level tokenizer."""
    return make_tiny_checkpoint(tmp_path / "tiny")


def make_tiny_checkpoint(path, **config):
    """tiny_config(**config) with seeded random weights, saved as a Hugging Face folder."""
    from model import Transformer
    from test_model import write_checkpoint

    torch.manual_seed(0)
    model = Transformer(tiny_config(**config))
    with torch.no_grad():  # default init caps logit gaps (|h| ~ 8, |w_v| ~ 0.6): a frozen
        model.lm_head.weight.mul_(8)  # head like that keeps any loss above ~1 nat; widen it
    write_checkpoint(path, model)
    write_tiny_tokenizer(path, model.config.vocab_size)
    (path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "add_bos_token": False,
        "chat_template": "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n'}}{% endfor %}"}))
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def chat(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
