"""Runtime backends side by side, one run: the default model dense and OWLed-SparseGPT 50 % (calibrated on 12 shipped
MetaDrive frame sets) on torch eager and OpenVINO (fp32, bf16, int8 weights). Each row is its own process (its own
resident memory), answers the perception and action questions for each held-out frame set as the drive node does
(guesses from earlier answers off, so that the rows compare the runtimes alone), and counts the answers that
equal torch eager fp32's on the same model.

    .venv/bin/python bench/runtime.py --frames bench/results/work-world-heldout --out bench/results   # ~15 min
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from results_io import cpu, write_results  # noqa: E402

QUESTIONS = ["What are the important objects in the current scene?", "What should the ego vehicle do?"]
CONFIGS = [("torch", "float32"), ("torch", "bfloat16"), ("openvino", "float32"), ("openvino", "bfloat16"),
           ("openvino-int8", "float32")]


def one_row(model_dir, backend, dtype, frames, count):
    """Runs in its own process: answers for every frame set, timings and resident memory."""
    import psutil
    import torch

    from owled_ros.data.calib import read_samples
    from owled_ros.model import load_model
    from owled_ros.runtime import prepare

    torch.set_num_threads(os.cpu_count())
    model = load_model(model_dir).to(getattr(torch, dtype))
    started = time.perf_counter()
    ran = prepare(model, backend, dtype, serve_only=True)  # as the drive node holds it
    compile_s = time.perf_counter() - started
    sets = [s.images() for s in read_samples(frames)[:count + 1]]
    answers, seconds, first, per_token = [], [], [], []
    for images in sets:
        timing = {}
        start = time.perf_counter()
        answers.append(model.answer([images, images], QUESTIONS, 48, timing, None, 0))
        seconds.append(time.perf_counter() - start)
        first.append(timing["encode_s"] + timing["prefill_s"])
        per_token.append(timing["decode_s"] / max(1, timing["decode_tokens"] - 1))
    seconds, first, per_token = seconds[1:], first[1:], per_token[1:]  # the first set warms up
    return {"backend": ran, "dtype": dtype, "compile_s": round(compile_s, 1), "p50_s": float(np.median(seconds)),
            "p95_s": float(np.percentile(seconds, 95)), "first_token_s": float(np.median(first)),
            "decode_ms_per_token": 1000 * float(np.median(per_token)),
            "rss_mb": psutil.Process().memory_info().rss / 2**20, "answers": answers[1:]}


def markdown(summary):
    lines = [f"Perception + action answers for one frame set (p50 over {summary['frame_sets']} held-out MetaDrive frame "
             f"sets, 6 views), {summary['cpu']['model']} ({', '.join(summary['cpu']['flags'])}), {summary['cpu']['cores']} "
             "cores; each row its own process. agree: answers equal to torch eager fp32 on the same model. "
             "Sparse rows run dense kernels: no backend here gains speed from unstructured sparsity.", ""]
    header = ["model", "backend", "dtype", "p50 s", "× torch fp32", "first token s", "decode ms/token", "RSS MB", "agree",
              "compile s"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in summary["rows"]:
        base = next(b for b in summary["rows"] if b["method"] == r["method"] and b["backend"] == "torch" and b["dtype"] == "float32")
        cells = [r["method"], r["backend"], r["dtype"], f"{r['p50_s']:.2f}", f"{r['p50_s'] / base['p50_s']:.2f}",
                 f"{r['first_token_s']:.3f}", f"{r['decode_ms_per_token']:.0f}", f"{r['rss_mb']:.0f}", f"{r['agree']:.2f}",
                 f"{r['compile_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", required=True, help="held-out frame sets")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--row", nargs=3, metavar=("MODEL", "BACKEND", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        print(json.dumps(one_row(*args.row, args.frames, args.count)))
        return
    from owled_ros.data.metadrive_world import DEMO_FRAMES

    started, rows = time.time(), []
    with tempfile.TemporaryDirectory() as work:
        pruned = Path(work) / "owled-sparsegpt-0.5"
        subprocess.run([sys.executable, "-m", "owled_ros.cli", "prune", "--model", "default", "--method", "owled-sparsegpt",
                        "--calib", str(DEMO_FRAMES), "--nsamples", "12", "--out", str(pruned)], check=True, capture_output=True)
        for method, model_dir in (("dense", "default"), ("owled-sparsegpt 50 %", str(pruned))):
            reference = None
            for backend, dtype in CONFIGS:
                done = subprocess.run([sys.executable, __file__, "--frames", args.frames, "--count", str(args.count),
                                       "--row", model_dir, backend, dtype], check=True, capture_output=True, text=True)
                row = json.loads(done.stdout.strip().splitlines()[-1]) | {"method": method, "sparsity": 0.0 if method == "dense" else 0.5}
                reference = reference or row["answers"]
                pairs = [(a, b) for x, y in zip(row["answers"], reference) for a, b in zip(x, y)]
                row["agree"] = sum(a == b for a, b in pairs) / len(pairs)
                rows.append(row)
                print({k: v for k, v in row.items() if k != "answers"}, flush=True)
    summary = {"cpu": cpu(), "frame_sets": args.count, "seconds": round(time.time() - started), "rows": rows}
    write_results(Path(args.out), "runtime", summary, markdown(summary))


if __name__ == "__main__":
    main()
