"""torch-int8 backend: every linear of the language model and the image side held as int8 weights, one scale per
output row (symmetric, rounded to nearest; a quarter of fp32's memory). A linear's output comes back in the
model's dtype, so the residual stream, norms and attention stay as they were.
Short inputs (a decoding pass) run torch's int8-weight kernel (aten._weight_int8pack_mm, the one torchao's
int8 weight-only layout calls on CPUs; with fp32 inputs it is slower than torch's fp32 product). Longer
ones (the prefill, the image side) multiply a dequantized weight: in bfloat16 on CPUs with bfloat16
instructions (AVX-512 BF16, AMX), else in fp32, dequantized a slice at a time into one small per-thread
buffer (without those instructions a bfloat16 product takes about 7x fp32's time, and a freshly allocated
fp32 copy of the weight about as long as the product). Tied token embeddings read the output layer's int8
table. Eager torch: no conversion, no new dependency.

Sparsity itself does not shrink this further: a CSR weight at 70 % (values and int32 indices) takes more than
int8's quarter of the dense bytes (bench/results/cpu_sparse.md)."""
import threading

import torch
from torch import nn
from torch.nn import functional as F

KERNEL_ROWS = 32  # inputs of at most this many rows run the int8 kernel; longer ones are faster dequantized
KERNEL_IN_MULTIPLE = 16  # other input widths give wrong sums, NaN or a crash (torch 2.13: 200 and 216 do, 192 and 208 not)
BF16_PRODUCT = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
SLICE_WEIGHTS = 1 << 20  # fp32 weights dequantized at a time (4 MB): a whole layer but the output layer's
_scratch = threading.local()


def dequantized_product(rows, qweight, scales):
    """rows (fp32) @ (qweight * scales).T, the weight dequantized a slice of output rows at a time."""
    out_features, in_features = qweight.shape
    step = min(out_features, max(1, SLICE_WEIGHTS // in_features))
    if getattr(_scratch, "buffer", None) is None or len(_scratch.buffer) < step * in_features:
        _scratch.buffer = torch.empty(max(SLICE_WEIGHTS, step * in_features))
    out = torch.empty(len(rows), out_features)
    for start in range(0, out_features, step):
        weight = qweight[start : start + step]
        dequantized = _scratch.buffer[: weight.numel()].view_as(weight).copy_(weight)
        torch.mm(rows, dequantized.T, out=out[:, start : start + len(weight)])
    return out.mul_(scales)


class Int8Linear(nn.Module):
    def __init__(self, weight, bias=None):
        super().__init__()
        weight = weight.detach().float()
        scales = weight.abs().amax(1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        self.register_buffer("qweight", torch.round(weight / scales[:, None]).to(torch.int8))
        self.register_buffer("scales", scales.to(torch.bfloat16))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.out_features, self.in_features = weight.shape

    def forward(self, x):
        rows = x.reshape(-1, self.in_features)
        if len(rows) <= KERNEL_ROWS and self.in_features % KERNEL_IN_MULTIPLE == 0:
            out = torch._weight_int8pack_mm(rows.to(torch.bfloat16).contiguous(), self.qweight, self.scales)
        elif BF16_PRODUCT:
            out = F.linear(rows.to(torch.bfloat16), self.qweight.to(torch.bfloat16) * self.scales[:, None])
        else:
            out = dequantized_product(rows.float(), self.qweight, self.scales.float())
        out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias


class Int8Embedding(nn.Module):
    """Token embeddings read from a tied output layer's int8 table."""

    def __init__(self, table, dtype):
        super().__init__()
        self.table, self.dtype = table, dtype

    def forward(self, ids):
        return (self.table.qweight[ids] * self.table.scales[ids, None]).to(self.dtype)


def quantize(model):
    """Swap the linears of model.lm and model.vision for Int8Linear, in place; tied token embeddings read the
    output layer's table (untied ones stay as they are). Returns how many linears were swapped."""
    lm = model.lm
    embeddings, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    tied = head is not None and head.weight is embeddings.weight
    swapped = 0
    for part in (lm, model.vision):
        for parent in list(part.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, Int8Linear(child.weight, child.bias))
                    swapped += 1
    if tied:
        lm.set_input_embeddings(Int8Embedding(lm.get_output_embeddings(), embeddings.weight.dtype))
    return swapped
