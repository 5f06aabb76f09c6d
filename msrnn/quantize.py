"""Weight-only quantization: every projection's matrix stored in fewer bits, swapped in after
loading. Decoding one sequence streams every weight once per token, so a step costs the weights'
bytes over the memory bandwidth (docs/performance.md); fewer bytes, a faster step.

quantize="int8": each row j of a projection's W [out, in] rounded symmetrically, one scale per
output channel (`Int8Linear`):

    s_j = max_i |W_ji| / 127,    Q_ji = round(W_ji / s_j) in [-127, 127],    W ≈ Q * s[:, None]

quantize="int4": llama.cpp's Q4_1 blocks (`GroupLinear`, bits=4). Each group of 32 weights along
a row's input has its own scale d and minimum m, both float16, and 4-bit codes q:

    m = min(w),   d = (max(w) - min(w)) / 15,   q = round((w - m) / d) in 0..15,   w ≈ d q + m

5 bits a weight in the file (16 bytes of codes, two a byte, and 4 of d and m per 32), 5.5 in
memory, where d is held in float32 for the compiled loop. The LM head takes llama.cpp's Q8_0
blocks (bits=8: d = max|w| / 127, q = round(w / d) in [-127, 127], m = 0), as llama.cpp's own
Q4_1 files keep it: the head makes every logit, and in the default model's GGUF it is Q8_0.

The grid is recovered, not approximated. The default model IS its GGUF's Q4_1 (and Q8_0) blocks,
dequantized to float32 (checkpoint/convert.py): w = fl32(d q + m), with q = 0 and q = 15 (Q8_0:
|q| = 127) in every group, as llama.cpp's quantizer makes them. So a group's minimum is m, its
maximum gives d back, and the rounding gives q back: quantizing those floats yields the GGUF's
own blocks, whose dequantization is the float32 checkpoint bit for bit. Each module records
whether that happened (`exact`). Other checkpoints are quantized by the same formulas.

Activations, the multi-state and every other weight (norms, the embedding table) stay in the
model's dtype. A tied LM head (SmolLM2) gets its own quantized copy of the embedding matrix, and
the table stays in float: a step looks up one of its rows, so its bytes do not count per token,
and the lookup stays exact. The model is quantized by swapping modules (`quantize`), from weights
in float32 (or wider) even when the model runs in bfloat16, so that the grid is found.
"""

import torch
import torch.nn.functional as F
from torch import nn

from . import group as groups
from .model import Linear, Transformer, linear

KINDS = ("int8", "int4")     # what `msrnn.load(..., quantize=)` and `--quantize` accept
GROUP = 32                   # int4: weights per group along the input (llama.cpp's block)


def one_row(x) -> bool:
    """Whether this call is a compiled batch-1 step on a CPU, where inductor's own loop streams
    the weights (model.linear): one row, nothing to reuse a weight for."""
    return torch.compiler.is_compiling() and x.device.type == "cpu" and x[..., 0].numel() == 1


def int8_rows(w: torch.Tensor, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] -> (Q int8 [out, in], s float32 [out]) with W ≈ Q * s[:, None], each row
    rounded to nearest over its own symmetric range (an all-zero row gets s = 1, Q = 0).
    group: W is this rank's columns of a row-parallel projection; the range is the whole row's,
    the max over the ranks, so that the ranks quantize as one process would."""
    w = w.detach().float()
    s = groups.largest(w.abs().amax(1), group) / 127
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8), s


class Int8Linear(nn.Module):
    """A projection with int8 weights: y = (x Q^T) * s + b, in x's dtype.

    One row on the CPU, compiled: model.linear's sum of products, which inductor turns into one
    loop that reads each int8 weight once and widens it in registers (no float copy of W).
    Several rows, or eager: bfloat16 and float16 rows go to PyTorch's int8 weight-only matrix
    product (a CPU kernel); otherwise Q is widened to x's dtype for the library's matrix product
    (a prompt's many rows amortize that copy; on CUDA, compiled, inductor fuses it).

    `group`: a row-parallel projection's tensor-parallel group (msrnn.tp.RowLinear): its rows'
    scales are the whole rows', and its partial products are summed over the ranks."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, group=None):
        super().__init__()
        q, s = int8_rows(weight, group)
        self.register_buffer("weight", q)                                # [out, in] int8
        self.register_buffer("scale", s.to(weight.dtype))               # [out]
        self.bias, self.group = bias, group

    @classmethod
    def of(cls, proj: Linear, name: str = "") -> "Int8Linear":
        """The int8 twin of a float projection (a row-parallel one keeps its group)."""
        return cls(proj.weight, proj.bias, getattr(proj, "group", None))

    def forward(self, x):
        q, s = self.weight, self.scale
        if one_row(x):
            y = linear(x, q) * s                                         # the int8 loop
        elif x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu":
            rows = x.reshape(-1, x.shape[-1])                            # [rows, in]
            y = torch._weight_int8pack_mm(rows, q, s).view(*x.shape[:-1], q.shape[0])
        else:
            y = F.linear(x, q.to(x.dtype)) * s
        if self.bias is not None:
            y = y + self.bias
        return y if self.group is None else groups.total(y, self.group)

    def extra_repr(self):
        return f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, int8"


def q4_1(w: torch.Tensor):
    """W [out, in] -> (codes uint8 [out, G, 16], d float16 [out, G], m float16 [out, G]), G =
    in / 32 groups of 32 along the input: w = d q + m, q = round((w - m) / d) in 0..15 with the
    float16 d and m (a group of equal weights: d = 0, q = 0). Two codes a byte, as in a Q4_1
    block: a group's weight j in the low four bits of byte j, weight j + 16 in the high four."""
    g = w.detach().float().view(w.shape[0], -1, GROUP)                   # [out, G, 32]
    lo, hi = g.amin(-1), g.amax(-1)
    d, m = ((hi - lo) / 15).half(), lo.half()
    d32, m32 = d.float()[..., None], m.float()[..., None]
    q = torch.where(d32 > 0, (g - m32) / torch.where(d32 > 0, d32, 1), 0)
    q = q.round().clamp(0, 15).to(torch.uint8)
    return q[..., :GROUP // 2] | (q[..., GROUP // 2:] << 4), d, m


def q8_0(w: torch.Tensor):
    """W [out, in] -> (codes int8 [out, G, 32], d float16 [out, G]): w = d q, d = max|w| / 127,
    q = round(w / d) in [-127, 127], per group of 32 along the input (a Q8_0 block)."""
    g = w.detach().float().view(w.shape[0], -1, GROUP)                   # [out, G, 32]
    d = (g.abs().amax(-1) / 127).half()
    d32 = d.float()[..., None]
    q = torch.where(d32 > 0, g / torch.where(d32 > 0, d32, 1), 0)
    return q.round().clamp(-127, 127).to(torch.int8), d


class GroupLinear(nn.Module):
    """A projection stored in groups of 32 weights along the input, each with a float16 scale d
    (held widened to float32) and offset m: w = d q + m. bits=4: Q4_1 (q in 0..15, two a byte);
    bits=8: Q8_0 (q int8, m=0).

    y_o = sum_g [ d_og sum_j x_gj q_ogj ] + sum_g m_og (sum_j x_gj): the scale multiplies each
    group's dot product once, and the offset only needs the group's sum of x, the same for every
    output row. One row on the CPU, compiled, inductor turns that into one loop that reads each
    code byte once and unpacks it in registers (no float copy of W). Several rows, or eager: W
    dequantized to float32 (exactly the checkpoint's floats when `exact`), then the library's
    matrix product in x's dtype (a prompt's many rows amortize that copy).

    `exact`: whether dequantizing gives back the weights it was made from, bit for bit (a
    checkpoint that was a Q4_1 / Q8_0 GGUF). `group`: a row-parallel projection's
    tensor-parallel group: groups of 32 lie inside a rank's columns, so each rank quantizes its
    own, and the partial products are summed over the ranks."""

    FORMAT = ("codes", "d", "m")               # stored in their own dtypes, whatever the model's

    def __init__(self, weight: torch.Tensor, bias=None, bits: int = 4, name: str = "", group=None):
        super().__init__()
        out, n_in = weight.shape
        if n_in % GROUP:
            share = " on this rank (tensor parallel)" if group is not None else ""
            raise ValueError(f"quantize='int4': {name or 'a projection'} has {n_in} inputs{share}, "
                             f"not a multiple of {GROUP} (int4 stores weights in groups of "
                             f"{GROUP} along the input); use quantize='int8' for this model")
        codes, d, *m = q4_1(weight) if bits == 4 else q8_0(weight)
        self.register_buffer("codes", codes)        # [out, G, 16] uint8 or [out, G, 32] int8
        # The block's float16 scale, widened once here (exactly): the compiled loop reads one d
        # per group, and with d in float16 the whole int4 step took 10-25% longer
        # (docs/performance.md, section 8) to save 2 bytes of every 22.
        self.register_buffer("d", d.float())        # [out, G] float32, each a float16 value
        self.register_buffer("m", m[0] if m else None)   # [out, G] float16
        self.bits, self.shape, self.bias, self.group = bits, (out, n_in), bias, group
        self.exact = torch.equal(self.dequantized(), weight.detach().float())

    @classmethod
    def of(cls, proj: Linear, name: str = "", bits: int = 4) -> "GroupLinear":
        """The grouped twin of a float projection (a row-parallel one keeps its group)."""
        return cls(proj.weight, proj.bias, bits, name, getattr(proj, "group", None))

    def dequantized(self) -> torch.Tensor:
        """W [out, in] in float32: d q + m, computed as the GGUF's own dequantization is."""
        c = self.codes
        w = (torch.cat([c & 15, c >> 4], -1) if self.bits == 4 else c).float()   # [out, G, 32]
        w.mul_(self.d.float()[..., None])      # in place: 5x faster here than `d * q + m`
        return (w if self.m is None else w.add_(self.m.float()[..., None])).view(self.shape)

    def forward(self, x):
        if one_row(x):
            y = self.loop(x)
        else:
            y = F.linear(x, self.dequantized().to(x.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y if self.group is None else groups.total(y, self.group)

    def loop(self, x):
        """The sum of products of one row, for inductor to fuse: x [..., in] -> [..., out]."""
        x = torch.as_strided(x, x.shape, x.stride())   # x once, into memory (model.linear)
        wide = torch.promote_types(x.dtype, torch.float32)
        xg = x.to(wide).view(*x.shape[:-1], 1, -1, GROUP)                # [..., 1, G, 32]
        c, half = self.codes, GROUP // 2
        if self.bits == 4:                              # low nibbles: weights 0..15, high: 16..31
            # Widen each byte once, to int32, before taking its nibbles: AVX-512 has no shift on
            # bytes, so on uint8 lanes `& 15` and `>> 4` become shuffle sequences (perf annotate).
            c = c.to(torch.int32)                                        # [out, G, 16]
            dot = xg[..., :half] * (c & 15).to(wide) + xg[..., half:] * (c >> 4).to(wide)
        else:
            dot = xg * c.to(wide)                                        # [..., out, G, 32]
        y = (dot * self.d.to(wide)[..., None]).sum((-2, -1))             # [..., out]
        if self.m is not None:
            y = y + (xg.sum(-1) * self.m.to(wide)).sum(-1)               # sum_g m_g sum_j x_gj
        return y.to(x.dtype)

    def extra_repr(self):
        return (f"in={self.shape[1]}, out={self.shape[0]}, "
                f"{'Q4_1' if self.bits == 4 else 'Q8_0'} groups of {GROUP}")


def quantized(model) -> bool:
    """Whether `model`'s projections are quantized (int8 or int4)."""
    return isinstance(model.blocks[0].attn.wqkv, (Int8Linear, GroupLinear))


def quantize(model: Transformer, kind: str = "int8", dtype: torch.dtype | None = None):
    """The model with every projection (and the LM head) swapped for a quantized one, in place:
    int8, Int8Linear; int4, GroupLinear Q4_1 (the LM head Q8_0). The embedding table stays in
    float (a tied head gets its own quantized copy). dtype: then every float tensor left (norms,
    the embedding, biases, int8's scales) is cast to it; quantize from float32 weights or wider,
    so that a bfloat16 model's int4 blocks are the checkpoint's own."""
    if kind not in KINDS:
        raise ValueError(f"quantize={kind!r}: msrnn quantizes weights to {', '.join(KINDS)}; "
                         f"or pass quantize=None for the checkpoint's own weights")
    if quantized(model):
        raise ValueError("the model is already quantized")
    make = Int8Linear.of if kind == "int8" else GroupLinear.of
    for i, block in enumerate(model.blocks):
        for part, attr in (("attn", "wqkv"), ("attn", "wo"), ("mlp", "w13"), ("mlp", "w2")):
            parent = getattr(block, part)
            setattr(parent, attr, make(getattr(parent, attr), f"blocks.{i}.{part}.{attr}"))
    # A tied head (lm_head None: logits read the embedding matrix) gets its own quantized copy.
    w = model.lm_head.weight if model.lm_head is not None else model.embed.weight
    model.lm_head = Int8Linear(w) if kind == "int8" else GroupLinear(w, bits=8, name="lm_head")
    if dtype is not None:
        cast(model, dtype)
    return model


def cast(model: nn.Module, dtype: torch.dtype):
    """Every floating parameter and buffer of `model` in `dtype`, except the formats' own (a
    GroupLinear's d and m): what `model.to(dtype)` would do to a quantized model."""
    for module in model.modules():
        keep = module.FORMAT if isinstance(module, GroupLinear) else ()
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is not None and t.is_floating_point() and name not in keep:
                    store[name] = (nn.Parameter(t.to(dtype), requires_grad=False)
                                   if isinstance(t, nn.Parameter) else t.to(dtype))
