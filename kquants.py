"""GGUF's k-quants by hand: Q4_K, Q5_K and Q6_K, byte for byte what llama.cpp's llama-quantize writes.

    python merge.py --model_path BASE --adapter_path out/lora --output_dir out/merged --gguf q4_k_m

Its own file because it is its own concern: three 4/5/6-bit formats with their own block layouts,
the scale search llama.cpp runs to fill them, and llama.cpp's choice of which tensor gets which of
them; gguf_export.py writes the file around these bytes. Every block equals what ggml's reference
quantizer (quantize_row_q4_K_ref & co in ggml-quants.c, no importance matrix) writes for the same
fp32 input: tests/test_kquants.py against hashes recorded from llama-quantize (tests/fixtures/).

Super-blocks of 256 weights along a row, cut into sub-blocks that share one fp16 scale d:
    Q4_K  8 sub-blocks of 32: x ~ d * sc_j * q - dmin * m_j, q in 0..15, sc_j and m_j 6-bit  (144 bytes)
    Q5_K  the same with q in 0..31, the fifth bit in a separate 32-byte plane                (176 bytes)
    Q6_K  16 sub-blocks of 16: x ~ d * sc_j * (q - 32), q in 0..63, sc_j signed 8-bit        (210 bytes)
A row that does not split into 256s falls back, as llama-quantize does, to the legacy 32-blocks:
Q5_0 (x ~ d * (q - 16)), Q5_1 (x ~ d * q + m), or Q8_0 (gguf_export.py).

Exactness. llama.cpp builds these loops without -ffast-math: every sum runs left to right and
rounds to fp32 at each step, so `_sum` adds the same terms in the same order (torch.sum would
round differently), each product is written in C's order ((w*l)*l, not w*(l*l)), and
torch.round (halves to even) is ggml's nearest_int. The search is vectorized over every
sub-block of a tensor; only the loops over the 16-32 weights of a sub-block and over the tries of
the search are Python loops. Bytes are little-endian, as on every machine llama.cpp targets.
"""
import torch

QK_K = 256  # weights per super-block
Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, F16 = 6, 7, 8, 12, 13, 14, 1  # ggml type ids
BLOCK = {Q5_0: (32, 22), Q5_1: (32, 24), Q8_0: (32, 34), Q4_K: (QK_K, 144), Q5_K: (QK_K, 176), Q6_K: (QK_K, 210)}
FILE_TYPES = {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}  # general.file_type (llama_ftype)
DEFAULT = {"q4_k_m": Q4_K, "q5_k_m": Q5_K, "q6_k": Q6_K}
FALLBACK = {Q4_K: Q5_0, Q5_K: Q5_1, Q6_K: Q8_0}  # llama-quantize's type for a row not a multiple of 256
GROUP_MAX_EPS = 1e-15  # ggml: a group whose largest magnitude is below this is all zeros
f32 = torch.float32
CHUNK = 1 << 18  # weights encoded at once


# ---- which tensor gets which type --------------------------------------------------------------

def more_bits(i, n):
    """llama.cpp's use_more_bits: the first and last eighth of the layers and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(name, ncols, ftype, c, tied):
    """The ggml type llama-quantize gives the 2-D weight `name` (its GGUF name) with rows of ncols
    in a q4_k_m/q5_k_m/q6_k file of the model with Config c (norms, biases and rope factors stay
    F32: the caller's rule). tied: there is no output.weight, so token_embd is the output layer too.
    attn_v and ffn_down get Q6_K in the layers more_bits picks (llama-quantize counts them in its
    order, layer by layer, so the count is the layer); in a 70B (llama.cpp: 80 layers, for llama
    with grouped-query attention) the other attn_v get Q5_K in q4_k_m."""
    n_layers = c.num_hidden_layers
    is_70b = n_layers == 80 and (c.model_type == "qwen2" or c.num_attention_heads != c.num_key_value_heads)
    t = DEFAULT[ftype]
    layer = int(name.split(".")[1]) if name.startswith("blk.") else None
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        t = Q8_0 if ncols % QK_K else Q6_K
    elif "attn_v.weight" in name and ftype != "q6_k":
        if more_bits(layer, n_layers):
            t = Q6_K
        elif is_70b and t == Q4_K:
            t = Q5_K
    elif "ffn_down" in name and ftype != "q6_k" and more_bits(layer, n_layers):
        t = Q6_K
    if ncols % BLOCK[t][0]:
        t = FALLBACK.get(t, t)
        if ncols % BLOCK[t][0]:
            t = F16  # not even a multiple of 32
    return t


# ---- helpers -----------------------------------------------------------------------------------

def _sum(t, dim=0):
    """The sum over `dim`, added left to right with each step rounded to fp32, as ggml's loops add."""
    s = t.select(dim, 0).clone()
    for i in range(1, t.shape[dim]):
        s += t.select(dim, i)
    return s


def _div(a, t):
    """a / t for a number a, divided as C divides: torch's `a / t` multiplies by 1 / t, rounding twice."""
    return torch.full_like(t, a) / t


def _sqrt(v):
    """fp32 sqrt rounded correctly, as C's sqrtf (torch's vectorized sqrt can be an ulp off): from
    float64, then each neighbour checked against the midpoint, whose square float64 holds exactly."""
    y = v.double().sqrt().float()
    for toward in (torch.inf, 0.0):
        other = torch.nextafter(y, torch.tensor(toward))
        mid = (y.double() + other.double()) / 2
        y = torch.where(mid * mid < v if toward else mid * mid > v, other, y)
    return y


def _fp16(x):
    """fp32 -> (fp16 bytes (..., 2), the fp16 value back in fp32): ggml's GGML_FP32_TO_FP16 rounds
    to nearest even, as torch does."""
    h = x.half()
    return h.view(torch.uint8).reshape(*x.shape, 2), h.float()


def _absmax(x, dim):
    """x (2-D) -> the element of largest magnitude along dim, signed; where v and -v tie, the first
    of them, as ggml's strict compare keeps (amax and amin are several times faster than argmax)."""
    hi, lo = x.amax(dim), x.amin(dim)
    out = torch.where(hi >= -lo, hi, lo)
    tie = ((hi == -lo) & (hi > 0)).nonzero().squeeze(1)
    if len(tie):
        sub = x.index_select(1 - dim, tie)
        out[tie] = sub.gather(dim, sub.abs().argmax(dim, keepdim=True)).squeeze(dim)
    return out


def _first(x, dim, pick):
    """The first element of the largest (pick=torch.argmax) or smallest value along dim, with its sign
    of zero: ggml keeps the first one found by a strict comparison, and -0.0 is written as such."""
    return x.gather(dim, pick(x, dim, keepdim=True)).squeeze(dim)


def _bits(q, shift):
    """(..., k, n) small ints -> (..., n) uint8: row i shifted left by i * shift, or-ed together."""
    out = torch.zeros(q.shape[:-2] + q.shape[-1:], dtype=torch.uint8)
    for i in range(q.shape[-2]):
        out |= q[..., i, :] << (i * shift)
    return out


# ---- the scale searches ------------------------------------------------------------------------

def scale_min_search(x, w, nmax, rmin, rdelta, nstep):
    """ggml's make_qkx2_quants for B sub-blocks at once: x, w (n, B) fp32, the weights of each
    sub-block down a column and their importance. -> scale (B,), offset m (B,) >= 0, L (n, B) in
    0..nmax with x ~ scale * L - m.

    Start from the range [min(x, 0), max(x)] in nmax steps; then try nstep + 1 step counts around
    nmax (rmin + rdelta * i more), each refit by weighted least squares (scale and offset of the
    line through (L, x)), and keep a try that lowers the weighted squared error. An accepted try
    moves the offset the later tries round from, so the tries run one after another."""
    n, b = x.shape
    lo = x.amin(0).clamp(max=0)  # the offset is never positive: 0 is always representable
    hi = x.amax(0)
    sum_w, sum_x = _sum(w), _sum(w * x)
    flat = hi == lo  # all zero: nothing to scale
    iscale = _div(nmax, hi - lo)
    scale = _div(1, iscale)
    l = (x - lo).mul_(iscale).round_().clamp_(0, nmax)
    best = _sum(l.mul_(scale).add_(lo).sub_(x).square_().mul_(w))  # sum of w * (scale * l + lo - x)^2
    chosen = iscale, lo  # what the kept L was rounded with: L is made again from it at the end
    prods = torch.empty(n, 3, b)  # w*l, w*l*l, w*l*x per weight, summed down the columns together
    for i in range(nstep + 1):
        steps = torch.tensor(rmin, dtype=f32) + torch.tensor(rdelta, dtype=f32) * i + nmax  # fp32, in C's order
        iscale = steps / (hi - lo)
        l = (x - lo).mul_(iscale).round_().clamp_(0, nmax)  # (n, B)
        wl = torch.mul(w, l, out=prods[:, 0])
        torch.mul(wl, l, out=prods[:, 1])
        torch.mul(wl, x, out=prods[:, 2])
        sum_l, sum_l2, sum_xl = _sum(prods)  # (3, B)
        det = sum_w * sum_l2 - sum_l * sum_l
        s = (sum_w * sum_xl - sum_x * sum_l) / det
        m = (sum_l2 * sum_x - sum_l * sum_xl) / det
        s = torch.where(m > 0, sum_xl / sum_l2, s)  # the fit wants a positive offset: refit through 0
        m = m.clamp(max=0)
        err = _sum(l.mul_(s).add_(m).sub_(x).square_().mul_(w))
        take = (det > 0) & (err < best)
        chosen = torch.where(take, iscale, chosen[0]), torch.where(take, lo, chosen[1])
        best, scale, lo = torch.where(take, err, best), torch.where(take, s, scale), torch.where(take, m, lo)
    L = (x - chosen[1]).mul_(chosen[0]).round_().clamp_(0, nmax)
    return torch.where(flat, 0.0, scale), -lo, torch.where(flat, 0.0, L)


def scale_search(x, nmax):
    """ggml's make_qx_quants (rmse_type 1: importance x^2) for B sub-blocks: x (n, B) fp32 ->
    scale (B,), L (n, B) in 0..2*nmax-1 with x ~ scale * (L - nmax).

    The scale puts the largest magnitude at -nmax; 18 more tries with nmax -/+ 0.1..0.9, each refit
    by weighted least squares, keep the one that explains most of sum(w x^2) (the largest
    sumlx^2 / suml2, compared as ggml does, in turn). The tries do not depend on each other: all
    19 roundings are made at once and compared after."""
    mx = _absmax(x, 0)
    zero = mx.abs() < GROUP_MAX_EPS
    tries = [0] + list(range(-9, 0)) + list(range(1, 10))
    steps = torch.stack([nmax + torch.tensor(0.1, dtype=f32) * i for i in tries])  # (19,) fp32
    iscale = -steps[:, None] / mx  # (19, B)
    w = x * x
    wx = w * x
    sumlx, suml2 = torch.zeros_like(iscale), torch.zeros_like(iscale)  # (19, B)
    for xi, wi, wxi in zip(x, w, wx):  # down the sub-blocks: ((w x) l) and ((w l) l) as in C
        l = (iscale * xi).round_().clamp_(-nmax, nmax - 1)
        sumlx += l * wxi
        suml2 += (l * wi).mul_(l)
    scale = torch.where(suml2[0] != 0, sumlx[0] / suml2[0], 0.0)
    best, pick = scale * sumlx[0], iscale[0]
    for t in range(1, len(tries)):
        take = (suml2[t] > 0) & (sumlx[t] * sumlx[t] > best * suml2[t])
        scale = torch.where(take, sumlx[t] / suml2[t], scale)
        best = torch.where(take, scale * sumlx[t], best)
        pick = torch.where(take, iscale[t], pick)
    L = (pick * x).round_().clamp_(-nmax, nmax - 1) + nmax
    return torch.where(zero, 0.0, scale), torch.where(zero, 0.0, L)


# ---- the blocks ----------------------------------------------------------------------------------

def _q45_k(x, nmax, rmin, rdelta, nstep):
    """The part Q4_K and Q5_K share. x (NB, 256) fp32 -> d, dmin bytes (NB, 2), the 12 bytes of
    6-bit scales and offsets (NB, 12), L (NB, 256) in 0..nmax."""
    nb = x.shape[0]
    sub = x.reshape(-1, 32).T.contiguous()  # (32, NB*8): a sub-block per column
    av = _sqrt(_sum(sub * sub) / 32)
    scales, mins, L = scale_min_search(sub, av + sub.abs(), nmax, rmin, rdelta, nstep)
    scales, mins, L = scales.view(nb, 8), mins.view(nb, 8), L.T.reshape(nb, 8, 32)
    # the 8 scales and 8 offsets of a super-block as 6-bit fractions of the largest (>= 0) of each
    max_scale, max_min = (torch.where(m > 0, m, 0.0) for m in (scales.amax(1), mins.amax(1)))  # +0 when none is
    inv_scale = torch.where(max_scale > 0, _div(63, max_scale), 0.0)
    inv_min = torch.where(max_min > 0, _div(63, max_min), 0.0)
    ls = ((inv_scale[:, None] * scales).round().to(torch.int32) & 255).clamp(max=63).to(torch.uint8)  # C's uint8_t
    lm = ((inv_min[:, None] * mins).round().to(torch.int32) & 255).clamp(max=63).to(torch.uint8)
    d_bytes, d = _fp16(max_scale / 63)
    dmin_bytes, dmin = _fp16(max_min / 63)
    # round again with the scales as stored; a sub-block whose scale stored as 0 keeps the search's L
    dj, mj = (d[:, None] * ls)[..., None], (dmin[:, None] * lm)[..., None]  # (NB, 8, 1)
    q = ((x.view(nb, 8, 32) + mj) / dj).round_().clamp_(0, nmax)
    L = torch.where(dj == 0, L, q).to(torch.uint8).reshape(nb, QK_K)
    # bytes 0-3: scales 0-3 (6 bits) + top 2 bits of scales 4-7; 4-7: the same for the offsets;
    # 8-11: low 4 bits of scale 4-7 | low 4 bits of offset 4-7 << 4
    packed = torch.cat([ls[:, :4] | (ls[:, 4:] >> 4) << 6, lm[:, :4] | (lm[:, 4:] >> 4) << 6,
                        (ls[:, 4:] & 15) | (lm[:, 4:] & 15) << 4], 1)
    return torch.cat([d_bytes, dmin_bytes], 1), packed, L


def quantize_q4_k(x):
    """(NB, 256) fp32 -> (NB, 144) uint8: d, dmin (fp16), scales (12), 128 bytes of 4-bit q, each 64
    weights as 32 bytes: weight j in the low nibble of byte j, weight 32 + j in the high one."""
    head, scales, L = _q45_k(x, 15, -1.0, 0.1, 20)
    L = L.view(-1, 4, 2, 32)
    return torch.cat([head, scales, (L[:, :, 0] | L[:, :, 1] << 4).flatten(1)], 1)


def quantize_q5_k(x):
    """(NB, 256) fp32 -> (NB, 176) uint8: d, dmin, scales (12), the fifth bits (32: bit k of byte j is
    weight 32k + j), the low nibbles (128, laid out as Q4_K's)."""
    head, scales, L = _q45_k(x, 31, -0.5, 0.1, 15)
    L = L.view(-1, 8, 32)
    low = (L & 15).view(-1, 4, 2, 32)
    return torch.cat([head, scales, _bits(L >> 4, 1), (low[:, :, 0] | low[:, :, 1] << 4).flatten(1)], 1)


def quantize_q6_k(x):
    """(NB, 256) fp32 -> (NB, 210) uint8: 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8
    scales, d (fp16). Each 128 weights: low nibbles of weights l and 64 + l in byte l, of 32 + l
    and 96 + l in byte 32 + l; the top two bits of l, 32 + l, 64 + l, 96 + l in byte l of qh."""
    nb = x.shape[0]
    sub = x.reshape(-1, 16).T.contiguous()  # (16, NB*16)
    scales, L = scale_search(sub, 32)
    scales, L = scales.view(nb, 16), L.T.reshape(nb, 16, 16)
    max_scale = _absmax(scales, 1)
    zero = max_scale.abs() < GROUP_MAX_EPS
    iscale = _div(-128, max_scale)
    d_bytes, d = _fp16(_div(1, iscale))
    sc = (iscale[:, None] * scales).round().clamp(max=127)  # (NB, 16), -128..127
    dj = (d[:, None] * sc)[..., None]
    q = (x.view(nb, 16, 16) / dj).round_().clamp_(-32, 31) + 32
    L = torch.where(dj == 0, L, q).to(torch.uint8).reshape(nb, 2, 4, 32)  # halves of 128, quarters of 32
    lo, hi = L & 15, L >> 4
    ql = torch.cat([lo[:, :, 0] | lo[:, :, 2] << 4, lo[:, :, 1] | lo[:, :, 3] << 4], 2).flatten(1)
    qh = _bits(hi, 2).flatten(1)
    out = torch.cat([ql, qh, sc.to(torch.int8).view(torch.uint8), d_bytes], 1)
    return torch.where(zero[:, None], 0, out).to(torch.uint8)  # an all-zero super-block: all-zero bytes


def quantize_q5_0(x):
    """(N, 32) fp32 -> (N, 22) uint8: d (fp16) = the largest magnitude (signed) / -16, the fifth bits
    (4 bytes: bit j is weight j), 16 bytes: weight j in the low nibble, 16 + j in the high one."""
    mx = _absmax(x, 1)
    mx = torch.where(mx == 0, 0.0, mx)  # an all-zero block: +0, as ggml starts from
    d = mx / -16
    inv = torch.where(d != 0, _div(1, d), 0.0)
    q = (x * inv[:, None] + 16.5).clamp_(max=31).to(torch.uint8)  # the cast truncates, as C's (int8_t)
    return torch.cat([_fp16(d)[0], _bits((q >> 4).view(-1, 4, 8).transpose(1, 2), 1),
                      q[:, :16] & 15 | (q[:, 16:] & 15) << 4], 1)


def quantize_q5_1(x):
    """(N, 32) fp32 -> (N, 24) uint8: d = (max - min) / 31, m = min (fp16 each), fifth bits, nibbles
    (as Q5_0)."""
    lo, hi = _first(x, 1, torch.argmin), _first(x, 1, torch.argmax)
    d = (hi - lo) / 31
    inv = torch.where(d != 0, _div(1, d), 0.0)
    q = ((x - lo[:, None]) * inv[:, None] + 0.5).to(torch.uint8)  # truncated, as C's (uint8_t)
    return torch.cat([_fp16(d)[0], _fp16(lo)[0], _bits((q >> 4 & 1).view(-1, 4, 8).transpose(1, 2), 1),
                      q[:, :16] & 15 | (q[:, 16:] & 15) << 4], 1)


ENCODERS = {Q5_0: quantize_q5_0, Q5_1: quantize_q5_1, Q4_K: quantize_q4_k, Q5_K: quantize_q5_k, Q6_K: quantize_q6_k}


def quantize(x, ggml_type):
    """(..., n) float tensor, n a multiple of the type's block -> uint8 (..., n / block * bytes)."""
    n, _ = BLOCK[ggml_type]
    blocks = x.detach().to("cpu", f32).reshape(-1, n)
    parts = blocks.split(max(1, CHUNK // n))  # a few MB of temporaries at a time, which stay in cache
    return torch.cat([ENCODERS[ggml_type](p) for p in parts]).reshape(*x.shape[:-1], -1)
