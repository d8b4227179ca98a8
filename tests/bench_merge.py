"""Peak resident memory of merge.py, and of merge.py --gguf, against the size of the checkpoint.

    python tests/bench_merge.py                     # a weight-dominated 1.5 GB bf16 checkpoint (random weights)
    python tests/bench_merge.py --model_path DIR    # a checkpoint of your own (e.g. SmolLM2-135M-Instruct)

The default checkpoint has a Llama shape (hidden 2048, 12 layers, 49152-token vocabulary, untied
lm_head: 742M parameters) and SmolLM2's tokenizer, written in one shard per layer; the adapter
has random A and B, r=16, on every linear layer of the blocks. Each measure runs in a fresh
process started with MALLOC_MMAP_THRESHOLD_=65536, so that freed buffers go back to the system
and the resident size follows what is alive; its peak is VmHWM less the resident size just
before the work starts (torch's own pages). Beside the merges, in the same run, the reference:
merging in a model, as merge.py did before it streamed (from_pretrained, load_adapter,
merge_and_unload, safetensors' save_file).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

SMOLLM2 = ROOT / "checkpoints" / "HuggingFaceTB" / "SmolLM2-135M-Instruct"
CONFIG = dict(model_type="llama", vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=12,
              num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048, rms_norm_eps=1e-5,
              rope_theta=10000.0, tie_word_embeddings=False)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def build_checkpoint(path):
    """CONFIG with random bf16 weights, one shard per layer (so building it holds one layer)."""
    from model import Config, Transformer

    with torch.device("meta"):
        shapes = {k: t.shape for k, t in Transformer(Config.from_dict(CONFIG)).state_dict().items()}
    groups = {}
    for k in shapes:
        groups.setdefault(k.split(".")[2] if ".layers." in k else "rest", []).append(k)
    path.mkdir(parents=True)
    weight_map = {}
    for i, (group, keys) in enumerate(groups.items()):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: (torch.randn(shapes[k]) * 0.02).bfloat16() for k in keys}, path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(CONFIG))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SMOLLM2 / name, path / name)


def build_adapter(base, path, r=16):
    """A PEFT LoRA adapter of every linear layer of the blocks, random A and B."""
    from model import Config, Transformer

    with torch.device("meta"):
        model = Transformer(Config.from_json(base / "config.json"))
    tensors = {}
    for i, _ in enumerate(model.model.layers):
        for name in LINEARS:
            layer = model.get_submodule(f"model.layers.{i}.{name}")
            key = f"base_model.model.model.layers.{i}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, layer.in_features) / layer.in_features**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(layer.out_features, r) * 0.01
    path.mkdir(parents=True)
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=r, lora_alpha=2 * r,
                  target_modules=sorted({n.split(".")[-1] for n in LINEARS}))
    (path / "adapter_config.json").write_text(json.dumps(config))


def resident(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def child(what, base, adapter, out):
    """In a fresh process: the peak resident bytes of one piece of work, above where it started."""
    import merge
    from adapters import merge_and_unload
    from peft_format import load_adapter
    from model import Transformer
    from weights import stored_dtype

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = resident("VmRSS:")
    if what == "in a model":
        model = Transformer.from_pretrained(base, dtype=stored_dtype(base))
        load_adapter(model, adapter)
        merge_and_unload(model)
        Path(out).mkdir(exist_ok=True)
        save_file(model.checkpoint_state_dict(), Path(out) / "model.safetensors", metadata={"format": "pt"})
    else:
        merge.merge(base, adapter, out, force=True, gguf="q8_0" if what == "merge --gguf q8_0" else None)
    print(f"peak {resident('VmHWM:') - before}")


def measure(what, base, adapter, out):
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, __file__, "--child", what, str(base), str(adapter), str(out)], env=env,
                       capture_output=True, text=True, check=True)
    return int(r.stdout.split("peak ")[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", help="a checkpoint folder (default: build the weight-dominated one)")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(*args.child)
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        tmp = Path(tmp)
        base = Path(args.model_path) if args.model_path else tmp / "base"
        if not args.model_path:
            build_checkpoint(base)
        build_adapter(base, tmp / "adapter")
        size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
        print(f"{base if args.model_path else 'weight-dominated checkpoint'}: {size / 2**20:.0f} MiB of safetensors")
        for what in ("in a model", "merge", "merge --gguf q8_0"):
            peak = measure(what, base, tmp / "adapter", tmp / "merged")
            label = {"in a model": "merging in a model (reference)"}.get(what, f"merge.py{what[5:]}")
            print(f"  {label:<42} peak RSS {peak / 2**20:7.0f} MiB = {peak / size:.2f}x the checkpoint")


if __name__ == "__main__":
    main()
