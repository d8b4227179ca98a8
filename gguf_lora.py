"""The LoRA adapter itself as a GGUF file, for llama.cpp's --lora and Ollama's ADAPTER:

    python merge.py --model_path BASE --adapter_path out/lora --output_dir out/lora-gguf --gguf_adapter f16
    llama-completion -m out/lora-gguf/base-f16.gguf --lora out/lora-gguf/adapter-f16.gguf

Its own file beside gguf_export.py, which writes models: an adapter file has other keys, other
tensors and no tokenizer, and shares only the writer, the tensor names and the types. What it
holds is what llama.cpp's convert_lora_to_gguf.py writes for the same PEFT folder, key for key
and byte for byte (tests/test_gguf_adapter.py, tests/fixtures/gguf_adapter_reference.py):

    keys     general.architecture (the base's), general.type "adapter", adapter.type "lora",
             general.name, adapter.lora.alpha (fp32), general.quantization_version 2
    tensors  for each adapted layer, in the order of its name, <GGUF name of its weight>.lora_a
             and .lora_b: A (r, in) and B (out, r) for a linear layer, B's rows permuted per head
             for llama's q/k as the weight's are; for the embedding table A transposed, (vocab, r),
             and B (dim, r). Types as gguf_export's for a model (q8_0: rows of r, not a multiple
             of 32, are F16).

llama.cpp scales each update by alpha / r, so rsLoRA's alpha / sqrt(r) is written as the alpha
that gives it, alpha * sqrt(r) (the converter writes lora_alpha as is, which is wrong for
rsLoRA). DoRA has no GGUF form: llama.cpp has no magnitude vector; it is refused. So is an adapter
of the embeddings or lm_head of a tied base: llama.cpp's output reuses token_embd, adapter and
all, and its matmul asserts on the embedding's transposed lora_a (tried: xllamacpp 2026.10.11549).
"""
import math

from common import InputError
import gguf_export
from peft_format import CONFIG_FILE, WEIGHTS_FILE

TYPES = ("f16", "bf16", "q8_0", "f32")


def check(adapter_path, config, tied, layers):
    """One-line errors for an adapter llama.cpp cannot apply as a GGUF adapter."""
    if config.get("use_dora"):
        raise InputError(f"{adapter_path / CONFIG_FILE}: a DoRA adapter has no GGUF form (llama.cpp's LoRA has no "
                         "magnitude vector); merge it instead: --gguf TYPE")
    if tied and (both := {"lm_head", "model.embed_tokens"} & layers.keys()):  # llama.cpp has one table for both
        raise InputError(f"{adapter_path / WEIGHTS_FILE}: adapts {min(both)}, which this base ties to "
                         f"{'model.embed_tokens' if min(both) == 'lm_head' else 'lm_head'} (llama.cpp would apply it "
                         "to both, and fails on it); merge it instead: --gguf TYPE")


def metadata(adapter_path, c, settings):
    """The adapter file's key/values; alpha such that llama.cpp's alpha / r is the adapter's scaling."""
    arch, _ = gguf_export.ARCHS[c.model_type]
    alpha = settings.alpha * math.sqrt(settings.r) if settings.use_rslora else settings.alpha
    S = gguf_export.STRING
    return {"general.architecture": (S, arch), "general.type": (S, "adapter"), "adapter.type": (S, "lora"),
            "general.name": (S, adapter_path.name),
            "adapter.lora.alpha": (gguf_export.FLOAT32, alpha),
            "general.quantization_version": (gguf_export.UINT32, 2)}


def tensors(layers, c, ftype):
    """[(GGUF name, shape, ggml type, load)] for the adapter's {layer name: {PEFT suffix: tensor}}."""
    _, permuted = gguf_export.ARCHS[c.model_type]
    heads = {"q_proj": c.num_attention_heads, "k_proj": c.num_key_value_heads} if permuted else {}
    out = []
    for name in sorted(layers):
        t, base = layers[name], gguf_export.gguf_name(name + ".weight")
        if "lora_embedding_A" in t:
            a, b = t["lora_embedding_A"].T, t["lora_embedding_B"]
        else:
            a, b = t["lora_A.weight"], t["lora_B.weight"]
            if n := heads.get(name.rsplit(".", 1)[-1]):
                b = gguf_export.permute_qk(b, n)
        for suffix, w in ((".lora_a", a), (".lora_b", b)):
            ggml_type = gguf_export.ggml_type(base + suffix, w.shape, ftype, c, tied=False)
            out.append((base + suffix, tuple(w.shape), ggml_type, lambda w=w: w))
    return out
