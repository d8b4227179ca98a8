"""Merge a LoRA adapter into its base: a plain Hugging Face checkpoint folder, no adapter needed.

    python merge.py --model_path BASE --adapter_path out/lora --output_dir out/merged

Each targeted weight becomes W + scaling * B @ A, in the base's own dtype. An adapter trained with
QLoRA is merged into the original full-precision weights read from BASE (not into the NF4 ones,
which would bake 4-bit rounding into every weight). An adapter of an lm_head that the base ties
to its embeddings unties them: lm_head.weight is written and the embeddings are kept.
config.json (tie_word_embeddings: false then), tokenizer and generation files are copied;
weights are written as safetensors, sharded with an index past --max_shard_size.
"""
import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from lora import load_adapter, merge_and_unload
from model import InputError, Transformer, exit_on_input_error, resolve_checkpoint, weight_files, written_atomically

COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def checkpoint_dtype(path):
    """The dtype the base stores its weights in (merged weights keep it)."""
    files = weight_files(path)
    key = next(iter(files))
    with safe_open(path / files[key], framework="pt") as f:
        stored = f.get_slice(key).get_dtype()  # "BF16", read from the header alone
    return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(stored, torch.float32)


def parse_size(text):
    """"5GB" -> 5_000_000_000 (argparse turns a ValueError into a usage error)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    unit = text[-2:].upper()
    return int(float(text[:-2]) * units[unit]) if unit in units else int(text)


def write_safetensors(state, out, max_shard_size):
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    shards, current, size = [], {}, 0
    for k, t in state.items():
        n = t.numel() * t.element_size()
        if current and size + n > max_shard_size:
            shards.append(current)
            current, size = {}, 0
        current[k], size = t.contiguous(), size + n
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(tqdm(shards, desc="writing shards", leave=False)):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def merge(model_path, adapter_path, output_dir, force=False, max_shard_size=5 * 10**9, dtype=None):
    out = Path(output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise InputError(f"--output_dir {out} is not empty; pass --force to replace it")
    path = resolve_checkpoint(model_path)
    adapter_path = Path(adapter_path)
    train_config = adapter_path / "train_config.json"
    if train_config.exists() and json.loads(train_config.read_text()).get("load_in_4bit"):
        print(f"{adapter_path} was trained with QLoRA: merging it into the full-precision weights of {path}")
    dtype = dtype or checkpoint_dtype(path)
    model = Transformer.from_pretrained(path, dtype=dtype)
    tied = model.config.tie_word_embeddings
    load_adapter(model, adapter_path)  # refuses an adapter whose layers do not fit this base
    merge_and_unload(model)  # unties lm_head from the embeddings if the adapter changes it
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]  # the same tensor as the embeddings
    # Write everything into a sibling folder, then swap it in: a failure never leaves half a checkpoint.
    with written_atomically(out) as tmp:
        tmp.mkdir(parents=True)
        write_safetensors(state, tmp, max_shard_size)
        for name in COPIED:
            if (path / name).exists():
                shutil.copy2(path / name, tmp / name)
        if tied and not model.config.tie_word_embeddings:
            config = {**json.loads((path / "config.json").read_text()), "tie_word_embeddings": False}
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            print("the merged checkpoint has its own lm_head.weight: config.json says tie_word_embeddings: false")
    n = sum(1 for k in state if k.endswith(".weight"))
    print(f"merged {adapter_path} into {path}: {n} tensors ({dtype}) written to {out}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True, help="the base checkpoint folder or hub id the adapter was trained on")
    p.add_argument("--adapter_path", required=True, help="the adapter folder (PEFT format)")
    p.add_argument("--output_dir", required=True, help="where the merged checkpoint goes")
    p.add_argument("--force", action="store_true", help="replace a non-empty --output_dir")
    p.add_argument("--dtype", choices=DTYPES, help="dtype of the merged weights (default: the base's)")
    p.add_argument("--max_shard_size", default="5GB", type=parse_size, help="largest safetensors file before sharding (default: %(default)s)")
    args = p.parse_args(argv)
    with exit_on_input_error("merge.py"):
        merge(args.model_path, args.adapter_path, args.output_dir, args.force, args.max_shard_size,
              DTYPES.get(args.dtype))


if __name__ == "__main__":
    main()
