"""What the test files share that is not a fixture: tiny models, checkpoints and tokenizers written
the way Hugging Face writes them, chat data, and the comparisons several files make."""
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adapters import apply_lora, lora_layers  # noqa: E402
from config import TrainConfig  # noqa: E402
import data  # noqa: E402
from lora import LoRALinear  # noqa: E402
from model import Config, Transformer  # noqa: E402
from peft_format import save_adapter  # noqa: E402
import quant  # noqa: E402

# NANOLORA_SMOLLM2=/nowhere runs the tests as on a machine without the model
SMOLLM2 = Path(os.environ.get("NANOLORA_SMOLLM2") or ROOT / "checkpoints" / "HuggingFaceTB" / "SmolLM2-135M-Instruct")
# SmolLM2's tokenizer files, kept here (1.8 MB): tests of tokenization and export that need its
# real vocabulary, not its weights, run without the model
SMOLLM2_TOKENIZER = ROOT / "tests" / "data" / "smollm2"


def in_ci():
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def tiny_config(**kw):
    """A random-weights model small enough for any test: 2 layers, GQA 4/2 heads."""
    d = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return Config(**{**d, **kw})


# --- checkpoints and tokenizers ---------------------------------------------------------------------------------------

def write_checkpoint(path, model, shards=1):
    """Save like Hugging Face does: config.json and one or several safetensors files (+ index)."""
    path.mkdir(parents=True, exist_ok=True)
    c = model.config
    config = {k: getattr(c, k) for k in ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                                          "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                          "max_position_embeddings", "tie_word_embeddings", "rope_theta")}
    (path / "config.json").write_text(json.dumps(config))
    sd = {k: v.contiguous() for k, v in model.state_dict().items()
          if not (c.tie_word_embeddings and k == "lm_head.weight")}
    if shards == 1:
        save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
        return
    keys, weight_map = sorted(sd), {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: sd[k] for k in part}, path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def make_tiny_checkpoint(path, **config):
    """tiny_config(**config) with seeded random weights, saved as a Hugging Face folder."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(**config))
    with torch.no_grad():  # default init caps logit gaps (|h| ~ 8, |w_v| ~ 0.6): a frozen
        model.lm_head.weight.mul_(8)  # head like that keeps any loss above ~1 nat; widen it
    write_checkpoint(path, model)
    write_tiny_chat_tokenizer(path, model.config.vocab_size)
    return path


def write_tiny_chat_tokenizer(path, vocab_size=128):
    """write_tiny_tokenizer's word-level tokenizer with a tokenizer_config.json: a ChatML template,
    pad == eos == <|im_end|>, no BOS."""
    write_tiny_tokenizer(path, vocab_size)
    (path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "add_bos_token": False,
        "chat_template": "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + "
                         "'<|im_end|>\\n'}}{% endfor %}"}))


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
    texts = [line for f in sorted((ROOT / "data").glob("*.jsonl")) for line in f.read_text().splitlines()]
    tok.train_from_iterator(texts, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>",
        "add_bos_token": False, "chat_template": SMOLLM2_CHAT_TEMPLATE}))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return path


# One tiny random config per family, each exercising that family's quirks.
FAMILIES = {
    "llama2": dict(model_type="llama", num_key_value_heads=4),
    "tinyllama": dict(model_type="llama", num_key_value_heads=1),
    "llama3": dict(model_type="llama", rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)),
    "llama-bias": dict(model_type="llama", attention_bias=True, mlp_bias=True),
    "smollm2": dict(model_type="llama", hidden_size=72, num_attention_heads=9, num_key_value_heads=3,
                    tie_word_embeddings=True, rope_theta=100000.0),
    "mistral": dict(model_type="mistral", head_dim=32, sliding_window=4096),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True, rope_theta=1000000.0),
    # Qwen3: q_norm/k_norm, head_dim set apart from hidden_size / heads (as 0.6B's 128 vs 1024/16)
    "qwen3": dict(model_type="qwen3", head_dim=24, tie_word_embeddings=True, rope_theta=1000000.0),
    "qwen3-untied": dict(model_type="qwen3", head_dim=32, num_key_value_heads=1, tie_word_embeddings=False),
}


def hf_model(family):
    """A random Hugging Face model of the family, and our config for the same shapes."""
    transformers = pytest.importorskip("transformers")
    kw = dict(FAMILIES[family])
    ours = tiny_config(**{k: v for k, v in kw.items() if k != "sliding_window"})
    cls = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config",
           "qwen3": "Qwen3Config"}[kw.pop("model_type")]
    d = dict(vocab_size=ours.vocab_size, hidden_size=ours.hidden_size, intermediate_size=ours.intermediate_size,
             num_hidden_layers=ours.num_hidden_layers, num_attention_heads=ours.num_attention_heads,
             num_key_value_heads=ours.num_key_value_heads, max_position_embeddings=ours.max_position_embeddings,
             rms_norm_eps=1e-5)
    d.update(kw)
    if "rope_scaling" in d:
        d["rope_parameters"] = dict(d.pop("rope_scaling"), rope_theta=d.pop("rope_theta"))
    config = getattr(transformers, cls)(**d)
    config._attn_implementation = "eager"  # the plainest reference
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: randomize so they are tested
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def random_adapter(base, path, r=4, alpha=8, **settings):
    """An adapter of the base with every tensor away from its start (B, DoRA's m, the embeddings' A)."""
    model = Transformer.from_pretrained(base)
    apply_lora(model, r=r, alpha=alpha, verbose=False, **settings)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for t in layer.adapter_tensors("default").values():
                t.add_(0.05 * torch.randn_like(t)).mul_(1 + 0.1 * torch.randn_like(t))
    save_adapter(model, path)
    return path


# --- GGUF -------------------------------------------------------------------------------------------------------------

def tiny_checkpoint(path, model_type):
    """A tiny checkpoint of a GGUF family (llama with llama3 rope, tied qwen2, qwen3): random weights,
    SmolLM2's tokenizer (the GGUF tests' recorded llama.cpp references were made with it)."""
    torch.manual_seed(0)
    extra = {"llama": dict(rope_theta=500000.0, attention_bias=True, rope_scaling={
                 "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 64}),
             "qwen2": dict(model_type="qwen2", tie_word_embeddings=True, rope_theta=1000000.0),
             "qwen3": dict(model_type="qwen3", head_dim=32, rope_theta=1000000.0)}[model_type]
    config = Config(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, **extra)
    write_checkpoint(path, Transformer(config))
    raw = json.loads((path / "config.json").read_text())
    raw.update({k: v for k, v in extra.items() if k not in raw})
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[model_type]
    raw.update(architectures=[arch], rms_norm_eps=1e-6)
    (path / "config.json").write_text(json.dumps(raw))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(SMOLLM2_TOKENIZER / name, path / name)
    return path


def write_sentencepiece_tokenizer(path, model_file, chat_template):
    """A real SentencePiece tokenizer (Llama 2's layout): tokenizer.model from mistral_common (its
    `model_file`), tokenizer.json as transformers converts it (Metaspace, BPE with byte fallback),
    tokenizer_config.json as Llama 2's (add_bos_token, added_tokens_decoder). Returns the vocabulary size."""
    pytest.importorskip("sentencepiece")  # transformers converts tokenizer.model with it
    mistral_common = pytest.importorskip("mistral_common")  # ships the tokenizer.model files
    from transformers import AutoTokenizer

    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(mistral_common.__file__).parent / "data" / model_file, path / "tokenizer.model")
    special = {"content": None, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
               "special": True}
    cfg = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
           "unk_token": "<unk>", "pad_token": None, "legacy": False, "tokenizer_class": "LlamaTokenizer",
           "added_tokens_decoder": {str(i): {**special, "content": t} for i, t in enumerate(["<unk>", "<s>", "</s>"])},
           "chat_template": chat_template}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    vocab = AutoTokenizer.from_pretrained(path).backend_tokenizer
    vocab.save(str(path / "tokenizer.json"))
    return vocab.get_vocab_size()


def unpermute(w, n_heads):
    """llama.cpp's interleaved rope pairs back to Hugging Face's rotate-half halves."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# --- LoRA on tiny models ----------------------------------------------------------------------------------------------

BLOCK_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def tiny(**kw):
    torch.manual_seed(0)
    return Transformer(tiny_config(**kw)).eval()


def ids(n=12, vocab=128):
    return torch.randint(0, vocab, (2, n))


def randomize_B(model, adapter="default", std=0.05):
    """A fresh adapter is a no-op (B = 0); give B values so the adapter does something."""
    with torch.no_grad():
        for _, m in lora_layers(model):
            if isinstance(m, LoRALinear) and adapter in m.lora_B:
                m.lora_B[adapter].weight.normal_(0, std)


def lora_model(**kw):
    model = tiny()
    apply_lora(model, verbose=False, **kw)
    randomize_B(model)
    return model


def quantized_and_dequantized():
    """A tiny model with NF4 linear layers, and a plain one holding their dequantized weights."""
    qmodel = quant.quantize_model(tiny())
    plain = tiny()
    plain.load_state_dict(plain.state_dict() | {f"{n}.weight": m.dequantize(torch.float32)
                                                for n, m in qmodel.named_modules() if hasattr(m, "dequantize")})
    return qmodel, plain


def adapted_on_nf4_and_dequantized(**settings):
    """(qmodel, x, [(logits, adapter grads) on qmodel, the same on plain]): the same seeded adapter
    (apply_lora's settings, B randomized) on quantized_and_dequantized()'s two models, one step."""
    qmodel, plain = quantized_and_dequantized()
    x, results = ids(), []
    for model in (qmodel, plain):
        torch.manual_seed(3)
        apply_lora(model, r=4, alpha=8, target_modules="all-linear", verbose=False, **settings)
        randomize_B(model)
        out = model(x)
        out.logsumexp(-1).mean().backward()
        results.append((out, [p.grad for p in model.parameters() if p.requires_grad]))
    return qmodel, x, results


def hf_checkpoint(path, family="smollm2"):
    """hf_model(family) written by transformers' save_pretrained, with write_tiny_chat_tokenizer's
    tokenizer: a folder both transformers and we load. (The model, the folder.)"""
    hf = hf_model(family)
    hf.save_pretrained(path)
    write_tiny_chat_tokenizer(path, hf.config.vocab_size)
    return hf, path


def load_hf(path):
    """transformers' model of a checkpoint folder, in fp32, the reference our exact tests compare with."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def tied_hf_and_ours(tmp_path):
    """A random tiny Llama with tied embeddings, from transformers, and ours loaded from its files."""
    hf, path = hf_checkpoint(tmp_path / "base")  # smollm2: tie_word_embeddings=True
    return hf, Transformer.from_pretrained(path)


# --- data and training runs -------------------------------------------------------------------------------------------

def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def chat(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


# Eight examples of word-level "chat" for the tiny model: the reply is a fixed function of the question.
TINY = [chat(f"w{i} w{i + 1}", f"w{i + 20} w{i + 40} w{i + 60}") for i in range(8)]


def config(ckpt, tmp_path, **kw):
    d = dict(model_path=str(ckpt), data_path=str(write_jsonl(tmp_path / "train.jsonl", TINY)),
             output_dir=str(tmp_path / "out"), lora_r=8, lora_alpha=16, lora_dropout=0.0, learning_rate=1e-2,
             warmup_steps=2, micro_batch_size=2, effective_batch_size=4, num_epochs=3, save_every=0, seed=0)
    return TrainConfig(**{**d, **kw})


def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def max_error(xs, ys):
    """The largest difference between paired tensors, relative to the largest entry of each."""
    return max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip(xs, ys))


def interrupt_during_step(monkeypatch, n, sig=signal.SIGTERM):
    """`sig` reaches this process while optimizer step n (counted from 1) runs."""
    real, calls = data.step_batches, []

    def step_batches(*a):  # called once per optimizer step
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), sig)
        return real(*a)

    monkeypatch.setattr(data, "step_batches", step_batches)


# --- tensors ----------------------------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def bits_equal(a, b):
    """Bitwise equality (torch.equal would accept 0.0 == -0.0)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(ints[a.element_size()]), b.contiguous().view(ints[b.element_size()]))


def weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Rows with very different scales, like real weights, so block absmaxes vary a lot.
    return (torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 0.05).to(dtype)
