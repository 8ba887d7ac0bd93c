"""Every number in README.md and docs/*.md comes from a results file (or, for node parameters, from the
parameter file that mirrors the node), through three kinds of marks:

    <!-- include PATH -->...<!-- end include -->        the file's content (a bench's table)
    <!-- value PATH KEY [FORMAT] -->...<!-- end -->     one figure of a JSON results file
    <!-- parameters PATH -->...<!-- end parameters -->  a ROS parameter file as a table: name, default, comment

bench/results/headline.md, the README's results, is made here from the other results files (HEADLINE).

KEY walks the JSON by `/` (`load/rss_growth`); a list step `name=dense` takes the element whose `name` is
dense (`method=dense&backend=torch`: every field must match). FORMAT is a Python format spec (`.3f`, `.1%`,
`,d`). Paths are relative to the repository root.

    python bench/update_readme.py           # rewrite the documents from the results files
    python bench/update_readme.py --check   # exit 1, naming each stale mark, where a document disagrees
"""
import argparse
import json
import re
import sys
from pathlib import Path

import yaml

from owled_ros.model.build import DEFAULT_SHA256

ROOT = Path(__file__).resolve().parents[1]
INCLUDE = re.compile(r"(<!-- include (\S+) -->\n).*?(<!-- end include -->)", re.S)
VALUE = re.compile(r"(<!-- value (\S+) (\S+)(?: (\S+))? -->).*?(<!-- end -->)", re.S)
PARAMETERS = re.compile(r"(<!-- parameters (\S+) -->\n).*?(<!-- end parameters -->)", re.S)

def interval(value):
    return "{:.3f} [{:.3f}, {:.3f}]".format(*value)


TARGETS = {"0.5": "50 %", "0.6": "60 %", "0.7": "70 %", "2:4": "2:4 (50 %)", "2:4 0.4": "2:4, outlier layers dense (40 %)"}


def picks(sweep):
    """Which method to pick at each target of the driving sweep: the run whose generated answers (the text the
    drive node publishes) keep the most of dense's, its action exact match and CIDEr each as a share of dense's,
    averaged; with its paired differences against dense (the sweep's corrected intervals)."""
    rows = sweep["results"]
    dense, blank = rows[:2]
    against_dense = {(c["challenger"], c["metric"]): c for c in sweep["comparisons"] if c["baseline"] == "dense"}

    def difference(row, key):
        c = against_dense.get((row["name"], key))
        return "–" if c is None else "{:+.3f} [{:+.3f}, {:+.3f}]".format(c["difference"], c["low"], c["high"])

    def command(row):
        """The run's `owled prune` options that choose the method (not its model, data, target or output)."""
        args = row["args"]
        shown = [f"{a} {args[i + 1]}" for i, a in enumerate(args) if a in ("--method", "--answers", "--questions")]
        return f"`{' '.join(shown)}`"

    shared = [key for key in ("gen_action_exact_match", "gen_cider") if dense["metrics"][key][0] > 0]  # a share of 0 is none

    def kept(row):
        return sum(row["metrics"][key][0] / dense["metrics"][key][0] for key in shared) / max(len(shared), 1)

    model = Path(sweep["model"]).name
    which = "the default driving model" if model.endswith(DEFAULT_SHA256[:12]) else "an earlier default driving model"
    lines = [f"**Which pruner at which sparsity, on {which}** (`{model}`; "
             f"{sweep['eval_frame_sets']} held-out MetaDrive frame sets, generated answers on {sweep['generated_frame_sets']}; "
             f"at each target the run of the sweep ({len(rows) - 2} runs) whose generated answers, the text the drive node "
             "publishes, keep the most of dense's: action exact match and CIDEr, each as a share of dense's, averaged; "
             f"value [95 % interval]; − dense: paired on the same frame sets, intervals at "
             f"{sweep['comparison_confidence']:.2%} for the sweep's {len(sweep['comparisons'])} comparisons):", "",
             "| target | `owled prune` | closed mean accuracy | − dense | generated action, exact match | − dense | "
             "CIDEr | − dense | size MB |", "|---|---|---|---|---|---|---|---|---|"]
    for label, row in (("dense", dense), ("dense, every camera blanked", blank)):
        lines.append(f"| {label} | | {interval(row['metrics']['closed_mean_acc'])} | | "
                     f"{interval(row['metrics']['gen_action_exact_match'])} | | {row['metrics']['gen_cider'][0]:.2f} | | "
                     f"{row['size_mb']:.0f} |")
    for target, label in TARGETS.items():
        runs = [r for r in rows[2:] if r["target"] == target]
        if runs:
            best = max(runs, key=kept)
            lines.append(f"| {label} | {command(best)} | {interval(best['metrics']['closed_mean_acc'])} | "
                         f"{difference(best, 'closed_mean_acc')} | {interval(best['metrics']['gen_action_exact_match'])} | "
                         f"{difference(best, 'gen_action_exact_match')} | {best['metrics']['gen_cider'][0]:.2f} | "
                         f"{difference(best, 'gen_cider')} | {best['size_mb']:.0f} |")
    return lines


def headline(root=ROOT):
    """The README's results tables, from text_check.json, default_model.json, results.json, runtime.json and
    load.json."""
    read = lambda name: json.loads((root / "bench" / "results" / f"{name}.json").read_text())
    text, sweep, runtime, load = read("text_check"), read("results"), read("runtime"), read("load")
    perplexity = {r["name"]: r["perplexity"] for r in text["results"]}
    lines = [f"**Pruning the language model** (SmolLM2-135M, real weights; held-out perplexity, dense "
             f"{perplexity['dense']:.1f}; lower is better):", "",
             "| sparsity | Wanda | OWL × Wanda | OWL × SparseGPT | OWL × ALPS |", "|---|---|---|---|---|"]
    lines += [f"| {s * 100:.0f} % | " + " | ".join(f"{perplexity[f'{m}-{s:g}']:.1f}" for m in
                                          ("wanda-uniform", "wanda-owl", "sparsegpt-owl", "alps-owl")) + " |"
              for s in (0.5, 0.6, 0.7)]
    default = read("default_model")
    lines += ["", f"**The default driving model** (`{default['model']}`, dense; {default['frame_sets']} held-out MetaDrive "
              "frame sets, closed questions and generated answers on every one; value [95 % interval]):", "",
              "| images | closed mean accuracy | traffic light | action | vehicle count MAE | generated action, exact match |",
              "|---|---|---|---|---|---|"]
    for label, name in (("as seen", "images"), ("every camera blanked", "blank")):
        lines.append(f"| {label} | " + " | ".join(interval(default[name][key]) for key in (
            "closed_mean_acc", "light_acc", "action_acc", "vehicle_count_mae", "gen_action_exact_match")) + " |")
    lines += ["", *picks(sweep)]
    cpu = runtime["cpu"]
    p50 = {(r["method"], r["backend"], r["dtype"]): r for r in runtime["rows"]}
    lines += ["", f"**Runtime** (perception + action answers for one frame set, p50 seconds; {cpu['model']}, "
              f"{', '.join(cpu['flags'])}; {cpu['cores']} cores):", "",
              "| model | torch fp32 | torch int8 weights | OpenVINO fp32 | OpenVINO int8 weights | OpenVINO int8 "
              "weights and activations | RSS MB torch fp32 | RSS MB torch int8 |", "|---|---|---|---|---|---|---|---|"]
    backends = ("torch", "torch-int8", "openvino", "openvino-int8", "openvino-w8a8")
    for method in dict.fromkeys(r["method"] for r in runtime["rows"]):
        measured = [p50.get((method, backend, "float32")) for backend in backends]
        cells = [f"{r['p50_s']:.2f}" if r else "–" for r in measured] + [
            f"{r['rss_mb']:.0f}" if r else "–" for r in measured[:2]]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    under = load["load"]
    lines += ["", f"**The drive node under load** (cameras at 10 Hz for {under['minutes']:g} minutes; "
              f"{load['machine']}): RSS growth after warm-up {under['rss_growth']:+.1%}, {under['worker_errors']} "
              f"worker errors; exit {load['shutdown']['sigint_s']:.2f} s after SIGINT, "
              f"{load['shutdown']['sigterm_s']:.2f} s after SIGTERM."]
    return "\n".join(lines) + "\n"


GENERATED = {"bench/results/headline.md": headline}


def documents(root=ROOT):
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def lookup(data, key):
    for step in key.split("/"):
        if isinstance(data, list) and "=" in step:
            wanted = dict(condition.split("=", 1) for condition in step.split("&"))
            data = next(item for item in data if all(str(item.get(k)) == v for k, v in wanted.items()))
        else:
            data = data[int(step)] if isinstance(data, list) else data[step]
    return data


def parameter_table(path):
    """A ROS parameter file (one node's `ros__parameters`) as a markdown table, with each line's comment."""
    text = path.read_text()
    (_, params), = yaml.safe_load(text).items()
    comments = dict(re.findall(r"^\s+(\w+):.*?#\s*(.*)$", text, re.M))
    shown = lambda v: "`" + (str(v) if isinstance(v, str) and v else json.dumps(v)) + "`"
    cell = lambda text: text.replace("|", "\\|")
    rows = [f"| `{name}` | {cell(shown(value))} | {cell(comments.get(name, ''))} |"
            for name, value in params["ros__parameters"].items()]
    return "\n".join(["| parameter | default | |", "|---|---|---|", *rows]) + "\n"


def render(text, root=ROOT, generated=None):
    """The document with every mark filled from its file (or from `generated`, {path: content} made here);
    ValueError naming a mark that cannot be filled."""
    generated = generated or {}

    def include(match):
        if match[2] in generated:
            return match[1] + generated[match[2]] + match[3]
        path = root / match[2]
        if not path.is_file():
            raise ValueError(f"{match[2]} not found (run its benchmark first)")
        return match[1] + path.read_text() + match[3]

    def value(match):
        path, key, spec = root / match[2], match[3], match[4] or ""
        try:
            figure = lookup(json.loads(path.read_text()), key)
        except (OSError, KeyError, IndexError, StopIteration, ValueError) as error:
            raise ValueError(f"{match[2]} has no value at {key} ({type(error).__name__}: {error})") from None
        return match[1] + format(figure, spec) + match[5]

    def parameters(match):
        return match[1] + parameter_table(root / match[2]) + match[3]

    return PARAMETERS.sub(parameters, VALUE.sub(value, INCLUDE.sub(include, text)))


def stale_marks(old, new):
    """The marks whose filled text differs, as 'PATH KEY' lines."""
    marks = lambda text: [(m[0].split(" -->")[0][5:], m[0]) for pattern in (INCLUDE, VALUE, PARAMETERS)
                          for m in pattern.finditer(text)]
    return [name for (name, before), (_, after) in zip(marks(old), marks(new)) if before != after]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 where a document is stale")
    p.add_argument("--root", type=Path, default=ROOT)
    args = p.parse_args()
    texts = {document: document.read_text() for document in documents(args.root)}
    wanted = {m[2] for text in texts.values() for m in INCLUDE.finditer(text) if m[2] in GENERATED}
    try:
        generated = {path: GENERATED[path](args.root) for path in wanted}
    except (OSError, KeyError, ValueError) as error:
        sys.exit(f"cannot make {', '.join(sorted(wanted))} from the results files: {type(error).__name__}: {error}")
    filled = {}
    for document, text in texts.items():  # every document filled before anything is written
        try:
            filled[document] = render(text, args.root, generated)
        except ValueError as error:
            sys.exit(f"{document.relative_to(args.root)}: {error}")
    if args.check:
        stale = [f"{path}: not what the results files give" for path, content in generated.items()
                 if not (args.root / path).is_file() or (args.root / path).read_text() != content]
        stale += [f"{document.relative_to(args.root)}: {mark}" for document, text in texts.items()
                  for mark in stale_marks(text, filled[document])]
    else:
        stale = []
        for path, content in generated.items():
            (args.root / path).write_text(content)
        for document, text in texts.items():
            if filled[document] != text:
                document.write_text(filled[document])
                print(f"updated {document.relative_to(args.root)}")
    if stale:
        sys.exit("stale (run python bench/update_readme.py):\n  " + "\n  ".join(stale))


if __name__ == "__main__":
    main()
