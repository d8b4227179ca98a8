"""LoRA (Hu et al. 2021, arXiv:2106.09685), by hand, with adapters in PEFT's on-disk format.

A frozen linear layer y = x W^T (W: out x in) gets a trainable low-rank update:

    y = x W^T + scaling * dropout(x) A^T B^T      A: (r, in), B: (out, r), r << in, out
    scaling = alpha / r            (rsLoRA, arXiv:2312.03732: alpha / sqrt(r))

B starts at zero, so a fresh adapter changes nothing; only A and B are trained, which is
r * (in + out) numbers instead of in * out. Merging folds the update into the weight,
W' = W + scaling * B @ A, and costs nothing at inference. With QLoRA the frozen W is NF4
(quant.py) and LoRA is unchanged: gradients flow through the dequantized W to x, never to W.

DoRA, a variant that also trains a magnitude per output row, is in dora.py; the token
embeddings can take LoRA too (LoRAEmbedding).

On disk, an adapter is what PEFT writes, so PEFT, vLLM and llama.cpp's converter read ours and
we read theirs: adapter_config.json and adapter_model.safetensors with keys like
base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight.

    apply_lora(model, r=16, alpha=32, target_modules="all-linear")   # then train
    save_adapter(model, "out/lora");  load_adapter(other_model, "out/lora")
"""
import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import InputError, written_atomically
from model import replace_module

PEFT_PREFIX = "base_model.model."  # PEFT's key = prefix + module name + ".lora_A.weight"
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
# LoraConfig settings that change the computation or add weights: refused, never silently ignored.
UNSUPPORTED = ("modules_to_save", "rank_pattern", "alpha_pattern", "fan_in_fan_out", "lora_bias",
               "layer_replication", "trainable_token_indices", "target_parameters", "use_qalora",
               "alora_invocation_tokens", "use_bdlora", "velora_config", "kasa_config", "monteclora_config",
               "arrow_config", "ensure_weight_tying")


class LoRAError(InputError):
    """An adapter that does not fit this model, or bad LoRA settings; one line naming it."""


@dataclass(frozen=True)
class AdapterSettings:
    """What an adapter is besides its weights; each layer holding it keeps these (save_adapter
    writes them to adapter_config.json)."""
    r: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False

    @property
    def scaling(self):
        # alpha / r shrinks the update as r grows, so large ranks barely learn; rsLoRA's
        # alpha / sqrt(r) keeps its size steady across ranks.
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


class LoRALayer(nn.Module):
    """What every adapted layer shares: a frozen `base` layer and named adapters, each with its
    AdapterSettings. One adapter is `active`; `disabled` skips adapters; `merged` names the
    adapter folded into the base weight. Subclasses say what an adapter computes.

    Built with settings, a layer starts with one adapter, "default", active: one call gives a
    working layer, LoRALinear(base, AdapterSettings(r=8, alpha=16))."""

    def __init__(self, base):
        super().__init__()
        self.base = base
        self.settings = {}  # adapter name -> AdapterSettings
        self.active, self.disabled, self.merged = None, False, None
        self.merged_into_nf4 = False  # the base was dequantized to merge: unmerging can't restore NF4

    @property
    def weight(self):
        """The base layer's weight (a tied lm_head and the embeddings share it); NF4 layers have none."""
        return self.base.weight

    def begin(self, settings):
        """The end of a subclass's __init__: the "default" adapter, active, when settings are given."""
        if settings is not None:
            self.add_adapter("default", settings)
            self.active = "default"

    def add_adapter(self, name, settings):
        self.settings[name] = settings

    def adapter_tensors(self, name):
        """{PEFT key suffix: parameter} of adapter `name`; save_adapter writes them, load copies into them."""
        raise NotImplementedError

    def delta_weight(self, name):
        """The update adapter `name` makes to the base weight, the weight's shape, in fp32."""
        return lora_delta(self.adapter_tensors(name), self.settings[name].scaling)

    def merged_weight(self, w, name):  # w: the base weight in fp32
        return w + self.delta_weight(name)

    def unmerged_weight(self, w, name):
        return w - self.delta_weight(name)

    @torch.no_grad()
    def merge(self):
        """W <- merged_weight(W) for the active adapter (W + delta_weight), in fp32, rounded once."""
        if hasattr(self.base, "to_linear"):  # quantized (quant.NF4Linear): W + BA is not NF4 any more
            self.base, self.merged_into_nf4 = self.base.to_linear(), True
        w = self.base.weight
        w.copy_(self.merged_weight(w.float(), self.active))
        self.merged = self.active

    @torch.no_grad()
    def unmerge(self):
        w = self.base.weight
        w.copy_(self.unmerged_weight(w.float(), self.merged))
        self.merged = None

    def extra_repr(self):
        return f"adapters={list(self.settings)}, active={self.active}, merged={self.merged}"


class LoRALinear(LoRALayer):
    """A frozen linear layer (nn.Linear, or quant.NF4Linear for QLoRA) plus adapters, each
    lora_A[name] (r, in) and lora_B[name] (out, r)."""

    def __init__(self, base, settings=None):
        super().__init__(base)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A, self.lora_B, self.lora_dropout = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.begin(settings)

    def add_adapter(self, name, settings, dtype=torch.float32):
        super().add_adapter(name, settings)
        r, device = settings.r, device_of(self.base)
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        # A: kaiming-uniform with a=sqrt(5), which is nn.Linear's own default, U(-1/sqrt(in), 1/sqrt(in)),
        # kept by PEFT: the entries of A x are then about the size of x's, whatever `in` is.
        # B: zero, so B @ A = 0 and training starts exactly at the base model (B gets the first
        # gradient; with A zero too, neither would ever get one).
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)
        self.lora_dropout[name] = nn.Dropout(settings.dropout) if settings.dropout > 0 else nn.Identity()

    def adapter_tensors(self, name):
        return {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}

    def forward(self, x):
        y = self.base(x)
        name = self.active
        if name is None or self.disabled or self.merged:  # merged: base(x) already includes it
            return y
        # In the input's dtype from the fp32 weights, as autocast computes: the casts are adapter-sized,
        # autograd keeps nothing activation-sized in fp32, and the gradients reach A and B in fp32.
        A, B = (w.to(x.dtype) for w in (self.lora_A[name].weight, self.lora_B[name].weight))
        s = self.settings[name].scaling
        xa = F.linear(self.lora_dropout[name](x), A)  # (..., in) -> (..., r)
        # y + s * xa B^T as one matmul-and-add: no (..., out)-sized temporaries besides the result
        return torch.addmm(y.reshape(-1, y.shape[-1]), xa.reshape(-1, xa.shape[-1]), B.T, alpha=s).view(y.shape)


class LoRAEmbedding(LoRALayer):
    """A frozen nn.Embedding (vocab, dim) plus adapters as PEFT makes them: the looked-up row of
    lora_embedding_A[name] (r, vocab), times lora_embedding_B[name] (dim, r), times scaling.
    No dropout (a dropped token id means nothing). A starts at zero and B random (the other way
    round from linear layers, as in PEFT): the update starts at zero all the same."""

    def __init__(self, base, settings=None):
        super().__init__(base)
        self.lora_embedding_A, self.lora_embedding_B = nn.ParameterDict(), nn.ParameterDict()
        self.begin(settings)

    def add_adapter(self, name, settings, dtype=torch.float32):
        super().add_adapter(name, settings)
        vocab, dim = self.base.weight.shape
        device = self.base.weight.device
        self.lora_embedding_A[name] = nn.Parameter(torch.zeros(settings.r, vocab, device=device, dtype=dtype))
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(dim, settings.r, device=device, dtype=dtype))

    def adapter_tensors(self, name):
        return {"lora_embedding_A": self.lora_embedding_A[name], "lora_embedding_B": self.lora_embedding_B[name]}

    def forward(self, ids):
        y = self.base(ids)  # (B, T, dim)
        name = self.active
        if name is None or self.disabled or self.merged:
            return y
        A, B = (w.to(y.dtype) for w in (self.lora_embedding_A[name], self.lora_embedding_B[name]))  # as LoRALinear
        xa = F.embedding(ids, A.T)  # row ids of A^T (vocab, r): (B, T, r)
        return y + xa @ B.T * self.settings[name].scaling


def base_weight(layer):
    """The (out, in) weight a base layer computes with: its own, or a quantized layer's, dequantized."""
    return layer.dequantize() if hasattr(layer, "dequantize") else layer.weight


def device_of(module):
    """Where a module's tensors live (an NF4 layer holds buffers, no parameters)."""
    return next(chain(module.parameters(), module.buffers())).device


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
        trainable, total = count_parameters(model)
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")
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
    from dora import DoRAEmbedding, DoRALinear  # dora.py builds on this file's classes

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

def lora_delta(tensors, scaling):
    """The update an adapter makes to its base weight, in fp32, from its tensors {PEFT key suffix:
    tensor} (a layer's adapter_tensors, or an adapter file's): scaling * B @ A, (out, in), for a
    linear layer's lora_A (r, in) and lora_B (out, r); its transpose, (vocab, dim), for the
    embeddings' lora_embedding_A (r, vocab) and lora_embedding_B (dim, r). The one merge math of
    merge_lora and of merge.py, which streams it over the checkpoint's files."""
    if "lora_A.weight" in tensors:
        return scaling * (tensors["lora_B.weight"].float() @ tensors["lora_A.weight"].float())
    return scaling * (tensors["lora_embedding_B"].float() @ tensors["lora_embedding_A"].float()).T


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


# --- the PEFT format on disk ---------------------------------------------------------------------

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
