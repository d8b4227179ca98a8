"""LoRA (Hu et al. 2021, arXiv:2106.09685), by hand: the adapted layers.

A frozen linear layer y = x W^T (W: out x in) gets a trainable low-rank update:

    y = x W^T + scaling * dropout(x) A^T B^T      A: (r, in), B: (out, r), r << in, out
    scaling = alpha / r            (rsLoRA, arXiv:2312.03732: alpha / sqrt(r))

B starts at zero, so a fresh adapter changes nothing; only A and B are trained, which is
r * (in + out) numbers instead of in * out. Merging folds the update into the weight,
W' = W + scaling * B @ A, and costs nothing at inference. With QLoRA the frozen W is NF4
(quant.py) and LoRA is unchanged: gradients flow through the dequantized W to x, never to W.

    layer = LoRALinear(nn.Linear(576, 576), AdapterSettings(r=8, alpha=16))   # a working layer

This file holds the layers; DoRA's siblings are in dora.py, putting adapters into a model
(apply_lora, set_adapter, merge_lora) is adapters.py, and PEFT's on-disk format peft_format.py.
"""
import math
from dataclasses import dataclass
from itertools import chain

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import InputError


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


def lora_delta(tensors, scaling):
    """The update an adapter makes to its base weight, in fp32, from its tensors {PEFT key suffix:
    tensor} (a layer's adapter_tensors, or an adapter file's): scaling * B @ A, (out, in), for a
    linear layer's lora_A (r, in) and lora_B (out, r); its transpose, (vocab, dim), for the
    embeddings' lora_embedding_A (r, vocab) and lora_embedding_B (dim, r). The one merge math of
    merge_lora and of merge.py, which streams it over the checkpoint's files."""
    if "lora_A.weight" in tensors:
        return scaling * (tensors["lora_B.weight"].float() @ tensors["lora_A.weight"].float())
    return scaling * (tensors["lora_embedding_B"].float() @ tensors["lora_embedding_A"].float()).T
