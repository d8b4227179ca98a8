"""GGUF export (gguf_export.py, merge.py --gguf) against llama.cpp.

- Converter parity: on SmolLM2-135M-Instruct every key/value, tensor name, shape, type and the
  bytes of all tensor data equal what llama.cpp's convert_hf_to_gguf.py writes (recorded in
  tests/fixtures/gguf_llama_cpp.json by tests/fixtures/gguf_reference.py); on tiny llama (llama3
  rope scaling, untied, q/k/v biases) and qwen2 (tied) checkpoints: keys, names, shapes, types and
  the llama3 rope factors (exact).
- Read back with the `gguf` package: keys and their types, every tensor, f32/f16/bf16 data equal
  to the checkpoint's weights (cast, q/k permutation undone), Q8_0 bytes equal to gguf's quantize.
- The tokenizer in the file encodes text as tokenizer.json does; merge.py --gguf end to end.
- SentencePiece (tiny Llama 2 and Mistral v0.3 with real tokenizer.model files): every key and
  tensor equal convert_hf_to_gguf.py's (tests/fixtures/gguf_sentencepiece_llama_cpp.json).
"""
import hashlib
import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file

from common import CheckpointError
from config import TrainConfig
import gguf_export
from helpers import (ROOT, SMOLLM2, random_adapter, tiny_checkpoint, unpermute, write_checkpoint,
                     write_sentencepiece_tokenizer)
import merge
from model import Config, Transformer
import ollama
from tokenizer import Tokenizer
import train

gguf = pytest.importorskip("gguf")  # the reference reader and quantizer (test-only)

REF = json.loads((ROOT / "tests" / "fixtures" / "gguf_llama_cpp.json").read_text())
FTYPES = ("f32", "f16", "bf16", "q8_0")


def as_recorded(kv):
    """Our key/values in the fixture's form: {key: [type, value]}, long arrays by length + hash,
    floats as the float32 the file holds."""
    out = {}
    for key, (vtype, value) in kv.items():
        if vtype == gguf_export.ARRAY:
            etype, items = value
            digest = hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()
            out[key] = [f"ARRAY:{gguf.GGUFValueType(etype).name}", {"len": len(items), "sha256": digest}]
        else:
            if vtype == gguf_export.FLOAT32:
                value = struct.unpack("<f", struct.pack("<f", value))[0]
            out[key] = [gguf.GGUFValueType(vtype).name, value]
    return out


def entries(state, config, ftype):
    """gguf_export.tensors for tensors held in memory ({key: tensor})."""
    return gguf_export.tensors({k: t.shape for k, t in state.items()}, state.__getitem__, config, ftype)


def compared(kv):
    """Every key but the converter's naming (general.name, ...) and the one key we add."""
    return {k: v for k, v in kv.items() if k not in REF["not_compared"] and k != "tokenizer.ggml.eot_token_id"}


@pytest.fixture(scope="module")
def smollm2_state():
    if not (SMOLLM2 / "model.safetensors").exists():
        pytest.skip(f"SmolLM2 checkpoint not found at {SMOLLM2}")
    digest = hashlib.sha256((SMOLLM2 / "model.safetensors").read_bytes()).hexdigest()
    if digest != REF["smollm2"]["model_safetensors_sha256"]:
        pytest.skip("the fixture was recorded on the SmolLM2 copy ../shared/tools/get_smollm2.sh makes; "
                    "this is another")
    return load_file(SMOLLM2 / "model.safetensors")


@pytest.mark.parametrize("ftype", FTYPES)
def test_smollm2_is_what_llama_cpp_converter_writes(smollm2_state, ftype):
    ref = REF["smollm2"]
    kv = as_recorded(gguf_export.metadata(SMOLLM2, ftype))
    expected = {**ref["keys"], "general.file_type": ["UINT32", ref["file_type"][ftype]]}
    assert compared(kv) == expected  # same keys, types and values (tokens, merges: length and hash)
    assert list(compared(kv)) == list(expected)  # in the same order
    assert kv["tokenizer.ggml.eot_token_id"] == ["UINT32", 2]  # <|im_end|>, the key llama.cpp infers by name
    tensors = entries(smollm2_state, Config.from_json(SMOLLM2 / "config.json"), ftype)
    infos = [f"{name} {'x'.join(map(str, reversed(shape)))}" for name, shape, _, _ in tensors]
    assert infos == ref["tensors"]
    assert " ".join(gguf.GGMLQuantizationType(t).name for _, _, t, _ in tensors) == ref["types"][ftype]
    data = hashlib.sha256()
    for _, _, t, load in tensors:
        data.update(gguf_export.encode(load(), t))
    assert data.hexdigest() == ref["data_sha256"][ftype]  # every byte of every tensor


TINY = [("llama", "tiny-llama3"), ("qwen2", "tiny-qwen2"), ("qwen3", "tiny-qwen3")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (checkpoint folder, its metadata for f16), made once."""
    made = {}
    for model_type, name in TINY:
        path = tiny_checkpoint(tmp_path_factory.mktemp(name), model_type)
        made[name] = path, gguf_export.metadata(path, "f16")
    return made


@pytest.mark.parametrize("model_type,name", TINY)
@pytest.mark.parametrize("ftype", FTYPES)
def test_tensors_read_back_equal_the_weights(tiny, tmp_path, model_type, name, ftype):
    path, kv = tiny[name]
    kv = {**kv, "general.file_type": (gguf_export.UINT32, gguf_export.FILE_TYPES[ftype])}
    config, state = Config.from_json(path / "config.json"), load_file(path / "model.safetensors")
    ref = REF[name]
    assert {k: v for k, v in compared(as_recorded(kv)).items() if not k.startswith("tokenizer.")} == \
        {**ref["keys"], "general.file_type": ["UINT32", gguf_export.FILE_TYPES[ftype]]}
    # the tokenizer's keys (SmolLM2's, checked above) would make the read-back slow: leave them out
    kv = {k: v for k, v in kv.items() if not k.startswith("tokenizer.")}
    gguf_export.write(tmp_path / "m.gguf", kv, entries(state, config, ftype))
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    assert r.alignment == 32 and r.fields["GGUF.version"].contents() == 3
    assert {k: (f.types[0], f.contents()) for k, f in r.fields.items() if not k.startswith("GGUF.")} == \
        {k: (gguf.GGUFValueType(t), v if t != gguf_export.FLOAT32 else struct.unpack("<f", struct.pack("<f", v))[0])
         for k, (t, v) in kv.items()}
    if ftype == "q8_0":  # names, types and ggml shapes as the converter writes them
        assert [f"{t.name} {t.tensor_type.name} {'x'.join(map(str, t.shape))}" for t in r.tensors] == ref["tensors"]
    read = {t.name: t for t in r.tensors}
    if model_type == "llama":  # llama3 scaling: the converter's factors, exactly
        assert read.pop("rope_freqs.weight").data.tolist() == ref["rope_freqs"]
    expected = {gguf_export.gguf_name(k): k for k in state}
    assert set(read) == set(expected)  # every tensor (a tied lm_head is not one)
    heads = ({"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
             if model_type == "llama" else {})
    for gname, t in read.items():
        w = state[expected[gname]].float()
        n = heads.get(gname.split(".")[2]) if gname.startswith("blk.") else None  # permuted q/k rows
        assert list(reversed(t.shape.tolist())) == list(w.shape)
        if t.tensor_type == gguf.GGMLQuantizationType.Q8_0:  # byte for byte gguf's (and ggml's) Q8_0
            in_file = gguf_export.permute_qk(w, n) if n else w
            assert t.data.tobytes() == gguf.quants.quantize(in_file.numpy(), t.tensor_type).tobytes(), gname
            continue
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape).copy())
        if n:
            got = unpermute(got, n)
        cast = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[t.tensor_type.name]
        assert torch.equal(got, w.to(cast).float()), gname
        assert t.tensor_type.name == ("F32" if w.dim() == 1 else ftype.upper()), gname


@pytest.mark.parametrize("name", ["tiny-llama3", "tiny-qwen2"])  # q/k permuted; tied, untied by the adapter
def test_merge_gguf_streams_the_file_of_the_merged_tensors(tiny, tmp_path, name):
    # merge.py --gguf q8_0 writes its GGUF a tensor at a time from the merged shards it has just
    # written: byte for byte the file gguf_export.write makes from those tensors held in memory
    path, _ = tiny[name]
    adapter = random_adapter(path, tmp_path / "adapter",
                             target_modules=["embed_tokens", "q_proj", "k_proj", "down_proj"])
    out = merge.merge(path, adapter, tmp_path / "merged", gguf="q8_0", max_shard_size=4_000_000)
    merged = {}
    for file in sorted(out.glob("model-*.safetensors")):
        merged.update(load_file(file))
    gguf_export.write(tmp_path / "expected.gguf", gguf_export.metadata(path, "q8_0"),
                      entries(merged, Config.from_json(out / "config.json"), "q8_0"))
    assert (out / "model-q8_0.gguf").read_bytes() == (tmp_path / "expected.gguf").read_bytes()


def test_unsupported_tokenizers_are_one_line_errors(tiny_checkpoint):
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: GGUF export supports the byte-level BPE tokenizers "
                                              r"of Llama 3\.x, SmolLM2, Qwen2/2\.5, Qwen3; this one is not among them"):
        gguf_export.metadata(tiny_checkpoint, "q8_0")  # a word-level tokenizer
    # (every model_type model.py loads is exported: llama, mistral, qwen2, qwen3)


def test_q8_0_rounds_halves_away_from_zero_and_keeps_zero_blocks():
    x = torch.zeros(2, 64)
    x[0, :4] = torch.tensor([127.0, 0.5, 2.5, -3.5])  # scale 1: halves, where roundf and round-half-even differ
    x[1, 32:] = torch.randn(32)
    ours = gguf_export.quantize_q8_0(x)
    assert ours.numpy().tobytes() == gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType.Q8_0).tobytes()
    assert ours[0, 2:6].view(torch.int8).tolist() == [127, 1, 3, -4]
    assert gguf_export.quantize_q8_0(torch.zeros(32)).tolist() == [0] * 34  # scale 0, no NaN


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Training for 2 steps on SmolLM2 -> merge.py --gguf f16 -> the folder and the file read back."""
    if not (SMOLLM2 / "model.safetensors").exists():
        pytest.skip(f"SmolLM2 checkpoint not found at {SMOLLM2}")
    tmp = tmp_path_factory.mktemp("export")
    train.train(TrainConfig(model_path=str(SMOLLM2), data_path=str(ROOT / "data" / "brannock_chat.jsonl"),
                            output_dir=str(tmp / "lora"), max_steps=2, micro_batch_size=2, effective_batch_size=2,
                            max_seq_len=96, learning_rate=1e-2, save_every=0))
    merge.main(["--model_path", str(SMOLLM2), "--adapter_path", str(tmp / "lora"), "--output_dir", str(tmp / "merged"),
                "--gguf", "f16"])
    return tmp / "merged", gguf.GGUFReader(tmp / "merged" / "model-f16.gguf")


def test_merge_gguf_end_to_end(exported):
    out, r = exported
    assert (out / "model.safetensors").exists()  # the Hugging Face folder is still written beside it
    ref = REF["smollm2"]
    keys = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert set(compared(keys)) == set(ref["keys"])  # every key, none missing, none extra
    for k, (vtype, value) in ref["keys"].items():
        f = keys[k]
        assert ":".join(t.name for t in f.types) == vtype, k
        if not isinstance(value, dict) and k != "general.file_type":
            assert f.contents() == value, k
    assert keys["general.file_type"].contents() == 1  # MOSTLY_F16
    merged = load_file(out / "model.safetensors")
    config = Config.from_json(out / "config.json")
    read = {t.name: t for t in r.tensors}
    assert [f"{t.name} {'x'.join(map(str, t.shape))}" for t in r.tensors] == ref["tensors"]
    assert " ".join(t.tensor_type.name for t in r.tensors) == ref["types"]["f16"]
    for name, w in merged.items():  # the merged weights, in f16, with the q/k permutation undone
        t = read[gguf_export.gguf_name(name)]
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape).copy())
        if "q_proj" in name or "k_proj" in name:
            got = unpermute(got, config.num_attention_heads if "q_proj" in name else config.num_key_value_heads)
        assert torch.equal(got, w.float().to(torch.float16 if w.dim() > 1 else torch.float32).float()), name
    assert (out / "Modelfile").read_text() == (
        'FROM ./model-f16.gguf\n'
        'TEMPLATE """{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
        '{{- range .Messages }}{{ if ne .Role "system" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
        '{{ end }}{{ end }}'
        '<|im_start|>assistant\n"""\n'
        'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""\n'
        'PARAMETER stop "<|im_end|>"\n')


TEXTS = ["Hello world", "<|im_start|>user\nWhat is 12345 + 678.9?<|im_end|>\n<|im_start|>assistant\n",
         "  leading spaces,\ttabs\t\tand\n\n\nnewlines   ", "naïve café, Ελληνικά, русский, 日本語, 🦙🚀 emoji",
         "3333333 3.14159 1e-10 0x1F", "<repo_name>a/b<file_sep>x = {'k': [1, 2]}<|endoftext|>", "I've 'll 're ' ' '"]


def test_tokenizer_in_the_file_encodes_like_tokenizer_json(exported):
    # tokenizer.json with its vocabulary, merges and special tokens replaced by the file's: the
    # same ids for every text. (The pre-tokenizer is named in the file; llama.cpp implements it.)
    from tokenizers import Tokenizer

    _, r = exported
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    merges = r.fields["tokenizer.ggml.merges"].contents()
    original = json.loads((SMOLLM2 / "tokenizer.json").read_text())
    rebuilt = json.loads(json.dumps(original))
    rebuilt["model"]["vocab"] = {t: i for i, t in enumerate(tokens)}
    rebuilt["model"]["merges"] = [m.split(" ") for m in merges]
    added = [(i, t, ty) for i, (t, ty) in enumerate(zip(tokens, types))
             if ty in (gguf_export.CONTROL, gguf_export.USER_DEFINED)]
    rebuilt["added_tokens"] = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                                "normalized": False, "special": ty == gguf_export.CONTROL} for i, t, ty in added]
    ours, theirs = Tokenizer.from_str(json.dumps(rebuilt)), Tokenizer.from_str(json.dumps(original))
    for text in TEXTS:
        assert (ours.encode(text, add_special_tokens=False).ids
                == theirs.encode(text, add_special_tokens=False).ids), text
    field = lambda key: r.fields[f"tokenizer.{key}"].contents()  # noqa: E731
    assert (tokens[field("ggml.bos_token_id")], tokens[field("ggml.eos_token_id")]) == ("<|im_start|>", "<|im_end|>")
    assert field("ggml.add_bos_token") is False  # SmolLM2's template writes no BOS
    chat_template = json.loads((SMOLLM2 / "tokenizer_config.json").read_text())["chat_template"]
    assert field("chat_template") == chat_template


# ---- SentencePiece families (gguf_sentencepiece.py) ------------------------------------------

SP_RECORDED = ROOT / "tests" / "fixtures" / "gguf_sentencepiece_llama_cpp.json"
SENTENCEPIECE = {  # name: (model_type, mistral_common's tokenizer.model, chat template)
    # Llama 2's and TinyLlama's layout (<unk> <s> </s>, 256 byte pieces, 32000), with Mistral 7B v0.1's pieces
    "tiny-llama2": ("llama", "tokenizer.model.v1", "llama2"),
    # Mistral 7B v0.3's: 32768, the control tokens [INST], [/INST], [TOOL_CALLS], ... among the pieces
    "tiny-mistral-v3": ("mistral", "mistral_instruct_tokenizer_240323.model.v3", "mistral"),
}
SP_TEMPLATES = {  # the families' published templates, in short: what tokenizer.py recognizes them by
    "llama2": "{{ bos_token + '[INST] <<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + content + ' [/INST]' }}",
    "mistral": "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + "
               "' [/INST]' }}{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}",
}


def sentencepiece_checkpoint(path, name):
    """A tiny Llama-2-shaped checkpoint (random weights, MHA) with a real SentencePiece tokenizer
    (helpers.write_sentencepiece_tokenizer)."""
    model_type, model_file, template = SENTENCEPIECE[name]
    vocab_size = write_sentencepiece_tokenizer(path, model_file, SP_TEMPLATES[template])
    torch.manual_seed(0)
    config = Config(model_type=model_type, vocab_size=vocab_size, hidden_size=64, intermediate_size=96,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                    rms_norm_eps=1e-5)
    write_checkpoint(path, Transformer(config))
    raw = json.loads((path / "config.json").read_text())
    raw.update(architectures=["LlamaForCausalLM" if model_type == "llama" else "MistralForCausalLM"],
               rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    (path / "config.json").write_text(json.dumps(raw))
    return path


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sentencepiece")
    return {name: sentencepiece_checkpoint(tmp / name, name) for name in SENTENCEPIECE}


@pytest.mark.parametrize("name", SENTENCEPIECE)
def test_sentencepiece_is_what_llama_cpp_converter_writes(sentencepiece, name):
    # every key (type, value, order; tokens, scores and types by length + sha256) and every tensor
    # (name, type, ggml dims, sha256 of its bytes) equal convert_hf_to_gguf.py's, in all four types;
    # naming keys from the folder name aside
    recorded, path = json.loads(SP_RECORDED.read_text()), sentencepiece[name]
    ref = recorded[name]
    assert hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest() == ref["model_safetensors_sha256"], \
        "the checkpoint built here is not the one recorded (another torch RNG?): re-run gguf_sentencepiece_reference.py"
    state, config = load_file(path / "model.safetensors"), Config.from_json(path / "config.json")
    for ftype in FTYPES:
        kv = {k: v for k, v in as_recorded(gguf_export.metadata(path, ftype)).items()
              if k not in recorded["not_compared"]}
        assert kv == ref[ftype]["keys"] and list(kv) == list(ref[ftype]["keys"]), ftype
        tensors = [f"{n} {gguf.GGMLQuantizationType(t).name} {'x'.join(map(str, reversed(shape)))} "
                   f"{hashlib.sha256(gguf_export.encode(load(), t)).hexdigest()}"
                   for n, shape, t, load in entries(state, config, ftype)]
        assert tensors == ref[ftype]["tensors"], ftype


def test_sentencepiece_vocabulary_is_tokenizer_json_s(sentencepiece):
    # independently of the converter: the file's tokens are tokenizer.json's, id for id, the
    # byte-fallback pieces <0x00>..<0xFF> typed BYTE, <unk>, <s> and </s> CONTROL (special in
    # tokenizer_config's added_tokens_decoder, which overrides tokenizer.model's UNKNOWN for <unk>)
    import gguf_sentencepiece as sp

    for name, path in sentencepiece.items():
        kv = gguf_export.metadata(path, "f16")
        tokens, types = kv["tokenizer.ggml.tokens"][1][1], kv["tokenizer.ggml.token_type"][1][1]
        vocab = json.loads((path / "tokenizer.json").read_text())["model"]["vocab"]
        assert tokens == sorted(vocab, key=vocab.get), name
        assert [t for t, k in zip(tokens, types) if k == sp.BYTE] == [f"<0x{b:02X}>" for b in range(256)], name
        assert types[:3] == [sp.CONTROL] * 3 and kv["tokenizer.ggml.model"][1] == "llama", name
        assert kv["tokenizer.ggml.add_bos_token"][1] is True and kv["tokenizer.ggml.add_sep_token"][1] is False, name


def test_sentencepiece_without_tokenizer_model_is_one_line(sentencepiece, tmp_path):
    path = shutil.copytree(sentencepiece["tiny-llama2"], tmp_path / "no-model",
                           ignore=shutil.ignore_patterns("tokenizer.model"))
    with pytest.raises(CheckpointError, match=r"tokenizer\.model: missing; a SentencePiece tokenizer's GGUF export"):
        gguf_export.metadata(path, "f16")


def test_chat_template_jinja_is_copied_and_goes_in_the_gguf(tiny, tmp_path):
    # a checkpoint that keeps its template in chat_template.jinja (newer Hugging Face repos): the
    # merged folder has the file, byte for byte, and the GGUF's tokenizer.chat_template is its text
    path = shutil.copytree(tiny["tiny-llama3"][0], tmp_path / "jinja")
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    (path / "chat_template.jinja").write_text(cfg.pop("chat_template"))
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    out = merge.merge(path, random_adapter(path, tmp_path / "adapter", target_modules=["q_proj"]), tmp_path / "merged")
    assert (out / "chat_template.jinja").read_bytes() == (path / "chat_template.jinja").read_bytes()
    kv = gguf_export.metadata(out, "f16")
    assert kv["tokenizer.chat_template"] == (gguf_export.STRING, (path / "chat_template.jinja").read_text())
    # training and the Modelfile read it too: the same template, system date and stops as from
    # tokenizer_config.json, so the Modelfile is the one the original folder gives
    same = (lambda t: (t.template, t.system_date, t.default_system, t.eos_ids))
    assert same(Tokenizer(path)) == same(Tokenizer(tiny["tiny-llama3"][0])) and Tokenizer(path).template is not None
    assert ollama.modelfile("m.gguf", out) == ollama.modelfile("m.gguf", tiny["tiny-llama3"][0])
