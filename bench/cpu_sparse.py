"""Does sparse execution of the pruned linears beat dense on this CPU? The default model's LM linears
(one of each shape), pruned per output row by magnitude at 50 % and 70 % (the unstructured pattern Wanda
leaves), timed as dense `F.linear` against torch's CSR and BSR (32x32 blocks) products, at the node's
decoding batch (2 tokens) and a prefill batch (128 tokens); plus the weight's bytes in each layout, and
what keeping it in the checkpoint's bitmask layout in memory would cost (rebuilding it per product).

    .venv/bin/python bench/cpu_sparse.py --out bench/results     # writes cpu_sparse.json, cpu_sparse.md
"""
import argparse
import os
import platform
import timeit
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from owled_ros.model.build import resolve_model
from owled_ros.model.checkpoint import compress, decompress
from owled_ros.model.vlm import DrivingVLM
from results_io import write_results

SPARSITIES = (0.5, 0.7)
TOKENS = (2, 128)
LAYERS = ("q_proj", "k_proj", "gate_proj", "down_proj")  # v and o, up share these shapes


def prune_rows(weight, sparsity):
    """Zero the smallest |w| of each output row (unstructured, as Wanda's per-row comparison group)."""
    drop = weight.abs().argsort(1)[:, :int(weight.shape[1] * sparsity)]
    return weight.scatter(1, drop, 0.0)


def seconds(runs, repeat=7, number=20):
    """{name: seconds per call}, best of `repeat`; the runs interleaved, so that drift in the machine's load
    falls on all of them alike."""
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeat):
        for name, run in runs.items():
            best[name] = min(best[name], timeit.timeit(run, number=number) / number)
    return best


def nbytes(tensor):
    sparse = tensor.layout in (torch.sparse_csr, torch.sparse_bsr)
    parts = (tensor.values(), tensor.crow_indices(), tensor.col_indices()) if sparse else (tensor,)
    return sum(p.numel() * p.element_size() for p in parts)


def measure(name, weight, sparsity, tokens):
    pruned = prune_rows(weight, sparsity)
    layouts = {"csr": pruned.to_sparse_csr(), "bsr": pruned.to_sparse_bsr((32, 32))}
    x = torch.randn(tokens, weight.shape[1])
    # y = x W^T computed as (W x^T)^T: the sparse operand on the left, where torch supports it
    products = {"dense": lambda: F.linear(x, pruned), **{layout: lambda s=sparse: torch.mm(s, x.t()).t()
                                                         for layout, sparse in layouts.items()}}
    packed = compress(pruned)  # the checkpoint's bitmask layout, if weights were kept compressed in memory
    timed = seconds(products | {"decompress": lambda: decompress(*packed.values())})
    row = {"layer": name, "shape": list(weight.shape), "sparsity": sparsity, "tokens": tokens, "dense_s": timed["dense"]}
    for layout, sparse in layouts.items():
        torch.testing.assert_close(products[layout](), products["dense"](), rtol=1e-4, atol=1e-4)
        row |= {f"{layout}_s": timed[layout], f"{layout}_speedup": timed["dense"] / timed[layout],
                f"{layout}_bytes_ratio": nbytes(sparse) / nbytes(pruned)}
    row |= {"decompress_s": timed["decompress"], "bitmask_bytes_ratio": sum(nbytes(t) for t in packed.values()) / nbytes(pruned)}
    return row


def markdown(summary):
    lines = [f"{summary['machine']}, torch {summary['torch']}, {summary['threads']} threads; float32; the time of "
             "one product, best of 7; speed-up = dense time / sparse time (above 1: sparse wins); bytes = the "
             "sparse weight's size / the dense one's; bitmask: the checkpoint's layout kept in memory, and the time "
             "to rebuild the dense weight from it before each product.", "",
             "| layer | shape | sparsity | tokens | dense ms | CSR speed-up | BSR speed-up | CSR bytes | BSR bytes "
             "| bitmask bytes | bitmask rebuild ms |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        lines.append(f"| {r['layer']} | {r['shape'][0]}x{r['shape'][1]} | {r['sparsity']:.0%} | {r['tokens']} | "
                     f"{r['dense_s'] * 1e3:.3f} | {r['csr_speedup']:.2f}x | {r['bsr_speedup']:.2f}x | "
                     f"{r['csr_bytes_ratio']:.2f} | {r['bsr_bytes_ratio']:.2f} | {r['bitmask_bytes_ratio']:.2f} | "
                     f"{r['decompress_s'] * 1e3:.3f} |")
    wins = [r for r in summary["rows"] if max(r["csr_speedup"], r["bsr_speedup"]) > 1]
    lines += ["", f"Sparse beat dense in {len(wins)} of {len(summary['rows'])} cases" +
              (": " + ", ".join(f"{r['layer']} {r['sparsity']:.0%} {r['tokens']} tokens" for r in wins) if wins else "") + "."]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
    model = DrivingVLM.from_pretrained(resolve_model(args.model))
    layer = model.lm.base_model.layers[0]
    linears = {name: module for name, module in layer.named_modules() if name.split(".")[-1] in LAYERS}
    with torch.inference_mode():
        rows = [measure(name.split(".")[-1], module.weight.detach(), sparsity, tokens)
                for name, module in linears.items() for sparsity in SPARSITIES for tokens in TOKENS]
    summary = {"machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), no GPU",
               "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}
    out = Path(args.out)
    write_results(out, "cpu_sparse", summary, markdown(summary))


if __name__ == "__main__":
    main()
