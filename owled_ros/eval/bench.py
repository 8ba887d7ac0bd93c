"""`owled bench`: methods x sparsities on one model, one run; results.json, results.md and plots.

Each prune runs as its own `owled prune` process, so its time and peak RSS are its own. Every pruned model
is scored on the same held-out frame sets (rendered MetaDrive scenes from `make bench`; synthetic 2-D ones
when none are given) and texts, then deleted (its report is kept): closed
questions by likelihood on every frame set, generated answers on the first ones. Every metric carries a
bootstrap 95 % interval; a method beats another only where the paired test on the same frame sets says so.
"""
import functools
import json
import math
import shutil
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

from ..data.calib import read_samples, write_synthetic
from ..data.world import QUESTIONS
from ..model import load_model
from ..model.build import resolve_model
from .evaluate import PAIRED_GENERATED, ResampledScores, evaluate, paired_generated
from .machine import cpu
from .metrics import METEOR_SYNONYMS
from .perplexity import perplexity
from .stats import corrected, paired_difference
from ..pruning.run import METHODS

TEXTS = ("driving",)  # perplexity of every benchmarked model (the text check covers generic text)
CLOSED = [("closed_mean_acc", "mean acc"), ("action_acc", "action"), ("light_acc", "light"), ("crossing_acc", "crossing"),
          ("lead_acc", "lead"), ("vehicle_count_acc", "vehicles"), ("pedestrian_count_acc", "pedestrians"),
          ("vehicle_count_mae", "vehicle MAE"), ("pedestrian_count_mae", "ped. MAE")]
GENERATED = [("gen_action_exact_match", "action EM"), ("gen_action_accuracy", "action acc (parsed)"),
             ("gen_light_accuracy", "light acc (parsed)"),
             ("gen_bleu4", "BLEU-4"), ("gen_meteor", "METEOR"), ("gen_rouge_l", "ROUGE-L"), ("gen_cider", "CIDEr")]
COST = [("ppl_driving", "ppl driving"), ("size_mb", "size MB"),
        ("seconds_per_answer", "s/answer"), ("prune_s", "prune s"), ("prune_peak_mb", "prune peak MB")]
# (challenger, baseline): the same pruner and calibration, OWL's allocation against the uniform one; SparseGPT's
# reconstruction against Wanda's scores, ALPS's against SparseGPT's; the dense model's answers as calibration
# targets against the calibration set's own, and every question of a calibration frame set against one
PAIRS = [("owled", "wanda"), ("owled-sparsegpt", "sparsegpt"), ("owled-alps", "alps"), ("sparsegpt", "wanda"),
         ("alps", "sparsegpt"), ("owled-sparsegpt", "owled"), ("owled-alps", "owled-sparsegpt"), ("owled", "owl")] + [
    (f"{m}-dense-answers", m) for m in METHODS] + [(f"{m}-all-questions", m) for m in METHODS]
COMPARED = ["closed_mean_acc", "action_acc", "light_acc"]


def text_path(name):
    """One of the shipped texts (owled_ros/data/text/SOURCES.md): driving, generic or heldout."""
    return Path(resources.files("owled_ros") / "data" / "text" / f"{name}.txt")


def runs(sparsities, nm, methods, high_methods, nm_methods, component_sparsity, answer_methods=(), question_methods=(),
         questions=1):
    """(name, label, method, sparsity spec, nm, extra arguments) of the sweep (label: the method and variant that
    paired comparisons match): every method at the first sparsity,
    high_methods at the others; nm_methods in N:M: uniform ones on every linear, OWL ones at 40 % with the
    most outlier-heavy layers dense; answer_methods at every sparsity again, calibrated on the dense model's
    own answers; question_methods at every sparsity again, calibrated on `questions` questions of each frame
    set."""
    plan = [(f"{m}-{s:g}", m, m, f"{s:g}", None, []) for i, s in enumerate(sparsities) for m in methods
            if i == 0 or m in high_methods]
    plan += [(f"{m}-dense-answers-{s:g}", f"{m}-dense-answers", m, f"{s:g}", None, ["--answers", "dense"])
             for s in sparsities for m in answer_methods]
    plan += [(f"{m}-all-questions-{s:g}", f"{m}-all-questions", m, f"{s:g}", None, ["--questions", str(questions)])
             for s in sparsities for m in question_methods]
    for m in nm_methods if nm else ():
        plan.append((f"{m}-{nm}-0.4", m, m, "0.4", nm, []) if METHODS[m][1] == "owl" else (f"{m}-{nm}", m, m, None, nm, []))
    if component_sparsity:
        plan += [(f"owled-vision-only-{component_sparsity:g}", "owled", "owled", f"vision={component_sparsity:g}", None, []),
                 (f"owled-llm-only-{component_sparsity:g}", "owled", "owled", f"llm={component_sparsity:g}", None, [])]
    return plan


def kept_row(work, name, settings, measure_row):
    """The row an earlier run of these settings kept in work/rows (a resumed run), else measure_row() now, kept."""
    path = work / "rows" / f"{name}.json"
    if path.exists() and (kept := json.loads(path.read_text()))["settings"] == settings:
        return kept["row"]
    row = measure_row()
    path.write_text(json.dumps({"settings": settings, "row": row}))
    return row


def measure(model, model_dir, eval_samples, generated, max_new_tokens, blank=False):
    scored = evaluate(model, eval_samples, generated, max_new_tokens, blank)
    row = {"metrics": scored["metrics"], "items": scored["items"], "seconds_per_answer": scored["seconds_per_answer"],
           "frame_sets": scored["frame_sets"], "generated_frame_sets": scored["generated_frame_sets"],
           "generated": scored["generated"]}
    for name in TEXTS:
        row[f"ppl_{name}"] = perplexity(model.lm, model.tokenizer, text_path(name).read_text())
    row["size_mb"] = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors")) / 2**20
    return row


def run_bench(model_dir, out, sparsities=(0.5, 0.6, 0.7), nm="2:4", component_sparsity=0, nsamples=32, eval_frames=200,
              generated_frames=100, max_new_tokens=32,
              methods=("wanda", "sparsegpt", "owl", "owled", "owled-sparsegpt", "alps", "owled-alps"),
              high_methods=("sparsegpt", "owled-sparsegpt", "alps", "owled-alps"),
              nm_methods=("wanda", "sparsegpt", "owled-sparsegpt"), answer_methods=("owled-sparsegpt",),
              question_methods=("owled-sparsegpt", "owled-alps"), calib=None,
              eval_set=None, resume=False, skip=(), log=print):
    """model_dir: 'default', one of our model directories or a transformers checkpoint (closed questions only
    where the model scores options). calib, eval_set: calibration and held-out frame sets (directories);
    default synthetic 2-D ones. resume: keep the rows an interrupted run measured with the same settings.
    skip: names of planned runs to leave out (owled-alps-0.6). question_methods calibrate on every question kind
    our worlds ask of each calibration frame set."""
    plan = runs(sparsities, nm, methods, high_methods, nm_methods, component_sparsity, answer_methods,
                question_methods, len(QUESTIONS))
    if unknown := set(skip) - {run[0] for run in plan}:
        raise ValueError(f"--skip {' '.join(sorted(unknown))}: not a run of this plan ({' '.join(r[0] for r in plan)})")
    plan = [run for run in plan if run[0] not in skip]
    model_dir = resolve_model(str(model_dir))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    if not resume:
        shutil.rmtree(work, ignore_errors=True)
    (work / "rows").mkdir(parents=True, exist_ok=True)
    if calib is None:
        calib = work / "calib"
        if not calib.exists():
            write_synthetic(calib, max(nsamples, 8), seed=100, vehicle="bench-calib")
    if eval_set is None:
        eval_set = work / "eval"
        if not eval_set.exists():
            write_synthetic(eval_set, eval_frames, seed=999, vehicle="bench-eval")
    settings = {"model": str(model_dir), "calib": str(calib), "eval": str(eval_set), "eval_frames": eval_frames,
                "generated_frames": generated_frames, "max_new_tokens": max_new_tokens}
    eval_samples = read_samples(eval_set)[:eval_frames]
    if len(eval_samples) < eval_frames:
        raise ValueError(f"{eval_set} has {len(eval_samples)} frame sets; --eval-frames asks for {eval_frames}")
    frames = "/".join(sorted({s.source.split(":")[0] for s in eval_samples}))  # synthetic (2-D) or metadrive
    started = time.time()
    model = functools.cache(lambda: load_model(model_dir))
    dense = kept_row(work, "dense", settings, lambda: {
        "name": "dense", "method": "dense", "target": "0", "achieved": 0.0,
        **measure(model(), model_dir, eval_samples, generated_frames, max_new_tokens)})
    # The same dense model with every camera blanked: what the answers owe to the images.
    blank = kept_row(work, "blank", settings, lambda: {
        "name": "dense, blank images", "method": "dense", "target": "0", "achieved": 0.0,
        **measure(model(), model_dir, eval_samples, generated_frames, max_new_tokens, blank=True)})
    del model
    results = [dense, blank]
    log(f"dense: {headline(dense)}; blank images: {headline(blank)}")
    for name, label, method, sparsity, pattern, extra in plan:
        command = [sys.executable, "-m", "owled_ros.cli", "prune", "--model", str(model_dir), "--out", str(work / name),
                   "--method", method, "--calib", str(text_path("generic") if method == "owl" else calib),
                   "--nsamples", str(nsamples)]
        command += ["--sparsity", sparsity] if sparsity else []
        command += ["--nm", pattern] if pattern else []
        command += extra

        def pruned_row():
            shutil.rmtree(work / name, ignore_errors=True)
            subprocess.run(command, check=True, capture_output=True, text=True)
            report = json.loads((work / name / "report.json").read_text())
            row = {"name": name, "method": label, "target": f"{pattern} {sparsity or ''}".strip() if pattern else sparsity,
                   "achieved": report["achieved"]["pruned_components"], "prune_s": report["seconds"],
                   "prune_peak_mb": report["peak_rss_mb"], "args": ["owled", *command[3:]],
                   **measure(load_model(work / name), work / name, eval_samples, generated_frames, max_new_tokens)}
            shutil.copy(work / name / "report.json", out / f"report-{name}.json")
            shutil.rmtree(work / name)
            return row
        row = kept_row(work, name, {**settings, "command": command[3:]}, pruned_row)
        results.append(row)
        log(f"{name}: achieved {row['achieved']:.3f}, {headline(row)}")
    summary = {"model": str(model_dir), "nsamples": nsamples, "eval_frame_sets": eval_frames,
               "frames": frames,
               "generated_frame_sets": dense["generated_frame_sets"], "seconds": round(time.time() - started), "resumed": resume,
               "meteor_synonyms": METEOR_SYNONYMS, "cpu": cpu(),
               "results": results}
    summary["comparisons"], summary["comparison_confidence"] = comparisons(results, eval_samples)
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    (out / "results.md").write_text(markdown(summary))
    plot(results, out)
    shutil.rmtree(work)
    return summary


def metric(row, key):
    """(value, low, high) of a metric; NaN where the model does not give it (closed questions of a transformers
    checkpoint)."""
    return row["metrics"].get(key, (math.nan,) * 3)


def headline(row):
    return ", ".join(f"{name} {metric(row, key)[0]:.3f}" for key, name in
                     (("closed_mean_acc", "closed mean accuracy"), ("gen_action_accuracy", "generated action"),
                      ("gen_bleu4", "BLEU-4")) if not math.isnan(metric(row, key)[0]))


def comparisons(results, samples):
    """Paired differences on the same frame sets: challenger - baseline at the same target (closed metrics),
    and every pruned model's closed mean accuracy and generated answers against the dense model's. Each interval is widened for the
    number of comparisons made (Bonferroni), so that all of them hold together at 95 %.
    Returns (comparisons, the confidence of each interval)."""
    by_name = {r["name"]: r for r in results}
    closed_pairs = []
    for row in results:
        for challenger, baseline in PAIRS:
            other = by_name.get(row["name"].replace(challenger, baseline, 1))
            if row["method"] == challenger and other is not None and other["method"] == baseline:
                closed_pairs += [(row, other, key) for key in COMPARED if key in row["items"]]
    dense = by_name["dense"]
    closed_pairs += [(row, dense, "closed_mean_acc") for row in results
                     if row["method"] != "dense" and "closed_mean_acc" in row["items"]]
    pruned = [r for r in results if r["method"] != "dense" and r["generated"]]
    confidence = corrected(len(closed_pairs) + len(pruned) * len(PAIRED_GENERATED))
    found = []
    for row, other, key in closed_pairs:
        diff, low, high, verdict = paired_difference(row["items"][key], other["items"][key], confidence=confidence)
        found.append({"challenger": row["name"], "baseline": other["name"], "metric": key,
                      "difference": diff, "low": low, "high": high, "verdict": verdict})
    dense_scores = ResampledScores(samples, dense["generated"])
    for row in pruned:
        generated = paired_generated(ResampledScores(samples, row["generated"]), dense_scores, confidence=confidence)
        found += [{"challenger": row["name"], "baseline": "dense", "metric": f"gen_{key}", "difference": diff,
                   "low": low, "high": high, "verdict": verdict} for key, (diff, low, high, verdict) in generated.items()]
    return found, confidence


def cell(value):
    if isinstance(value, (list, tuple)):
        point, low, high = value
        return "–" if math.isnan(point) else f"{cell(point)} [{cell(low)}, {cell(high)}]"
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def table(header, rows):
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(map(cell, row)) + " |" for row in rows]


def markdown(summary):
    results = summary["results"]
    lines = [f"Model `{Path(summary['model']).name}`; held-out {summary['frames']} 6-camera frame sets: closed questions on "
             f"{summary['eval_frame_sets']}, generated answers on the first {summary['generated_frame_sets']}; "
             f"{summary['nsamples']} calibration samples; "
             + (f"{summary['cpu']['model']} ({', '.join(summary['cpu']['flags'])}), {summary['cpu']['cores']} cores; " if "cpu" in summary else "")
             + (f"this run took {summary['seconds']} s, resuming the rows an interrupted one had measured. " if summary.get("resumed")
                else f"sweep took {summary['seconds']} s. ") +
             "Each cell: value [bootstrap 95 % interval over frame sets].", "",
             "Closed questions, scored by likelihood (accuracy; MAE in objects).", ""]
    lines += table(["run", "target", "achieved"] + [t for _, t in CLOSED],
                   [[r["name"], r["target"], r["achieved"]] + [metric(r, k) for k, _ in CLOSED] for r in results])
    meteor = "exact, stem and WordNet-synonym" if summary["meteor_synonyms"] else "exact and stem (no WordNet here)"
    lines += ["", f"Generated answers (greedy): driving values parsed from the text, and language metrics (METEOR: "
                  f"{meteor} matching).", ""]
    lines += table(["run"] + [t for _, t in GENERATED], [[r["name"]] + [metric(r, k) for k, _ in GENERATED] for r in results])
    lines += ["", "Perplexity, size, speed and pruning cost (each prune its own process).", ""]
    lines += table(["run"] + [t for _, t in COST], [[r["name"]] + [r.get(k, "") for k, _ in COST] for r in results])
    dense, blank = results[:2]
    lines += ["", "Do the images matter? The dense model on the same frame sets with every camera blanked.", ""]
    keys = [("closed_mean_acc", "mean acc"), ("action_acc", "action"), ("light_acc", "light"),
            ("vehicle_count_mae", "vehicle MAE"), ("gen_description_bleu4", "description BLEU-4")]
    lines += table(["images"] + [t for _, t in keys], [[r["name"]] + [metric(r, k) for k, _ in keys] for r in (dense, blank)])
    verdicts = {1: "**better**", -1: "**worse**", 0: "no difference shown"}
    lines += ["", f"Paired comparisons on the same frame sets: challenger − baseline [interval]; each interval at "
                  f"{summary['comparison_confidence']:.2%} so that all {len(summary['comparisons'])} hold together at 95 % "
                  "(Bonferroni); better/worse only where the interval excludes 0.", ""]
    lines += table(["challenger", "baseline", "metric", "difference", "verdict"],
                   [[c["challenger"], c["baseline"], c["metric"], (c["difference"], c["low"], c["high"]), verdicts[c["verdict"]]]
                    for c in summary["comparisons"]])
    return "\n".join(lines) + "\n"


def plot(results, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unstructured = [r for r in results if r["method"] != "dense" and ":" not in r["target"] and "=" not in r["target"]]
    methods = list(dict.fromkeys(r["method"] for r in unstructured))
    metrics = [("closed_mean_acc", "closed questions: mean accuracy"), ("action_acc", "action accuracy (likelihood)"),
               ("gen_bleu4", "BLEU-4 (generated)"), ("ppl_driving", "perplexity (driving text)")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4))
    dense = results[0]
    value = lambda row, key: (row[key],) * 3 if key in row else metric(row, key)
    for ax, (key, title) in zip(axes, metrics):
        for method in methods:
            rows = [dense] + sorted((r for r in unstructured if r["method"] == method), key=lambda r: float(r["target"]))
            x = [0] + [float(r["target"]) for r in rows[1:]]
            points = [value(r, key) for r in rows]
            line, = ax.plot(x, [p[0] for p in points], marker="o", label=method)
            ax.fill_between(x, [p[1] for p in points], [p[2] for p in points], color=line.get_color(), alpha=0.12)
        ax.set_xlabel("target sparsity (language model)")
        ax.set_title(title)
        if key.startswith("ppl"):
            ax.set_yscale("log")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "metrics_vs_sparsity.png", dpi=80)
    plt.close(fig)
