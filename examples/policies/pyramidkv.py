"""PyramidKV (Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
Information Funneling"), over TOVA: lower layers keep more states than upper ones, the budgets
falling linearly from (1 + spread) k at the bottom layer to (1 - spread) k at the top,

    b_l = k + round(spread k (L - 1 - 2 l) / (L - 1)),

which sum to L k: the same memory as TOVA(k). Each layer evicts as TOVA does."""

from dataclasses import dataclass

from msrnn.policies import TOVA, register


@register("pyramidkv", "PyramidKV over TOVA: budgets falling by layer, the total of TOVA(k)")
@dataclass(frozen=True, repr=False)
class PyramidKV(TOVA):
    spread: float = 0.5

    def budget(self, layer, layers):
        if layers == 1:
            return self.size
        step = self.spread * self.size * (layers - 1 - 2 * layer) / (layers - 1)
        return self.size + round(step)      # round(-x) = -round(x): the total is exactly L k
