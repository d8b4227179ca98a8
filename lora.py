"""LoRA (Hu et al. 2021, arXiv:2106.09685), by hand, with adapters in PEFT's on-disk format.

A frozen linear layer y = x W^T (W: out x in) gets a trainable low-rank update:

    y = x W^T + scaling * dropout(x) A^T B^T      A: (r, in), B: (out, r), r << in, out
    scaling = alpha / r            (rsLoRA, arXiv:2312.03732: alpha / sqrt(r))

B starts at zero, so a fresh adapter changes nothing; only A and B are trained, which is
r * (in + out) numbers instead of in * out. Merging folds the update into the weight,
W' = W + scaling * B @ A, and costs nothing at inference. With QLoRA the frozen W is NF4
(quant.py) and LoRA is unchanged: gradients flow through the dequantized W to x, never to W.

On disk, an adapter is what PEFT writes, so PEFT, vLLM and llama.cpp's converter read ours and
we read theirs: adapter_config.json and adapter_model.safetensors with keys like
base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight.

    apply_lora(model, r=16, alpha=32, target_modules="all-linear")   # then train
    save_adapter(model, "out/lora");  load_adapter(other_model, "out/lora")
"""
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from model import InputError

PEFT_PREFIX = "base_model.model."  # PEFT's key = prefix + module name + ".lora_A.weight"
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
# LoraConfig settings that change the computation or add weights: refused, never silently ignored.
UNSUPPORTED = ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern", "fan_in_fan_out", "lora_bias",
               "layer_replication", "trainable_token_indices", "target_parameters", "use_qalora",
               "alora_invocation_tokens", "use_bdlora", "velora_config", "kasa_config", "monteclora_config",
               "arrow_config")


class LoRAError(InputError):
    """An adapter that does not fit this model, or bad LoRA settings; one line naming it."""


class LoRALinear(nn.Module):
    """A frozen base layer (nn.Linear, or quant.NF4Linear for QLoRA) plus named adapters, each
    lora_A[name] (r, in), lora_B[name] (out, r) and scaling[name]. One adapter is `active`;
    `disabled` skips adapters; `merged` names the adapter already folded into the base weight."""

    def __init__(self, base):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A, self.lora_B, self.lora_dropout = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.scaling = {}
        self.active, self.disabled, self.merged = None, False, None
        self.merged_into_nf4 = False  # the base was dequantized to merge: unmerging can't restore NF4

    def add_adapter(self, name, r, alpha, dropout=0.0, use_rslora=False, dtype=torch.float32):
        device = next(iter(self.base.state_dict().values())).device
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        # A: kaiming-uniform with a=sqrt(5), which is nn.Linear's own default, U(-1/sqrt(in), 1/sqrt(in)),
        # kept by PEFT: the entries of A x are then about the size of x's, whatever `in` is.
        # B: zero, so B @ A = 0 and training starts exactly at the base model (B gets the first
        # gradient; with A zero too, neither would ever get one).
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # alpha / r shrinks the update as r grows, so large ranks barely learn; rsLoRA's
        # alpha / sqrt(r) keeps its size steady across ranks.
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r

    def delta_weight(self, name):
        """scaling * B @ A: (out, in) in fp32, the update the adapter makes to the base weight."""
        return self.scaling[name] * (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float())

    def forward(self, x):
        y = self.base(x)
        name = self.active
        if name is None or self.disabled or self.merged:  # merged: base(x) already includes it
            return y
        A, B, s = self.lora_A[name], self.lora_B[name], self.scaling[name]
        xa = A(self.lora_dropout[name](x.to(A.weight.dtype)))  # (..., in) -> (..., r), in the adapter's dtype
        if xa.dtype != y.dtype:  # e.g. a bf16 model with fp32 adapters: the update is added in y's dtype
            return y + (B(xa) * s).to(y.dtype)
        # y + s * xa B^T as one matmul-and-add: no (..., out)-sized temporaries besides the result
        return torch.addmm(y.reshape(-1, y.shape[-1]), xa.reshape(-1, xa.shape[-1]), B.weight.T, alpha=s).view(y.shape)

    @torch.no_grad()
    def merge(self):
        """W <- W + scaling * B @ A for the active adapter, summed in fp32 and rounded once."""
        if not isinstance(self.base, nn.Linear):  # NF4: W + BA is not NF4 any more
            self.base, self.merged_into_nf4 = dequantized_linear(self.base), True
        w = self.base.weight
        w.copy_(w.float() + self.delta_weight(self.active))
        self.merged = self.active

    @torch.no_grad()
    def unmerge(self):
        w = self.base.weight
        w.copy_(w.float() - self.delta_weight(self.merged))
        self.merged = None

    def extra_repr(self):
        return f"adapters={list(self.lora_A)}, active={self.active}, merged={self.merged}"


def dequantized_linear(nf4):
    """A frozen nn.Linear holding an NF4Linear's weight, dequantized to its compute dtype."""
    w = nf4.dequantize()
    linear = nn.Linear(nf4.in_features, nf4.out_features, bias=nf4.bias is not None, device="meta")
    linear.weight = nn.Parameter(w, requires_grad=False)
    if nf4.bias is not None:
        linear.bias = nn.Parameter(nf4.bias.clone(), requires_grad=False)
    return linear


def unwrap(model):
    """The model inside a DistributedDataParallel wrapper, whose names start with "module."."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def lora_layers(model):
    return [(n, m) for n, m in unwrap(model).named_modules() if isinstance(m, LoRALinear)]


def targetable_linears(model):
    """{name: layer} of what LoRA may adapt, LoRA-wrapped or not: the linear layers of the
    transformer blocks, and lm_head (by name only: "all-linear" leaves it out, as in PEFT).
    Never the embeddings."""
    inside_lora = {"base", "lora_A", "lora_B"}
    return {n: m for n, m in model.named_modules()
            if (".layers." in n or n == "lm_head") and hasattr(m, "in_features") and not inside_lora & set(n.split("."))}


def apply_lora(model, r=8, alpha=16, dropout=0.0, target_modules=("q_proj", "v_proj"), use_rslora=False,
               adapter_name="default", dtype=torch.float32, verbose=True):
    """Add adapter `adapter_name` to the block linears whose name ends in one of target_modules
    (or to all of them: "all-linear"), make it the active one and freeze everything else.
    Call again with another adapter_name to add a second adapter."""
    if r < 1:
        raise LoRAError(f"LoRA rank r must be positive, not {r}")
    linears = targetable_linears(model)
    if target_modules == "all-linear":
        names = [n for n in linears if n != "lm_head"]
    else:
        targets = {target_modules} if isinstance(target_modules, str) else set(target_modules)
        existing = sorted({n.rsplit(".", 1)[-1] for n in linears})
        if unknown := sorted(targets - set(existing)):
            raise LoRAError(f"target module {unknown[0]!r} matches no layer; the model's linear layers are: "
                            f"{', '.join(existing)} (or all-linear)")
        names = [n for n in linears if n.rsplit(".", 1)[-1] in targets]
    add_adapter(model, names, adapter_name, dict(r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora), dtype)
    set_adapter(model, adapter_name)
    if verbose:
        trainable, total = count_parameters(model)
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")
    return model


def add_adapter(model, names, adapter_name, settings, dtype):
    """Wrap the named layers in LoRALinear (once) and give each a new adapter; the settings
    (r, alpha, dropout, use_rslora) are kept on the model for save_adapter."""
    if adapter_name in getattr(model, "lora_config", {}):
        raise LoRAError(f"the model already has an adapter named {adapter_name!r}")
    for name in names:
        layer = model.get_submodule(name)
        if not isinstance(layer, LoRALinear):
            parent, _, child = name.rpartition(".")
            layer = LoRALinear(layer)
            setattr(model.get_submodule(parent), child, layer)
        layer.add_adapter(adapter_name, dtype=dtype, **settings)
        layer.train(model.training)  # new modules start in training mode (dropout on): follow the model
    model.lora_config = {**getattr(model, "lora_config", {}), adapter_name: settings}


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


def set_adapter(model, name):
    """Make `name` the active adapter (layers without it compute as the base); only its A and B
    stay trainable, everything else is frozen."""
    layers = [m for _, m in lora_layers(model)]
    if not any(name in m.lora_A for m in layers):
        have = sorted({a for m in layers for a in m.lora_A})
        raise LoRAError(f"no adapter named {name!r} (the model has: {', '.join(have) or 'none'})")
    if any(m.merged not in (None, name) for m in layers):
        raise LoRAError(f"cannot switch to adapter {name!r} while another is merged; unmerge_lora first")
    for p in model.parameters():
        p.requires_grad_(False)
    for m in layers:
        m.active = name if name in m.lora_A else None
        if m.active:
            m.lora_A[name].weight.requires_grad_(True)
            m.lora_B[name].weight.requires_grad_(True)


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
    An NF4 base is dequantized first and becomes an nn.Linear in its compute dtype; an lm_head
    tied to the embeddings is untied first."""
    model = unwrap(model)
    layers = [m for _, m in lora_layers(model) if m.active and not m.merged]
    nf4 = [m for m in layers if not isinstance(m.base, nn.Linear)]
    head = model.lm_head
    if head in layers and head.base.weight is model.model.embed_tokens.weight:
        # merging into a tied lm_head would change the embedding table too: give it its own copy
        head.base.weight = nn.Parameter(head.base.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
        print("merge_lora: the adapter changes lm_head, so lm_head is untied from the embeddings")
    for m in layers:
        m.merge()
    if nf4:
        print(f"merge_lora: dequantized {len(nf4)} NF4 layers to {nf4[0].base.weight.dtype} to merge into them")


def unmerge_lora(model):
    """Undo merge_lora: W <- W - scaling * B @ A (exact up to float rounding)."""
    layers = [(n, m) for n, m in lora_layers(model) if m.merged]
    for name, m in layers:
        if m.merged_into_nf4:
            raise LoRAError(f"cannot unmerge {name}: its NF4 weight was dequantized to merge into "
                            "(the NF4 values are gone); reload the base model instead")
    for _, m in layers:
        m.unmerge()


def merge_and_unload(model):
    """Merge, then put each plain base layer back in place of its LoRALinear: the model is a
    plain Transformer again and its state_dict has the Hugging Face key names (for merge.py)."""
    model = unwrap(model)
    merge_lora(model)
    for name, m in lora_layers(model):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, m.base)
    model.lora_config = {}
    return model


# --- the PEFT format on disk ---------------------------------------------------------------------

def save_adapter(model, path, adapter_name="default", base_model_name_or_path=None):
    """Write adapter_config.json + adapter_model.safetensors (A and B only, never base weights)
    into `path`. Both are written in a temporary folder beside them, then moved into place:
    a crash never leaves half a file, and the config lands last, after its weights."""
    from safetensors.torch import save_file

    model = unwrap(model)
    settings = getattr(model, "lora_config", {}).get(adapter_name)
    if settings is None:
        raise LoRAError(f"the model has no adapter named {adapter_name!r} to save")
    tensors, targets = {}, set()
    for name, m in lora_layers(model):
        if adapter_name in m.lora_A:  # PEFT's keys have no adapter name in them
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A[adapter_name].weight.detach().cpu().contiguous()
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B[adapter_name].weight.detach().cpu().contiguous()
            targets.add(name.rsplit(".", 1)[-1])
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base_model_name_or_path,
                  revision=None, r=settings["r"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"],
                  use_rslora=settings["use_rslora"], target_modules=sorted(targets), bias="none",
                  fan_in_fan_out=False, init_lora_weights=True, inference_mode=True, modules_to_save=None,
                  use_dora=False, layers_to_transform=None, layers_pattern=None, rank_pattern={}, alpha_pattern={})
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".adapter-", dir=path))
    try:
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        for file in (WEIGHTS_FILE, CONFIG_FILE):
            os.replace(tmp / file, path / file)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


def match_adapter(model, path, config, tensors):
    """{layer name: {"lora_A": A, "lora_B": B}}, after checking that every tensor is the A or B
    of a layer of this model that LoRA can adapt, with shapes A: (r, in), B: (out, r)."""
    weights_file, r = Path(path) / WEIGHTS_FILE, config["r"]
    linears, layers = targetable_linears(model), {}
    for key, t in tensors.items():
        if key == PEFT_PREFIX + "lm_head.base_layer.weight" and "lm_head" in linears:
            check_saved_head(model, weights_file, key, t)
            continue
        if not key.startswith(PEFT_PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise LoRAError(f"{weights_file}: unexpected tensor {key} (only LoRA A/B weights are supported)")
        name, part = key[len(PEFT_PREFIX):-len(".lora_A.weight")], key.split(".")[-2]
        if name not in linears:
            raise LoRAError(f"{weights_file}: {key}: this model has no linear layer {name} that LoRA "
                            "can adapt (an adapter for another base?)")
        layer = linears[name]
        expected = (r, layer.in_features) if part == "lora_A" else (layer.out_features, r)
        if tuple(t.shape) != expected:
            raise LoRAError(f"{weights_file}: {key} has shape {tuple(t.shape)} but this model needs "
                            f"{expected} (an adapter for another base?)")
        layers.setdefault(name, {})[part] = t
    if not layers:
        raise LoRAError(f"{weights_file}: no LoRA weights in it")
    for name, ab in layers.items():
        if missing := {"lora_A", "lora_B"} - set(ab):
            raise LoRAError(f"{weights_file}: {name} has no {missing.pop()} weight")
    return layers


def check_saved_head(model, weights_file, key, t):
    """PEFT saves the base lm_head beside an adapter of it (for vocabularies resized before
    training) and loads it over the model's: accepted only when it is this model's own."""
    head = unwrap(model).lm_head
    w = (head.base if isinstance(head, LoRALinear) else head).weight
    if t.shape != w.shape or not torch.equal(t.to(w.device, w.dtype), w):
        raise LoRAError(f"{weights_file}: {key} differs from this model's lm_head (a resized vocabulary, "
                        "or an adapter for another base?)")


def load_adapter(model, path, adapter_name="default", dtype=torch.float32):
    """Add the adapter saved at `path` (by save_adapter or PEFT) as `adapter_name` and make it
    active, after checking every tensor fits this model. Returns its adapter_config dict."""
    model = unwrap(model)
    config, tensors = read_adapter(path)
    layers = match_adapter(model, path, config, tensors)
    settings = dict(r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
                    use_rslora=config.get("use_rslora", False))
    add_adapter(model, sorted(layers), adapter_name, settings, dtype)  # exactly the layers in the file
    copy_weights(model, layers, adapter_name)
    set_adapter(model, adapter_name)
    return config


def load_adapter_weights(model, path, adapter_name="default"):
    """Copy A and B saved at `path` into the model's existing adapter (resuming training); the
    saved adapter must have the same settings and layers."""
    model = unwrap(model)
    config, tensors = read_adapter(path)
    layers = match_adapter(model, path, config, tensors)
    settings = getattr(model, "lora_config", {}).get(adapter_name)
    saved = dict(r=config["r"], alpha=config["lora_alpha"], use_rslora=config.get("use_rslora", False))
    if settings is None or any(settings[k] != v for k, v in saved.items()):
        raise LoRAError(f"{Path(path) / CONFIG_FILE}: {saved} does not match the model's adapter "
                        f"{adapter_name!r} ({settings})")
    if set(layers) != {n for n, m in lora_layers(model) if adapter_name in m.lora_A}:
        raise LoRAError(f"{Path(path) / WEIGHTS_FILE}: its layers differ from those of the model's "
                        f"adapter {adapter_name!r}")
    copy_weights(model, layers, adapter_name)


@torch.no_grad()
def copy_weights(model, layers, adapter_name):
    for name, ab in layers.items():
        m = model.get_submodule(name)
        m.lora_A[adapter_name].weight.copy_(ab["lora_A"])
        m.lora_B[adapter_name].weight.copy_(ab["lora_B"])
