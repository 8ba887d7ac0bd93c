"""One held-out MetaDrive frame set as a picture: the six views, and per question the model's answer beside
the ground truth.

    python bench/world_picture.py [--model default|DIR] --frames HELDOUT [--index 0] --out docs/metadrive_frame_set.png
"""
import argparse
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from owled_ros.data.calib import read_samples  # noqa: E402
from owled_ros.model.build import resolve_model  # noqa: E402
from owled_ros.model.vlm import DrivingVLM  # noqa: E402

LAYOUT = ["CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--frames", required=True)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--out", default="docs/metadrive_frame_set.png")
    args = parser.parse_args()
    sample = read_samples(args.frames)[args.index]
    images = sample.images()
    model = DrivingVLM.from_pretrained(resolve_model(args.model))
    with torch.no_grad():
        answers = model.answer([images] * len(sample.qa), [q["question"] for q in sample.qa], max_new_tokens=32)
    figure = plt.figure(figsize=(12, 8.2))
    for position, camera in enumerate(LAYOUT):
        axis = figure.add_subplot(4, 3, position + 1)
        if camera in images:
            axis.imshow(images[camera])
        axis.set_title(camera, fontsize=9)
        axis.axis("off")
    text = figure.add_subplot(2, 1, 2)
    text.axis("off")
    lines = [line for q, a in zip(sample.qa, answers)
             for line in (f"Q: {q['question']}", f"   model: {a}", f"   truth: {q['answer']}")]
    text.text(0, 1, "\n".join(textwrap.fill(line, 150, subsequent_indent="          ") for line in lines), va="top",
              family="monospace", fontsize=8.5)
    figure.suptitle(f"{sample.id} ({sample.source}), model {model.config['model_id']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
