"""Adapters on disk in PEFT's format, so PEFT, vLLM and llama.cpp's converter read ours and we
read theirs: adapter_config.json and adapter_model.safetensors with keys like
base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight (no adapter name in them).

    save_adapter(model, "out/lora");  load_adapter(other_model, "out/lora")

Everything read is checked before it is used: the settings we implement, every tensor's layer
and shape; what does not fit is one LoRAError naming the file.
"""
import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from adapters import add_adapter, adapter_settings, lora_layers, set_adapter, targetable_layers
from common import written_atomically
from lora import AdapterSettings, LoRAEmbedding, LoRAError

PEFT_PREFIX = "base_model.model."  # PEFT's key = prefix + module name + ".lora_A.weight"
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
# LoraConfig settings that change the computation or add weights: refused, never silently ignored.
UNSUPPORTED = ("modules_to_save", "rank_pattern", "alpha_pattern", "fan_in_fan_out", "lora_bias",
               "layer_replication", "trainable_token_indices", "target_parameters", "use_qalora",
               "alora_invocation_tokens", "use_bdlora", "velora_config", "kasa_config", "monteclora_config",
               "arrow_config", "ensure_weight_tying")


def save_adapter(model, path, adapter_name="default", base_model_name_or_path=None):
    """Write adapter_config.json + adapter_model.safetensors (the adapter's tensors only, never
    base weights) into `path`. Both are written in a temporary folder beside them, then moved
    into place: a crash never leaves half a file, and the config lands last, after its weights."""
    from safetensors.torch import save_file

    settings = adapter_settings(model, adapter_name)
    if settings is None:
        raise LoRAError(f"the model has no adapter named {adapter_name!r} to save")
    tensors, targets = {}, set()
    for name, m in lora_layers(model):
        if adapter_name in m.settings:  # PEFT's keys have no adapter name in them
            for suffix, t in m.adapter_tensors(adapter_name).items():
                tensors[f"{PEFT_PREFIX}{name}.{suffix}"] = t.detach().cpu().contiguous()
            targets.add(name.rsplit(".", 1)[-1])
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base_model_name_or_path,
                  revision=None, r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                  use_rslora=settings.use_rslora, target_modules=sorted(targets), bias="none",
                  fan_in_fan_out=False, init_lora_weights=True, inference_mode=True, modules_to_save=None,
                  use_dora=settings.use_dora, layers_to_transform=None, layers_pattern=None, rank_pattern={},
                  alpha_pattern={})
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with written_atomically(path / WEIGHTS_FILE) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    with written_atomically(path / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")


def read_adapter(path):
    """(config, {key: tensor}) of a PEFT LoRA adapter folder, refusing what we don't implement."""
    from safetensors.torch import load_file

    path = Path(path)
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not config_file.is_file():
        raise LoRAError(f"{path}: no {CONFIG_FILE} (not a PEFT adapter folder)")
    if not weights_file.is_file():
        raise LoRAError(f"{path}: no {WEIGHTS_FILE} (adapters are read from safetensors only, never pickles)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LoRAError(f"{config_file}: cannot read it ({e})") from None
    if config.get("peft_type") != "LORA":
        raise LoRAError(f"{config_file}: peft_type {config.get('peft_type')!r} is not LORA")
    for key, kind in (("r", int), ("lora_alpha", (int, float))):
        if not isinstance(config.get(key), kind) or config[key] <= 0:
            raise LoRAError(f"{config_file}: {key} must be a positive number, not {config.get(key)!r}")
    for key in UNSUPPORTED:
        if config.get(key):  # each is falsy (False, None, {}, []) when unused
            raise LoRAError(f"{config_file}: {key}={config[key]!r} is not supported")
    if config.get("bias", "none") != "none":
        raise LoRAError(f"{config_file}: bias={config['bias']!r} is not supported (only 'none')")
    try:
        tensors = load_file(weights_file)
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise LoRAError(f"{weights_file}: not a readable safetensors file ({e})") from None
    return config, tensors


def peft_shapes(layer, config):
    """{PEFT key suffix: shape} of what an adapter of this (base) layer holds."""
    r = config["r"]
    if isinstance(layer, (nn.Embedding, LoRAEmbedding)):
        vocab, dim = layer.weight.shape
        shapes = {"lora_embedding_A": (r, vocab), "lora_embedding_B": (dim, r)}
        if config.get("use_dora"):
            shapes["lora_magnitude_vector"] = (dim,)
        return shapes
    shapes = {"lora_A.weight": (r, layer.in_features), "lora_B.weight": (layer.out_features, r)}
    if config.get("use_dora"):
        shapes["lora_magnitude_vector"] = (layer.out_features,)
    return shapes


def match_adapter(model, path, config, tensors):
    """{layer name: {PEFT key suffix: tensor}}, after checking that every tensor belongs to a
    layer of this model that LoRA can adapt, with the shape it needs there, and that no layer
    lacks one: e.g. A: (r, in), B: (out, r), and with DoRA the magnitude (out,)."""
    weights_file = Path(path) / WEIGHTS_FILE
    targetable, layers = targetable_layers(model), {}
    for key, t in tensors.items():
        rest = key.removeprefix(PEFT_PREFIX)
        if rest in ("lm_head.base_layer.weight", "model.embed_tokens.base_layer.weight"):
            check_saved_base(model, weights_file, key, t)
            continue
        name, _, suffix = rest.partition(".lora_")  # "model.layers.0.self_attn.q_proj", "A.weight"
        suffix = "lora_" + suffix
        if not key.startswith(PEFT_PREFIX) or name not in targetable:
            raise LoRAError(f"{weights_file}: unexpected tensor {key}: this model has no layer {name} that LoRA "
                            "can adapt (an adapter for another base?)")
        expected = peft_shapes(targetable[name], config)
        if suffix not in expected:
            raise LoRAError(f"{weights_file}: unexpected tensor {key} (use_dora={bool(config.get('use_dora'))}; "
                            f"an adapter of {name} holds {', '.join(expected)})")
        if tuple(t.shape) != expected[suffix]:
            raise LoRAError(f"{weights_file}: {key} has shape {tuple(t.shape)} but this model needs "
                            f"{expected[suffix]} (an adapter for another base?)")
        layers.setdefault(name, {})[suffix] = t
    if not layers:
        raise LoRAError(f"{weights_file}: no LoRA weights in it")
    for name, found in layers.items():
        for suffix in peft_shapes(targetable[name], config):
            if suffix not in found:
                raise LoRAError(f"{weights_file}: {name} has no {suffix}")
    return layers


def check_saved_base(model, weights_file, key, t):
    """PEFT saves the base lm_head or embeddings beside an adapter of them (for vocabularies
    resized before training) and loads it over the model's: accepted only when it is this model's own."""
    name = key.removeprefix(PEFT_PREFIX).removesuffix(".base_layer.weight")
    w = model.get_submodule(name).weight
    if t.shape != w.shape or not torch.equal(t.to(w.device, w.dtype), w):
        raise LoRAError(f"{weights_file}: {key} differs from this model's {name} (a resized vocabulary, "
                        "or an adapter for another base?)")


def check_adapter_folder(path):
    """Scripts call this before loading a model (minutes, or a download), so a wrong path fails
    at once; read_adapter checks the files' contents when the adapter loads."""
    path = Path(path)
    if not path.is_dir():
        raise LoRAError(f"{path}: no such adapter folder")
    for file in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / file).is_file():
            raise LoRAError(f"{path}: no {file} (not a PEFT adapter folder)")


def load_adapter(model, path, adapter_name="default", dtype=torch.float32):
    """Add the adapter saved at `path` (by save_adapter or PEFT) as `adapter_name` and make it
    active, after checking every tensor fits this model. Returns its adapter_config dict."""
    config, tensors = read_adapter(path)
    layers = match_adapter(model, path, config, tensors)
    add_adapter(model, sorted(layers), adapter_name, settings_of(config), dtype)  # exactly the layers in the file
    copy_weights(model, layers, adapter_name)
    set_adapter(model, adapter_name)
    return config


def load_adapter_weights(model, path, adapter_name="default"):
    """Copy the tensors saved at `path` into the model's existing adapter (resuming training); the
    saved adapter must have the same settings and layers."""
    config, tensors = read_adapter(path)
    layers = match_adapter(model, path, config, tensors)
    settings, saved = adapter_settings(model, adapter_name), settings_of(config)
    if settings is None or asdict(settings) != {**asdict(saved), "dropout": settings.dropout}:  # dropout may differ
        raise LoRAError(f"{Path(path) / CONFIG_FILE}: {saved} does not match the model's adapter "
                        f"{adapter_name!r} ({settings})")
    if set(layers) != {n for n, m in lora_layers(model) if adapter_name in m.settings}:
        raise LoRAError(f"{Path(path) / WEIGHTS_FILE}: its layers differ from those of the model's "
                        f"adapter {adapter_name!r}")
    copy_weights(model, layers, adapter_name)


def settings_of(config):
    """AdapterSettings from an adapter_config.json dict."""
    return AdapterSettings(r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
                           use_rslora=config.get("use_rslora", False), use_dora=config.get("use_dora", False))


@torch.no_grad()
def copy_weights(model, layers, adapter_name):
    for name, saved in layers.items():
        own = model.get_submodule(name).adapter_tensors(adapter_name)
        for suffix, t in saved.items():
            own[suffix].copy_(t)
