"""Sequential block-by-block pruning (Wanda/SparseGPT style) with OWL's outlier-weighted allocation.

For each component (vision blocks, LM blocks; T5: encoder then decoder) the calibration samples are run
through the model once to capture the first block's input and every block's other arguments; then the
blocks are processed in order: accumulate input-feature norms, score, prune, recompute the block's
outputs with the pruned weights and feed them to the next block. Memory stays at one block's activations.
"""
import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from .sparsity import nm_mask, outlier_ratio, owl_allocation, owl_nm_allocation, row_mask, wanda_scores

log = logging.getLogger(__name__)
METHODS = ("magnitude", "wanda", "owl", "owled")


@dataclass
class PruneSpec:
    method: str
    targets: dict  # component group ("llm", "vision") -> sparsity
    nm: tuple = None  # (n, m)
    m_factor: float = 5.0
    lam: float = 0.08

    @property
    def outlier_weighted(self):
        return self.method in ("owl", "owled")


@dataclass
class BlockRecord:
    component: str
    index: int
    target: float
    outlier_ratio: float = None
    nm: tuple = None
    layers: dict = field(default_factory=dict)  # linear name -> (zeros, numel)


class StopForward(Exception):
    pass


def linears(block):
    return {name: module for name, module in block.named_modules() if isinstance(module, nn.Linear)}


def group_of(component):
    return component.split(".")[0]


def capture(model, blocks, samples, run):
    """Per sample: the hidden input of blocks[0], and (args, kwargs) of every block without the hidden state."""
    first_inputs, calls = [], [[] for _ in blocks]

    def pre_hook(index):
        def hook(_, args, kwargs):
            hidden, args, kwargs = split_hidden(args, kwargs)
            if index == 0:
                first_inputs.append(hidden)
            calls[index].append((args, kwargs))
            if index == len(blocks) - 1:
                raise StopForward
        return hook

    handles = [b.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
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


def split_hidden(args, kwargs):
    if args:
        return args[0], args[1:], kwargs
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


def run_block(block, hidden, args, kwargs):
    output = block(hidden, *args, **kwargs)
    return output[0] if isinstance(output, tuple) else output


def block_outputs(block, inputs, calls, stats=None):
    """Outputs of a block for every sample; with stats, accumulate per-linear input sum of squares."""
    handles = []
    if stats is not None:
        for name, module in linears(block).items():
            def hook(_, args, __, name=name):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                stats[name] = stats.get(name, 0) + (x * x).sum(0)
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            return [run_block(block, x, *call) for x, call in zip(inputs, calls)]
    finally:
        for handle in handles:
            handle.remove()


def block_scores(block, stats, method):
    return {name: module.weight.detach().abs() if method == "magnitude" else wanda_scores(module.weight.detach(), stats[name])
            for name, module in linears(block).items()}


def prune_block(block, scores, sparsity=None, nm=None):
    """Zero the lowest-scoring weights of every linear; returns {name: (zeros, numel)}."""
    result = {}
    for name, module in linears(block).items():
        mask = nm_mask(scores[name], *nm) if nm else row_mask(scores[name], sparsity)
        with torch.no_grad():
            module.weight[mask] = 0
        result[name] = (int((module.weight == 0).sum()), module.weight.numel())
    return result


def outlier_pass(model, components, samples, run, spec, progress=True):
    """OWL pass 1: dense activations through every component; outlier ratio per block."""
    ratios = {}
    for component, blocks in components.items():
        inputs, calls = capture(model, blocks, samples, run)
        ratios[component] = []
        for index, block in enumerate(tqdm(blocks, desc=f"outliers {component}", leave=False, disable=not progress)):
            stats = {}
            outputs = block_outputs(block, inputs, calls[index], stats)
            ratios[component].append(outlier_ratio(block_scores(block, stats, "wanda").values(), spec.m_factor))
            inputs = outputs
    return ratios


def allocate(component, blocks, ratios, spec):
    """Per-block (sparsity, nm) for one component."""
    target = spec.targets[group_of(component)]
    if not spec.outlier_weighted:
        return [(target, spec.nm)] * len(blocks)
    if spec.nm:
        return [(None, (n, spec.nm[1])) for n in owl_nm_allocation(ratios, *spec.nm)]
    sizes = [sum(m.weight.numel() for m in linears(b).values()) for b in blocks]
    sparsities, _ = owl_allocation(ratios, target, spec.lam, weights=sizes)
    return [(s, None) for s in sparsities]


def prune_model(model, samples, run, spec, progress=True):
    """Prune model in place. samples: calibration inputs for `run(model, sample)` (None for magnitude).
    Returns the list of BlockRecords."""
    components = {c: b for c, b in model.components().items() if group_of(c) in spec.targets}
    ratios = outlier_pass(model, components, samples, run, spec, progress) if spec.outlier_weighted else {}
    records = []
    for component, blocks in components.items():
        plan = allocate(component, blocks, ratios.get(component), spec)
        if spec.method != "magnitude":
            inputs, calls = capture(model, blocks, samples, run)
        bar = tqdm(list(enumerate(blocks)), desc=f"prune {component}", disable=not progress)
        for index, block in bar:
            sparsity, nm = plan[index]
            stats = {}
            if spec.method != "magnitude":
                block_outputs(block, inputs, calls[index], stats)
            record = BlockRecord(component, index, sparsity if sparsity is not None else 1 - nm[0] / nm[1],
                                 ratios[component][index] if ratios else None, nm)
            record.layers = prune_block(block, block_scores(block, stats, spec.method), sparsity, nm)
            if spec.method != "magnitude":
                inputs = block_outputs(block, inputs, calls[index])  # pruned outputs feed the next block
            records.append(record)
            log.info("%s block %d: target %.4f achieved %.4f%s", component, index, record.target,
                     achieved(record.layers), "" if record.outlier_ratio is None else f" outliers {record.outlier_ratio:.5f}")
    return records


def achieved(layers):
    zeros = sum(z for z, _ in layers.values())
    return zeros / max(1, sum(n for _, n in layers.values()))
