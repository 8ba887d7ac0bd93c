"""2:4 on a GPU: the language model's linear shapes, dense bfloat16 against PyTorch's semi-structured sparse
kernels, and the default pruned to 2:4 answering the shipped MetaDrive frame sets with either; one run.
Needs a CUDA GPU (Ampere or newer), so it is not part of `make bench`.

    .venv/bin/python bench/cuda_sparse.py --out bench/results   # writes cuda_sparse.json and cuda_sparse.md
"""
import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from owled_ros.data.calib import read_samples
from owled_ros.data.metadrive_world import DEMO_FRAMES
from owled_ros.model.build import resolve_model
from owled_ros.model.sparse_kernels import to_semi_structured
from owled_ros.model.vlm import DrivingVLM
from owled_ros.pruning.run import prune
from owled_ros.pruning.sparsity import nm_mask
from results_io import write_results

SHAPES = {"q_proj": (576, 576), "k_proj": (192, 576), "gate_proj": (1536, 576), "down_proj": (576, 1536)}
TOKENS = (2, 32, 128, 512)
QUESTIONS = ["What are the important objects in the current scene?", "What should the ego vehicle do?"]


def per_linear():
    from torch.sparse import to_sparse_semi_structured

    rows = []
    for name, (out_features, in_features) in SHAPES.items():
        weight = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16)
        weight = weight * nm_mask(weight.abs().float(), 2, 4)
        sparse = to_sparse_semi_structured(weight)
        for tokens in TOKENS:
            x = torch.randn(tokens, in_features, device="cuda", dtype=torch.bfloat16)
            dense_s = Timer("F.linear(x, w)", globals={"F": F, "x": x, "w": weight}).blocked_autorange().median
            sparse_s = Timer("F.linear(x, w)", globals={"F": F, "x": x, "w": sparse}).blocked_autorange().median
            rows.append({"layer": name, "shape": [out_features, in_features], "tokens": tokens, "dense_s": dense_s,
                         "sparse_s": sparse_s, "speedup": dense_s / sparse_s})
    return rows


def answer_times(model, frames):
    times, answers = [], []
    for images in frames:
        torch.cuda.synchronize()
        start = time.perf_counter()
        answers.append(model.answer([images] * len(QUESTIONS), QUESTIONS, 48))
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times, answers


def end_to_end(model_dir):
    frames = [s.images() for s in read_samples(DEMO_FRAMES)]
    result = {}
    for kernels in ("dense", "semi-structured"):
        model = DrivingVLM.from_pretrained(model_dir).to("cuda", torch.bfloat16)
        swapped = to_semi_structured(model) if kernels == "semi-structured" else []
        answer_times(model, frames[:2])  # warm-up
        times, answers = answer_times(model, frames)
        result[kernels] = {"p50_s": float(np.median(times)), "linears": len(swapped), "answers": answers}
    result["same_answers"] = float(np.mean([a == b for a, b in zip(result["dense"]["answers"],
                                                                     result["semi-structured"]["answers"])]))
    return result


def markdown(summary):
    lines = [f"{summary['gpu']}, torch {summary['torch']}; bfloat16; median time of one product "
             "(torch.utils.benchmark); speed-up = dense / 2:4 semi-structured.", "",
             "| layer | shape | tokens | dense µs | 2:4 µs | speed-up |", "|---|---|---|---|---|---|"]
    for r in summary["linears"]:
        lines.append(f"| {r['layer']} | {r['shape'][0]}x{r['shape'][1]} | {r['tokens']} | {r['dense_s'] * 1e6:.1f} | "
                     f"{r['sparse_s'] * 1e6:.1f} | {r['speedup']:.2f}x |")
    e2e = summary["end_to_end"]
    lines += ["", f"The default pruned with Wanda to 2:4 on every LM linear, perception + action question on the "
                  f"{len(e2e['dense']['answers'])} shipped MetaDrive frame sets: p50 {e2e['dense']['p50_s']:.3f} s "
                  f"with dense kernels, {e2e['semi-structured']['p50_s']:.3f} s with {e2e['semi-structured']['linears']} "
                  f"linears on the 2:4 kernels; same answers on {e2e['same_answers']:.0%} of the frame sets."]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--calib", default=str(DEMO_FRAMES), help="calibration frame sets for the 2:4 prune")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/cuda_sparse.py needs a CUDA GPU; none is visible")
    out = Path(args.out)
    work = out / "work-cuda-sparse"
    shutil.rmtree(work, ignore_errors=True)
    prune(resolve_model(args.model), work / "wanda-2of4", "wanda", None, args.calib, nm="2:4", nsamples=12, progress=False)
    summary = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "linears": per_linear(),
               "end_to_end": end_to_end(work / "wanda-2of4")}
    write_results(out, "cuda_sparse", summary, markdown(summary))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
