"""A Llama-family transformer, built from a Hugging Face checkpoint folder.

Covers Llama 2/3.x, TinyLlama, SmolLM2, Mistral, Qwen2/2.5 and Qwen3 (dense): they share one
architecture (pre-norm RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP) and
differ in a few config fields, all read into `Config` (Qwen3 adds an RMSNorm on each head's
query and key, `qk_norm`). Module names mirror the checkpoint's keys
(model.layers.N.self_attn.q_proj.weight, ...) so weights load with no renaming and LoRA target
names and PEFT keys map one to one.

    model = Transformer.from_pretrained("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct")
    logits = model(input_ids)  # (B, T) -> (B, T, vocab)
"""
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from activations import checkpointed, recomputed
from common import CheckpointError, replace_module
from quant import NF4Linear, is_nf4_target
from weights import checked_shapes, read_tensor


@dataclass
class Config:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = None  # None: multi-head attention (= num_attention_heads)
    head_dim: int = None  # None: hidden_size // num_attention_heads (Mistral Nemo sets its own)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict = None  # e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v/o (Qwen2: q/k/v only, see __post_init__)
    mlp_bias: bool = False
    qkv_bias: bool = None  # None: attention_bias (Qwen2: always True, with no o_proj bias)
    qk_norm: bool = None  # RMSNorm on each head's query and key before RoPE; None: Qwen3 only

    def __post_init__(self):
        if self.model_type not in ("llama", "mistral", "qwen2", "qwen3"):
            raise CheckpointError(f"model_type {self.model_type!r} is not supported "
                                  "(supported: llama, mistral, qwen2, qwen3)")
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.qkv_bias is None:
            self.qkv_bias = self.attention_bias or self.model_type == "qwen2"
        if self.qk_norm is None:
            self.qk_norm = self.model_type == "qwen3"
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError("num_attention_heads must be a multiple of num_key_value_heads")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ("default", "linear", "llama3"):
            raise CheckpointError(f"rope scaling type {rope_type!r} is not supported "
                                  "(supported: default, linear, llama3)")

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        # transformers >= 5 writes rope_theta and scaling together as rope_parameters;
        # hub checkpoints spell them rope_theta + rope_scaling (with "type" in older ones).
        rope = dict(d.pop("rope_parameters", None) or d.get("rope_scaling") or {})
        if "rope_theta" in rope:
            d["rope_theta"] = rope.pop("rope_theta")
        if "type" in rope:
            rope.setdefault("rope_type", rope.pop("type"))
        d["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, path):
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise CheckpointError(f"{path}: cannot read config: {e}") from None


def rope_inv_freq(config):
    """Inverse frequencies theta^(-2i/d), i < d/2, with the checkpoint's long-context scaling."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    if s["rope_type"] == "linear":  # positions divided by factor
        return inv_freq / s["factor"]
    # llama3 (Llama 3.1 paper, sec. 3.3): long wavelengths are slowed by `factor`, short ones
    # kept, and the band in between interpolated smoothly.
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    # x: (B, H, T, D), cos/sin: (B, 1, T, D). Hugging Face's rotate-half layout: dimension i is
    # paired with i + D/2, so checkpoint q/k weights load with no permutation.
    return (x * cos).add_(rotate_half(x).mul_(sin))  # in place: two temporaries, not four, same numbers


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalize in fp32 for stability, then cast back before the scale (as the reference does)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype).mul_(self.weight)  # in place: xf is not needed for backward


class KVCache(nn.Module):
    """Preallocated keys and values, so decoding a token reads the prompt's K/V, never recomputes it."""

    def __init__(self, batch_size, max_len, n_kv_heads, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start, k, v):
        # k, v: (B, n_kv, T, D) written at positions start..start+T; returns K/V up to there
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = config
        self.n_heads, self.n_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=c.attention_bias)
        # Qwen3: an RMSNorm over each head's query and key (head_dim wide), shared by all heads
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps) if c.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps) if c.qk_norm else nn.Identity()
        self.kv_cache = None

    def forward(self, x, cos, sin, mask, start):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)  # (B, H, T, D)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(start, k, v)
        # grouped-query attention: each K/V head serves n_heads / n_kv_heads query heads. Without a
        # mask, enable_gqa shares them with no copy (the flash kernel). With one (packing, or new
        # tokens after a cache) no fused CUDA kernel takes both a mask and enable_gqa (flash takes
        # no mask, memory-efficient no GQA): SDPA would fall back to the math kernel, O(T^2) fp32
        # scores per layer. Repeating the K/V heads costs two (B, H, S, D) copies and keeps the
        # memory-efficient kernel.
        gqa = self.n_heads != self.n_kv_heads
        if mask is not None and gqa:
            k, v = (t.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1) for t in (k, v))
            gqa = False
        # mask None: plain causal attention over the new tokens, or one token seeing all the cache
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = config
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x, recompute=True):
        g, u = self.gate_proj(x), self.up_proj(x)
        h = SwiGLU.apply(g, u)
        with recomputed(h, lambda: swiglu(g, u), recompute):  # down_proj's LoRA A keeps its input
            return self.down_proj(h)


def swiglu(g, u):
    return F.silu(g).mul_(u)


class SwiGLU(torch.autograd.Function):
    """silu(g) * u, saving only g and u for backward. Autograd would also keep silu(g): a third
    (tokens, intermediate) tensor per layer, where the largest activations of training are."""

    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return swiglu(g, u)

    @staticmethod
    def backward(ctx, grad):
        g, u = ctx.saved_tensors
        # d/du = silu(g);  d/dg = u * silu'(g) = u * s (1 + g (1 - s)), s = sigmoid(g)
        return torch.ops.aten.silu_backward(grad * u, g), F.silu(g).mul_(grad)  # in place: one temporary less


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, start, recompute=True):
        # recompute: the normed inputs and SwiGLU's product kept as recipes (see recomputed)
        h = self.input_layernorm(x)
        with recomputed(h, lambda: self.input_layernorm(x), recompute):  # the norm keeps x anyway
            y = x + self.self_attn(h, cos, sin, mask, start)
        h = self.post_attention_layernorm(y)
        with recomputed(h, lambda: self.post_attention_layernorm(y), recompute):
            return y + self.mlp(h, recompute)


class Decoder(nn.Module):
    """The `model.` part of a Hugging Face checkpoint: embeddings, blocks, final norm."""

    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.gradient_checkpointing = None  # None, "on" or "offload": see enable_gradient_checkpointing
        self.layer_devices = None  # where each block runs, after split_layers; None: with the embeddings

    def enable_gradient_checkpointing(self, mode="on"):
        """In training, keep only each block's input and recompute the block in backward: activation
        memory of one block instead of all, for about one more forward pass of compute. "offload"
        keeps those inputs in (pinned) host memory until backward: on a GPU, the longest sequences."""
        mode = {True: "on", False: None}.get(mode, mode)
        if mode not in (None, "on", "offload"):
            raise ValueError(f"gradient checkpointing {mode!r}: None, 'on' or 'offload'")
        self.gradient_checkpointing = mode
        return self

    def compile_blocks(self):
        """torch.compile each block on its own, as torchtune does: blocks of one shape share the
        compiled code, and the loop, checkpointing and the loss around them stay eager. In place
        (Module.compile), so state_dict keys do not change."""
        for block in self.model.layers:
            block.compile()
        return self

    def hidden(self, input_ids, position_ids=None, doc_ids=None, start=0):
        """Final hidden states (B, T, C) after the last norm.

        position_ids (B, T): defaults to start..start+T. doc_ids (B, T): with sample packing, the
        example each token belongs to; tokens attend only within their example. start: with a
        KV cache (setup_cache), where input_ids go in the cached sequence.
        """
        B, T = input_ids.shape
        device = input_ids.device
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=device).expand(B, T)
        x = self.model.embed_tokens(input_ids)
        # cos/sin computed in fp32 from the positions, then cast, as the reference does
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        mask = None
        if doc_ids is not None:  # causal and block-diagonal: (B, 1, T, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
            mask = (causal & (doc_ids[:, :, None] == doc_ids[:, None, :]))[:, None]
        elif start > 0 and T > 1:  # new tokens see the whole cache and each other causally: (T, start+T)
            mask = torch.ones(T, start + T, dtype=torch.bool, device=device).tril(diagonal=start)
        for i, block in enumerate(self.model.layers):
            if self.layer_devices is not None and x.device != (d := self.layer_devices[i]):
                x, cos, sin, mask = (t if t is None else t.to(d) for t in (x, cos, sin, mask))
            if self.gradient_checkpointing and self.training:
                x = checkpointed(block, x, cos, sin, mask, start, offload=self.gradient_checkpointing == "offload")
            else:
                x = block(x, cos, sin, mask, start)
        return self.model.norm(x.to(device))  # back with the embeddings, final norm and lm_head

    def forward(self, input_ids, position_ids=None, doc_ids=None, start=0):
        return self.lm_head(self.hidden(input_ids, position_ids, doc_ids, start))  # (B, T, vocab)

    def untie_lm_head(self):
        """Give lm_head its own copy of the embedding table, so that one can change without the
        other (merging an adapter into either); config.tie_word_embeddings says so from then on.
        Under a LoRA wrapper, the copy goes to the layer it wraps (its `base`)."""
        head = getattr(self.lm_head, "base", self.lm_head)
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        self.config.tie_word_embeddings = False

    def checkpoint_state_dict(self):
        """The state_dict as a Hugging Face checkpoint stores it: a tied lm_head.weight is left out
        (it is the embedding table)."""
        state = self.state_dict()
        if self.config.tie_word_embeddings:
            del state["lm_head.weight"]
        return state

    def split_layers(self, devices):
        """Spread the blocks evenly over devices, in order, for a model too large for one GPU
        (one process; devices take turns). Embeddings, final norm and lm_head (tied with the
        embeddings in some models) stay on the first device."""
        n = len(self.model.layers)
        self.layer_devices = [torch.device(devices[i * len(devices) // n]) for i in range(n)]
        for block, device in zip(self.model.layers, self.layer_devices):
            block.to(device)
        return self

    def setup_cache(self, batch_size, max_len):
        """Give each attention layer a KV cache of max_len positions (None to remove them)."""
        c, p = self.config, self.model.embed_tokens.weight  # the compute dtype (lm_head may be LoRA-wrapped)
        for i, block in enumerate(self.model.layers):
            device = p.device if self.layer_devices is None else self.layer_devices[i]
            block.self_attn.kv_cache = None if batch_size is None else KVCache(
                batch_size, max_len, c.num_key_value_heads, c.head_dim, p.dtype, device)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu", quantize=None):
        """Load a checkpoint folder without two copies of it (a hub id: hub.resolve_checkpoint first).

        The model is built on the meta device (no memory) and each tensor is read from its
        safetensors file straight into place; with quantize="nf4" every linear layer of the
        blocks is quantized as soon as it is read, so peak memory stays near the 4-bit size.
        """
        config, model, read = open_checkpoint(path)
        if quantize not in (None, "nf4"):
            raise CheckpointError(f"quantize={quantize!r}: only 'nf4' is supported")
        for name, module in list(model.named_modules()):
            own = dict(module.named_parameters(recurse=False))
            if not own or (config.tie_word_embeddings and module is model.lm_head):
                continue
            tensors = {k: read(f"{name}.{k}").to(device=device, dtype=dtype) for k in own}
            if quantize == "nf4" and is_nf4_target(name, module):
                replace_module(model, name, NF4Linear.from_weight(tensors["weight"], tensors.get("bias")))
            else:
                for k, t in tensors.items():
                    setattr(module, k, nn.Parameter(t))
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.inv_freq = rope_inv_freq(config).to(device)
        return model.eval()


def open_checkpoint(path):
    """(config, model, read) for a checkpoint folder: its Config, a Transformer of it on the meta
    device (no memory), and read(key), one tensor as stored (a tied lm_head.weight: the embedding
    table). Every key and shape is checked from the files' headers before anything is read: a
    missing, an unexpected or a misshapen tensor is named."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    config = Config.from_json(path / "config.json")
    with torch.device("meta"):
        model = Transformer(config)
    expected = {k: tuple(t.shape) for k, t in model.checkpoint_state_dict().items()}
    files = checked_shapes(path, expected, config.tie_word_embeddings)  # {key: (file, shape)}

    def read(key):
        key = "model.embed_tokens.weight" if config.tie_word_embeddings and key == "lm_head.weight" else key
        return read_tensor(files[key][0], key)

    return config, model, read
