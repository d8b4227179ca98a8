import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model import Config  # noqa: E402

SMOLLM2 = ROOT / "checkpoints" / "HuggingFaceTB" / "SmolLM2-135M-Instruct"


@pytest.fixture
def smollm2():
    """Path of the real SmolLM2-135M-Instruct checkpoint; skips the test when it is absent."""
    if not (SMOLLM2 / "model.safetensors").exists():
        pytest.skip(f"SmolLM2 checkpoint not found at {SMOLLM2}; run ../shared/tools/get_smollm2.sh {SMOLLM2.relative_to(ROOT)}")
    return SMOLLM2


def tiny_config(**kw):
    """A random-weights model small enough for any test: 2 layers, GQA 4/2 heads."""
    d = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return Config(**{**d, **kw})


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def write_tiny_tokenizer(path, vocab_size=128):
    """A word-level tokenizer.json (ids < vocab_size) with ChatML specials, for tiny models."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    words = specials + [f"w{i}" for i in range(vocab_size - len(specials))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A random tiny model saved as a Hugging Face folder, with a ChatML word-level tokenizer."""
    import json

    from model import Transformer
    from test_model import write_checkpoint

    path = tmp_path / "tiny"
    torch.manual_seed(0)
    model = Transformer(tiny_config())
    with torch.no_grad():  # default init caps logit gaps (|h| ~ 8, |w_v| ~ 0.6): a frozen
        model.lm_head.weight.mul_(8)  # head like that keeps any loss above ~1 nat; widen it
    write_checkpoint(path, model)
    write_tiny_tokenizer(path)
    (path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "add_bos_token": False,
        "chat_template": "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n'}}{% endfor %}"}))
    return path


def write_jsonl(path, records):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def chat(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
