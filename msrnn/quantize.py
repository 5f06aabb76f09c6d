"""Weight-only int8: every projection's matrix stored as int8 with one scale per output channel.

Decoding one sequence streams every weight once per token, so a step costs the weights' bytes
over the memory bandwidth (docs/performance.md); int8 weights are a quarter of float32's. Each
row j of a projection's W [out, in] is rounded symmetrically to

    s_j = max_i |W_ji| / 127,    Q_ji = round(W_ji / s_j) in [-127, 127],    W ≈ Q * s[:, None]

and the product keeps the scale out of the inner loop:  y = (x Q^T) * s + b.  Activations, the
multi-state and every other weight (norms, the embedding table) stay in the model's dtype.

What is quantized: every `Linear` of the blocks (q/k/v, o, gate/up, down) and the LM head. A tied
LM head (SmolLM2) gets its own int8 copy of the embedding matrix, and the embedding table stays in
float: a step looks up one of its rows, so its bytes do not count per token, and the lookup stays
exact. The model is quantized after loading, by swapping modules (`quantize`), not by editing it.
"""

import torch
import torch.nn.functional as F
from torch import nn

from . import group as groups
from .model import Linear, Transformer, linear

KINDS = ("int8",)            # what `msrnn.load(..., quantize=)` and `--quantize` accept


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
    def of(cls, proj: Linear) -> "Int8Linear":
        """The int8 twin of a float projection (a row-parallel one keeps its group)."""
        return cls(proj.weight, proj.bias, getattr(proj, "group", None))

    def forward(self, x):
        q, s = self.weight, self.scale
        if torch.compiler.is_compiling() and x.device.type == "cpu" and x[..., 0].numel() == 1:
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


def quantized(model) -> bool:
    """Whether `model`'s projections are int8."""
    return isinstance(model.blocks[0].attn.wqkv, Int8Linear)


def quantize(model: Transformer, kind: str = "int8") -> Transformer:
    """The model with every projection (and the LM head) swapped for an Int8Linear, in place.
    The embedding table stays in the model's dtype (a tied head gets its own int8 copy)."""
    if kind not in KINDS:
        raise ValueError(f"quantize={kind!r}: msrnn quantizes weights to {', '.join(KINDS)}; "
                         f"or pass quantize=None for the checkpoint's own weights")
    if quantized(model):
        raise ValueError("the model is already quantized")
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        attn.wqkv, attn.wo = Int8Linear.of(attn.wqkv), Int8Linear.of(attn.wo)
        mlp.w13, mlp.w2 = Int8Linear.of(mlp.w13), Int8Linear.of(mlp.w2)
    # A tied head (lm_head None: logits read the embedding matrix) gets its own int8 copy.
    model.lm_head = Int8Linear.of(model.lm_head) if model.lm_head is not None else \
        Int8Linear(model.embed.weight)
    return model
