"""The path README shows, end to end on the real model, and merge.py's promises on a tiny one."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from adapters import apply_lora, lora_layers, merge_and_unload
from common import InputError
from config import TrainConfig
from generate import load
from helpers import ROOT, chat, random_adapter, tiny_config, write_checkpoint, write_jsonl
from merge import merge
from model import Transformer
from peft_format import load_adapter, save_adapter
import train
from weights import stored_dtype

QUESTION = "What is the capital of Brannock?"


def cli(script, *args):
    r = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return r


def test_train_generate_merge_generate(smollm2, tmp_path):
    # train.py on the bundled data -> generate.py with the adapter -> merge.py -> generate.py on the
    # merged folder: the same greedy text. fp32 merge, so the two differ only by float rounding.
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    cli("train.py", "--model_path", str(smollm2), "--output_dir", str(adapter), "--max_steps", "4",
        "--effective_batch_size", "8", "--learning_rate", "1e-3", "--warmup_steps", "1")
    assert len((adapter / "metrics.jsonl").read_text().splitlines()) == 4
    with_adapter = cli("generate.py", "--model_path", str(smollm2), "--adapter_path", str(adapter),
                       "--prompt", QUESTION, "--max_new_tokens", "24").stdout
    base = cli("generate.py", "--model_path", str(smollm2), "--prompt", QUESTION, "--max_new_tokens", "24").stdout
    assert with_adapter != base  # four steps already change the answer
    cli("merge.py", "--model_path", str(smollm2), "--adapter_path", str(adapter), "--output_dir", str(merged),
        "--dtype", "float32")
    merged_reply = cli("generate.py", "--model_path", str(merged), "--prompt", QUESTION,
                       "--max_new_tokens", "24").stdout
    assert merged_reply == with_adapter
    # the merged folder is a plain Hugging Face checkpoint: tied embeddings stay tied (no lm_head)
    with safe_open(merged / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys() and not any("lora" in k for k in f.keys())
    assert {p.name for p in merged.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                  "tokenizer_config.json"}
    ids = torch.randint(0, 49152, (1, 12))
    model, _ = load(smollm2, {"default": str(adapter)})
    with torch.no_grad():
        expected = model(ids)
        assert (Transformer.from_pretrained(merged)(ids) - expected).abs().max() < 1e-4
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    with torch.no_grad():
        assert (hf(ids).logits - expected).abs().max() < 1e-4


TINY = [chat(f"w{i} w{i + 1}", f"w{i + 20} w{i + 40}") for i in range(4)]


@pytest.fixture
def qlora_adapter(tiny_checkpoint, tmp_path):
    out = tmp_path / "qlora"
    train.train(TrainConfig(model_path=str(tiny_checkpoint), data_path=str(write_jsonl(tmp_path / "d.jsonl", TINY)),
                            output_dir=str(out), load_in_4bit=True, micro_batch_size=2, effective_batch_size=4,
                            num_epochs=3, learning_rate=1e-2, save_every=0, lora_dropout=0.0))
    return out


def test_qlora_adapter_merges_into_full_precision_weights(tiny_checkpoint, qlora_adapter, tmp_path, capsys):
    out = merge(tiny_checkpoint, qlora_adapter, tmp_path / "merged", max_shard_size=100_000)
    assert "trained with QLoRA: merging it into the full-precision weights" in capsys.readouterr().out
    index = json.loads((out / "model.safetensors.index.json").read_text())  # sharded past 100 kB
    assert len(set(index["weight_map"].values())) > 1
    base = Transformer.from_pretrained(tiny_checkpoint)
    load_adapter(base, qlora_adapter)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert (Transformer.from_pretrained(out)(ids) - base(ids)).abs().max() < 1e-5


def test_merge_refuses_another_base_and_a_non_empty_output(tiny_checkpoint, qlora_adapter, tmp_path):
    other = tmp_path / "other"  # same layer names, other widths
    write_checkpoint(other, Transformer(tiny_config(hidden_size=32)))
    r = subprocess.run([sys.executable, "merge.py", "--model_path", str(other), "--adapter_path", str(qlora_adapter),
                        "--output_dir", str(tmp_path / "m")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "this model needs" in r.stderr and "adapter for another base?" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "m").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="is not empty; pass --force"):
        merge(tiny_checkpoint, qlora_adapter, busy)
    assert (busy / "keep.txt").read_text() == "mine"
    merge(tiny_checkpoint, qlora_adapter, busy, force=True)
    assert not (busy / "keep.txt").exists() and (busy / "model.safetensors").exists()


def test_adapter_of_a_tied_lm_head_merges_untied(tmp_path, capsys):
    # The base ties lm_head to its embeddings and the adapter changes lm_head (and q_proj):
    # merge.py writes lm_head.weight, says tie_word_embeddings: false, keeps the embeddings, and
    # the merged logits equal base + adapter's, here (fp32, atol 1e-4) and in transformers.
    base = tmp_path / "tied"
    model = Transformer(tiny_config(tie_word_embeddings=True)).eval()
    write_checkpoint(base, model)
    apply_lora(model, r=4, alpha=8, target_modules=["lm_head", "q_proj"], verbose=False)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["default"].weight.normal_(0, 0.05)
    save_adapter(model, tmp_path / "adapter")
    out = merge(base, tmp_path / "adapter", tmp_path / "merged")
    assert "config.json says tie_word_embeddings: false" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    with safe_open(out / "model.safetensors", "pt") as merged, safe_open(base / "model.safetensors", "pt") as original:
        assert "lm_head.weight" in merged.keys()
        name = "model.embed_tokens.weight"
        assert torch.equal(merged.get_tensor(name), original.get_tensor(name))
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        expected = model(ids)
        assert (Transformer.from_pretrained(out)(ids) - expected).abs().max() < 1e-4
        transformers = pytest.importorskip("transformers", reason="transformers reads the merged folder")
        hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert (hf(ids).logits - expected).abs().max() < 1e-4


def merged_in_a_model(base, adapter, dtype=None):
    """The reference merge.py streams: the base as a model, the adapter merged into it
    (merge_and_unload), its tensors as a Hugging Face checkpoint stores them."""
    model = Transformer.from_pretrained(base, dtype=dtype or stored_dtype(base))
    load_adapter(model, adapter)
    return merge_and_unload(model).checkpoint_state_dict()


STREAMED = {  # base config, base dtype, base shards, adapter settings, merge.py flags
    "lora": ({}, torch.float32, 1, dict(target_modules="all-linear"), {}),
    "lora, bf16 base merged in fp32": ({}, torch.bfloat16, 1, dict(target_modules="all-linear"),
                                       dict(dtype=torch.float32)),
    "rslora, tied lm_head, sharded": (dict(tie_word_embeddings=True), torch.float32, 3,
                                      dict(target_modules=["lm_head", "q_proj"], use_rslora=True),
                                      dict(max_shard_size=50_000)),
    "dora, embeddings": (dict(tie_word_embeddings=True), torch.float32, 1,
                         dict(target_modules=["embed_tokens", "o_proj", "lm_head"], use_dora=True), {}),
}


@pytest.mark.parametrize("case", STREAMED)
def test_merge_streams_the_bytes_of_merging_in_a_model(tmp_path, case):
    # merge.py reads, merges and writes a tensor at a time; each file it writes is byte for byte
    # what safetensors' save_file writes for the reference's tensors (the whole state, or each
    # shard's keys), and the shards split where the state's sizes say
    from safetensors.torch import save

    config, dtype, shards, settings, flags = STREAMED[case]
    write_checkpoint(tmp_path / "base", Transformer(tiny_config(**config)).to(dtype), shards=shards)
    adapter = random_adapter(tmp_path / "base", tmp_path / "adapter", **settings)
    out = merge(tmp_path / "base", adapter, tmp_path / "merged", **flags)
    expected = merged_in_a_model(tmp_path / "base", adapter, flags.get("dtype"))
    if "max_shard_size" not in flags:
        assert (out / "model.safetensors").read_bytes() == save(expected, metadata={"format": "pt"})
        return
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert list(index["weight_map"]) == list(expected)  # every tensor, in the state's order
    files = list(dict.fromkeys(index["weight_map"].values()))
    assert len(files) > 2
    nbytes = lambda keys: sum(expected[k].numel() * expected[k].element_size() for k in keys)  # noqa: E731
    for i, file in enumerate(files):
        keys = [k for k, f in index["weight_map"].items() if f == file]
        assert (out / file).read_bytes() == save({k: expected[k] for k in keys}, metadata={"format": "pt"})
        assert nbytes(keys) <= flags["max_shard_size"] or len(keys) == 1
        if i + 1 < len(files):  # a shard ends where the next tensor would not fit
            first_next = next(k for k, f in index["weight_map"].items() if f == files[i + 1])
            assert nbytes(keys + [first_next]) > flags["max_shard_size"]
    assert index["metadata"]["total_size"] == nbytes(expected)


def test_merge_checks_the_base_as_loading_it_would(tmp_path):
    # the base is never loaded as a model, so its tensors are checked from the files' headers:
    # one missing, or one of another shape, is a one-line error before anything is written
    from safetensors.torch import load_file, save_file

    model = Transformer(tiny_config())
    write_checkpoint(tmp_path / "base", model)
    adapter = random_adapter(tmp_path / "base", tmp_path / "adapter", target_modules=["q_proj"])
    state = load_file(tmp_path / "base" / "model.safetensors")
    for name, broken, message in (
            ("missing", {k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"},
             "missing tensor model.layers.1.mlp.up_proj.weight"),
            ("reshaped", {**state, "model.norm.weight": torch.ones(63)},
             r"model.norm.weight has shape \(63,\), expected \(64,\)")):
        save_file(broken, tmp_path / "base" / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(InputError, match=message):
            merge(tmp_path / "base", adapter, tmp_path / name)
        assert not (tmp_path / name).exists()
