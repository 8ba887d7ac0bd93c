"""`make demo` as a new user runs it, scored: frame sets answered and dropped of the 12 judged scenes, actions
and lights right, the runtime backend the drive node chose, on this machine's CPU. One row per CPU (model and
vector extensions): a run on another CPU adds its row and keeps the others of the same default model.

    .venv/bin/python bench/demo.py --out bench/results     # writes demo.json, demo.md (about 4 minutes)
"""
import argparse
import json
import tempfile
from pathlib import Path

from owled_ros.eval.machine import cpu
from owled_ros.model.build import DEFAULT_MODEL_ID, DEFAULT_SHA256
from owled_ros.nodes.demo import run_demo
from results_io import write_results


def markdown(rows):
    lines = [f"`make demo` (OWLed-SparseGPT 50 % of the default model `{DEFAULT_MODEL_ID}-{DEFAULT_SHA256[:12]}`, 12 "
             "held-out scenes one every 2 s, the drive node with its defaults); dropped: frame sets the node had no time "
             "for or could not make; both right: action and light right on one answered frame set.", "",
             "| CPU | cores | backend | frame sets answered | dropped | actions right | lights right | both right "
             "| vehicle count MAE | model p50 s | model p95 s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        report, score = row["report"], row["report"]["score"]
        dropped = sum(report["dropped"].values())
        lines.append(f"| {row['cpu']['model']} ({', '.join(row['cpu']['flags'])}) | {row['cpu']['cores']} | "
                     f"{report['backend']} | {score['frame_sets_answered']} of {report['frame_sets']} | {dropped} | "
                     f"{score['actions_right']} of {score['actions']} | {score['lights_right']} of {score['lights']} | "
                     f"{score['both_right']} of {score['both']} | "
                     f"{score['vehicle_count_mae']} | {report['latency_p50_s']} | {report['latency_p95_s']} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as work:
        report = run_demo(Path(work) / "demo")
    previous = out / "demo.json"
    rows = json.loads(previous.read_text())["rows"] if previous.exists() else []
    machine = cpu()
    rows = [r for r in rows if (r["cpu"]["model"], r["cpu"]["flags"]) != (machine["model"], machine["flags"])
            and r.get("default") == DEFAULT_SHA256]  # another default's rows are another model's
    rows.append({"cpu": machine, "default": DEFAULT_SHA256, "report": report})
    write_results(out, "demo", {"rows": rows}, markdown(rows))


if __name__ == "__main__":
    main()
