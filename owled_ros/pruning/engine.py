"""Sequential block-by-block pruning (Wanda / SparseGPT style) with OWL's outlier-weighted allocation.

For each component (vision blocks, LM blocks; T5: encoder then decoder) the calibration samples are run
through the model once to capture the first block's input and every block's other arguments (never a KV
cache); then the blocks are processed in order: collect each linear's input statistics (per-feature
norms; XᵀX for SparseGPT), prune every linear to its planned sparsity or N:M pattern, recompute the
block's outputs with the pruned weights and feed them to the next block. OWL first runs the dense model
once to measure each block's outlier ratio. Memory stays near one block's activations.
"""
import contextlib
import logging
import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .alps import alps_
from .sparsegpt import sparsegpt_
from .sparsity import (heavy_tail_alpha, nm_mask, nm_selection, outlier_ratio, owl_allocation, row_mask, row_ranks,
                       wanda_scores)

log = logging.getLogger(__name__)
PRUNERS = ("magnitude", "wanda", "sparsegpt", "alps")
RECONSTRUCTING = {"sparsegpt": sparsegpt_, "alps": alps_}  # pruners that refit the kept weights from XᵀX
ALLOCATIONS = ("uniform", "owl", "alpha")
OUTLIER_RATIOS = ("per-layer", "pooled")
# searched where M or lambda is left to the calibration data (None): around OWL's published defaults
DEFAULT_M, DEFAULT_LAM = 5.0, 0.08
M_GRID = (3.0, 5.0, 7.0, 10.0)
LAM_GRID = (0.02, 0.05, 0.08, 0.12, 0.2)
SEARCH_SAMPLES = 8  # calibration samples scoring each point (the loss only ranks the points)


@dataclass
class PruneSpec:
    """What to prune and how. pruner: which weights go within a layer; allocation: how much each block
    keeps (uniform; OWL's outlier-weighted layerwise sparsity; or AlphaPruning's, from the heavy tails of
    the weights' spectra, which needs no data), the band 2 * lam wide for both; nm=(n, m): the N:M pattern, on every
    pruned layer. With nm and an OWL allocation, a target below 1 - n/m keeps the most outlier-heavy
    layers dense; outlier_ratio: per block, pooled over its linears or the mean of per-linear ratios.
    m_factor or lam None: chosen from the calibration data by prune_model (search_allocation), which writes
    the choice here and every point it scored into `search`."""
    pruner: str
    allocation: str
    targets: dict  # component group ("llm", "vision") -> sparsity
    nm: tuple = None  # (n, m)
    m_factor: float = DEFAULT_M
    lam: float = DEFAULT_LAM
    outlier_ratio: str = "per-layer"
    search: list = None

    def __post_init__(self):
        for value, allowed, what in ((self.pruner, PRUNERS, "pruner"), (self.allocation, ALLOCATIONS, "allocation"),
                                     (self.outlier_ratio, OUTLIER_RATIOS, "outlier ratio")):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")
        if self.lam is not None and not 0 < self.lam < 0.5:
            raise ValueError(f"OWL lambda {self.lam} is outside (0, 0.5)")
        if self.m_factor is not None and not (math.isfinite(self.m_factor) and self.m_factor > 0):
            raise ValueError(f"outlier threshold M {self.m_factor} must be a finite number above 0")
        if self.nm:
            n, m = self.nm
            for group, target in self.targets.items():
                if target > 1 - n / m + 1e-9:
                    raise ValueError(f"{group} sparsity {target:g} is above what {n}:{m} removes ({1 - n / m:g})")
                if self.allocation != "owl" and target < 1 - n / m - 1e-9:
                    raise ValueError(f"{group} sparsity {target:g} below {1 - n / m:g} with {n}:{m} keeps some layers "
                                     f"dense: that needs the owl allocation to choose them")

    @property
    def outlier_weighted(self):
        return self.allocation == "owl"

    def candidates(self):
        """(M values, lambda values) to score: the fixed value of each, or its grid where it is left open. M
        matters to OWL only; lambda to a band (not to N:M, whose dense layers OWL picks by rank)."""
        ms = [self.m_factor] if self.m_factor is not None or not self.outlier_weighted else list(M_GRID)
        lams = [self.lam] if self.lam is not None or self.nm or self.allocation == "uniform" else list(LAM_GRID)
        return ms, lams

    @property
    def searched(self):
        return any(len(values) > 1 for values in self.candidates())

    @property
    def needs_activations(self):
        return self.pruner != "magnitude"

    @property
    def needs_hessian(self):
        return self.pruner in RECONSTRUCTING


@dataclass
class Outliers:
    """Outlier ratios of one block: over all its linears' scores pooled, and per linear."""
    pooled: float
    per_layer: dict

    def block_ratio(self, kind):
        return self.pooled if kind == "pooled" else float(np.mean(list(self.per_layer.values())))


@dataclass
class BlockRecord:
    component: str
    index: int
    target: float
    outlier_ratio: float = None
    nm: tuple = None
    layers: dict = field(default_factory=dict)  # linear name -> (zeros, numel)


class InputStats:
    """Calibration inputs of one layer as rows of its matrix's input features: per-feature sum of squares
    (Wanda), and XᵀX (SparseGPT)."""

    def __init__(self, module, hessian):
        self.module, self.sq, self.xtx, self.hessian = module, 0, 0, hessian

    def add(self, x):
        x = input_rows(self.module, x.detach()).float()
        self.sq = self.sq + (x * x).sum(0)
        if self.hessian:
            self.xtx = self.xtx + x.T @ x


class StopForward(Exception):
    pass


def prunable(block):
    """The layers pruned as matrices: linears, and convolutions as linears over their unfolded inputs (a
    weight out x in·kh·kw). Depthwise and other grouped convolutions stay dense: each output sees only its
    own few inputs, and they hold a small share of a CNN's weights."""
    return {name: module for name, module in block.named_modules()
            if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)}


def matrix(module):
    """The layer's weight as (outputs, input features): a view, so pruning it prunes the layer."""
    return module.weight.view(module.weight.shape[0], -1)


def input_rows(module, x):
    """A layer's input as (tokens, input features) matching matrix(module): a convolution's input unfolded
    into its receptive fields (channel-major, then kernel row and column, as the weight is laid out)."""
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise ValueError(f"cannot unfold the input of {module}: only explicit zero padding is supported")
        x = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride).transpose(1, 2)
    return x.reshape(-1, x.shape[-1])


def group_of(component):
    return component.split(".")[0]


def target_of(component, targets):
    """A component's target sparsity: its own ('vision.encoder'), else its group's ('vision'), else None."""
    return targets.get(component, targets.get(group_of(component)))


def collect_stats(block, stats, hessian):
    """Hooks that fill stats (a dict) with an InputStats per prunable layer of block as it runs; their handles."""
    handles = []
    for name, module in prunable(block).items():
        stats[name] = InputStats(module, hessian)
        handles.append(module.register_forward_hook(lambda _, args, __, s=stats[name]: s.add(args[0])))
    return handles


def capture(model, blocks, samples, run, stats=None):
    """Per sample: the hidden input of blocks[0], and (args, kwargs) of every block without the hidden state.
    With stats (one dict per block), the forward goes through the last block too, collecting every prunable
    layer's InputStats on the way: the dense statistics for the cost of the capture itself."""
    first_inputs, calls = [], [[] for _ in blocks]

    def pre_hook(index):
        def hook(_, args, kwargs):
            hidden, args, kwargs = split_hidden(args, kwargs)
            if index == 0:
                first_inputs.append(hidden)
            calls[index].append((args, kwargs))
            if index == len(blocks) - 1 and stats is None:
                raise StopForward
        return hook

    def stop(*_):
        raise StopForward

    handles = [b.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    for block, block_stats in zip(blocks, stats or ()):
        handles += collect_stats(block, block_stats, hessian=False)
    if stats is not None:
        handles.append(blocks[-1].register_forward_hook(stop))
    try:
        with torch.no_grad():
            for sample in samples:
                try:
                    run(model, sample)
                except StopForward:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return first_inputs, calls


CACHE_ARGUMENTS = ("past_key_value", "past_key_values")


def split_hidden(args, kwargs):
    """(hidden state, other args, other kwargs) of a block call, without any KV cache: a cache filled by the
    capture forward would make every later run of the block attend to the stale keys/values it holds."""
    kwargs = {k: v for k, v in kwargs.items() if k not in CACHE_ARGUMENTS}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    if args:
        return args[0], args[1:], kwargs
    return kwargs.pop("hidden_states"), (), kwargs


def run_block(block, hidden, args, kwargs):
    output = block(hidden, *args, **kwargs)
    return output[0] if isinstance(output, tuple) else output


def block_outputs(block, inputs, calls, stats=None, hessian=False):
    """Outputs of a block for every sample; with stats (a dict), collect every linear's InputStats in it."""
    handles = collect_stats(block, stats, hessian) if stats is not None else []
    try:
        with torch.no_grad():
            return [run_block(block, x, *call) for x, call in zip(inputs, calls)]
    finally:
        for handle in handles:
            handle.remove()


def prune_layer(module, stats, pruner, sparsity, nm):
    """Zero the weights the pruner picks: the lowest |W| or Wanda scores per row (or per N:M group), or
    SparseGPT's or ALPS's choice with the kept weights updated to reconstruct the layer's output."""
    weight = matrix(module)
    if pruner in RECONSTRUCTING:
        RECONSTRUCTING[pruner](weight, stats.xtx, sparsity or 0.0, nm)
        return
    mask = removal_mask(weight, stats.sq if stats else None, sparsity, nm)
    with torch.no_grad():
        weight[mask] = 0


def removal_scores(weight, input_sq_norm):
    """Wanda scores, or |W| without input statistics: the lowest go first."""
    return weight.detach().abs() if input_sq_norm is None else wanda_scores(weight.detach(), input_sq_norm)


def removal_mask(weight, input_sq_norm, sparsity, nm):
    """The weights to remove: the lowest removal scores per row or N:M group."""
    scores = removal_scores(weight, input_sq_norm)
    return nm_mask(scores, *nm) if nm else row_mask(scores, sparsity)


def prune_block(block, stats, plan, pruner):
    """Prune every layer of a block by its (sparsity, nm) in plan; returns {name: (zeros, numel)}."""
    result = {}
    for name, module in prunable(block).items():
        sparsity, nm = plan[name]
        if nm or sparsity > 0:
            prune_layer(module, stats.get(name), pruner, sparsity, nm)
        result[name] = (int((module.weight == 0).sum()), module.weight.numel())
    return result


def outlier_pass(model, components, samples, run, m_factors):
    """OWL pass 1: one dense forward per component, which also captures the component's block inputs. Per
    block: {M: Outliers} from its Wanda scores, and every linear's per-input-feature sum of squares (the dense
    statistics); per component, what capture() returned, for the pruning pass to start from."""
    found, norms, captured = {}, {}, {}
    for component, blocks in components.items():
        stats = [{} for _ in blocks]
        captured[component] = capture(model, blocks, samples, run, stats)
        found[component], norms[component] = [], []
        for block, block_stats in zip(blocks, stats):
            with onloaded(model, block, changes=False):
                scores = {name: wanda_scores(matrix(m).detach(), block_stats[name].sq) for name, m in prunable(block).items()}
            found[component].append({m: Outliers(outlier_ratio(scores.values(), m),
                                                  {name: outlier_ratio([s], m) for name, s in scores.items()})
                                     for m in m_factors if m is not None})
            norms[component].append({name: block_stats[name].sq for name in scores})
    return found, norms, captured


class OneShot:
    """Every planned layer pruned at once by magnitude or Wanda scores from the dense statistics (no
    reconstruction, no sequential pass), the weights restored on exit: the real pruner's stand-in while
    allocations are scored. A layer's ranks (or its N:M mask) are computed at its first use and its dense
    weight kept (memory: a copy of the prunable weights), so a later allocation costs a comparison, a multiply
    and a copy back per weight, not a selection."""

    def __init__(self, components, norms, pruner):
        self.layers = {(component, index, name): (matrix(module), None if pruner == "magnitude" else block_norms[name])
                       for component, blocks in components.items()
                       for index, (block, block_norms) in enumerate(zip(blocks, norms[component]))
                       for name, module in prunable(block).items()}
        self.selections, self.dense = {}, {}

    def kept(self, key, sparsity, nm):
        """The weights the trial keeps, as a mask."""
        weight, norm = self.layers[key]
        if (key, nm) not in self.selections:
            scores = removal_scores(weight, norm)
            self.selections[key, nm] = ~nm_mask(scores, *nm) if nm else row_ranks(scores)
        selection = self.selections[key, nm]
        return selection if nm else selection >= int(weight.shape[1] * sparsity)

    @contextlib.contextmanager
    def pruned(self, plans):
        with torch.no_grad():
            try:
                for key, (weight, _) in self.layers.items():
                    sparsity, nm = plans[key[0]][key[1]][key[2]]
                    if nm or sparsity:
                        if key not in self.dense:
                            self.dense[key] = weight.clone()
                        weight.mul_(self.kept(key, sparsity, nm))  # faster than masked_fill_ on CPUs
                yield
            finally:
                for key, dense in self.dense.items():
                    self.layers[key][0].copy_(dense)


def search_allocation(model, components, samples, run, spec, outliers, norms):
    """Choose the open M and lambda of spec: each point is scored by the calibration loss (first SEARCH_SAMPLES
    samples) of the model pruned one-shot with the dense statistics (magnitude for magnitude, Wanda scores
    otherwise: a cheap stand-in for the real pruner). M first, at OWL's default lambda (or the one given),
    then lambda at the best M. The choice goes into spec, every point scored into spec.search."""
    ms, lams = spec.candidates()
    samples, scored, one_shot = samples[:SEARCH_SAMPLES], {}, OneShot(components, norms, spec.pruner)

    def loss(m_factor, lam):
        if (m_factor, lam) not in scored:
            trial = replace(spec, m_factor=m_factor, lam=lam)
            plans = {c: allocate(c, blocks, [o[m_factor] for o in outliers[c]] if trial.outlier_weighted else None, trial)
                     for c, blocks in components.items()}
            with one_shot.pruned(plans):
                scored[m_factor, lam] = float(np.mean([float(run(model, sample)) for sample in samples]))
        return scored[m_factor, lam]

    first_lam = lams[0] if len(lams) == 1 else DEFAULT_LAM
    best_m = min(ms, key=lambda m: loss(m, first_lam))
    best_lam = min(lams, key=lambda lam: loss(best_m, lam))
    spec.m_factor, spec.lam = best_m, best_lam
    spec.search = [{"M": m, "lambda": lam, "calibration_loss": value} for (m, lam), value in scored.items()]
    log.info("M %s, lambda %s chosen: calibration loss %.4f", best_m, best_lam, scored[best_m, best_lam])


def onloaded(model, block, changes=True):
    """The block's weights in memory while pruning reads or changes them (a model offloaded to disk writes the
    changes back on exit); a plain module holds them anyway."""
    return model.onloaded(block, changes) if hasattr(model, "onloaded") else contextlib.nullcontext()


def allocate(component, blocks, outliers, spec):
    """Per block, {linear name: (sparsity, nm)} for one component; (0, None) leaves a linear dense."""
    target = target_of(component, spec.targets)
    layers = [prunable(b) for b in blocks]
    if spec.nm:
        full = 1 - spec.nm[0] / spec.nm[1]
        # a layer whose input features do not split into groups of M (a 3x3 conv on RGB: 27) stays dense
        layers = [{name: m for name, m in block.items() if matrix(m).shape[1] % spec.nm[1] == 0} for block in layers]
        chosen = {(i, name) for i, block in enumerate(layers) for name in block}
        if target < full - 1e-9:  # OWL: the layers with fewest outliers take the pattern, the rest stay dense
            kind = spec.outlier_ratio
            chosen = nm_selection([((i, name), module.weight.numel(), (outliers[i].block_ratio(kind), outliers[i].per_layer[name]))
                                   for i, block in enumerate(layers) for name, module in block.items()], target, *spec.nm)
        return [{name: (None, spec.nm) if (i, name) in chosen else (0.0, None) for name in prunable(b)}
                for i, b in enumerate(blocks)]
    if spec.allocation == "uniform":
        return [{name: (target, None) for name in block} for block in layers]
    sizes = [sum(m.weight.numel() for m in block.values()) for block in layers]
    if spec.allocation == "alpha":  # heavier tails (lower alpha): better trained, pruned less
        ratios = [-np.mean([heavy_tail_alpha(matrix(m).detach()) for m in block.values()]) for block in layers]
    else:
        ratios = [o.block_ratio(spec.outlier_ratio) for o in outliers]
    sparsities, _ = owl_allocation(ratios, target, spec.lam, weights=sizes)
    return [{name: (s, None) for name in block} for s, block in zip(sparsities, layers)]


def planned_sparsity(block, plan):
    sizes = {name: m.weight.numel() for name, m in prunable(block).items()}
    removed = sum(sizes[name] * (1 - nm[0] / nm[1] if nm else sparsity) for name, (sparsity, nm) in plan.items())
    return removed / max(1, sum(sizes.values()))


def prune_model(model, samples, run, spec, progress=True):
    """Prune model in place. samples: calibration inputs for `run(model, sample)` (None for magnitude with
    a uniform allocation). An M or lambda left open in spec is chosen first (search_allocation). Returns the
    list of BlockRecords."""
    components = {c: b for c, b in model.components().items() if target_of(c, spec.targets) is not None}
    if spec.searched and getattr(model, "offloaded", 0):
        log.warning("M and lambda are not searched on a model offloaded to disk: OWL's defaults are used")
        spec.m_factor, spec.lam = spec.m_factor or DEFAULT_M, spec.lam or DEFAULT_LAM
    outliers, captured = {}, {}
    if spec.outlier_weighted or spec.searched:
        outliers, norms, captured = outlier_pass(model, components, samples, run, spec.candidates()[0])
        if spec.searched:
            search_allocation(model, components, samples, run, spec, outliers, norms)
        outliers = {c: [o[spec.m_factor] for o in blocks] for c, blocks in outliers.items()} if spec.outlier_weighted else {}
    records = []
    for component, blocks in components.items():
        plans = allocate(component, blocks, outliers.get(component), spec)
        if spec.needs_activations:
            # the outlier pass's capture holds for the first component only: the later ones are captured
            # through the components already pruned
            reused = captured.pop(component, None) if not records else None
            inputs, calls = reused or capture(model, blocks, samples, run)
        for index, block in enumerate(tqdm(blocks, desc=f"prune {component}", disable=not progress)):
            stats = {}
            if spec.needs_activations:
                block_outputs(block, inputs, calls[index], stats, hessian=spec.needs_hessian)
            ratio = outliers[component][index].block_ratio(spec.outlier_ratio) if outliers else None
            uses_nm = any(nm for _, nm in plans[index].values())
            record = BlockRecord(component, index, planned_sparsity(block, plans[index]), ratio, spec.nm if uses_nm else None)
            with onloaded(model, block):
                record.layers = prune_block(block, stats, plans[index], spec.pruner)
            del stats
            if spec.needs_activations:
                inputs = block_outputs(block, inputs, calls[index])  # pruned outputs feed the next block
            records.append(record)
            log.info("%s block %d: target %.4f achieved %.4f%s", component, index, record.target, achieved(record.layers),
                     "" if ratio is None else f" outliers {ratio:.5f}")
    return records


def achieved(layers):
    zeros = sum(z for z, _ in layers.values())
    return zeros / max(1, sum(n for _, n in layers.values()))
