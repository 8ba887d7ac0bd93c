"""torch-int8 backend: every linear of the language model and the image side held as int8 weights, one scale per
output row (symmetric, rounded to nearest; a quarter of fp32's memory). A linear's input goes in as bfloat16
and its output comes back in the model's dtype, so the residual stream, norms and attention stay as they were.
Short inputs (a decoding pass) run torch's int8-weight kernel (aten._weight_int8pack_mm, the one torchao's
int8 weight-only layout calls on CPUs; with fp32 inputs it is slower than torch's fp32 product),
longer ones (the prefill) a bfloat16 product with the weight dequantized one layer at a time. Tied token
embeddings read the output layer's int8 table. Eager torch: no conversion, no new dependency.

Sparsity itself does not shrink this further: a CSR weight at 70 % (values and int32 indices) takes more than
int8's quarter of the dense bytes (bench/results/cpu_sparse.md)."""
import torch
from torch import nn
from torch.nn import functional as F

KERNEL_ROWS = 32  # inputs of at most this many rows run the int8 kernel; longer ones are faster dequantized
KERNEL_IN_MULTIPLE = 8  # the kernel reads the input in blocks of 8: other widths give NaN or crash (torch 2.13)


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
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if len(rows) <= KERNEL_ROWS and self.in_features % KERNEL_IN_MULTIPLE == 0:
            out = torch._weight_int8pack_mm(rows.contiguous(), self.qweight, self.scales)
        else:
            out = F.linear(rows, self.qweight.to(torch.bfloat16) * self.scales[:, None])
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
