"""Merge a LoRA adapter into its base: a plain Hugging Face checkpoint folder, no adapter needed.

    python merge.py --model_path BASE --adapter_path out/lora --output_dir out/merged

Each targeted weight becomes W + scaling * B @ A (DoRA: m * V / ||V||_row, V = W + scaling * B @ A),
in the base's own dtype; an adapter of the embeddings merges into the embedding table. An
adapter trained with QLoRA is merged into the original full-precision weights read from BASE
(not into the NF4 ones, which would bake 4-bit rounding into every weight). An adapter of an
lm_head or embedding table that the base ties together unties them: lm_head.weight is written,
and the one not adapted is kept.
config.json (tie_word_embeddings: false then), tokenizer and generation files are copied;
weights are written as safetensors, sharded with an index past --max_shard_size.
--gguf TYPE also writes model-TYPE.gguf for llama.cpp (gguf_export.py) and an Ollama Modelfile (ollama.py).
--gguf_adapter TYPE merges nothing: it writes the adapter as adapter-TYPE.gguf (llama.cpp's --lora,
Ollama's ADAPTER; gguf_lora.py), the base as base-TYPE.gguf (--gguf's type if given) and a Modelfile.

Merging is a function over tensors, streamed: no model is built. Each tensor of the base is read
alone (memory-mapped, weights.py), merged with lora.lora_delta and dora.dora_weight (the math of
LoRALayer.merge, so the bytes are those merge_lora gives) and written into its shard at once;
the GGUF file is then written from the merged shards the same way. Memory holds a tensor or two,
never the model: a 70B base merges with a few GB of RAM, not 140 (docs/export.md, measured by
tests/bench_merge.py).
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.nn as nn

from common import InputError, exit_on_input_error, written_atomically
from dora import DoRAEmbedding, DoRALinear, dora_weight
import gguf_export
import gguf_lora
from hub import resolve_checkpoint, same_checkpoint
from lora import lora_delta
from model import open_checkpoint
import ollama
from peft_format import PEFT_PREFIX, check_adapter_folder, match_adapter, read_adapter, settings_of
from weights import read_tensor, stored_dtype, weight_files, write_safetensors

# what a merged folder keeps besides the weights: tokenizer.model holds SentencePiece's pieces,
# chat_template.jinja newer repos' template
COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
          "tokenizer.model", "added_tokens.json", "chat_template.jinja")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_size(text):
    """"5GB" -> 5_000_000_000 (argparse turns a ValueError into a usage error)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    unit = text[-2:].upper()
    return int(float(text[:-2]) * units[unit]) if unit in units else int(text)


def merged_weight(w, tensors, scaling):
    """What LoRALayer.merge (or DoRA's) makes of base weight w (fp32) with one layer's adapter
    tensors {PEFT key suffix: tensor}: W + scaling * B @ A, or m * V / ||V|| when there is a magnitude."""
    v = w + lora_delta(tensors, scaling)
    if "lora_magnitude_vector" not in tensors:
        return v
    norm_dim = (DoRAEmbedding if "lora_embedding_A" in tensors else DoRALinear).norm_dim
    return dora_weight(v, tensors["lora_magnitude_vector"], norm_dim)[0]


def check_flags(out, force, gguf, gguf_adapter):
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise InputError(f"--output_dir {out} is not empty; pass --force to replace it")
    if gguf and gguf not in gguf_export.FILE_TYPES:
        raise InputError(f"--gguf {gguf}: not a GGUF type this export writes ({', '.join(gguf_export.FILE_TYPES)})")
    if gguf_adapter and gguf_adapter not in gguf_lora.TYPES:
        raise InputError(f"--gguf_adapter {gguf_adapter}: not a GGUF adapter type ({', '.join(gguf_lora.TYPES)})")


def read_matched_adapter(adapter_path, model, read_base, dtype, model_path):
    """(adapter_config, {layer name: its adapter tensors}) of the adapter folder, refused in one line if
    it does not fit the base (model: on the meta device); a warning if it was trained on another base."""
    adapter_config, saved = read_adapter(adapter_path)
    for key in saved:  # PEFT saves a base table beside an adapter of it: checked against the real one
        if key.endswith(".base_layer.weight"):
            name = key.removeprefix(PEFT_PREFIX).removesuffix(".base_layer.weight")
            model.get_submodule(name).weight = nn.Parameter(read_base(name + ".weight").to(dtype), requires_grad=False)
    layers = match_adapter(model, adapter_path, adapter_config, saved)
    if (trained_on := adapter_config.get("base_model_name_or_path")) and not same_checkpoint(trained_on, model_path):
        print(f"merge.py: warning: {adapter_path} was trained on {trained_on}, not on {model_path} "
              "(fine if it is the same model at another path)", file=sys.stderr)
    return adapter_config, layers


def merge(model_path, adapter_path, output_dir, force=False, max_shard_size=5 * 10**9, dtype=None, gguf=None,
          gguf_adapter=None):
    """The merged folder at output_dir, and the GGUF files asked for (flags as main's); returns its
    Path. Flags, paths, the base and the adapter are checked (one line each) before anything is written."""
    out = Path(output_dir)
    check_flags(out, force, gguf, gguf_adapter)
    check_adapter_folder(adapter_path)  # every path before the base loads (or downloads)
    path = resolve_checkpoint(model_path)
    adapter_path = Path(adapter_path)
    train_config = adapter_path / "train_config.json"
    if train_config.exists() and json.loads(train_config.read_text()).get("load_in_4bit"):
        print(f"{adapter_path} was trained with QLoRA: merging it into the full-precision weights of {path}")
    if gguf or gguf_adapter:  # an unsupported family fails here, before any work
        gguf = gguf or gguf_adapter  # with --gguf_adapter: the base's type
        gguf_kv = gguf_export.metadata(path, gguf)
    dtype = dtype or stored_dtype(path)
    config, model, read_base = open_checkpoint(path)  # every key and shape checked, nothing read yet
    shapes = {k: tuple(t.shape) for k, t in model.checkpoint_state_dict().items()}

    adapter_config, layers = read_matched_adapter(adapter_path, model, read_base, dtype, model_path)
    if gguf_adapter:
        gguf_lora.check(adapter_path, adapter_config, config.tie_word_embeddings, layers)
        return write_gguf_adapter(out, path, config, adapter_path, layers, settings_of(adapter_config), gguf_adapter,
                                  (gguf, gguf_kv, gguf_export.tensors(shapes, read_base, config, gguf)))
    untie = config.tie_word_embeddings and bool({"lm_head", "model.embed_tokens"} & layers.keys())
    if untie:  # lm_head gets its own copy of the table (as merge_lora's untie_lm_head), the last key
        shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"]
    scaling = settings_of(adapter_config).scaling

    def tensor(key):  # as merge_lora computes it: the base weight in dtype, merged in fp32, rounded once
        w = read_base(key).to(dtype)
        if key.endswith(".weight") and (name := key.removesuffix(".weight")) in layers:
            w = merged_weight(w.float(), layers[name], scaling).to(dtype)
        return w

    # Write everything into a sibling folder, then swap it in: a failure never leaves half a checkpoint.
    with written_atomically(out) as tmp:
        tmp.mkdir(parents=True)
        write_safetensors(shapes, dtype, tensor, tmp, max_shard_size)
        for name in COPIED:
            if (path / name).exists():
                shutil.copy2(path / name, tmp / name)
        if untie:
            raw = {**json.loads((path / "config.json").read_text()), "tie_word_embeddings": False}
            (tmp / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
            print("the merged checkpoint has its own lm_head.weight: config.json says tie_word_embeddings: false")
        if gguf:
            name = write_gguf(tmp, path, shapes, config, gguf, gguf_kv)
            print(f"{out / name} written for llama.cpp; {out / 'Modelfile'} for Ollama: "
                  f"ollama create NAME -f {out / 'Modelfile'}")
    n = sum(1 for k in shapes if k.endswith(".weight"))
    print(f"merged {adapter_path} into {path}: {n} tensors ({dtype}) written to {out}")
    return out


def write_gguf(tmp, path, shapes, config, gguf, kv):
    """--gguf: model-TYPE.gguf and its Modelfile in `tmp` from the merged shards just written there,
    a tensor at a time; returns the GGUF's name."""
    merged = weight_files(tmp)
    entries = gguf_export.tensors(shapes, lambda key: read_tensor(tmp / merged[key], key), config, gguf)
    name = f"model-{gguf}.gguf"
    gguf_export.write(tmp / name, kv, entries)
    (tmp / "Modelfile").write_text(ollama.modelfile(name, path))
    return name


def write_gguf_adapter(out, path, config, adapter_path, layers, settings, ftype, base_gguf):
    """--gguf_adapter: adapter-TYPE.gguf, base-TYPE.gguf and their Modelfile in `out`, nothing merged."""
    base_type, base_kv, base_tensors = base_gguf
    names = f"base-{base_type}.gguf", f"adapter-{ftype}.gguf"
    with written_atomically(out) as tmp:
        tmp.mkdir(parents=True)
        gguf_export.write(tmp / names[0], base_kv, base_tensors)
        gguf_export.write(tmp / names[1], gguf_lora.metadata(adapter_path, config, settings),
                          gguf_lora.tensors(layers, config, ftype))
        (tmp / "Modelfile").write_text(ollama.modelfile(names[0], path, adapter_file=names[1]))
    print(f"{out / names[1]} written for llama.cpp's --lora on {out / names[0]}; {out / 'Modelfile'} for Ollama: "
          f"ollama create NAME -f {out / 'Modelfile'}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True,
                   help="the base checkpoint folder or hub id the adapter was trained on")
    p.add_argument("--adapter_path", required=True, help="the adapter folder (PEFT format)")
    p.add_argument("--output_dir", required=True, help="where the merged checkpoint goes")
    p.add_argument("--force", action="store_true", help="replace a non-empty --output_dir")
    p.add_argument("--dtype", choices=DTYPES, help="dtype of the merged weights (default: the base's)")
    p.add_argument("--gguf", choices=gguf_export.FILE_TYPES,
                   help="also write model-TYPE.gguf (llama.cpp, Ollama, LM Studio) and an Ollama Modelfile")
    p.add_argument("--gguf_adapter", choices=gguf_lora.TYPES,
                   help="merge nothing: write the adapter as adapter-TYPE.gguf (llama.cpp --lora, Ollama ADAPTER), "
                        "the base as base-TYPE.gguf (--gguf's type, if given) and a Modelfile")
    p.add_argument("--max_shard_size", default="5GB", type=parse_size,
                   help="largest safetensors file before sharding (default: %(default)s)")
    args = p.parse_args(argv)
    with exit_on_input_error("merge.py"):
        merge(args.model_path, args.adapter_path, args.output_dir, args.force, args.max_shard_size,
              DTYPES.get(args.dtype), args.gguf, args.gguf_adapter)


if __name__ == "__main__":
    main()
