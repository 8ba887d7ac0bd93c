"""Scores, masks and the outlier-weighted layerwise sparsity allocation (OWL)."""
import numpy as np
import torch


def wanda_scores(weight, input_sq_norm):
    """|W_ij| * ||X_j||_2, with input_sq_norm the per-input-feature sum of squares over calibration tokens."""
    return weight.abs() * input_sq_norm.sqrt().to(weight.dtype)[None, :]


def row_mask(scores, sparsity):
    """Boolean mask of weights to remove: the int(cols * sparsity) lowest scores of every row."""
    remove = int(scores.shape[1] * sparsity)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if remove:
        mask.scatter_(1, scores.topk(remove, dim=1, largest=False).indices, True)
    return mask


def row_ranks(scores):
    """Each score's rank in its row, 0 the lowest: `ranks < k` removes what row_mask removes at k / cols
    (ties aside), for any k, without another selection."""
    rows, cols = scores.shape
    dtype = torch.int16 if cols <= torch.iinfo(torch.int16).max else torch.int32
    ranks = torch.empty(rows, cols, dtype=dtype)
    ranks.scatter_(1, scores.argsort(dim=1), torch.arange(cols, dtype=dtype).expand(rows, cols))
    return ranks


def nm_mask(scores, n, m):
    """Mask that keeps the n highest scores of every m consecutive inputs of each row."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M {n}:{m} needs input features divisible by {m}, got {cols}")
    groups = scores.reshape(rows, cols // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, groups.topk(m - n, dim=2, largest=False).indices, True)
    return mask.reshape(rows, cols)


def outlier_ratio(scores, m_factor):
    """Share of the pooled scores (e.g. all linear layers of a block) above m_factor x their mean."""
    pooled = torch.cat([s.flatten() for s in scores])
    return (pooled > m_factor * pooled.mean()).float().mean().item()


def owl_allocation(ratios, target, lam, weights=None, floor=0.0, ceiling=0.99):
    """Per-block sparsity from outlier ratios as OWL's published code does it: min-max scale the ratios to
    [0, 2*lam] (D'), S_l = S - (D'_l - mean D'), so blocks with more outliers get lower sparsity and the
    band is exactly 2*lam wide. The mean is parameter-weighted (blocks of unequal size), which makes the
    achieved sparsity S; OWL's blocks are all the same size, where this is its plain mean. Only a band that
    leaves [floor, ceiling] is clipped, the residual spread over the unclipped blocks.
    Returns (sparsities, the unweighted mean)."""
    ratios = np.asarray(ratios, dtype=np.float64)
    weights = np.ones_like(ratios) if weights is None else np.asarray(weights, dtype=np.float64)
    spread = ratios.max() - ratios.min()
    scaled = np.zeros_like(ratios) if spread == 0 else (ratios - ratios.min()) / spread * 2 * lam
    sparsities = np.clip(target - (scaled - np.average(scaled, weights=weights)), floor, ceiling)
    for _ in range(100):  # clipping moves the weighted mean; spread the residual over the unclipped blocks
        residual = target - np.average(sparsities, weights=weights)
        free = (sparsities > floor) & (sparsities < ceiling)
        if abs(residual) < 1e-12 or not free.any():
            break
        sparsities[free] += residual * weights.sum() / weights[free].sum()
        sparsities = np.clip(sparsities, floor, ceiling)
    return sparsities.tolist(), float(sparsities.mean())


def heavy_tail_alpha(weight):
    """Power-law exponent of the tail of the weight's eigenvalue spectrum (eigenvalues of WᵀW), as
    AlphaPruning (Lu et al., NeurIPS 2024) fits it: Hill's estimator over the upper half of the spectrum."""
    eigenvalues = torch.linalg.svdvals(weight.float()).square().sort().values
    eigenvalues = eigenvalues[eigenvalues > 1e-5]
    tail = torch.log(eigenvalues[len(eigenvalues) // 2:].double())
    return 1 + len(tail) / float((tail - tail[0]).sum())


def nm_selection(layers, target, n, m):
    """Hardware N:M with outlier weighting: which linear layers get the N:M pattern so that the removed
    weights reach `target` of all, the rest staying dense. layers: [(key, numel, rank)], rank ordering
    layers from fewest outliers (pruned first) to most (kept dense). Layers are added in that order until
    the target is met; the result overshoots it by less than the last layer's share."""
    total = sum(numel for _, numel, _ in layers)
    removed_share = 1 - n / m
    if target > removed_share + 1e-12:
        raise ValueError(f"sparsity {target:g} is above what {n}:{m} removes ({removed_share:g})")
    chosen, removed = set(), 0.0
    for key, numel, _ in sorted(layers, key=lambda layer: layer[2]):
        if removed >= target * total - 1e-9:
            break
        chosen.add(key)
        removed += numel * removed_share
    return chosen
