"""Public pruning check on text: the raw SmolLM2-135M-Instruct language model, generic-text calibration
(32 windows of 128 tokens from GPL-3, owled_ros/data/text/generic.txt), perplexity on held-out text
(GPL-2 + GFDL-1.3, heldout.txt). Pruners x allocations x sparsities and hardware 2:4, each pruned from the
same dense weights in this process; every row records the `owled prune` command that makes its model.

    .venv/bin/python bench/text_check.py --out bench/results      # text_check.md / .json (about 25 min on 2 cores)
"""
import argparse
import time
from pathlib import Path

import numpy as np

from owled_ros.eval.bench import table, text_path
from owled_ros.eval.perplexity import perplexity
from owled_ros.pruning.calibration import text_samples
from owled_ros.pruning.engine import ALLOCATIONS, PRUNERS, PruneSpec, achieved, prune_model
from results_io import write_results

SPARSITIES = (0.5, 0.6, 0.7)
CONTEXT = 512  # perplexity in non-overlapping windows of 512 tokens


def plan(sparsities=SPARSITIES, pruners=PRUNERS):
    """(name, PruneSpec arguments) of every run."""
    runs = [(f"{p}-{a}-{s:g}", dict(pruner=p, allocation=a, targets={"llm": s}))
            for s in sparsities for p in pruners for a in ALLOCATIONS]
    runs += [(f"{p}-2:4", dict(pruner=p, allocation="uniform", targets={"llm": 0.5}, nm=(2, 4))) for p in pruners]
    runs += [(f"{p}-owl-2:4-0.4", dict(pruner=p, allocation="owl", targets={"llm": 0.4}, nm=(2, 4)))
             for p in pruners if p != "magnitude"]
    return runs


def prune_args(spec, nsamples):
    """The `owled prune` command that makes the same model as a run here."""
    args = ["owled", "prune", "--model", "smollm2", "--calib", "owled_ros/data/text/generic.txt", "--nsamples",
            str(nsamples), "--method", spec.pruner, "--allocation", spec.allocation, "--sparsity", f"{spec.targets['llm']:g}"]
    args += ["--nm", f"{spec.nm[0]}:{spec.nm[1]}"] if spec.nm else []
    args += ["--M", f"{spec.m_factor:g}", "--lam", f"{spec.lam:g}"] if spec.allocation != "uniform" else []
    return args + ["--out", "OUT"]


def check(model, runs, nsamples=32, log=print):
    """Prune `model` (a DrivingVLM; its LM only) once per run from the same dense weights; held-out perplexity."""
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    samples, info = text_samples(text_path("generic"), model.tokenizer, nsamples)
    heldout = text_path("heldout").read_text()
    forward = lambda m, sample: m.forward_text([sample])
    held_out_perplexity = lambda: perplexity(model.lm, model.tokenizer, heldout, CONTEXT, CONTEXT)
    results = [{"name": "dense", "perplexity": held_out_perplexity()}]
    for name, arguments in runs:
        model.load_state_dict(dense)
        spec = PruneSpec(**arguments)
        start = time.perf_counter()
        records = prune_model(model, samples, forward, spec, progress=False)
        seconds = time.perf_counter() - start
        layers = {f"{r.index}.{k}": v for r in records for k, v in r.layers.items()}
        results.append({"name": name, **arguments, "nm": arguments.get("nm"), "target": arguments["targets"]["llm"],
                        "achieved": achieved(layers), "perplexity": held_out_perplexity(),
                        "prune_s": seconds, "args": prune_args(spec, nsamples)})
        log(f"{name}: achieved {results[-1]['achieved']:.4f}, perplexity {results[-1]['perplexity']:.1f}, {seconds:.1f} s")
    model.load_state_dict(dense)
    return {"calibration": info | {"nsamples": nsamples}, "heldout": str(text_path("heldout").name), "results": results}


def markdown(summary, sparsities=SPARSITIES):
    rows = {r["name"]: r for r in summary["results"]}
    value = lambda name: rows[name]["perplexity"] if name in rows else "–"
    pruners = [p for p in PRUNERS if any(r.get("pruner") == p for r in summary["results"])]
    lines = [f"Raw SmolLM2-135M-Instruct, held-out perplexity on {summary['heldout']} in windows of {CONTEXT} tokens "
             f"(dense {rows['dense']['perplexity']:.1f}); calibration {summary['calibration']['nsamples']} windows of 128 "
             f"tokens of generic.txt. Allocation: uniform, OWL (outlier-weighted, M {PruneSpec.m_factor:g}, band 2λ = "
             f"{2 * PruneSpec.lam:g}) or AlphaPruning (heavy-tailed weight spectra, the same band).", ""]
    lines += table(["pruner", "allocation"] + [f"{s:.0%}" for s in sparsities],
                   [[p, a] + [value(f"{p}-{a}-{s:g}") for s in sparsities] for p in pruners for a in ALLOCATIONS])
    lines += ["", "Lowest perplexity at each sparsity, and against OWL × SparseGPT:", ""]
    best = lambda s: min((r for r in summary["results"] if r.get("target") == s and not r.get("nm")), key=lambda r: r["perplexity"])
    lines += table(["sparsity", "pruner", "allocation", "perplexity", "× OWL × SparseGPT"],
                   [[f"{s:.0%}", best(s)["pruner"], best(s)["allocation"], best(s)["perplexity"],
                     f"{best(s)['perplexity'] / rows[f'sparsegpt-owl-{s:g}']['perplexity']:.2f}"] for s in sparsities])
    lines += ["", "Hardware 2:4: every linear 2:4 (50 %), or 80 % of the linear weights in 2:4 with the most "
                  "outlier-heavy layers dense (40 %).", ""]
    lines += table(["pruner", "2:4 everywhere (50 %)", "2:4 + dense outlier layers (40 %)"],
                   [[p, value(f"{p}-2:4"), value(f"{p}-owl-2:4-0.4")] for p in pruners])
    lines += ["", "Prune time against the same pruner with a uniform allocation (median over the sparsities; "
                  "uniform's own time in seconds).", ""]
    seconds = lambda p, a: [rows[f"{p}-{a}-{s:g}"]["prune_s"] for s in sparsities if f"{p}-{a}-{s:g}" in rows]
    ratio = lambda p, a: f"{np.median([x / u for x, u in zip(seconds(p, a), seconds(p, 'uniform'))]):.2f} ×"
    lines += table(["pruner", "uniform (s)"] + [f"{a} × uniform" for a in ALLOCATIONS[1:]],
                   [[p, f"{np.median(seconds(p, 'uniform')):.0f}"] + [ratio(p, a) for a in ALLOCATIONS[1:]] for p in pruners])
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--nsamples", type=int, default=32)
    args = parser.parse_args()
    from owled_ros.model.build import default_model_untrained

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    summary = check(default_model_untrained().eval(), plan(), args.nsamples)
    summary["seconds"] = round(time.time() - started)
    write_results(out, "text_check", summary, markdown(summary))


if __name__ == "__main__":
    main()
