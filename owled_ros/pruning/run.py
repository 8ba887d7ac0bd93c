"""`owled prune`: load a model directory, calibrate, prune, write a compressed model + report.json + sparsity.png."""
import json
import shutil
import time
from pathlib import Path

from ..model import load_model
from ..model.checkpoint import peak_rss_mb
from . import calibration
from .engine import PruneSpec, achieved, group_of, prunable, prune_model

GROUPS = ("llm", "vision")
# --method presets: (pruner, allocation, the calibration data its name promises, or None for any)
METHODS = {
    "magnitude": ("magnitude", "uniform", None),
    "wanda": ("wanda", "uniform", None),
    "sparsegpt": ("sparsegpt", "uniform", None),
    "owl": ("wanda", "owl", "text"),
    "owled": ("wanda", "owl", "driving"),
    "owled-sparsegpt": ("sparsegpt", "owl", "driving"),
    "alps": ("alps", "uniform", None),
    "owled-alps": ("alps", "owl", "driving"),
}


class PruneError(ValueError):
    pass


def parse_sparsity(text):
    """'0.5' (language model only), 'llm=0.5,vision=0.2' (groups) or 'vision.encoder=0.3' (one component of a
    group: the image encoder alone) -> {group or component: sparsity}."""
    targets = {}
    for part in str(text).split(","):
        group, _, value = part.rpartition("=")
        group = group.strip() or "llm"
        if group_of(group) not in GROUPS:
            raise PruneError(f"unknown component {group!r} in --sparsity; use {', '.join(GROUPS)} or one of their "
                             "components (vision.encoder, vision.fusion, ...)")
        try:
            targets[group] = float(value)
        except ValueError:
            raise PruneError(f"--sparsity value {value!r} is not a number") from None
        if not 0 <= targets[group] < 1:
            raise PruneError(f"--sparsity {group}={targets[group]} is outside [0, 1)")
    return {g: s for g, s in targets.items() if s > 0}


def parse_nm(text):
    if not text:
        return None
    try:
        n, m = (int(v) for v in text.split(":"))
    except ValueError:
        raise PruneError(f"--nm {text!r} is not of the form N:M (e.g. 2:4)") from None
    if not 0 < n < m:
        raise PruneError(f"--nm {text}: need 0 < N < M")
    return n, m


def check_calibration(method, info):
    promised = METHODS[method][2]
    if promised == "driving" and info["kind"] != "driving":
        raise PruneError(f"--method {method} calibrates on driving data (frames + questions); --calib is a text file")
    if promised == "text" and info["kind"] != "text":
        raise PruneError(f"--method {method} is the generic-text baseline; --calib must be a text file "
                         "(use owled for driving data)")


def make_spec(method, targets, nm, m_factor, lam, pruner, allocation, outlier_ratio):
    """The PruneSpec of a --method preset, with --pruner/--allocation overriding its parts."""
    if method not in METHODS:
        raise PruneError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    preset_pruner, preset_allocation, _ = METHODS[method]
    try:
        return PruneSpec(pruner or preset_pruner, allocation or preset_allocation, targets, nm, m_factor, lam, outlier_ratio)
    except ValueError as error:
        raise PruneError(str(error)) from None


LAYOUTS = ("auto", "dense", "bitmask")


def prune(model_dir, out, method="owled", sparsity=None, calib=None, nm=None, m_factor=None, lam=None,
          nsamples=128, seed=0, progress=True, pruner=None, allocation=None, outlier_ratio="per-layer", layout="auto",
          max_memory=None, answers="reference", questions=1):
    """Prune model_dir ('default', one of our model directories or a local transformers checkpoint) into out
    (written to a temporary directory, renamed at the end); the arguments are checked before the model is
    read. Returns the report. sparsity: '0.5' or 'llm=0.5,vision=0.2'; default 0.5, or with nm all that N:M
    removes (1 - n/m). m_factor, lam: OWL's M and the allocation's lambda; None: chosen from the calibration
    data (report.json: "allocation_search"). layout: how pruned weights are stored, 'dense' (plain safetensors with the zeros),
    'bitmask' (our compact layout), 'auto' (the model's own: ours bitmask, transformers checkpoints dense).
    max_memory (e.g. '2GB'): a transformers checkpoint larger than that keeps the rest of its weights on disk,
    each block onloaded while it runs or is pruned. answers: the driving calibration's answer tokens, the set's
    reference answers (the dense model's where a frame set has none) or the dense model's own for every sample.
    questions: samples of each driving frame set, one per question (nsamples x questions samples in all)."""
    start = time.time()
    nm = parse_nm(nm)
    targets = parse_sparsity(sparsity if sparsity is not None else f"{1 - nm[0] / nm[1]:g}" if nm else "0.5")
    if not targets:
        raise PruneError("nothing to prune: every --sparsity target is 0")
    spec = make_spec(method, targets, nm, m_factor, lam, pruner, allocation, outlier_ratio)
    if layout not in LAYOUTS:
        raise PruneError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if answers not in calibration.ANSWERS:
        raise PruneError(f"unknown answers {answers!r}; choose one of {', '.join(calibration.ANSWERS)}")
    out = Path(out)
    if out.exists():
        raise PruneError(f"output directory already exists: {out}")
    offload = out.with_name(f".{out.name}.offload")
    try:
        model = load_model(model_dir, max_memory=max_memory, offload_folder=offload)
        return prune_loaded(model, out, method, spec, calib, nsamples, seed, progress, layout, max_memory, start, answers,
                            questions)
    except ValueError as error:
        raise PruneError(str(error)) from None
    finally:
        shutil.rmtree(offload, ignore_errors=True)


def prune_loaded(model, out, method, spec, calib, nsamples, seed, progress, layout, max_memory, start, answers, questions):
    targets, nm = spec.targets, spec.nm
    if layout == "bitmask" and getattr(model, "offloaded", 0):
        raise PruneError("--layout bitmask needs the whole model in memory; an offloaded model (--max-memory) is saved dense")
    components = model.components()
    unknown = [t for t in targets if t not in components and not any(group_of(c) == t for c in components)]
    if unknown:
        raise PruneError(f"--sparsity names {', '.join(unknown)}: not a component of {model.model_id} "
                         f"(it has {', '.join(components)})")
    samples, run, info = None, None, {"kind": "none"}
    if spec.needs_activations or spec.outlier_weighted or spec.searched:
        if calib is None:
            raise PruneError(f"--method {method} needs --calib")
        samples, run, info = calibration.load(calib, model.tokenizer, nsamples, seed, questions=questions)
        check_calibration(method, info)
        if info["kind"] == "driving" and not model.sees_images:
            raise PruneError(f"{model.model_id} is a text-only model: calibrate it with a text file (--calib FILE.txt)")
        if answers == "dense" and info["kind"] != "driving":
            raise PruneError("--answers dense needs driving calibration (frame sets with questions); --calib is a text file")
        if questions > 1 and info["kind"] != "driving":
            raise PruneError(f"--questions {questions} needs driving calibration (frame sets with questions); "
                             "--calib is a text file")
        if info["kind"] == "driving":
            info["answers"], info["questions"] = answers, questions
            samples, info["dense_model_answers"] = calibration.dense_answers(model, samples, answers == "dense")
        if any(group_of(t) == "vision" for t in targets) and info["kind"] == "text":
            raise PruneError("pruning the vision side needs image calibration; --calib is a text file")
    records = prune_model(model, samples, run, spec, progress)

    report = make_report(model, records, method, spec, info, len(samples) if samples else 0)
    report["seconds"] = round(time.time() - start, 1)
    report["peak_rss_mb"] = round(peak_rss_mb(), 1)
    report["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    report["layout"] = model.default_layout if layout == "auto" else layout
    report["max_memory"], report["offloaded_parameters"] = max_memory, getattr(model, "offloaded", 0)
    model.mark_pruned({"method": method, "pruner": spec.pruner, "allocation": spec.allocation,
                       "sparsity": report["achieved"]["pruned_components"],
                       "targets": targets, "nm": list(nm) if nm else None, "source_model": model.model_id},
                      f"{model.model_id}-{method}-" + (f"{nm[0]}of{nm[1]}-" if nm else "") + "-".join(
                          f"{g}{s:g}" for g, s in targets.items()))
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, pruned_weight_names(model, records), report["layout"])
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        plot_report(report, tmp / "sparsity.png")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def pruned_weight_names(model, records):
    components = model.components()
    names = {id(module): name for name, module in model.named_modules()}
    return {f"{names[id(prunable(components[r.component][r.index])[layer])]}.weight" for r in records for layer in r.layers}


def make_report(model, records, method, spec, info, nsamples):
    per_component = {}
    for r in records:
        per_component.setdefault(r.component, {}).update({f"{r.index}.{k}": v for k, v in r.layers.items()})
    all_layers = {f"{c}.{k}": v for c, layers in per_component.items() for k, v in layers.items()}
    weighted_target = {}
    for component in per_component:
        rs = [r for r in records if r.component == component]
        sizes = [sum(n for _, n in r.layers.values()) for r in rs]
        weighted_target[component] = {"mean": sum(r.target for r in rs) / len(rs),
                                      "parameter_weighted_mean": sum(r.target * s for r, s in zip(rs, sizes)) / sum(sizes)}
    total = sum(p.numel() for p in model.parameters())
    return {
        "model_id": model.model_id, "method": method, "pruner": spec.pruner, "allocation_rule": spec.allocation,
        "outlier_ratio": spec.outlier_ratio if spec.outlier_weighted else None, "targets": spec.targets,
        "nm": list(spec.nm) if spec.nm else None, "M": spec.m_factor, "lambda": spec.lam,
        "allocation_search": spec.search,
        "calibration": info | {"nsamples": nsamples},
        "achieved": {"pruned_components": achieved(all_layers),
                     "whole_model": sum(z for z, _ in all_layers.values()) / total,
                     **{c: achieved(layers) for c, layers in per_component.items()}},
        "allocation": weighted_target,
        "blocks": [{"component": r.component, "index": r.index, "target": r.target, "outlier_ratio": r.outlier_ratio,
                    "nm": list(r.nm) if r.nm else None, "achieved": achieved(r.layers),
                    "layers": {k: {"zeros": z, "numel": n, "sparsity": z / n} for k, (z, n) in r.layers.items()}}
                   for r in records],
    }


def plot_report(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    components = sorted({b["component"] for b in report["blocks"]}, key=lambda c: [b["component"] for b in report["blocks"]].index(c))
    fig, axes = plt.subplots(len(components), 1, figsize=(8, 3 * len(components)), squeeze=False)
    for ax, component in zip(axes[:, 0], components):
        blocks = [b for b in report["blocks"] if b["component"] == component]
        x = [b["index"] for b in blocks]
        ax.bar(x, [b["achieved"] for b in blocks], color="tab:blue", label="achieved sparsity")
        ax.plot(x, [b["target"] for b in blocks], "k.", label="target")
        ax.set_ylabel("sparsity")
        ax.set_title(f"{component}: {report['method']}")
        if blocks[0]["outlier_ratio"] is not None:
            twin = ax.twinx()
            twin.plot(x, [100 * b["outlier_ratio"] for b in blocks], color="tab:red", marker="o", label="outlier ratio")
            twin.set_ylabel("outlier ratio (%)", color="tab:red")
        ax.set_xlabel("block")
        ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
