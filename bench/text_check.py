"""Public pruning check on text: the raw SmolLM2-135M-Instruct language model, generic-text calibration
(32 windows of 128 tokens from GPL-3, owled_ros/data/text/generic.txt), perplexity on held-out text
(GPL-2 + GFDL-1.3, heldout.txt). Pruners x allocations x sparsities, hardware 2:4, and the two OWL
outlier ratios, each pruned from the same dense weights in this process.

    .venv/bin/python bench/text_check.py --out bench/results      # text_check.md / .json (about 25 min on 2 cores)
"""
import argparse
import time
from pathlib import Path

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
    runs += [(f"{p}-owl-pooled-{s:g}", dict(pruner=p, allocation="owl", targets={"llm": s}, outlier_ratio="pooled"))
             for s in sparsities for p in pruners if p != "magnitude"]
    return runs


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
                        "outlier_ratio": spec.outlier_ratio if spec.outlier_weighted else None,
                        "achieved": achieved(layers), "perplexity": held_out_perplexity(),
                        "prune_s": seconds})
        log(f"{name}: achieved {results[-1]['achieved']:.4f}, perplexity {results[-1]['perplexity']:.1f}, {seconds:.1f} s")
    model.load_state_dict(dense)
    return {"calibration": info | {"nsamples": nsamples}, "heldout": str(text_path("heldout").name), "results": results}


def markdown(summary, sparsities=SPARSITIES):
    rows = {r["name"]: r for r in summary["results"]}
    value = lambda name: rows[name]["perplexity"] if name in rows else "–"
    pruners = [p for p in PRUNERS if any(r.get("pruner") == p for r in summary["results"])]
    lines = [f"Raw SmolLM2-135M-Instruct, held-out perplexity on {summary['heldout']} in windows of {CONTEXT} tokens "
             f"(dense {rows['dense']['perplexity']:.1f}); calibration {summary['calibration']['nsamples']} windows of 128 "
             "tokens of generic.txt; per-layer outlier ratio unless said.", ""]
    lines += table(["pruner", "allocation"] + [f"{s:.0%}" for s in sparsities],
                   [[p, a] + [value(f"{p}-{a}-{s:g}") for s in sparsities] for p in pruners for a in ALLOCATIONS])
    lines += ["", "Hardware 2:4: every linear 2:4 (50 %), or 80 % of the linear weights in 2:4 with the most "
                  "outlier-heavy layers dense (40 %).", ""]
    lines += table(["pruner", "2:4 everywhere (50 %)", "2:4 + dense outlier layers (40 %)"],
                   [[p, value(f"{p}-2:4"), value(f"{p}-owl-2:4-0.4")] for p in pruners])
    lines += ["", "OWL's outlier ratio per block: mean of the per-linear ratios vs all linears pooled.", ""]
    lines += table(["pruner", "outlier ratio"] + [f"{s:.0%}" for s in sparsities],
                   [[p, kind] + [value(f"{p}-owl-{s:g}" if kind == "per-layer" else f"{p}-owl-pooled-{s:g}") for s in sparsities]
                    for p in pruners if p != "magnitude" for kind in ("per-layer", "pooled")])
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
