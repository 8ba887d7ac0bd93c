"""Which image side reads MetaDrive frames better: the conv stem trained from scratch, or MobileNetV2's
ImageNet features? Both default models are aligned on the same rendered training scenes with the same
steps and seed, then answer the closed driving questions on held-out scenes (other maps), with real and
with blanked images.

    python bench/encoder_choice.py --train DIR --heldout DIR [--steps A B] --out bench/results

Writes encoder_choice.json and encoder_choice.md (table with 95 % bootstrap intervals and the paired
difference per metric).
"""
import argparse
import time
from pathlib import Path

import psutil
import torch

from owled_ros.data.calib import read_samples
from owled_ros.eval.closed import FIELDS
from owled_ros.eval.evaluate import closed
from owled_ros.eval.stats import interval, paired_difference
from owled_ros.model.build import IMAGE_SIDES, align_default, default_model_untrained, rendered_scenes
from results_io import write_results

METRICS = [f"{field.name}_acc" for field in FIELDS] + ["closed_mean_acc"]


def run(image_side, data, heldout, steps, seed, save=None):
    torch.manual_seed(seed)
    start = time.monotonic()
    model, _ = align_default(default_model_untrained(image_side), data=data, steps=steps, seed=seed)
    seconds = time.monotonic() - start
    if save:
        model.save_pretrained(Path(save) / image_side)
    with torch.no_grad():
        real, blank = closed(model, heldout), closed(model, heldout, blank=True)
    trainable = sum(p.numel() for name, p in model.vision.named_parameters()
                    if not (IMAGE_SIDES[image_side].get("backbone") and name.startswith("stem.")))
    return {"image_side": image_side, "train_seconds": round(seconds, 1), "vision_trained_parameters": trainable,
            "real": real, "blank": blank}


def fmt(value):
    return f"{value[0]:.3f} [{value[1]:.3f}, {value[2]:.3f}]"


def table(runs):
    first, second = runs
    lines = [f"| metric | {first['image_side']} | {second['image_side']} | {second['image_side']} − {first['image_side']} |",
             "|---|---|---|---|"]
    for metric in METRICS:
        a, b = first["real"].get(metric), second["real"].get(metric)
        if a is None or b is None:
            continue
        diff, low, high, verdict = paired_difference(b, a)
        shown = {1: "better", -1: "worse", 0: "no difference shown"}[verdict]
        lines.append(f"| {metric} | {fmt(interval(a))} | {fmt(interval(b))} | {diff:+.3f} [{low:+.3f}, {high:+.3f}] {shown} |")
    for run_ in runs:
        lines.append(f"| closed_mean_acc, blank images ({run_['image_side']}) | {fmt(interval(run_['blank']['closed_mean_acc']))} | | |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True)
    parser.add_argument("--heldout", required=True)
    parser.add_argument("--steps", type=int, nargs=2, default=[300, 300], metavar=("A", "B"))
    parser.add_argument("--heldout-count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--save", help="keep both aligned models here (<dir>/stem, <dir>/mobilenet_v2)")
    args = parser.parse_args()
    data = rendered_scenes(args.train)
    heldout = read_samples(args.heldout)[:args.heldout_count]
    runs = [run(side, data, heldout, tuple(args.steps), args.seed, args.save) for side in ("stem", "mobilenet_v2")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"train_frame_sets": len(data[0]), "heldout_frame_sets": len(heldout), "steps": args.steps,
               "seed": args.seed, "peak_rss_mb": round(psutil.Process().memory_info().rss / 2**20),
               "runs": [{k: v for k, v in r.items() if k not in ("real", "blank")} |
                        {"real": {m: interval(v) for m, v in r["real"].items()},
                         "blank": {m: interval(v) for m, v in r["blank"].items()}} for r in runs]}
    header = (f"Aligned on {len(data[0])} MetaDrive frame sets ({args.steps[0]} + {args.steps[1]} steps, seed "
              f"{args.seed}); closed questions on {len(heldout)} held-out frame sets (other maps). Training time: "
              + ", ".join(f"{r['image_side']} {r['train_seconds']:.0f} s" for r in runs) + ".\n\n")
    write_results(out, "encoder_choice", summary, header + table(runs) + "\n")


if __name__ == "__main__":
    main()
