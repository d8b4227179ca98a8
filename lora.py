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
"""
import json
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import InputError

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."


class LoRAError(InputError):
    """An adapter that does not fit this model, or bad LoRA settings; one line naming it."""


class LoRALinear(nn.Module):
    """A frozen base linear (nn.Linear or quant.NF4Linear) plus named low-rank adapters."""

    def __init__(self, base):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()
        self.scaling, self.dropout = {}, nn.ModuleDict()
        self.active = None  # name of the adapter in use; None: base only
        self.merged = None  # name of the adapter folded into the base weight, if any

    def add(self, name, r, alpha, dropout=0.0, use_rslora=False, dtype=torch.float32):
        device = next(iter(self.base.state_dict().values())).device
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        # A as nn.Linear's default init (kaiming-uniform, a=sqrt(5)), as PEFT does; B = 0 so
        # B @ A = 0 and training starts exactly from the base model.
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)
        self.dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.active = name

    def delta_weight(self, name):
        """scaling * B @ A: (out, in), the update the adapter makes to the base weight."""
        return self.scaling[name] * (self.lora_B[name].weight @ self.lora_A[name].weight)

    def forward(self, x):
        y = self.base(x)
        name = self.active
        if name is None or name == self.merged:
            return y
        A, B = self.lora_A[name], self.lora_B[name]
        # x: (..., in) -> A: (..., r) -> B: (..., out); in the adapter's dtype, added in y's
        return y + (B(A(self.dropout[name](x.to(A.weight.dtype)))) * self.scaling[name]).to(y.dtype)

    def extra_repr(self):
        return f"adapters={list(self.lora_A)}, active={self.active}, merged={self.merged}"


def lora_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def block_linears(model):
    """{name: module} of the linear layers in the transformer blocks (LoRA-wrapped or not)."""
    inside_lora = {"base", "lora_A", "lora_B"}
    return {n: m for n, m in model.named_modules() if ".layers." in n and hasattr(m, "in_features")
            and not inside_lora & set(n.split("."))}


def apply_lora(model, r=8, alpha=16, dropout=0.0, target_modules=("q_proj", "v_proj"), use_rslora=False,
               adapter_name="default", dtype=torch.float32, verbose=True):
    """Add an adapter to the named linear layers of the blocks and freeze everything else.
    target_modules: names such as ["q_proj", "v_proj"], or "all-linear" (the 7 linears of each
    block; never lm_head, as PEFT). Call again with another adapter_name to add a second."""
    targets = BLOCK_LINEARS if target_modules == "all-linear" else tuple(target_modules)
    if r < 1:
        raise LoRAError(f"LoRA rank r must be positive, not {r}")
    linears = block_linears(model)
    candidates = {n.rsplit(".", 1)[-1] for n in linears}
    if unknown := sorted(set(targets) - candidates):
        raise LoRAError(f"target module {unknown[0]!r} matches no layer; the model's linear layers are: "
                        + ", ".join(sorted(candidates)))
    for name, module in linears.items():
        if name.rsplit(".", 1)[-1] not in targets:
            continue
        if not isinstance(module, LoRALinear):
            parent, child = name.rsplit(".", 1)
            module = LoRALinear(module)
            setattr(model.get_submodule(parent), child, module)
        if adapter_name in module.lora_A:
            raise LoRAError(f"adapter {adapter_name!r} already exists on {name}")
        module.add(adapter_name, r, alpha, dropout, use_rslora, dtype)
        module.train(model.training)  # new modules start in training mode: follow the model's
    model.lora_config = getattr(model, "lora_config", {})
    model.lora_config[adapter_name] = dict(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora,
                                           target_modules=sorted(set(targets)))
    set_adapter(model, adapter_name)
    if verbose:
        trainable, total = count_parameters(model)
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")
    return model


def count_parameters(model):
    """(trainable, all) parameter counts; NF4 weights count as their unpacked size, as PEFT does."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.in_features * m.out_features for m in model.modules() if type(m).__name__ == "NF4Linear")
    return trainable, total


def set_adapter(model, name):
    """Use adapter `name` everywhere; only its A and B are trainable, everything else frozen."""
    layers = lora_layers(model)
    if not any(name in m.lora_A for _, m in layers):
        raise LoRAError(f"no adapter named {name!r} (loaded: {', '.join(getattr(model, 'lora_config', {})) or 'none'})")
    for p in model.parameters():
        p.requires_grad_(False)
    for _, m in layers:
        m.active = name if name in m.lora_A else None
        if name in m.lora_A:
            m.lora_A[name].weight.requires_grad_(True)
            m.lora_B[name].weight.requires_grad_(True)


@contextmanager
def disable_adapters(model):
    """Inside, the model computes as the base model (merged adapters excepted)."""
    saved = [(m, m.active) for _, m in lora_layers(model)]
    for m, _ in saved:
        m.active = None
    try:
        yield model
    finally:
        for m, active in saved:
            m.active = active


# --- merging -------------------------------------------------------------------------------------

def merge_lora(model):
    """Fold the active adapter into each base weight: W += scaling * B @ A (in W's dtype).
    An NF4 base is dequantized first and becomes an nn.Linear (a merged weight is not NF4)."""
    nf4 = 0
    for _, m in lora_layers(model):
        if m.active is None or m.merged is not None:
            continue
        if not isinstance(m.base, nn.Linear):  # NF4Linear
            w = m.base.dequantize()
            linear = nn.Linear(m.in_features, m.out_features, bias=m.base.bias is not None, device=w.device, dtype=w.dtype)
            linear.weight.data, linear.weight.requires_grad = w, False
            if m.base.bias is not None:
                linear.bias.data, linear.bias.requires_grad = m.base.bias.clone(), False
            m.base, nf4 = linear, nf4 + 1
        with torch.no_grad():
            m.base.weight += m.delta_weight(m.active).to(m.base.weight.dtype)
        m.merged = m.active
    if nf4:
        print(f"merge_lora: dequantized {nf4} NF4 layers to {m.base.weight.dtype} to merge into them")


def unmerge_lora(model):
    """Undo merge_lora: W -= scaling * B @ A (exact up to float rounding)."""
    for _, m in lora_layers(model):
        if m.merged is not None:
            with torch.no_grad():
                m.base.weight -= m.delta_weight(m.merged).to(m.base.weight.dtype)
            m.merged = None


def merge_and_unload(model):
    """Merge, then put each plain base layer back in place of its LoRALinear: the model's
    state_dict has the original Hugging Face key names again (merge.py writes it)."""
    merge_lora(model)
    for name, m in lora_layers(model):
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, m.base)
    model.lora_config = {}
    return model


# --- the PEFT format on disk ---------------------------------------------------------------------

def save_adapter(model, path, adapter_name="default", base_model_name_or_path=None):
    """adapter_config.json + adapter_model.safetensors in `path`, written in a temporary folder
    and moved into place, so a crash never leaves half an adapter."""
    from safetensors.torch import save_file

    model = getattr(model, "module", model)  # DDP-wrapped
    cfg = model.lora_config[adapter_name]
    tensors = {}
    for name, m in lora_layers(model):
        if adapter_name in m.lora_A:
            key = PEFT_PREFIX + name
            tensors[f"{key}.lora_A.weight"] = m.lora_A[adapter_name].weight.detach().contiguous().cpu()
            tensors[f"{key}.lora_B.weight"] = m.lora_B[adapter_name].weight.detach().contiguous().cpu()
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base_model_name_or_path,
                  r=cfg["r"], lora_alpha=cfg["lora_alpha"], lora_dropout=cfg["lora_dropout"],
                  target_modules=cfg["target_modules"], use_rslora=cfg["use_rslora"], bias="none",
                  fan_in_fan_out=False, init_lora_weights=True, inference_mode=True, modules_to_save=None,
                  use_dora=False, layers_to_transform=None, layers_pattern=None, rank_pattern={}, alpha_pattern={},
                  revision=None)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    # weights first, config last: a folder with a config always has its weights
    os.replace(tmp / "adapter_model.safetensors", path / "adapter_model.safetensors")
    os.replace(tmp / "adapter_config.json", path / "adapter_config.json")
    tmp.rmdir()


def read_adapter(path):
    """(config dict, {key: tensor}) of a PEFT LoRA adapter folder, checked for what we support."""
    from safetensors.torch import load_file

    path = Path(path)
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config_file.exists():
        raise LoRAError(f"{path}: no adapter_config.json (not a PEFT adapter folder)")
    if not weights_file.exists():
        raise LoRAError(f"{path}: no adapter_model.safetensors (only safetensors adapters are loaded, never pickles)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise LoRAError(f"{config_file}: not valid JSON ({e})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"{config_file}: peft_type {config.get('peft_type')!r} is not LORA")
    for key, ok in (("use_dora", not config.get("use_dora")), ("modules_to_save", not config.get("modules_to_save")),
                    ("bias", config.get("bias", "none") == "none"), ("rank_pattern", not config.get("rank_pattern")),
                    ("alpha_pattern", not config.get("alpha_pattern"))):
        if not ok:
            raise LoRAError(f"{config_file}: {key}={config[key]!r} is not supported")
    try:
        tensors = load_file(weights_file)
    except Exception as e:
        raise LoRAError(f"{weights_file}: not a readable safetensors file ({e})") from None
    return config, tensors


def load_adapter(model, path, adapter_name="default"):
    """Add the adapter at `path` to the model as `adapter_name` (and make it active), after
    checking that every tensor fits a layer of this model."""
    config, tensors = read_adapter(path)
    weights_file = Path(path) / "adapter_model.safetensors"
    layers = {n: m for n, m in model.named_modules()}
    shapes = {}
    for key, t in tensors.items():
        if not key.startswith(PEFT_PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise LoRAError(f"{weights_file}: unexpected tensor {key} (only LoRA A/B weights are loaded)")
        name, ab = key[len(PEFT_PREFIX):].rsplit(".", 2)[0], key.split(".")[-2]
        base = layers.get(name)
        if isinstance(base, LoRALinear):
            base = base.base
        if base is None or not hasattr(base, "in_features"):
            raise LoRAError(f"{weights_file}: {key} names no linear layer of this model (adapter for another base?)")
        r = config["r"]
        expected = (r, base.in_features) if ab == "lora_A" else (base.out_features, r)
        if tuple(t.shape) != expected:
            raise LoRAError(f"{weights_file}: {key} has shape {tuple(t.shape)}, this model needs {expected} "
                            "(adapter for another base?)")
        shapes.setdefault(name, set()).add(ab)
    if not shapes or any(v != {"lora_A", "lora_B"} for v in shapes.values()):
        raise LoRAError(f"{weights_file}: every layer needs both lora_A and lora_B weights")
    targets = sorted({n.rsplit(".", 1)[-1] for n in shapes})
    apply_lora(model, r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
               target_modules=targets, use_rslora=config.get("use_rslora", False), adapter_name=adapter_name, verbose=False)
    for name, m in lora_layers(model):
        if name not in shapes:  # targeted by name but absent from the file (layers_to_transform)
            m.lora_B[adapter_name].weight.data.zero_()
            continue
        with torch.no_grad():
            m.lora_A[adapter_name].weight.copy_(tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"])
            m.lora_B[adapter_name].weight.copy_(tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"])
    return config


def load_adapter_weights(model, path, adapter_name="default"):
    """Copy A and B from `path` into the model's existing adapter (resuming a run)."""
    _, tensors = read_adapter(path)
    for name, m in lora_layers(getattr(model, "module", model)):
        if adapter_name in m.lora_A:
            with torch.no_grad():
                m.lora_A[adapter_name].weight.copy_(tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"])
                m.lora_B[adapter_name].weight.copy_(tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"])
