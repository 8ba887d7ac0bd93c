"""Bring your own model: `owled prune` on transformers checkpoints, each prune its own process (its own time and
peak RSS). Tiny random-weight LLaVA, Idefics3 and Qwen2-VL checkpoints (test/hf_models.py) calibrated on the
12 shipped MetaDrive frame sets; the real SmolLM2-135M-Instruct as a plain LlamaForCausalLM directory
calibrated on generic text, once in memory and once with --max-memory below its size (blocks from disk).

    .venv/bin/python bench/byo_model.py --out bench/results     # byo_model.md / .json (about 10 min on 2 cores)
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "test"))
from hf_models import FAMILIES  # noqa: E402
from owled_ros.data.metadrive_world import DEMO_FRAMES  # noqa: E402
from owled_ros.eval.bench import table, text_path  # noqa: E402
from owled_ros.eval.machine import cpu  # noqa: E402
from owled_ros.model.build import save_smollm2  # noqa: E402
from results_io import write_results  # noqa: E402

VLM_RUNS = [("owled-sparsegpt", "llm=0.5,vision=0.5", None), ("owled", "llm=0.5,vision=0.5", None),
            ("owled-sparsegpt", "llm=0.5,vision=0.5", "2:4")]
TEXT_RUNS = [("wanda", "0.5", None, None), ("sparsegpt", "0.5", None, None), ("sparsegpt", "0.5", None, "300MB")]


def prune(model, out, method, sparsity, nm, calib, nsamples, max_memory=None):
    command = [sys.executable, "-m", "owled_ros.cli", "prune", "--model", str(model), "--out", str(out), "--method", method,
               "--sparsity", sparsity, "--calib", str(calib), "--nsamples", str(nsamples)]
    command += (["--nm", nm] if nm else []) + (["--max-memory", max_memory] if max_memory else [])
    subprocess.run(command, check=True, capture_output=True, text=True, env=os.environ | {"TRANSFORMERS_VERBOSITY": "error"})
    report = json.loads((out / "report.json").read_text())
    shutil.rmtree(out)
    return report


def row(family, checkpoint, method, sparsity, nm, report, max_memory=None):
    size_mb = sum(f.stat().st_size for f in Path(checkpoint).glob("*.safetensors")) / 2**20
    return {"family": family, "checkpoint_mb": round(size_mb, 1), "method": method, "target": f"{nm} {sparsity}" if nm else sparsity,
            "achieved": report["achieved"]["pruned_components"], "prune_s": report["seconds"],
            "peak_rss_mb": report["peak_rss_mb"], "max_memory": max_memory, "dtype": report["dtype"],
            "args": ["--method", method, "--sparsity", sparsity] + (["--nm", nm] if nm else []) +
                    (["--max-memory", max_memory] if max_memory else [])}


def markdown(summary):
    lines = [f"`owled prune` on transformers checkpoints, each prune its own process; {summary['cpu']['model']}, "
             f"{summary['cpu']['cores']} cores. Tiny random-weight VLMs calibrate on {summary['frame_sets']} MetaDrive frame sets (6 views in one "
             f"prompt), SmolLM2 on {summary['text_samples']} windows of generic text. Peak RSS includes torch and "
             "transformers themselves (about 0.45 GB).", ""]
    lines += table(["checkpoint", "size MB", "method", "target", "achieved", "prune s", "peak RSS MB", "--max-memory"],
                   [[r["family"], r["checkpoint_mb"], r["method"], r["target"], r["achieved"], r["prune_s"], r["peak_rss_mb"],
                     r["max_memory"] or "–"] for r in summary["rows"]])
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--nsamples", type=int, default=12)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started, rows = time.time(), []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for family, build in FAMILIES.items():
            checkpoint = build(work / family)
            for method, sparsity, nm in VLM_RUNS:
                report = prune(checkpoint, work / "out", method, sparsity, nm, DEMO_FRAMES, args.nsamples)
                rows.append(row(family, checkpoint, method, sparsity, nm, report))
                print(rows[-1])
        checkpoint = save_smollm2(work / "smollm2")
        for method, sparsity, nm, max_memory in TEXT_RUNS:
            report = prune(checkpoint, work / "out", method, sparsity, nm, text_path("generic"), 32, max_memory)
            rows.append(row("SmolLM2-135M (real, text-only)", checkpoint, method, sparsity, nm, report, max_memory))
            print(rows[-1])
    summary = {"cpu": cpu(), "frame_sets": args.nsamples,
               "text_samples": 32, "seconds": round(time.time() - started), "rows": rows}
    write_results(out, "byo_model", summary, markdown(summary))


if __name__ == "__main__":
    main()
