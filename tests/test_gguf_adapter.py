"""The adapter as GGUF (gguf_lora.py, merge.py --gguf_adapter) against llama.cpp's convert_lora_to_gguf.py.

- Converter parity: for four PEFT adapter folders (tiny llama with llama3 rope scaling on every
  linear layer; tiny llama with embeddings, q/k and lm_head at r=32, so Q8_0 takes lora_b too;
  tiny qwen2, tied, q/v/down; tiny qwen3 on every linear layer) in f32/f16/bf16/q8_0,
  every key (type, value, order; general.name aside, the converter's prettified folder name) and
  every tensor (name, type, ggml shape, sha256 of its bytes) equal the converter's file:
  recorded in tests/fixtures/gguf_adapter_llama_cpp.json by tests/fixtures/gguf_adapter_reference.py.
- What the file means, independently of the converter: in f32, scale * lora_b @ lora_a with
  llama.cpp's scale alpha / r is our merge's update (lora.lora_delta) to 1e-6 relative, q/k
  permutation undone; rsLoRA's alpha is written so that alpha / r = alpha / sqrt(r).
- The folder: base-TYPE.gguf is byte for byte gguf_export's file of the base; the Modelfile is
  the base's with an ADAPTER line. DoRA, embeddings or lm_head of a tied base, an unknown type:
  one line, exit 2, nothing written.
"""
import hashlib
import json
import math

import pytest
import torch

import gguf_export
from helpers import ROOT, random_adapter, tiny_checkpoint, unpermute
import merge
from model import Config
import ollama

gguf = pytest.importorskip("gguf")  # the reference reader (test-only)

RECORDED = ROOT / "tests" / "fixtures" / "gguf_adapter_llama_cpp.json"
FTYPES = ("f32", "f16", "bf16", "q8_0")
CASES = {  # name: (tiny_checkpoint's model_type, adapter settings)
    "llama-all-linear": ("llama", dict(target_modules="all-linear")),
    "llama-embeddings-lm_head-r32": ("llama", dict(target_modules=["embed_tokens", "q_proj", "k_proj", "lm_head"],
                                                   r=32, alpha=16)),
    "qwen2-tied": ("qwen2", dict(target_modules=["q_proj", "v_proj", "down_proj"])),
    "qwen3-all-linear": ("qwen3", dict(target_modules="all-linear")),
}


def make_case(tmp, name):
    """(base folder, adapter folder) of a case, the same bytes every time (seeded)."""
    model_type, settings = CASES[name]
    base = tmp / f"base-{model_type}"
    if not base.exists():
        tiny_checkpoint(base, model_type)
    torch.manual_seed(1)
    return base, random_adapter(base, tmp / name, **settings)


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def described(file):
    """{keys: {key: [type, value]}, tensors: ["name TYPE dims sha256"]} of a GGUF adapter file."""
    r = gguf.GGUFReader(file)
    keys = {k: [":".join(t.name for t in f.types), f.contents()] for k, f in r.fields.items()
            if not k.startswith("GGUF.") and k != "general.name"}
    tensors = [f"{t.name} {t.tensor_type.name} {'x'.join(str(int(n)) for n in t.shape)} {sha256(t.data.tobytes())}"
               for t in r.tensors]
    return {"keys": keys, "tensors": tensors}


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapters")
    return {name: make_case(tmp, name) for name in CASES}


@pytest.mark.parametrize("name", CASES)
def test_adapter_gguf_is_what_convert_lora_to_gguf_writes(cases, tmp_path, name):
    recorded = json.loads(RECORDED.read_text())[name]
    base, adapter = cases[name]
    assert sha256((adapter / "adapter_model.safetensors").read_bytes()) == recorded["adapter_sha256"], \
        "the adapter built here is not the one recorded (another torch RNG?): re-run gguf_adapter_reference.py"
    for ftype in FTYPES:
        out = merge.merge(base, adapter, tmp_path / ftype, gguf_adapter=ftype)
        assert described(out / f"adapter-{ftype}.gguf") == recorded[ftype], ftype  # keys in order, tensors in order
        assert (out / "base-f32.gguf").exists() == (ftype == "f32")


def test_adapter_gguf_means_our_merge_update(cases, tmp_path):
    # in f32 the file's lora_a, lora_b and alpha give, as llama.cpp applies them (alpha / r *
    # lora_b @ lora_a, ggml's (in, out) layout), the update merge.py adds to each weight
    from lora import lora_delta
    from peft_format import read_adapter

    base, adapter = cases["llama-embeddings-lm_head-r32"]
    config, saved = read_adapter(adapter)
    out = merge.merge(base, adapter, tmp_path / "out", gguf_adapter="f32")
    r = gguf.GGUFReader(out / "adapter-f32.gguf")
    read = {t.name: torch.from_numpy(t.data.copy()) for t in r.tensors}
    alpha = float(r.fields["adapter.lora.alpha"].contents())
    c = Config.from_json(base / "config.json")
    layers = {}  # {layer name: {PEFT suffix: tensor}}
    for key, t in saved.items():
        name, suffix = key.removeprefix("base_model.model.").split(".lora_")
        layers.setdefault(name, {})["lora_" + suffix] = t
    for name, layer in layers.items():
        expected = lora_delta(layer, config["lora_alpha"] / config["r"])
        g = gguf_export.gguf_name(name + ".weight")
        a, b = read[g + ".lora_a"], read[g + ".lora_b"]
        got = alpha / config["r"] * (a @ b.T if g == "token_embd.weight" else b @ a)  # the embedding's a: (vocab, r)
        if name.endswith(("q_proj", "k_proj")):
            got = unpermute(got, c.num_attention_heads if name.endswith("q_proj") else c.num_key_value_heads)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7, msg=name)


def test_rslora_alpha_is_what_llama_cpp_needs(cases, tmp_path):
    # llama.cpp scales by alpha / r; rsLoRA's scaling is lora_alpha / sqrt(r): 8 / 2 = 4 = 16 / 4
    base, _ = cases["llama-all-linear"]
    adapter = random_adapter(base, tmp_path / "rslora", target_modules=["q_proj"], use_rslora=True)
    out = merge.merge(base, adapter, tmp_path / "out", gguf_adapter="f16")
    alpha = gguf.GGUFReader(out / "adapter-f16.gguf").fields["adapter.lora.alpha"].contents()
    assert alpha == 8 * math.sqrt(4) == 16


def test_folder_base_gguf_and_modelfile(cases, tmp_path):
    base, adapter = cases["qwen2-tied"]
    out = merge.merge(base, adapter, tmp_path / "out", gguf_adapter="f16", gguf="q8_0")
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "adapter-f16.gguf", "base-q8_0.gguf"]
    from safetensors.torch import load_file

    state = load_file(base / "model.safetensors")
    gguf_export.write(tmp_path / "expected.gguf", gguf_export.metadata(base, "q8_0"),
                      gguf_export.tensors({k: tuple(t.shape) for k, t in state.items()}, state.__getitem__,
                                          Config.from_json(base / "config.json"), "q8_0"))
    assert (out / "base-q8_0.gguf").read_bytes() == (tmp_path / "expected.gguf").read_bytes()
    merged = ollama.modelfile("base-q8_0.gguf", base).split("\n")
    assert (out / "Modelfile").read_text().split("\n") == [merged[0], "ADAPTER ./adapter-f16.gguf", *merged[1:]]


@pytest.mark.parametrize("problem", ["dora", "tied lm_head", "tied embeddings", "type"])
def test_refused_in_one_line_nothing_written(cases, tmp_path, capsys, problem):
    base, _ = cases["qwen2-tied"]
    settings = {"dora": dict(target_modules=["q_proj"], use_dora=True),
                "tied lm_head": dict(target_modules=["lm_head"]),
                "tied embeddings": dict(target_modules=["embed_tokens"]),
                "type": dict(target_modules=["q_proj"])}[problem]
    adapter = random_adapter(base, tmp_path / "adapter", **settings)
    with pytest.raises(SystemExit) as e:
        if problem == "type":  # the function's check (the command line's choices stop it earlier)
            from common import exit_on_input_error
            with exit_on_input_error("merge.py"):
                merge.merge(base, adapter, tmp_path / "out", gguf_adapter="q4_k_m")
        else:
            merge.main(["--model_path", str(base), "--adapter_path", str(adapter),
                        "--output_dir", str(tmp_path / "out"), "--gguf_adapter", "f16"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    expected = {"dora": "adapter_config.json: a DoRA adapter has no GGUF form (llama.cpp's LoRA has no magnitude "
                        "vector); merge it instead: --gguf TYPE",
                "tied lm_head": "adapter_model.safetensors: adapts lm_head, which this base ties to model.embed_tokens",
                "tied embeddings": "adapter_model.safetensors: adapts model.embed_tokens, which this base ties to "
                                   "lm_head (llama.cpp would apply it to both, and fails on it); merge it instead",
                "type": "--gguf_adapter q4_k_m: not a GGUF adapter type (f16, bf16, q8_0, f32)"}[problem]
    assert expected in err
    assert not (tmp_path / "out").exists()
