"""The shipped default model's facts, read from its file: what the build trained on, its steps, time and
peak RAM (recorded by `owled build-default`), the file's size and SHA-256, and how long `--model default`
takes to be ready on first use (measured here, into a fresh cache). With --frames, its quality on held-out
MetaDrive frame sets (closed questions and generated answers on every one, and with every camera blanked),
each figure against the goal of issue #29 with its interval. The build's training curve (loss per step of
both stages, kept in the file's metadata) is drawn into docs/default_training.png.

    python bench/default_model.py --out bench/results [--frames bench/results/work-world-heldout]
    # writes default_model.md (and default_model.json, default_eval.md with --frames)
"""
import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors import safe_open

from owled_ros.eval.bench import cell
from owled_ros.model.build import DEFAULT_SHA256, DEFAULT_WEIGHTS, resolve_model

# metric -> (label, goal, higher is better): the dense default's goals (issue #29), blank images last
GOALS = {"closed_mean_acc": ("closed mean accuracy", 0.80, True), "light_acc": ("traffic light", 0.90, True),
         "action_acc": ("action", 0.80, True), "vehicle_count_mae": ("vehicle count MAE", 0.5, False),
         "gen_action_exact_match": ("generated action, exact match", 0.80, True),
         "gen_action_accuracy": ("generated action, parsed", None, True),
         "gen_light_accuracy": ("generated light, parsed", None, True), "gen_cider": ("generated answers, CIDEr", None, True)}
BLANK_GOAL = 0.3  # closed mean accuracy with every camera blanked: at most this (the images matter)


def verdict(value, goal, higher):
    """met / not met / undecided: the whole 95 % interval on one side of the goal, or not."""
    low, high = value[1:]
    good, bad = (low >= goal, high < goal) if higher else (high <= goal, low > goal)
    return "met" if good else "not met" if bad else "undecided"


def evaluate_default(frames, out):
    from owled_ros.data.calib import read_samples
    from owled_ros.eval.evaluate import evaluate
    from owled_ros.model import load_model

    samples = read_samples(frames)
    model = load_model("default")
    scored = {name: evaluate(model, samples, len(samples), 40, blank) for name, blank in (("images", False), ("blank", True))}
    result = {"model": model.model_id, "frames": str(frames), "frame_sets": len(samples),
              **{name: {k: list(v) for k, v in s["metrics"].items()} for name, s in scored.items()}}
    (out / "default_model.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "default_eval.md").write_text(eval_table(result))


def eval_table(result):
    """default_eval.md from default_model.json: each metric with and without the images, against its goal."""
    lines = [f"Model `{result['model']}`, dense, on {result['frame_sets']} held-out MetaDrive frame sets "
             f"(`{Path(result['frames']).name}`): closed questions scored by likelihood and generated answers, both on "
             "every frame set; value [95 % interval].", "",
             "| metric | images | every camera blanked | goal | |", "|---|---|---|---|---|"]
    for key, (label, goal, higher) in GOALS.items():
        value, blank = result["images"][key], result["blank"][key]
        target = "" if goal is None else f"{'≥' if higher else '≤'} {goal:g}"
        lines.append(f"| {label} | {cell(value)} | {cell(blank)} | {target} | {'' if goal is None else verdict(value, goal, higher)} |")
    blank = result["blank"]["closed_mean_acc"]
    lines.append(f"| closed mean accuracy, every camera blanked | | {cell(blank)} | ≤ {BLANK_GOAL:g} | "
                 f"{verdict(blank, BLANK_GOAL, False)} |")
    return "\n".join(lines) + "\n"


def plot_curves(curves, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.2))
    labels = {"stage A": "stage A: image side and scene tags (sum of six cross-entropies)",
              "stage B": "stage B: answers through the LM adapter (cross-entropy per token)"}
    for ax, (stage, losses) in zip(axes, curves.items()):
        window = max(1, len(losses) // 50)
        total = np.cumsum([0.0, *losses])
        ax.plot(losses, color="0.8", linewidth=0.6, label="per step")
        ax.plot(np.arange(window - 1, len(losses)), (total[window:] - total[:-window]) / window, color="C0",
                label=f"mean of {window} steps")
        ax.set(title=labels.get(stage, stage), xlabel="step", ylabel="training loss")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def crop_source(crop):
    cameras = "every camera's" if crop["camera"] == "all" else f"{crop['camera']}'s"
    source = "pixels" if crop.get("tap") is None else f"backbone features after block {crop['tap']}"
    added = ", added over the cameras" if crop["camera"] == "all" else ""
    return f"{cameras} {source} (top {crop['rows']} rows, maximum over a {'x'.join(map(str, crop.get('grid', [1, 3])))} grid{added})"


def recipe_extras(vision):
    """The image side's further config in the build recipe, in words."""
    crops, dropout = vision.get("crops", []), vision.get("tag_dropout")
    tags, views, rules = vision.get("tags"), vision.get("tag_view_hidden"), vision.get("tag_rules") or {}
    return ((f", {len(tags)} tags" if tags else "")
            + (f", view summaries of width {views} added over the views" if views else "")
            + "".join(f", a rule for {name} from {', '.join(inputs)}" for name, inputs in rules.items())
            + "".join(f", a crop of {crop_source(crop)} for {', '.join(crop['tags'])}" for crop in crops)
            + (f", tag heads' dropout {dropout:g}" if dropout else ""))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--docs", default="docs", help="where the training curve's plot goes")
    parser.add_argument("--frames", type=Path, help="held-out frame sets with ground truth: evaluate the default on them")
    args = parser.parse_args()
    with safe_open(str(DEFAULT_WEIGHTS), framework="pt") as f:
        meta, count = f.metadata(), sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    build, lora = json.loads(meta["build"]), json.loads(meta["lora"])
    if "curves" in meta:
        plot_curves(json.loads(meta["curves"]), Path(args.docs) / "default_training.png")
    with tempfile.TemporaryDirectory() as home:
        os.environ["OWLED_HOME"] = home
        start = time.monotonic()
        resolve_model("default")
        ready = time.monotonic() - start
    lines = [f"| `{DEFAULT_WEIGHTS.name}` | |", "|---|---|",
             f"| size | {DEFAULT_WEIGHTS.stat().st_size / 2**20:.1f} MB (fp16, {count / 1e6:.1f} M values: image side "
             f"less MobileNetV2, LoRA adapter r={lora['r']}) |",
             f"| SHA-256 | `{DEFAULT_SHA256}` |",
             f"| trained on | {build['scenes']} MetaDrive frame sets (scene seeds {build['scene_seed']}.., "
             f"{build['image_side']} image side{recipe_extras(build.get('vision', {}))}), {build['steps'][0]} + "
             f"{build['steps'][1]} steps, seed {build['seed']} |",
             f"| build (`owled build-default`, 2 CPU cores, scenes already rendered) | {build['minutes']} min, "
             f"peak RSS {build['peak_rss_mb'] / 1024:.1f} GB |",
             f"| first use of `--model default` (written out as a model directory) | {ready:.0f} s |"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "default_model.md").write_text("\n".join(lines) + "\n")
    if args.frames:
        evaluate_default(args.frames, out)


if __name__ == "__main__":
    main()
