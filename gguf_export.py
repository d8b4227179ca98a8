"""GGUF export: a merged model as one file that llama.cpp (and so Ollama and LM Studio) loads.

    python merge.py --model_path BASE --adapter_path out/lora --output_dir out/merged --gguf q8_0

Its own file because it is its own concern: a second on-disk format with its own names, its own
layout of the q/k rows and its own copy of the tokenizer, none of which the rest of nanolora
needs. Everything here is checked against llama.cpp's convert_hf_to_gguf.py, key by key and
tensor by tensor (tests/test_gguf.py, tests/fixtures/).

The format, GGUF version 3, little-endian, written top to bottom by `write`:

    header        b"GGUF", version u32 (3), tensor count u64, key/value count u64
    key/values    key, value type u32, value. A string is a u64 byte length + UTF-8 bytes; an
                  array is element type u32 + count u64 + the elements
    tensor infos  name, n_dims u32, the dims as u64, fastest-varying first (a PyTorch (out, in)
                  weight is written (in, out)), tensor type u32, offset u64 into the data
    padding       zeros up to a multiple of 32 bytes (general.alignment's default)
    data          each tensor's bytes, each padded to a multiple of 32 bytes

Tensor types written: F32 (norms, biases, rope factors), F16, BF16, and Q8_0: blocks of 32
weights along a row, each an fp16 scale d = max|x| / 127 and 32 int8 round(x / d) (34 bytes).
q4_k_m, q5_k_m and q6_k files hold the k-quants of kquants.py, with the type llama-quantize
gives each tensor, in its order; equal byte for byte to llama-quantize run on our bf16 (f32, f16:
the checkpoint's own dtype) file.

What goes in, as llama.cpp's converter writes it for these families:
- architecture "llama" (Llama 3.x, SmolLM2, Llama 2, TinyLlama, Mistral), "qwen2" or "qwen3";
  tensors renamed (token_embd, blk.N.attn_q, ...); a tied lm_head is simply absent (llama.cpp
  reuses token_embd), an untied one is output;
- for "llama", q/k rows permuted within each head from Hugging Face's rotate-half order to the
  interleaved pairs llama.cpp's rope rotates (Qwen uses llama.cpp's NeoX rope: no permutation);
- rope base, llama3 scaling as a rope_freqs tensor of per-frequency factors, linear scaling as
  keys; head_dim as key_length/value_length;
- the tokenizer: tokens, token types, merges, special ids, add_bos/add_eos, the chat template, and
  the pre-tokenizer's name, which llama.cpp finds by hashing the ids of a fixed text (below); for
  a SentencePiece tokenizer (a tokenizer.model beside tokenizer.json) llama.cpp's "llama" model:
  pieces, scores and types from tokenizer.model (gguf_sentencepiece.py), no merges.
One key the converter leaves out is written too: tokenizer.ggml.eot_token_id, the chat template's
end-of-turn token, which llama.cpp would otherwise find by its name.
"""
import hashlib
import json
import math
import struct
from pathlib import Path

import torch

import gguf_sentencepiece
import kquants
from common import CheckpointError
from model import Config
from tokenizer import END_OF_TURN, Tokenizer, read_json, stored_chat_template, token_content

# model_type -> (GGUF architecture, q/k rows permuted for llama.cpp's rope). One line per family.
ARCHS = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
}
TYPES = {"f16": 1, "bf16": 30, "q8_0": 8, "f32": 0}  # ggml tensor types
FILE_TYPES = {"f16": 1, "bf16": 32, "q8_0": 7, "f32": 0, **kquants.FILE_TYPES}  # general.file_type (llama_ftype)
ALIGNMENT = 32
QK8_0 = 32  # weights per Q8_0 block

# llama.cpp names a byte-level BPE pre-tokenizer by the sha256 of the ids its tokenizer gives this
# text (whitespace runs, emoji, digits, scripts, contractions); the families we export:
CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis '
          'concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 '
          '?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? '
          "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3, 3.1, 3.2
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 to Qwen3
}
SUPPORTED = "Llama 3.x, SmolLM2, Qwen2/2.5, Qwen3"  # byte-level BPE (SentencePiece ones: by their tokenizer.model)

# GGUF value types
UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY = 4, 5, 6, 7, 8, 9
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5  # token types
# tokenizer_config's <kind>_token -> tokenizer.ggml.<name>_token_id (GGUF's spelling, typo included)
SPECIAL_KEYS = {"bos": "bos", "eos": "eos", "unk": "unknown", "sep": "seperator", "pad": "padding",
                "cls": "cls", "mask": "mask"}


# ---- what goes in: key/values ----------------------------------------------------------------

def pre_tokenizer(tok, path):
    ids = tok.encode(CHKTXT).ids  # with the specials the tokenizer adds (Llama 3: BOS), as llama.cpp hashes
    digest = hashlib.sha256(str(ids).encode()).hexdigest()
    if digest not in PRE_TOKENIZERS:
        raise CheckpointError(f"{path / 'tokenizer.json'}: GGUF export supports the byte-level BPE tokenizers "
                              f"of {SUPPORTED}; this one is not among them (pre-tokenizer hash {digest[:16]})")
    return PRE_TOKENIZERS[digest]


def token_and_type(i, text, added):
    """(text, type) of token i: added tokens are CONTROL when special (or <|...|>-shaped), else
    USER_DEFINED; rows of the embedding with no token at all (Qwen2.5 pads) are UNUSED."""
    if added is None:
        return (text, NORMAL) if text is not None else (f"[PAD{i}]", UNUSED)
    text = added["content"]
    if added["special"] or (text.startswith("<|") and text.endswith("|>")):
        return text, CONTROL
    return text.replace("\u2581", " "), USER_DEFINED


def tokenizer_kv(path, vocab_size, arch):
    """The tokenizer.* keys: {key: (value type, value)}."""
    tokenizer = Tokenizer(path)  # also: a clear error for a missing or broken tokenizer.json
    tok_json = json.loads((path / "tokenizer.json").read_text())  # the vocabulary and merges, as stored
    cfg = read_json(path / "tokenizer_config.json")
    kv = {}
    if arch == "llama" and isinstance(cfg.get("add_prefix_space"), bool):
        kv["tokenizer.ggml.add_space_prefix"] = (BOOL, cfg["add_prefix_space"])
    kv.update(vocabulary_kv(path, tokenizer, tok_json, vocab_size, arch))
    # special ids: tokenizer_config's tokens first, then config.json's *_token_id for the rest
    content = {a["content"]: a["id"] for a in reversed(tok_json.get("added_tokens", []))}  # first wins
    special = {}
    for kind in SPECIAL_KEYS:
        if (t := token_content(cfg.get(f"{kind}_token"))) in content:
            special[kind] = content[t]
    config = read_json(path / "config.json")
    for kind in SPECIAL_KEYS:
        if kind not in special and isinstance(config.get(f"{kind}_token_id"), int):
            special[kind] = config[f"{kind}_token_id"]
    for kind, i in special.items():
        kv[f"tokenizer.ggml.{SPECIAL_KEYS[kind]}_token_id"] = (UINT32, i)
    for kind, add in add_special(tok_json, cfg).items():
        kv[f"tokenizer.ggml.add_{kind}_token"] = (BOOL, add)
    chat = stored_chat_template(path, cfg)
    if isinstance(chat, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t["name"]: t["template"] for t in chat}
        for name, text in named.items():
            if name != "default":
                kv[f"tokenizer.chat_template.{name}"] = (STRING, text)
        if len(named) > 1:
            kv["tokenizer.chat_templates"] = (ARRAY, (STRING, [n for n in named if n != "default"]))
        chat = named.get("default")
    if chat is not None:
        kv["tokenizer.chat_template"] = (STRING, chat)
    eot = END_OF_TURN.get(tokenizer.template)
    if eot in content:
        kv["tokenizer.ggml.eot_token_id"] = (UINT32, content[eot])
    return kv


def vocabulary_kv(path, tokenizer, tok_json, vocab_size, arch):
    """The tokenizer's model, pre-tokenizer, tokens, their types and its merges (scores instead, for
    SentencePiece), as the converter writes them."""
    kv = {}
    if arch == "llama" and (path / "tokenizer.model").exists():  # SentencePiece, as the converter decides it
        tokens, scores, types = gguf_sentencepiece.vocab(path, vocab_size, lambda a: token_and_type(None, None, a))
        kv["tokenizer.ggml.model"] = (STRING, "llama")  # llama.cpp's SentencePiece tokenizer
        kv["tokenizer.ggml.pre"] = (STRING, "default")
        kv["tokenizer.ggml.tokens"] = (ARRAY, (STRING, tokens))
        kv["tokenizer.ggml.scores"] = (ARRAY, (FLOAT32, scores))
        kv["tokenizer.ggml.token_type"] = (ARRAY, (INT32, types))
    else:
        if tok_json["model"].get("byte_fallback") or (tok_json.get("pre_tokenizer") or {}).get("type") == "Metaspace":
            raise CheckpointError(f"{path / 'tokenizer.model'}: missing; a SentencePiece tokenizer's GGUF export "
                                  "reads its pieces' scores and types from it (Llama 2, Mistral ship one)")
        pre = pre_tokenizer(tokenizer.tok, path)
        vocab = {i: t for t, i in tok_json["model"]["vocab"].items()}
        added = {a["id"]: a for a in tok_json.get("added_tokens", [])}
        tokens = [token_and_type(i, vocab.get(i), added.get(i)) for i in range(vocab_size)]
        merges = tok_json["model"]["merges"]
        if merges and not isinstance(merges[0], str):  # [["Ġ", "t"], ...] since tokenizers 0.20
            merges = [" ".join(p.replace(" ", "\u0120") for p in pair) for pair in merges]
        kv["tokenizer.ggml.model"] = (STRING, "gpt2")  # llama.cpp's name for byte-level BPE
        kv["tokenizer.ggml.pre"] = (STRING, pre)
        kv["tokenizer.ggml.tokens"] = (ARRAY, (STRING, [t for t, _ in tokens]))
        kv["tokenizer.ggml.token_type"] = (ARRAY, (INT32, [k for _, k in tokens]))
        kv["tokenizer.ggml.merges"] = (ARRAY, (STRING, merges))
    return kv


def add_special(tok_json, cfg):
    """Whether llama.cpp adds BOS/EOS to raw text: as tokenizer.json's post-processor does
    (Llama 3's template prepends <|begin_of_text|>), else as tokenizer_config says; and SEP, as
    the converter reads it from the pair template: A [sep] [eos] B (Llama 2's <s> A <s> B: no)."""
    post = tok_json.get("post_processor") or {}
    special = lambda t: t.get("SpecialToken", {}).get("id")  # noqa: E731
    add = {}
    for p in post.get("processors", [post]):
        if p.get("type") == "ByteLevel":  # adds nothing
            add.setdefault("bos", False)
            add.setdefault("eos", False)
        elif p.get("type") == "TemplateProcessing":
            single, first, last = p.get("single", []), None, None
            if len(single) > 1:
                if first := special(single[0]):
                    add["bos"] = first == token_content(cfg.get("bos_token"))
                if last := special(single[-1]):
                    add["eos"] = last == token_content(cfg.get("eos_token"))
            pair = p.get("pair", [])
            pair = pair[1 if first and pair and special(pair[0]) == first else 0:
                        -1 if last and pair and special(pair[-1]) == last else None]
            if len(pair) > 2 and [t.get("Sequence", {}).get("id") for t in (pair[0], pair[-1])] == ["A", "B"]:
                middle, ends = pair[1:-1], (token_content(cfg.get("sep_token")), token_content(cfg.get("eos_token")))
                add["sep"] = bool(special(middle[0]) in ends and special(middle[0]) and not last) or \
                    (len(middle) == 2 and bool(special(middle[1]) in ends and special(middle[1])))
    for kind in ("bos", "eos"):
        if isinstance(cfg.get(f"add_{kind}_token"), bool):
            add.setdefault(kind, cfg[f"add_{kind}_token"])
    return add


def metadata(path, ftype):
    """Every key/value of the file for the checkpoint folder `path`; raises CheckpointError (one
    line) for a family or tokenizer llama.cpp's llama/qwen2 architectures cannot take as is."""
    path = Path(path)
    c = Config.from_json(path / "config.json")  # the same reading of config.json as the model's
    raw = read_json(path / "config.json")
    if c.model_type not in ARCHS:
        raise CheckpointError(f"{path / 'config.json'}: GGUF export supports {SUPPORTED}, Llama 2, Mistral "
                              f"(model_type {', '.join(ARCHS)}), not model_type {c.model_type}")
    arch, permuted = ARCHS[c.model_type]
    kv = {"general.architecture": (STRING, arch), "general.type": (STRING, "model"),
          "general.name": (STRING, path.name)}
    n = arch + "."
    kv.update({n + "block_count": (UINT32, c.num_hidden_layers),
               n + "context_length": (UINT32, c.max_position_embeddings),
               n + "embedding_length": (UINT32, c.hidden_size),
               n + "feed_forward_length": (UINT32, c.intermediate_size),
               n + "attention.head_count": (UINT32, c.num_attention_heads),
               n + "attention.head_count_kv": (UINT32, c.num_key_value_heads)})
    if (c.rope_scaling or {}).get("rope_type") == "linear":  # llama3 scaling is a tensor instead
        kv[n + "rope.scaling.type"] = (STRING, "linear")
        kv[n + "rope.scaling.factor"] = (FLOAT32, c.rope_scaling["factor"])
    kv[n + "rope.freq_base"] = (FLOAT32, c.rope_theta)
    kv[n + "attention.layer_norm_rms_epsilon"] = (FLOAT32, c.rms_norm_eps)
    if permuted or raw.get("head_dim"):  # transformers' LlamaConfig always has a head_dim; Qwen2's only if set
        kv[n + "attention.key_length"] = kv[n + "attention.value_length"] = (UINT32, c.head_dim)
    kv["general.file_type"] = (UINT32, FILE_TYPES[ftype])
    if arch == "llama":
        kv[n + "vocab_size"] = (UINT32, c.vocab_size)
        kv[n + "rope.dimension_count"] = (UINT32, c.head_dim)
    kv["general.quantization_version"] = (UINT32, 2)
    kv = {**kv, **tokenizer_kv(path, c.vocab_size, arch)}
    if ftype in kquants.FILE_TYPES:  # llama-quantize copies the keys, then sets these two last
        kv |= {k: kv.pop(k) for k in ("general.quantization_version", "general.file_type")}
    return kv


# ---- what goes in: tensors -------------------------------------------------------------------

NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
         "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
       "lm_head.weight": "output.weight"}


def gguf_name(name):
    """model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight"""
    if name in TOP:
        return TOP[name]
    parts = name.split(".")  # model, layers, N, module..., weight|bias
    if parts[:2] == ["model", "layers"] and ".".join(parts[3:-1]) in NAMES:
        return f"blk.{parts[2]}.{NAMES['.'.join(parts[3:-1])]}.{parts[-1]}"
    raise CheckpointError(f"tensor {name} has no GGUF name")


def permute_qk(w, n_heads):
    """Rows of each head from rotate-half order (x_0..x_{d/2-1}, y_0..y_{d/2-1}) to interleaved
    pairs (x_0, y_0, x_1, y_1, ...), the layout of llama.cpp's (and Meta's) rope for llama."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def llama3_rope_factors(c):
    """llama3 scaling as llama.cpp applies it: each rotary frequency divided by a factor
    (1 for short wavelengths, `factor` for long ones, smoothly in between), in fp32."""
    s, d = c.rope_scaling, c.head_dim
    freqs = 1.0 / (c.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    old, low, high = s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"]
    wavelen = 2 * torch.pi / freqs
    smooth = (old / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / s["factor"] + smooth)
    return torch.where(wavelen < old / high, 1.0, torch.where(wavelen > old / low, s["factor"], mid)).float()


def ggml_type(name, shape, ftype, c, tied):
    """The ggml type of the tensor `name` (its GGUF name) in a file of type ftype, as llama.cpp's
    converter picks it (for the k-quant types: as llama-quantize does, kquants.tensor_type)."""
    if len(shape) == 1 or name.endswith("_norm.weight"):
        return TYPES["f32"]  # norms and biases stay full precision
    if ftype in kquants.FILE_TYPES:
        return kquants.tensor_type(name, shape[-1], ftype, c, tied)
    if ftype == "q8_0" and shape[-1] % QK8_0:
        return TYPES["f16"]  # rows that do not split into blocks: llama.cpp's converter falls back to F16
    return TYPES[ftype]


def tensors(shapes, read, c, ftype):
    """[(GGUF name, shape, ggml type, load)] in llama.cpp's converter's order (for the k-quant
    types, llama-quantize's: by layer, then by name), for a checkpoint's tensors {key: shape}:
    load() gives one as it goes in the file, read(key) with q/k rows permuted for llama. Nothing is
    read before it is written: the export holds one tensor at a time."""
    arch, permuted = ARCHS[c.model_type]
    out = []
    if (c.rope_scaling or {}).get("rope_type") == "llama3":
        factors = llama3_rope_factors(c)
        out.append(("rope_freqs.weight", tuple(factors.shape), TYPES["f32"], lambda: factors))
    for key in sorted(shapes):
        heads = None
        if permuted and key.endswith(("q_proj.weight", "q_proj.bias")):
            heads = c.num_attention_heads
        elif permuted and key.endswith(("k_proj.weight", "k_proj.bias")):
            heads = c.num_key_value_heads
        name = gguf_name(key)
        out.append((name, tuple(shapes[key]), ggml_type(name, shapes[key], ftype, c, "lm_head.weight" not in shapes),
                    loader(read, key, heads)))
    if ftype in kquants.FILE_TYPES:
        out.sort(key=lambda t: (int(t[0].split(".")[1]) if t[0].startswith("blk.") else -1, t[0]))
    return out


def loader(read, key, heads):
    return lambda: permute_qk(read(key), heads) if heads else read(key)


# ---- the bytes -------------------------------------------------------------------------------

def quantize_q8_0(x):
    """(..., n) float32, n % 32 == 0 -> uint8 (..., n / 32 * 34), as ggml's quantize_row_q8_0."""
    blocks = x.reshape(-1, QK8_0)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, 0.0, 1 / d)
    v = blocks * inv
    a = v.abs()
    q = torch.sign(v) * (a.floor() + (a - a.floor() >= 0.5))  # C's roundf: halves away from zero
    scale = d.to(torch.float16).view(torch.uint8)  # (blocks, 2)
    return torch.cat([scale, q.to(torch.int8).view(torch.uint8)], dim=1).reshape(*x.shape[:-1], -1)


def encode(w, ggml_type):
    """Bytes of a tensor in a ggml type; the checkpoint's dtype goes through fp32 first, as in
    llama.cpp's converter (so bf16 -> f16 rounds once, from the exact bf16 values)."""
    x = w.detach().to("cpu", torch.float32)
    if ggml_type == TYPES["f32"]:
        return x.numpy().tobytes()
    if ggml_type == TYPES["f16"]:
        return x.half().numpy().tobytes()
    if ggml_type == TYPES["bf16"]:
        return x.bfloat16().view(torch.int16).numpy().tobytes()
    if ggml_type in kquants.ENCODERS:
        return kquants.quantize(x, ggml_type).numpy().tobytes()
    return quantize_q8_0(x).numpy().tobytes()


def nbytes(shape, ggml_type):
    n = math.prod(shape)
    if ggml_type in kquants.BLOCK:  # Q8_0 and the k-quants: bytes per block of weights
        return n // kquants.BLOCK[ggml_type][0] * kquants.BLOCK[ggml_type][1]
    return {0: 4 * n, 1: 2 * n, 30: 2 * n}[ggml_type]


def _string(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _value(vtype, value):
    if vtype == STRING:
        return _string(value)
    if vtype == ARRAY:
        etype, items = value
        head = struct.pack("<IQ", etype, len(items))
        if etype == STRING:
            return head + b"".join(_string(s) for s in items)
        return head + struct.pack(f"<{len(items)}{ {INT32: 'i', FLOAT32: 'f'}.get(etype, 'I')}", *items)
    return struct.pack({UINT32: "<I", INT32: "<i", FLOAT32: "<f", BOOL: "<?"}[vtype], value)


def _pad(n):
    return -n % ALIGNMENT


def write(file, kv, tensors):
    """Write a GGUF v3 file: header, key/values, tensor infos, padding, aligned tensor data.
    tensors: [(name, shape, ggml type, load)], as tensors() gives them; each is loaded when written."""
    with open(file, "wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv)))
        for key, (vtype, value) in kv.items():
            f.write(_string(key) + struct.pack("<I", vtype) + _value(vtype, value))
        offset = 0
        for name, shape, ggml_type, _ in tensors:
            dims = list(reversed(shape))  # ggml: fastest-varying dimension first
            f.write(_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset))
            offset += nbytes(shape, ggml_type) + _pad(nbytes(shape, ggml_type))
        f.write(b"\0" * _pad(f.tell()))
        for _, _, ggml_type, load in tensors:
            write_tensor(f, load(), ggml_type)


def write_tensor(f, w, ggml_type, chunk=1 << 20):
    """Tensor w's bytes in a ggml type, then its padding; encoded about a million weights (a few
    MB) at a time, whole rows (a block never spans two rows), so no fp32 copy of w is ever made."""
    rows = w.reshape(-1, w.shape[-1]) if w.dim() > 1 else w.reshape(1, -1)
    for part in rows.split(max(1, chunk // rows.shape[1])):
        f.write(encode(part, ggml_type))
    f.write(b"\0" * _pad(nbytes(w.shape, ggml_type)))
