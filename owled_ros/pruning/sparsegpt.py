"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning with optimal-brain-surgeon reconstruction.

For a linear layer with weight W (rows x cols) and calibration inputs X (tokens x cols), H = XᵀX. Columns
are visited left to right in blocks; within a block the mask is chosen by the saliency w² / [H⁻¹]²_jj, and
each pruned (or kept) column's error is propagated to the columns not yet visited through the upper
Cholesky factor of H⁻¹, so the remaining weights compensate for the removed ones.
"""
import torch


def inverse_hessian_factor(xtx, damp):
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)⁻¹, and the input features never active."""
    hessian = xtx.double().clone()
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1
    hessian.diagonal().add_(damp * hessian.diagonal().mean())
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(hessian))
    return torch.linalg.cholesky(inverse, upper=True).float(), dead


def block_mask(weights, inverse_diag, sparsity, nm):
    """Unstructured mask of one column block: the int(numel * sparsity) lowest saliencies of the block."""
    saliency = weights ** 2 / inverse_diag[None, :] ** 2
    mask = torch.zeros_like(weights, dtype=torch.bool)
    remove = int(weights.numel() * sparsity) if nm is None else 0
    if remove:
        mask.view(-1)[saliency.flatten().topk(remove, largest=False).indices] = True
    return mask


def sparsegpt_(weight, xtx, sparsity=0.0, nm=None, blocksize=128, damp=0.01):
    """Prune `weight` (rows x cols) in place. xtx: XᵀX of its calibration inputs (cols x cols).
    sparsity: share of weights removed (unstructured); nm=(n, m): keep n of every m consecutive inputs."""
    if nm and weight.shape[1] % nm[1]:
        raise ValueError(f"N:M {nm[0]}:{nm[1]} needs input features divisible by {nm[1]}, got {weight.shape[1]}")
    if nm and blocksize % nm[1]:
        raise ValueError(f"SparseGPT block size {blocksize} is not a multiple of M={nm[1]}")
    factor, dead = inverse_hessian_factor(xtx, damp)
    w = weight.detach().float().clone()
    w[:, dead] = 0
    cols = w.shape[1]
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        block, inverse = w[:, start:end].clone(), factor[start:end, start:end]
        diag = inverse.diagonal()
        mask = block_mask(block, diag, sparsity, nm)
        errors = torch.zeros_like(block)
        for i in range(end - start):
            if nm and i % nm[1] == 0:  # N:M: choose the group's mask from the weights as updated so far
                saliency = block[:, i:i + nm[1]] ** 2 / diag[None, i:i + nm[1]] ** 2
                group = saliency.topk(nm[1] - nm[0], dim=1, largest=False).indices
                mask[:, i:i + nm[1]].scatter_(1, group, True)
            column = block[:, i]
            kept = column.masked_fill(mask[:, i], 0)
            errors[:, i] = (column - kept) / diag[i]
            block[:, i:] -= errors[:, i:i + 1] * inverse[i:i + 1, i:]
            block[:, i] = kept
        w[:, start:end] = block
        w[:, end:] -= errors @ factor[start:end, end:]
    with torch.no_grad():
        weight.copy_(w.to(weight.dtype))
