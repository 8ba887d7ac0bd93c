"""The shipped default model's facts, read from its file: what the build trained on, its steps, time and
peak RAM (recorded by `owled build-default`), the file's size and SHA-256, and how long `--model default`
takes to be ready on first use (measured here, into a fresh cache).

    python bench/default_model.py --out bench/results     # writes default_model.md
"""
import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

from safetensors import safe_open

from owled_ros.model.build import DEFAULT_SHA256, DEFAULT_WEIGHTS, resolve_model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    with safe_open(str(DEFAULT_WEIGHTS), framework="pt") as f:
        meta, count = f.metadata(), sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    build, lora = json.loads(meta["build"]), json.loads(meta["lora"])
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
             f"{build['image_side']} image side), {build['steps'][0]} + {build['steps'][1]} steps, seed {build['seed']} |",
             f"| build (`owled build-default`, 2 CPU cores, scenes already rendered) | {build['minutes']} min, "
             f"peak RSS {build['peak_rss_mb'] / 1024:.1f} GB |",
             f"| first use of `--model default` (written out as a model directory) | {ready:.0f} s |"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "default_model.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
