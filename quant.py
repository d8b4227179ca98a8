"""NF4 quantization for QLoRA, written out by hand (Dettmers et al. 2023, arXiv:2305.14314).

A frozen weight is cut into blocks of `blocksize` (64) consecutive elements, row-major. Each block is
scaled by its absolute maximum into [-1, 1] and every element is rounded to the nearest of
16 NormalFloat values, stored as a 4-bit index, two per byte. "Double quantization"
then compresses the per-block fp32 absmax constants themselves: subtract their mean, and
quantize them to 8 bits in blocks of 256 with bitsandbytes' dynamic 8-bit code.

Memory per parameter:
  no double quant:   4 + 32/64               = 4.5   bits
  with double quant: 4 + 8/64 + 32/(64*256)  ≈ 4.127 bits   (+ one fp32 offset per tensor)

The numbers match bitsandbytes' CPU path byte for byte (codes, absmax, nested absmax, offset),
so bitsandbytes' kernels can consume these tensors (the CUDA path below does); tests/test_quant.py
checks this.

Sharding with FSDP (fsdp.py). FSDP shards a module's parameters, never its buffers, so NF4Linear
keeps its codes and statistics as frozen parameters (requires_grad=False). FSDP1 flattened all
parameters of a unit into one flat tensor of one dtype: uint8 codes could not share it with the
bf16 norms, which is why the QLoRA guide stores them as bfloat16 (bnb_4bit_quant_storage=bfloat16,
two bytes holding four codes). FSDP2 (fully_shard) shards each parameter on its own along dim 0 and
all-gathers mixed dtypes as bytes, so the codes stay uint8; it needs only that every tensor has a
dim 0 (the offset is (1,), not a scalar), that the trainable parameters of a unit share one dtype
(their gradients are reduce-scattered in one buffer: the LoRA weights are all fp32), and that the
weight is read while the unit is gathered: dequantize() reads the parameters when called, in
forward and again in backward. A shard is never dequantized on its own, so blocks may straddle
two ranks' shards; gathered, the bytes are the ones quantize_nf4 wrote.

No cast may touch the NF4 statistics. Module.to(torch.bfloat16), and an FSDP2 mixed-precision
policy (which casts every floating-point parameter when it gathers), would round the fp32 absmax,
nested absmax and offset to bf16, and bitsandbytes reads them as fp32: garbage weights. So
NF4Linear stores their fp32 bits as int32 tensors (`.view(torch.int32)`), which no dtype cast
converts, and views them back as fp32 when it dequantizes.
"""
import functools
import importlib.util
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import replace_module

# NF4: quantiles of N(0, 1) with equal probability mass per bin, normalised to [-1, 1].
# 8 positive values norm.ppf(linspace(o, 0.5, 9)[:-1]), 7 negative -norm.ppf(linspace(o, 0.5,
# 8)[:-1]) and an exact 0 (so zero-padding and zero weights are lossless), all divided by
# norm.ppf(o), where o = 1 - (1/30 + 1/32)/2 = 0.9677083 keeps the outermost quantile finite.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])  # (16,) fp32, sorted
NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2  # (15,) fp32, rounding thresholds
# byte -> (value of its high nibble, value of its low nibble): a (256, 2) fp32 table stored as
# (256,) int64 so that one index_select fetches both values (~10x faster than fancy indexing).
NF4_BYTE_PAIRS = torch.stack([NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)], 1).view(torch.int64).view(-1)


def dynamic_code_8bit() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" code (Dettmers 2015), used for the absmax statistics.

    A sign, a decimal exponent 10^-6 .. 10^0 and a linear fraction that gets more steps as the
    exponent grows: exponent 10^(e-6) covers [0.1, 1] * 10^(e-6) with 2^e bin centres. 127
    positive, 127 negative values, 0 and 1.0; (256,) fp32, sorted.
    """
    values = [torch.tensor([0.0, 1.0])]
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1)
        centres = (edges[:-1] + edges[1:]) / 2.0 * 10.0 ** (e - 6)
        values += [centres, -centres]
    return torch.cat(values).sort().values


DYNAMIC_CODE = dynamic_code_8bit()
DYNAMIC_MIDPOINTS = (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:]) * 0.5
NESTED_BLOCKSIZE = 256
_CHUNK_BLOCKS = 16384  # blocks per chunk: bounds fp32 temporaries to ~4 MB at blocksize 64


def nearest_nf4(scaled: torch.Tensor) -> torch.Tensor:
    """uint8 index of the nearest NF4 code for values in [-1, 1]: the number of midpoints
    strictly below, so a value exactly on a midpoint takes the lower code, like bitsandbytes'
    bucketize(right=False). 15 vectorized compares are ~3x faster than torch.bucketize on CPU."""
    idx = torch.zeros(scaled.shape, dtype=torch.uint8, device=scaled.device)
    for m in NF4_MIDPOINTS.tolist():
        idx += scaled > m
    return idx


@dataclass
class NF4Weight:
    packed: torch.Tensor  # (ceil(n/2),) uint8; element 2i in the high nibble, 2i+1 in the low
    absmax: torch.Tensor  # (nblocks,) fp32, or uint8 indices into DYNAMIC_CODE if double-quantized
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    nested_absmax: torch.Tensor | None = None  # (ceil(nblocks/256),) fp32 scale per absmax block
    offset: torch.Tensor | None = None  # () fp32 mean of the absmax, subtracted before quantizing


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Blockwise NF4-quantize any float tensor (flattened row-major, blocks of `blocksize`)."""
    flat = w.detach().reshape(-1)
    n = flat.numel()
    nfull, tail = divmod(n, blocksize)
    absmax = torch.empty(nfull + (tail > 0), dtype=torch.float32, device=w.device)
    # An odd count is padded with code 7 (0.0): bitsandbytes pads the scaled values with zero.
    codes = torch.full((n + n % 2,), 7, dtype=torch.uint8, device=w.device)
    for b0 in range(0, nfull, _CHUNK_BLOCKS):  # chunks keep peak memory near the 4-bit size
        b1 = min(b0 + _CHUNK_BLOCKS, nfull)
        x = flat[b0 * blocksize:b1 * blocksize].float().view(-1, blocksize)
        absmax[b0:b1] = x.abs().amax(dim=1)
        # Multiply by the fp32 reciprocal (not divide): same rounding as bitsandbytes.
        scaled = (x * (1.0 / absmax[b0:b1].clamp(min=1e-38))[:, None]).clamp_(-1, 1)
        codes[b0 * blocksize:b1 * blocksize] = nearest_nf4(scaled).view(-1)
    if tail:
        # bitsandbytes treats the ragged last block differently: it stores the clamped absmax
        # and divides instead of multiplying by the reciprocal (can differ by 1 ulp).
        x = flat[nfull * blocksize:].float()
        absmax[-1] = x.abs().amax().clamp(min=1e-38)
        scaled = (x / absmax[-1]).clamp(-1, 1)
        codes[nfull * blocksize:n] = nearest_nf4(scaled)
    packed = codes[0::2] << 4 | codes[1::2]
    if not double_quant:
        return NF4Weight(packed, absmax, w.shape, w.dtype, blocksize)
    # The absmax values are all positive and similar: centring them uses the signed code well.
    offset = absmax.mean()
    qabsmax, nested_absmax = _quantize_dynamic_8bit(absmax - offset)
    return NF4Weight(packed, qabsmax, w.shape, w.dtype, blocksize, nested_absmax, offset)


def _quantize_dynamic_8bit(x: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE):
    """8-bit blockwise quantization of a 1-D fp32 tensor with DYNAMIC_CODE -> (uint8 codes, fp32 absmax).

    Mirrors bitsandbytes' CPU kernel, which is *not* exact nearest rounding: it snaps the
    scaled value to a grid of 65536 points on [-1, 1] and rounds that grid point to the
    nearest code, so values that fall between two codes closer than 2/65535 may be off by one.
    """
    n = x.numel()
    blocks = F.pad(x, (0, -n % blocksize)).view(-1, blocksize)  # zero padding leaves absmax unchanged
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax)[:, None]).clamp(-1, 1)
    grid = ((scaled + 1) * 0.5 * 65535 + 0.5).to(torch.int32)  # truncation = the C cast
    grid_value = (2.0 * grid.float()) / 65535 - 1.0
    codes = torch.searchsorted(DYNAMIC_MIDPOINTS.to(x.device), grid_value)  # ties -> lower code
    codes = codes.masked_fill(absmax[:, None] == 0, 0)  # all-zero block: code 0, scale 0
    return codes.view(-1)[:n].to(torch.uint8), absmax


@functools.cache
def tables_on(device: torch.device) -> dict:
    """The code tables on `device`, copied there once: a copy per dequantization would be a blocking
    host-to-device transfer per layer, forward and backward, and the host could never run ahead."""
    return {"nf4": NF4_CODE.to(device), "nf4_pairs": NF4_BYTE_PAIRS.to(device), "dynamic": DYNAMIC_CODE.to(device)}


def absmax_fp32(q: NF4Weight) -> torch.Tensor:
    """(nblocks,) fp32 per-block scales, undoing double quantization if it was used."""
    if q.nested_absmax is None:
        return q.absmax
    scale = q.nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[:q.absmax.numel()]
    return tables_on(scale.device)["dynamic"][q.absmax.long()] * scale + q.offset


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rebuild the weight in `dtype` (default: the original dtype) and original shape."""
    n, bs = q.shape.numel(), q.blocksize
    absmax = absmax_fp32(q)
    pairs = tables_on(q.packed.device)["nf4_pairs"].index_select(0, q.packed.int())  # (ceil(n/2),) int64
    w = pairs.view(torch.float32)[:n]  # (n,) fp32 code values
    nfull = n // bs
    w[:nfull * bs].view(nfull, bs).mul_(absmax[:nfull, None])  # fp32 product, then one rounding to dtype
    w[nfull * bs:].mul_(absmax[nfull:])
    return w.to(dtype or q.dtype).view(q.shape)


def _dequantize_bnb(q: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """Same numbers as dequantize_nf4, from bitsandbytes' fused CUDA kernel (imported only here)."""
    from bitsandbytes.functional import QuantState, dequantize_4bit
    tables = tables_on(q.packed.device)
    state2 = None if q.nested_absmax is None else QuantState(
        q.nested_absmax, code=tables["dynamic"], blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
    state = QuantState(q.absmax, shape=q.shape, code=tables["nf4"], blocksize=q.blocksize,
                       quant_type="nf4", dtype=dtype, offset=q.offset, state2=state2)
    return dequantize_4bit(q.packed.view(-1, 1), state)


HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None


def _dequantize(packed, absmax, nested_absmax, offset, out_features, in_features, blocksize, dtype):
    """NF4Linear's parameters (statistics as int32 bits) -> the (out, in) weight in dtype."""
    f32 = lambda t: None if t is None else t.view(torch.float32)
    q = NF4Weight(packed, f32(absmax) if nested_absmax is None else absmax, torch.Size((out_features, in_features)),
                  dtype, blocksize, f32(nested_absmax), None if offset is None else f32(offset).reshape(()))
    return _dequantize_bnb(q, dtype) if packed.is_cuda and HAVE_BNB else dequantize_nf4(q, dtype)


# The NF4 ops as custom operators: torch.compile sees each as one opaque call, so a block with NF4
# weights compiles without graph breaks (and without tracing the dequantization's table lookups).
@torch.library.custom_op("nanolora::nf4_dequantize", mutates_args=())
def nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
                   offset: torch.Tensor | None, out_features: int, in_features: int, blocksize: int,
                   dtype: torch.dtype) -> torch.Tensor:
    return _dequantize(packed, absmax, nested_absmax, offset, out_features, in_features, blocksize, dtype)


@nf4_dequantize.register_fake
def _(packed, absmax, nested_absmax, offset, out_features, in_features, blocksize, dtype):
    return packed.new_empty((out_features, in_features), dtype=dtype)


# The NF4 matmul: autograd sees a function whose backward rebuilds W instead of keeping it, so no
# full-precision copy of W outlives either call (the QLoRA memory trick). W is frozen: only x
# gets a gradient. transposed=True computes x @ W, the backward's product.
@torch.library.custom_op("nanolora::nf4_matmul", mutates_args=())
def nf4_matmul(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
               offset: torch.Tensor | None, out_features: int, in_features: int, blocksize: int,
               bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    w = _dequantize(packed, absmax, nested_absmax, offset, out_features, in_features, blocksize, x.dtype)
    return x @ w if transposed else F.linear(x, w, bias)  # (..., in) -> (..., out), or back


@nf4_matmul.register_fake
def _(x, packed, absmax, nested_absmax, offset, out_features, in_features, blocksize, bias, transposed):
    return x.new_empty(*x.shape[:-1], in_features if transposed else out_features)


def _nf4_matmul_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[1:5])  # the 4-bit parameters: no copy of anything
    ctx.shape = inputs[5:8]


def _nf4_matmul_backward(ctx, grad):  # grad: (..., out_features) -> (..., in_features)
    return nf4_matmul(grad, *ctx.saved_tensors, *ctx.shape, None, True), *[None] * 9


nf4_matmul.register_autograd(_nf4_matmul_backward, setup_context=_nf4_matmul_setup)


def is_nf4_target(name: str, module: nn.Module) -> bool:
    """Which layers QLoRA stores in NF4: the nn.Linear layers of the transformer blocks (names
    with a "layers" component). Not lm_head, whose rounding would reach every logit, and not the
    embeddings or norms, which are not Linears: they stay in the compute dtype, as in QLoRA."""
    return isinstance(module, nn.Linear) and "layers" in name.split(".")


class NF4Linear(nn.Module):
    """A frozen nn.Linear whose weight (out_features, in_features) is stored as NF4.

    Frozen parameters, 1-D so that FSDP can shard them (the state_dict keys): packed (uint8),
    absmax (uint8 codes when double-quantized, else fp32 bits), plus nested_absmax and offset (1,)
    (fp32 bits) when double-quantized, plus bias if present (the compute dtype). The fp32
    statistics are stored as int32 so that no dtype cast rounds them (see the module docstring).
    """

    def __init__(self, in_features, out_features, bias=False, blocksize=64, double_quant=True,
                 compute_dtype=torch.bfloat16, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.blocksize, self.double_quant, self.compute_dtype = blocksize, double_quant, compute_dtype
        n = in_features * out_features
        nblocks = math.ceil(n / blocksize)
        def frozen(n, dtype=torch.int32):
            return nn.Parameter(torch.zeros(n, dtype=dtype, device=device), requires_grad=False)
        self.packed = frozen(math.ceil(n / 2), torch.uint8)
        self.absmax = frozen(nblocks, torch.uint8 if double_quant else torch.int32)
        self.nested_absmax = frozen(math.ceil(nblocks / NESTED_BLOCKSIZE)) if double_quant else None
        self.offset = frozen(1) if double_quant else None
        self.bias = frozen(out_features, compute_dtype) if bias else None

    @classmethod
    def from_weight(cls, weight, bias=None, blocksize=64, double_quant=True):
        """Quantize weight (out, in); its dtype becomes the compute dtype of dequantize()."""
        out_features, in_features = weight.shape
        q = quantize_nf4(weight, blocksize, double_quant)
        # On "meta" the placeholder parameters cost nothing; every one of them is replaced here.
        m = cls(in_features, out_features, bias is not None, blocksize, double_quant, weight.dtype, "meta")
        frozen = lambda t: None if t is None else nn.Parameter(t, requires_grad=False)
        bits = lambda t: t if t is None or t.dtype == torch.uint8 else t.view(torch.int32)  # fp32 statistics
        m.packed, m.absmax, m.nested_absmax = frozen(q.packed), frozen(bits(q.absmax)), frozen(bits(q.nested_absmax))
        m.offset = None if q.offset is None else frozen(bits(q.offset.reshape(1)))
        m.bias = None if bias is None else frozen(bias.detach().clone())
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize=64, double_quant=True):
        return cls.from_weight(linear.weight, linear.bias, blocksize, double_quant)

    def quantized(self):
        """nf4_matmul's arguments after x: the 4-bit parameters and the shape."""
        return (self.packed, self.absmax, self.nested_absmax, self.offset, self.out_features, self.in_features,
                self.blocksize)

    def dequantize(self, dtype=None) -> torch.Tensor:
        """The full (out, in) weight in `dtype` (default: compute dtype), e.g. to merge LoRA into."""
        return nf4_dequantize(*self.quantized(), dtype or self.compute_dtype)

    def to_linear(self) -> nn.Linear:
        """A frozen nn.Linear holding the dequantized weight (e.g. to merge an adapter into)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.dequantize(), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.clone(), requires_grad=False)
        return linear

    def forward(self, x):  # (..., in_features) -> (..., out_features)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nf4_matmul(x, *self.quantized(), bias, False)

    def extra_repr(self):
        nbytes = sum(p.numel() * p.element_size() for name, p in self.named_parameters() if name != "bias")
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}, nf4_bytes={nbytes}")


def quantize_model(model: nn.Module, blocksize=64, double_quant=True) -> nn.Module:
    """Replace, in place, every layer that is_nf4_target by an NF4Linear."""
    for name, module in list(model.named_modules()):
        if is_nf4_target(name, module):
            replace_module(model, name, NF4Linear.from_linear(module, blocksize, double_quant))
    return model
