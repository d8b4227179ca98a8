"""What is done to a model with adapters: put them on its layers by name, switch between
several, disable them, merge them into the weights and back.

    apply_lora(model, r=16, alpha=32, target_modules="all-linear")   # then train
    set_adapter(model, "other");  with disable_adapters(model): ...   # the base model
    merge_and_unload(model)                                           # a plain Transformer again

Its own file because it joins lora.py's layers with dora.py's (which build on them): the
layers import nothing of this, so there is no import circle.
"""
from contextlib import contextmanager

import torch
import torch.nn as nn

from dora import DoRAEmbedding, DoRALinear
from common import replace_module
from lora import AdapterSettings, LoRAEmbedding, LoRAError, LoRALayer, LoRALinear


def lora_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALayer)]


def adapter_settings(model, name):
    """The AdapterSettings of adapter `name`, as the layers holding it keep them (None: no such adapter)."""
    for _, m in lora_layers(model):
        if name in m.settings:
            return m.settings[name]
    return None


def targetable_layers(model):
    """{name: layer} of what LoRA may adapt, LoRA-wrapped or not: the linear layers of the
    transformer blocks, and by name only (as in PEFT: "all-linear" leaves them out) lm_head and
    the token embeddings, model.embed_tokens."""
    inside_lora = {"base", "lora_A", "lora_B"}
    return {n: m for n, m in model.named_modules()
            if ((".layers." in n and hasattr(m, "in_features")) or n in ("lm_head", "model.embed_tokens"))
            and not inside_lora & set(n.split("."))}


def apply_lora(model, r=8, alpha=16, dropout=0.0, target_modules=("q_proj", "v_proj"), use_rslora=False,
               use_dora=False, adapter_name="default", dtype=torch.float32, verbose=True):
    """Add adapter `adapter_name` to the layers whose name ends in one of target_modules (block
    linears, lm_head, embed_tokens), or to every linear layer of the blocks ("all-linear"); make it
    the active one and freeze everything else. use_dora: DoRA adapters (dora.py).
    Call again with another adapter_name to add a second adapter."""
    if r < 1:
        raise LoRAError(f"LoRA rank r must be positive, not {r}")
    layers = targetable_layers(model)
    if target_modules == "all-linear":
        names = [n for n in layers if n not in ("lm_head", "model.embed_tokens")]
    else:
        targets = {target_modules} if isinstance(target_modules, str) else set(target_modules)
        existing = sorted({n.rsplit(".", 1)[-1] for n in layers})
        unknown = sorted(targets - set(existing))
        if unknown:
            raise LoRAError(f"target module {unknown[0]!r} matches no layer; the layers LoRA can adapt are: "
                            f"{', '.join(existing)} (or all-linear)")
        names = [n for n in layers if n.rsplit(".", 1)[-1] in targets]
    add_adapter(model, names, adapter_name, AdapterSettings(r, alpha, dropout, use_rslora, use_dora), dtype)
    set_adapter(model, adapter_name)
    if verbose:
        print(trainable_summary(model))
    return model


def add_adapter(model, names, adapter_name, settings, dtype):
    """Wrap the named layers (see lora_layer_for) and give each a new adapter with `settings`.

    dtype: fp32 by default, whatever the model's: AdamW's update of a weight is often below
    bf16's resolution (8 bits of mantissa: a step under 1/256 of the value rounds away), and
    the adapter is small, so keeping it fp32 costs little (PEFT does the same, by default)."""
    if adapter_settings(model, adapter_name) is not None:
        raise LoRAError(f"the model already has an adapter named {adapter_name!r}")
    if any(m.merged for _, m in lora_layers(model)):
        raise LoRAError(f"cannot add adapter {adapter_name!r} while another is merged; unmerge_lora first")
    for name in names:
        layer = lora_layer_for(model.get_submodule(name), settings.use_dora)
        replace_module(model, name, layer)
        layer.add_adapter(adapter_name, settings, dtype)
        layer.train(model.training)  # new modules start in training mode (dropout on): follow the model


def lora_layer_for(layer, use_dora):
    """The LoRA layer that can take a new adapter on `layer`: LoRALinear or LoRAEmbedding the first
    time, or for a DoRA adapter their DoRA sibling (dora.py), which takes over the layer's adapters."""
    embedding = isinstance(layer, (nn.Embedding, LoRAEmbedding))
    lora_class, dora_class = (LoRAEmbedding, DoRAEmbedding) if embedding else (LoRALinear, DoRALinear)
    if not isinstance(layer, LoRALayer):
        return (dora_class if use_dora else lora_class)(layer)
    if use_dora and not isinstance(layer, dora_class):
        return dora_class.from_lora(layer)
    return layer


def count_parameters(model):
    """(trainable, all) as PEFT's print_trainable_parameters counts them: tied weights once,
    and an NF4 weight as its in * out numbers (not as its packed codes and statistics)."""
    nf4 = [m for m in model.modules() if hasattr(m, "dequantize")]
    stored = {id(p) for m in nf4 for p in m.parameters()}
    params = [p for p in model.parameters() if id(p) not in stored]
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    total += sum(m.in_features * m.out_features + (0 if m.bias is None else m.bias.numel()) for m in nf4)
    return trainable, total


def trainable_summary(model):
    """PEFT's print_trainable_parameters line: how much of the model trains."""
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def set_adapter(model, name):
    """Make `name` the active adapter (layers without it compute as the base); only its tensors
    (A and B, and DoRA's magnitudes) stay trainable, everything else is frozen."""
    layers = [m for _, m in lora_layers(model)]
    if not any(name in m.settings for m in layers):
        have = sorted({a for m in layers for a in m.settings})
        raise LoRAError(f"no adapter named {name!r} (the model has: {', '.join(have) or 'none'})")
    if any(m.merged not in (None, name) for m in layers):
        raise LoRAError(f"cannot switch to adapter {name!r} while another is merged; unmerge_lora first")
    for p in model.parameters():
        p.requires_grad_(False)
    for m in layers:
        m.active = name if name in m.settings else None
        if m.active:
            for p in m.adapter_tensors(name).values():
                p.requires_grad_(True)


@contextmanager
def disable_adapters(model):
    """Inside, the model computes exactly as the base model (e.g. as a reference model)."""
    layers = [m for _, m in lora_layers(model)]
    if any(m.merged for m in layers):
        raise LoRAError("cannot disable adapters merged into the weights; unmerge_lora first")
    saved = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, disabled in zip(layers, saved):
            m.disabled = disabled


# --- merging -------------------------------------------------------------------------------------

def merge_lora(model):
    """Fold the active adapter into each base weight; forwards then cost no more than the base.
    An NF4 base is dequantized first and becomes an nn.Linear in its compute dtype. If lm_head
    and the embeddings share their table, it is untied first, so the one adapted changes alone
    (as the adapter did before merging; PEFT's merge would change both)."""
    layers = [m for _, m in lora_layers(model) if m.active and not m.merged]
    nf4 = [m for m in layers if hasattr(m.base, "to_linear")]
    adapted = [n for n in ("lm_head", "model.embed_tokens") if model.get_submodule(n) in layers]
    if adapted and model.config.tie_word_embeddings:
        model.untie_lm_head()
        print(f"merge_lora: the adapter changes {' and '.join(adapted)}, so lm_head is untied from the embeddings")
    for m in layers:
        m.merge()
    if nf4:
        print(f"merge_lora: dequantized {len(nf4)} NF4 layers to {nf4[0].base.weight.dtype} to merge into them")


def unmerge_lora(model):
    """Undo merge_lora: W <- W - scaling * B @ A, or DoRA's inverse (exact up to float rounding)."""
    layers = [(n, m) for n, m in lora_layers(model) if m.merged]
    for name, m in layers:
        if m.merged_into_nf4:
            raise LoRAError(f"cannot unmerge {name}: its NF4 weight was dequantized to merge into "
                            "(the NF4 values are gone); reload the base model instead")
    for _, m in layers:
        m.unmerge()


def merge_and_unload(model):
    """Merge, then put each plain base layer back in place of its LoRA layer: the model is a
    plain Transformer again and its state_dict has the Hugging Face key names (for merge.py)."""
    merge_lora(model)
    for name, m in lora_layers(model):
        replace_module(model, name, m.base)
    return model
