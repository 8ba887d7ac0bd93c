"""ALPS (Meng et al., NeurIPS 2024): one-shot pruning as least squares under a sparsity constraint, solved by
ADMM, then the kept weights refitted on their support by conjugate gradients.

With the inputs scaled to unit norm (H = XᵀX scaled to a unit diagonal, the weights by the input norms: the
scaled weights' magnitudes are Wanda's scores), the layer's output error is tr((W - W0) H (W - W0)ᵀ). ADMM
keeps two copies of the weights: W, the least-squares fit (closed form through H's eigendecomposition), and
D, its sparse projection (the largest weights of the whole layer, or of every N:M group); the penalty ρ
tying them grows while the support still changes, until both agree.
"""
import torch

from .sparsity import nm_mask


def keep_mask(weights, sparsity, nm):
    """True for the weights kept: the largest |w| of the whole matrix, or of every N:M group of each row."""
    if nm:
        return ~nm_mask(weights.abs(), *nm)
    magnitudes = weights.abs().flatten()
    removed = int(magnitudes.numel() * sparsity)
    if removed == 0:
        return torch.ones_like(weights, dtype=torch.bool)
    threshold = magnitudes.kthvalue(removed).values  # a selection, several times faster than topk here
    keep = magnitudes > threshold
    short = magnitudes.numel() - removed - int(keep.sum())
    if short > 0:  # ties at the threshold (zeros of inputs never active): keep the first of them
        keep[(magnitudes == threshold).nonzero()[:short, 0]] = True
    return keep.view_as(weights)


def scaled_hessian(xtx, damp):
    """H + damp * mean(diag H) * I scaled to a unit diagonal, the input norms, and the features never active."""
    hessian = xtx.double().clone()
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1
    hessian.diagonal().add_(damp * hessian.diagonal().mean())
    norms = hessian.diagonal().sqrt()
    return hessian / norms[:, None] / norms[None, :], norms, dead


def admm_support(w0, target, hessian, sparsity, nm, rho=0.1, max_iter=300, check_every=3, settle_after=30):
    """ADMM's least-squares weights and the support they settle on, with ρ adapted to how fast it still changes (ALPS's schedule)."""
    eigenvalues, eigenvectors = (v.float() for v in torch.linalg.eigh(hessian))
    inverse = lambda rho: (eigenvectors / (eigenvalues + rho)) @ eigenvectors.T
    hessian_inv, grown = inverse(rho), False
    sparse = w0 * keep_mask(w0, sparsity, nm)
    start, dual, support = sparse, torch.zeros_like(w0), keep_mask(w0, sparsity, nm)
    kept, w = int(support.sum()), w0
    for step in range(max_iter):
        w = (target - dual + rho * sparse) @ hessian_inv
        sparse = w + dual / rho
        sparse = sparse * keep_mask(sparse, sparsity, nm)
        dual = dual + rho * (w - sparse)
        if (step + 1) % check_every:
            continue
        new_support = sparse != 0
        changed = int((new_support != support).sum())
        support = new_support
        if changed > 0.1 * kept:
            rho, grown = rho * 1.3, True
        elif changed > 0.005 * kept:
            rho, grown = rho * 1.2, True
        elif changed and grown:
            rho *= 1.1
        elif grown:
            break
        else:  # ρ too large from the start: the support froze at its first guess; restart with less
            rho /= 5
            sparse, dual = start, torch.zeros_like(w0)
        rho = min(rho, 1e6)
        hessian_inv = inverse(rho)
        if step >= settle_after and changed < 3e-4 * kept:
            break
    return w, keep_mask(w, sparsity, nm)


def refit(w, target, hessian, support, iters=10, rtol=1e-4):
    """Conjugate gradients on every row at once: min tr((W - W0) H (W - W0)ᵀ) with W zero off the support."""
    w = w * support
    residual = (target - w @ hessian) * support
    direction, power = residual, (residual * residual).sum(1)
    stop = rtol * target.norm(dim=1)
    for _ in range(iters):
        step = (direction @ hessian) * support
        alpha = power / (direction * step).sum(1).clamp_min(1e-12)
        w = w + alpha[:, None] * direction
        residual = residual - alpha[:, None] * step
        new_power = (residual * residual).sum(1)
        if (new_power.sqrt() <= stop).all():
            break
        direction, power = residual + (new_power / power.clamp_min(1e-12))[:, None] * direction, new_power
    return w


def alps_(weight, xtx, sparsity=0.0, nm=None, damp=0.01):
    """Prune `weight` (rows x cols) in place. xtx: XᵀX of its calibration inputs (cols x cols).
    sparsity: share of weights removed (unstructured); nm=(n, m): keep n of every m consecutive inputs."""
    if nm and weight.shape[1] % nm[1]:
        raise ValueError(f"N:M {nm[0]}:{nm[1]} needs input features divisible by {nm[1]}, got {weight.shape[1]}")
    hessian, norms, dead = scaled_hessian(xtx, damp)
    w0 = weight.detach().float() * norms.float()[None, :]
    w0[:, dead] = 0
    hessian = hessian.float()
    target = w0 @ hessian
    w, support = admm_support(w0, target, hessian.double(), sparsity, nm)
    w = refit(w, target, hessian, support) / norms.float()[None, :]
    with torch.no_grad():
        weight.copy_(w.to(weight.dtype))
