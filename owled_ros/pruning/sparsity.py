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
    """Share of the pooled scores (all linear layers of a block) above m_factor x their mean."""
    pooled = torch.cat([s.flatten() for s in scores])
    return (pooled > m_factor * pooled.mean()).float().mean().item()


def owl_allocation(ratios, target, lam, weights=None, floor=0.0, ceiling=0.99):
    """Per-block sparsity from outlier ratios, as OWL does it: min-max scale the ratios to [0, 2*lam],
    S_l = S - (D'_l - mean D'). Blocks with more outliers get lower sparsity. Deviations are then shrunk
    (if needed) to stay within [S - lam, S + lam], clipped to [floor, ceiling], and the parameter-weighted
    mean made exactly S. Returns (sparsities, the unweighted mean)."""
    ratios = np.asarray(ratios, dtype=np.float64)
    weights = np.ones_like(ratios) if weights is None else np.asarray(weights, dtype=np.float64)
    spread = ratios.max() - ratios.min()
    scaled = np.zeros_like(ratios) if spread == 0 else (ratios - ratios.min()) / spread * 2 * lam
    deviation = np.average(scaled, weights=weights) - scaled
    largest = np.abs(deviation).max()
    if largest > lam:
        deviation *= lam / largest
    low, high = max(floor, target - lam), min(ceiling, target + lam)
    sparsities = np.clip(target + deviation, low, high)
    for _ in range(100):  # clipping moves the weighted mean; spread the residual over the unclipped blocks
        residual = target - np.average(sparsities, weights=weights)
        free = (sparsities > low) & (sparsities < high)
        if abs(residual) < 1e-12 or not free.any():
            break
        sparsities[free] += residual * weights.sum() / weights[free].sum()
        sparsities = np.clip(sparsities, low, high)
    return sparsities.tolist(), float(sparsities.mean())


def owl_nm_allocation(ratios, n, m):
    """N:M with outlier weighting: the quarter of blocks with most outliers keep n+1 of m, the quarter
    with fewest keep n-1 (within 1..m-1), the rest n; the mean N stays exactly n."""
    order = np.argsort(ratios)
    shift = len(ratios) // 4 if 2 <= n <= m - 2 else 0
    kept = np.full(len(ratios), n)
    if shift:
        kept[order[:shift]] = n - 1
        kept[order[-shift:]] = n + 1
    return kept.tolist()
