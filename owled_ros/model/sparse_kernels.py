"""2:4 linears on NVIDIA's sparse tensor cores: PyTorch's semi-structured sparse layout (cuSPARSELt or
CUTLASS kernels, Ampere and newer). On the CPU sparse products do not beat dense ones for this model's
shapes (bench/cpu_sparse.py), so only CUDA uses it; bench/cuda_sparse.py measures it where a GPU is lent."""
from torch import nn


def is_two_four(weight):
    """Every group of 4 consecutive inputs of every row holds at most 2 nonzeros."""
    return weight.shape[-1] % 4 == 0 and bool(((weight.detach().reshape(-1, 4) != 0).sum(1) <= 2).all())


def to_semi_structured(model):
    """Swap the language model's 2:4 linears to the semi-structured sparse layout, in place. Needs the model
    on a CUDA device in float16 or bfloat16. Returns the swapped linears' names."""
    from torch.sparse import to_sparse_semi_structured

    swapped = []
    for name, module in model.lm.named_modules():
        if isinstance(module, nn.Linear) and module.weight.any() and is_two_four(module.weight):
            module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.detach()), requires_grad=False)
            swapped.append(name)
    return swapped
