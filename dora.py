"""DoRA (Liu et al. 2024, arXiv:2402.09353): weight-decomposed LoRA, exactly as PEFT computes it.

A weight is a magnitude times a direction. DoRA trains the magnitude m (one number per output
row) and lets LoRA move the direction:

    W' = m * V / ||V||_row,    V = W + scaling * B @ A,    m starts at ||W||_row (so W' = W)

    y = W' x + b = g * (W x + scaling * B A x) + b,        g = m / ||V||_row  (out,)

||V||_row is a constant in backward (the paper's sec. 4.3: less memory, about the same result).
The forward takes W x from the base output y = W x + b, so W x is not computed twice, except
under dropout (see forward).

Cost against LoRA: each forward builds the full (out, in) matrix V to take its row norms (an NF4
weight is dequantized for it once more); bench.py measures the time and memory. Merged, DoRA
costs nothing: W <- g * V. llama.cpp's adapter converter refuses lora_magnitude_vector, so a
DoRA adapter goes to llama.cpp merged (merge.py), not as an adapter. The token embeddings take
DoRA too (DoRAEmbedding), as PEFT defines it for them.

This file holds the layers; adapters.py puts them where an adapter has use_dora (apply_lora(...,
use_dora=True), train.py --use_dora), and peft_format.py saves and loads them, m under the key
<module>.lora_magnitude_vector: shape (out,), or (dim,) for the embeddings.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import LoRAEmbedding, LoRALinear, base_weight
from quant import nf4_matmul


class Magnitude:
    """What DoRALinear and DoRAEmbedding share: a trained magnitude m per DoRA adapter, its
    starting value, its key on disk, and merging. norm_dim is the dimension the norms run along:
    1 for a linear weight's rows (out, in), 0 for an embedding table's columns (vocab, dim)."""
    norm_dim = 1

    def __init__(self, base, settings=None):
        super().__init__(base)
        self.lora_magnitude_vector = nn.ParameterDict()  # adapter name -> m: (out,), or (dim,)
        self.merged_norm = None  # the norms of the merged adapter's V, to unmerge with
        self.begin(settings)

    @classmethod
    def from_lora(cls, layer):
        """The same base and LoRA adapters (the same modules, not copies), able to hold DoRA ones too."""
        dora = cls(layer.base)
        for name, child in layer.named_children():  # base, and lora_A/B/dropout or lora_embedding_A/B
            setattr(dora, name, child)
        dora.settings = layer.settings
        dora.active, dora.disabled = layer.active, layer.disabled
        return dora

    def add_adapter(self, name, settings, dtype=torch.float32):
        super().add_adapter(name, settings, dtype)
        if settings.use_dora:
            self.lora_magnitude_vector[name] = nn.Parameter(self.weight_norm(name, dtype))

    def adapter_tensors(self, name):
        tensors = super().adapter_tensors(name)
        if name in self.lora_magnitude_vector:
            tensors["lora_magnitude_vector"] = self.lora_magnitude_vector[name]
        return tensors

    @torch.no_grad()  # a constant in backward
    def weight_norm(self, name, dtype):
        """||W + scaling * B @ A|| along norm_dim. An NF4 weight is dequantized for it: a full-size
        temporary, and the time of one more dequantization, per layer and forward."""
        v = base_weight(self.base).to(dtype) + self.delta_weight(name).to(dtype)
        return torch.linalg.norm(v, dim=self.norm_dim)

    def merged_weight(self, w, name):
        if name not in self.lora_magnitude_vector:
            return super().merged_weight(w, name)
        w, self.merged_norm = dora_weight(w + self.delta_weight(name), self.lora_magnitude_vector[name], self.norm_dim)
        return w

    def unmerged_weight(self, w, name):
        if name not in self.lora_magnitude_vector:
            return super().unmerged_weight(w, name)
        g = self.lora_magnitude_vector[name].float() / self.merged_norm
        return w / g.unsqueeze(self.norm_dim) - self.delta_weight(name)


def dora_weight(v, magnitude, norm_dim):
    """DoRA's merged weight m * V / ||V|| for V = W + lora_delta (fp32), and the norms ||V|| along
    norm_dim, as the forward takes them (Magnitude keeps them to unmerge); merge.py merges with it too."""
    norm = torch.linalg.norm(v, dim=norm_dim)
    return (magnitude.float() / norm).unsqueeze(norm_dim) * v, norm


class DoRALinear(Magnitude, LoRALinear):
    """A LoRALinear whose adapters may be DoRA ones, m in lora_magnitude_vector[name]. A layer
    becomes one when its first DoRA adapter is added; its plain LoRA adapters compute as before."""

    def forward(self, x):
        name = self.active
        if name not in self.lora_magnitude_vector or self.disabled or self.merged:
            return super().forward(x)
        s, dropout = self.settings[name].scaling, self.lora_dropout[name]
        # in the input's dtype from the fp32 weights, as LoRALinear's update
        A, B = (w.to(x.dtype) for w in (self.lora_A[name].weight, self.lora_B[name].weight))
        g = (self.lora_magnitude_vector[name] / self.weight_norm(name, x.dtype)).to(x.dtype)  # m / ||V||, (out,)
        y = self.base(x)  # (..., out)
        bias = 0.0 if self.base.bias is None else self.base.bias.to(x.dtype)
        # W' x + b = g * (W x + s B A x) + b. Written so, autograd keeps one (..., out) tensor
        # for backward, the one g multiplies (PEFT's (g - 1) W x + g s B A x keeps two).
        if self.training and not isinstance(dropout, nn.Identity):
            # LoRA's dropout acts on x in both terms here, so W x is recomputed on dropout(x),
            # as PEFT does (one more matmul with W per layer); y's own W x is swapped for it.
            x = dropout(x)
            wx = base_product(self.base, x)
            rest = y - wx
        else:
            rest, wx = bias, y - bias
        return rest + g * (wx + s * F.linear(F.linear(x, A), B))


def base_product(layer, x):
    """x W^T with no bias, in x's dtype, keeping nothing weight-sized for backward: an NF4 weight
    is rebuilt in backward (quant.nf4_matmul), a plain one is the layer's own parameter."""
    if hasattr(layer, "quantized"):
        return nf4_matmul(x, *layer.quantized(), None, False)
    return F.linear(x, layer.weight.to(x.dtype))


class DoRAEmbedding(Magnitude, LoRAEmbedding):
    """A LoRAEmbedding whose adapters may be DoRA ones, as PEFT computes them for embeddings: the
    magnitude is one number per embedding dimension, m: (dim,), and the norms are taken down the
    vocabulary (the columns of the (vocab, dim) table):

        y = g * (W[ids] + scaling * A^T[ids] B^T),   g = m / ||W + scaling * (B A)^T||_column

    The norms need the whole (vocab, dim) table in every forward: costly for large vocabularies."""

    norm_dim = 0

    def forward(self, ids):
        name = self.active
        if name not in self.lora_magnitude_vector or self.disabled or self.merged:
            return super().forward(ids)
        y = self.base(ids)  # (B, T, dim)
        A, B = (w.to(y.dtype) for w in (self.lora_embedding_A[name], self.lora_embedding_B[name]))  # as DoRALinear
        g = (self.lora_magnitude_vector[name] / self.weight_norm(name, y.dtype)).to(y.dtype)  # (dim,)
        update = F.embedding(ids, A.T) @ B.T * self.settings[name].scaling
        return g * (y + update)
