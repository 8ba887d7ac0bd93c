"""Is the image encoder more sensitive to pruning than the language model (the OWLed paper's finding)? The
default model pruned with OWLed on one component at a time: the image encoder (`vision.encoder`:
MobileNetV2's convolutions and the patch embedding; the fusion unit after it is left dense) at 10-50 %, the
LM at 30-70 %, and the LM again at the sparsity that removes as many weights as each encoder run (matched
parameters). Closed driving questions on held-out MetaDrive frame sets, with 95 % intervals; paired
differences at matched parameters.

    python bench/encoder_sensitivity.py --calib DIR --eval DIR --out bench/results

Writes encoder_sensitivity.json, encoder_sensitivity.md and encoder_sensitivity.png.
"""
import argparse
import shutil
import time
from pathlib import Path

import torch

from owled_ros.data.calib import read_samples
from owled_ros.eval.evaluate import closed
from owled_ros.eval.stats import interval, paired_difference
from owled_ros.model.build import resolve_model
from owled_ros.model.vlm import DrivingVLM
from owled_ros.pruning.engine import prunable
from owled_ros.pruning.run import prune
from results_io import write_results

ENCODER = "vision.encoder"
ENCODER_SPARSITIES = (0.1, 0.3, 0.5)
LLM_SPARSITIES = (0.3, 0.5, 0.7)
NAMES = {ENCODER: "image encoder", "llm": "language model"}


def prunable_weights(model, component):
    return sum(m.weight.numel() for block in model.components()[component] for m in prunable(block).values())


def zeros(model):
    return sum(int((p == 0).sum()) for p in model.parameters())


def measure(model, eval_samples):
    with torch.no_grad():
        return closed(model, eval_samples)["closed_mean_acc"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--calib", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--eval-frames", type=int, default=200)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    started = time.time()
    out, model_dir = Path(args.out), resolve_model(args.model)
    work = out / "work-sensitivity"
    shutil.rmtree(work, ignore_errors=True)
    eval_samples = read_samples(args.eval)[:args.eval_frames]
    dense = DrivingVLM.from_pretrained(model_dir)
    total = sum(p.numel() for p in dense.parameters())
    size = {component: prunable_weights(dense, component) for component in (ENCODER, "llm")}
    dense_zeros = zeros(dense)
    rows = [{"component": "dense", "target": 0.0, "removed": 0, "items": measure(dense, eval_samples)}]
    del dense

    def run(component, sparsity, matched=None):
        name = f"{component}-{sparsity:.4f}"
        prune(model_dir, work / name, "owled", f"{component}={sparsity:.4f}", args.calib, nsamples=args.nsamples,
              progress=False)
        model = DrivingVLM.from_pretrained(work / name)
        row = {"component": component, "target": sparsity, "removed": zeros(model) - dense_zeros,
               "items": measure(model, eval_samples), "matched_to": matched}
        shutil.rmtree(work / name)
        rows.append(row)
        print(f"{name}: removed {row['removed'] / 1e6:.2f} M, closed mean {interval(row['items'])[0]:.3f}", flush=True)
        return row

    for sparsity in ENCODER_SPARSITIES:
        encoder = run(ENCODER, sparsity)
        if encoder["removed"] < 0.9 * size["llm"]:  # else the language model has too few weights to match
            run("llm", encoder["removed"] / size["llm"], matched=sparsity)
    for sparsity in LLM_SPARSITIES:
        run("llm", sparsity)
    shutil.rmtree(work, ignore_errors=True)
    summary = {"model": Path(model_dir).name, "eval_frame_sets": len(eval_samples), "nsamples": args.nsamples,
               "frames": "/".join(sorted({s.source.split(":")[0] for s in eval_samples})),
               "parameters": total, "prunable": size, "seconds": round(time.time() - started), "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, "encoder_sensitivity", summary, markdown(summary))
    plot(summary, out / "encoder_sensitivity.png")


def fmt(items):
    mean, low, high = interval(items)
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def markdown(summary):
    rows, dense = summary["rows"], summary["rows"][0]
    lines = [f"OWLed (Wanda scores, OWL allocation) on one component of `{summary['model']}`: closed questions on "
             f"{summary['eval_frame_sets']} held-out {summary['frames']} frame sets, {summary['nsamples']} calibration frame "
             f"sets; prunable weights: image encoder {summary['prunable'][ENCODER] / 1e6:.2f} M, language model "
             f"{summary['prunable']['llm'] / 1e6:.1f} M; {summary['seconds']} s.", "",
             "| component | target | weights removed | closed mean accuracy | − dense |", "|---|---|---|---|---|"]
    for row in rows:
        diff, low, high, _ = paired_difference(row["items"], dense["items"])
        lines.append(f"| {NAMES.get(row['component'], row['component'])}{' (matched)' if row.get('matched_to') else ''} | "
                     f"{row['target']:.3f} | "
                     f"{row['removed'] / 1e6:.2f} M | {fmt(row['items'])} | {diff:+.3f} [{low:+.3f}, {high:+.3f}] |")
    lines += ["", "At matched weights removed (image encoder − language model, paired over frame sets):", "",
              "| encoder target | difference | verdict |", "|---|---|---|"]
    for encoder in (r for r in rows if r["component"] == ENCODER):
        llm = next((r for r in rows if r.get("matched_to") == encoder["target"]), None)
        if llm is None:
            continue
        diff, low, high, verdict = paired_difference(encoder["items"], llm["items"])
        shown = {-1: "encoder more sensitive", 1: "language model more sensitive", 0: "not separable"}[verdict]
        lines.append(f"| {encoder['target']:.1f} | {diff:+.3f} [{low:+.3f}, {high:+.3f}] | {shown} |")
    return "\n".join(lines) + "\n"


def plot(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = summary["rows"][0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for component in (ENCODER, "llm"):
        rows = [dense] + sorted((r for r in summary["rows"] if r["component"] == component and not r.get("matched_to")),
                                key=lambda r: r["target"])
        points = [interval(r["items"]) for r in rows]
        for ax, x in ((axes[0], [r["target"] for r in rows]), (axes[1], [r["removed"] / summary["parameters"] for r in rows])):
            line, = ax.plot(x, [p[0] for p in points], marker="o", label=NAMES[component])
            ax.fill_between(x, [p[1] for p in points], [p[2] for p in points], color=line.get_color(), alpha=0.15)
    axes[0].set_xlabel("target sparsity of the pruned component")
    axes[1].set_xlabel("share of the model's weights removed")
    axes[1].set_xscale("symlog", linthresh=1e-3)
    for ax in axes:
        ax.set_ylabel("closed questions: mean accuracy")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
