"""Runtime backends side by side, one run: the default model dense, OWLed-SparseGPT 50 % and 70 % and SparseGPT
2:4 (calibrated on 12 shipped MetaDrive frame sets) on torch eager and OpenVINO (fp32, int8 weights; bf16 for
dense; OpenVINO also with int8 weights and activations, w8a8). Each row is its own process (its own resident memory), answers the perception and action questions for
each held-out frame set as the drive node does (guesses from earlier answers off, so that the rows compare the
runtimes alone), and counts the answers that equal torch eager fp32's on the same model. Every sparse row says
whether it beat dense in its backend (paired over the frame sets, sign test) and how many of the decoder's
linears OpenVINO ran with sparse weights (its exec graph's kernels; w8a8 on CPUs with AMX only).

    .venv/bin/python bench/runtime.py --frames bench/results/work-world-heldout --out bench/results   # ~25 min
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
from owled_ros.eval.machine import cpu  # noqa: E402
from results_io import write_results  # noqa: E402

QUESTIONS = ["What are the important objects in the current scene?", "What should the ego vehicle do?"]
DENSE_CONFIGS = [("torch", "float32"), ("torch", "bfloat16"), ("torch-int8", "float32"), ("openvino", "float32"),
                 ("openvino", "bfloat16"), ("openvino-int8", "float32"), ("openvino-w8a8", "float32")]
SPARSE_CONFIGS = [("torch", "float32"), ("torch-int8", "float32"), ("openvino", "float32"), ("openvino-int8", "float32"),
                  ("openvino-w8a8", "float32")]
# (row label, sparsity, `owled prune` arguments)
PRUNED = [("owled-sparsegpt 50 %", 0.5, ["--method", "owled-sparsegpt", "--sparsity", "0.5"]),
          ("owled-sparsegpt 70 %", 0.7, ["--method", "owled-sparsegpt", "--sparsity", "0.7"]),
          ("sparsegpt 2:4", 0.5, ["--method", "sparsegpt", "--nm", "2:4"])]


def one_row(model_dir, backend, dtype, frames, count):
    """Runs in its own process: answers for every frame set, timings and resident memory."""
    import psutil
    import torch

    from owled_ros.data.calib import read_samples
    from owled_ros.model import load_model
    from owled_ros.model.checkpoint import keep_heap_small
    from owled_ros.runtime import prepare
    from owled_ros.runtime.openvino import kernels

    torch.set_num_threads(os.cpu_count())
    keep_heap_small()  # as the drive node does
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
    ran_kernels = kernels(model.compiled["decoder"].runtime) if ran.startswith("openvino") else {}
    return {"backend": ran, "dtype": dtype, "compile_s": round(compile_s, 1), "seconds": seconds, "kernels": ran_kernels,
            "sparse_weights": sum(n for k, n in ran_kernels.items() if "sparse" in k), "p50_s": float(np.median(seconds)),
            "p95_s": float(np.percentile(seconds, 95)), "first_token_s": float(np.median(first)),
            "decode_ms_per_token": 1000 * float(np.median(per_token)),
            "rss_mb": psutil.Process().memory_info().rss / 2**20, "answers": answers[1:]}


def faster(row, dense):
    """Whether `row` beat `dense` on the same frame sets: "yes"/"no" by a two-sided sign test (p < 0.05), with
    the share of sets on which it was faster."""
    from scipy.stats import binomtest

    wins = sum(a < b for a, b in zip(row["seconds"], dense["seconds"]))
    significant = binomtest(wins, len(row["seconds"])).pvalue < 0.05
    return f"{'yes' if significant and wins > len(row['seconds']) / 2 else 'no'} ({wins}/{len(row['seconds'])})"


def markdown(summary):
    lines = [f"Perception + action answers for one frame set (p50 over {summary['frame_sets']} held-out MetaDrive frame "
             f"sets, 6 views) of `{summary['model']}` and its pruned models, {summary['cpu']['model']} ({', '.join(summary['cpu']['flags'])}), {summary['cpu']['cores']} "
             "cores; each row its own process. agree: answers equal to torch eager fp32 on the same model. "
             "× dense: p50 against the dense model in the same backend and dtype; faster: whether the sparse model was "
             "faster on more frame sets than chance allows (paired, two-sided sign test, p < 0.05); the time of a frame set includes its answers' length, so a pruned "
             "model that answers in fewer tokens finishes sooner with no faster kernel: decode ms/token compares the "
             "kernels. sparse weights: the decoder's linears that OpenVINO ran with its sparse weights decompression, "
             "of all its linears (w8a8 on AMX CPUs only, for linears at least 50 % zeros; weight-only int8 runs dense "
             "kernels; not available on CPUs without AMX).", ""]
    header = ["model", "backend", "dtype", "p50 s", "× torch fp32", "× dense", "faster than dense", "sparse weights",
              "first token s", "decode ms/token", "RSS MB", "agree", "compile s"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in summary["rows"]:
        base = next(b for b in summary["rows"] if b["method"] == r["method"] and b["backend"] == "torch" and b["dtype"] == "float32")
        dense = next(b for b in summary["rows"] if b["method"] == "dense" and b["backend"] == r["backend"] and b["dtype"] == r["dtype"])
        sparse = r["method"] != "dense"
        weights = "—" if not (sparse and r.get("kernels")) else "not available" if "amx_int8" not in summary["cpu"]["flags"] \
            else f"{r['sparse_weights']}/{sum(r['kernels'].values())}"
        cells = [r["method"], r["backend"], r["dtype"], f"{r['p50_s']:.2f}", f"{r['p50_s'] / base['p50_s']:.2f}",
                 f"{r['p50_s'] / dense['p50_s']:.2f}" if sparse else "—", faster(r, dense) if sparse else "—", weights,
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
    from owled_ros.model.build import resolve_model

    started, rows = time.time(), []
    with tempfile.TemporaryDirectory() as work:
        models = [("dense", 0.0, "default", DENSE_CONFIGS, None)]
        for method, sparsity, prune_args in PRUNED:
            out = Path(work) / method.replace(" ", "-").replace("%", "pct").replace(":", "-")
            prune_args = prune_args + ["--calib", str(DEMO_FRAMES), "--nsamples", "12"]
            subprocess.run([sys.executable, "-m", "owled_ros.cli", "prune", "--model", "default", *prune_args,
                            "--out", str(out)], check=True, capture_output=True)
            models.append((method, sparsity, str(out), SPARSE_CONFIGS, ["owled", "prune", "--model", "default", *prune_args]))
        for method, sparsity, model_dir, configs, prune_args in models:
            reference = None
            for backend, dtype in configs:
                done = subprocess.run([sys.executable, __file__, "--frames", args.frames, "--count", str(args.count),
                                       "--row", model_dir, backend, dtype], check=True, capture_output=True, text=True)
                row = json.loads(done.stdout.strip().splitlines()[-1]) | {"method": method, "sparsity": sparsity,
                                                                           "args": prune_args}
                reference = reference or row["answers"]
                pairs = [(a, b) for x, y in zip(row["answers"], reference) for a, b in zip(x, y)]
                row["agree"] = sum(a == b for a, b in pairs) / len(pairs)
                rows.append(row)
                print({k: v for k, v in row.items() if k != "answers"}, flush=True)
    summary = {"model": resolve_model("default").name, "cpu": cpu(), "frame_sets": args.count, "seconds": round(time.time() - started), "rows": rows}
    write_results(Path(args.out), "runtime", summary, markdown(summary))


if __name__ == "__main__":
    main()
