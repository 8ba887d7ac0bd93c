"""`owled bench`: methods x sparsities on one model, one run; results.json, results.md and plots.

Each prune runs as its own `owled prune` process, so its time and peak RSS are its own. Every pruned model
is scored on the same held-out synthetic frame sets and texts, then deleted (its report is kept).
"""
import json
import math
import shutil
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

from ..data.calib import read_samples, write_synthetic
from ..model.vlm import DrivingVLM
from .evaluate import CATEGORIES, evaluate
from .perplexity import perplexity

METHODS = ("magnitude", "wanda", "owl", "owled")
TEXTS = {"driving": "driving.txt", "generic": "generic.txt"}
COLUMNS = [("method", "method"), ("target", "target"), ("achieved", "achieved"), ("action_accuracy", "action acc"),
           ("light_accuracy", "light acc"), ("vehicle_count_mae", "vehicle MAE"), ("pedestrian_count_mae", "ped. MAE"),
           ("bleu4", "BLEU-4"), ("meteor", "METEOR"), ("rouge_l", "ROUGE-L"), ("cider", "CIDEr"),
           ("ppl_driving", "ppl driving"), ("ppl_generic", "ppl generic"), ("size_mb", "size MB"),
           ("seconds_per_answer", "s/answer"), ("prune_s", "prune s"), ("prune_peak_mb", "prune peak MB")]


def text_path(name):
    return Path(resources.files("owled_ros") / "data" / "text" / TEXTS[name])


def runs(sparsities, paper_range, nm, component_sparsity):
    """(name, method, sparsity spec, nm) of the sweep."""
    plan = [(f"{m}-{s:g}", m, f"{s:g}", None) for s in sparsities for m in METHODS]
    plan += [(f"{m}-{nm}", m, "0.5", nm) for m in METHODS] if nm else []
    plan += [(f"{m}-{s:g}", m, f"{s:g}", None) for s in paper_range for m in ("wanda", "owled") if s not in sparsities]
    if component_sparsity:
        plan += [(f"owled-vision-only-{component_sparsity:g}", "owled", f"vision={component_sparsity:g}", None),
                 (f"owled-llm-only-{component_sparsity:g}", "owled", f"llm={component_sparsity:g}", None)]
    return plan


def measure(model, model_dir, eval_samples, max_new_tokens):
    metrics = evaluate(model, eval_samples, max_new_tokens)
    for name in TEXTS:
        metrics[f"ppl_{name}"] = perplexity(model.lm, model.tokenizer, text_path(name).read_text())
    metrics["size_mb"] = (Path(model_dir) / "model.safetensors").stat().st_size / 2**20
    return metrics


def run_bench(model_dir, out, sparsities=(0.5, 0.6, 0.7), paper_range=(0.1, 0.2, 0.3, 0.4), nm="2:4",
              component_sparsity=0.3, nsamples=32, eval_frames=20, max_new_tokens=40, log=print):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    write_synthetic(work / "calib", max(nsamples, 8), seed=100, vehicle="bench-calib")
    write_synthetic(work / "eval", eval_frames, seed=999, vehicle="bench-eval")
    eval_samples = read_samples(work / "eval")
    started = time.time()
    model = DrivingVLM.from_pretrained(model_dir)
    dense = {"name": "dense", "method": "dense", "target": "0", "achieved": 0.0,
             **measure(model, model_dir, eval_samples, max_new_tokens)}
    # The same dense model with every camera blanked: what the answers owe to the images.
    blank = evaluate(model, eval_samples, max_new_tokens, blank=True)
    del model
    results = [dense, {**dense, **blank, "name": "dense, blank images"}]
    log(f"dense: {dense['action_accuracy']:.3f} action accuracy ({blank['action_accuracy']:.3f} with blank images)")
    for name, method, sparsity, pattern in runs(sparsities, paper_range, nm, component_sparsity):
        calib = text_path("generic") if method == "owl" else work / "calib"
        command = [sys.executable, "-m", "owled_ros.cli", "prune", "--model", str(model_dir), "--out", str(work / name),
                   "--method", method, "--sparsity", sparsity, "--calib", str(calib), "--nsamples", str(nsamples)]
        if pattern:
            command += ["--nm", pattern]
        subprocess.run(command, check=True, capture_output=True, text=True)
        report = json.loads((work / name / "report.json").read_text())
        row = {"name": name, "method": method, "target": pattern or sparsity, "achieved": report["achieved"]["pruned_components"],
               "prune_s": report["seconds"], "prune_peak_mb": report["peak_rss_mb"],
               **measure(DrivingVLM.from_pretrained(work / name), work / name, eval_samples, max_new_tokens)}
        results.append(row)
        shutil.copy(work / name / "report.json", out / f"report-{name}.json")
        shutil.rmtree(work / name)
        log(f"{name}: achieved {row['achieved']:.3f}, action accuracy {row['action_accuracy']:.3f}, "
            f"BLEU-4 {row['bleu4']:.3f}, ppl driving {row['ppl_driving']:.1f}")
    summary = {"model": str(model_dir), "nsamples": nsamples, "eval_frame_sets": eval_frames,
               "answers_per_model": results[0]["answers"], "seconds": round(time.time() - started), "results": results}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "results.md").write_text(markdown(summary))
    plot(results, out)
    shutil.rmtree(work)
    return summary


def cell(value):
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def table(header, rows):
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(map(cell, row)) + " |" for row in rows]


def markdown(summary):
    results = summary["results"]
    lines = [f"Model `{Path(summary['model']).name}`, {summary['answers_per_model']} answers per model on "
             f"{summary['eval_frame_sets']} held-out synthetic 6-camera frame sets, {summary['nsamples']} calibration "
             f"samples; sweep took {summary['seconds']} s.", ""]
    lines += table(["run"] + [title for _, title in COLUMNS], [[r["name"]] + [r.get(key, "") for key, _ in COLUMNS] for r in results])
    dense, blank = results[:2]
    lines += ["", "Do the images matter? The dense model on the same frame sets with every camera blanked.", ""]
    lines += table(["images", "action exact match", "action acc", "description BLEU-4", "vehicle MAE", "light acc"],
                   [[r["name"], r["action_exact_match"], r["action_accuracy"], r["description_bleu4"],
                     r["vehicle_count_mae"], r["light_accuracy"]] for r in (dense, blank)])
    lines += ["", "Per question category: exact match / BLEU-4.", ""]
    lines += table(["run"] + list(CATEGORIES), [[r["name"]] + [f"{r[c]['exact_match']:.2f} / {r[c]['bleu4']:.3f}" for c in CATEGORIES]
                                                 for r in results])
    cost = [r for r in results if r["method"] in METHODS and r["target"] == "0.5"]
    lines += ["", "Pruning cost at 50 % (language model), each prune its own process.", ""]
    lines += table(["method", "prune s", "peak RSS MB", "achieved"], [[r["method"], r["prune_s"], r["prune_peak_mb"], r["achieved"]]
                                                                    for r in cost])
    return "\n".join(lines) + "\n"


def plot(results, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unstructured = [r for r in results if r["method"] in METHODS and ":" not in r["target"] and "=" not in r["target"]]
    metrics = [("action_accuracy", "action accuracy"), ("bleu4", "BLEU-4"), ("ppl_driving", "perplexity (driving text)")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4))
    dense = results[0]
    for ax, (key, title) in zip(axes, metrics):
        for method in METHODS:
            rows = sorted((r for r in unstructured if r["method"] == method), key=lambda r: float(r["target"]))
            ax.plot([0] + [float(r["target"]) for r in rows], [dense[key]] + [r[key] for r in rows], marker="o", label=method)
        ax.set_xlabel("target sparsity (language model)")
        ax.set_title(title)
        if key.startswith("ppl"):
            ax.set_yscale("log")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "metrics_vs_sparsity.png", dpi=80)
    plt.close(fig)
