"""What the front view shows of the traffic light the labels name: in every frame set of a rendered set with a
front view, whether its upper half holds a pixel of a lit lamp's colour (red, yellow, green; metadrive_world's
lamp_pixels), per labelled light state. A model cannot read a light the pixels do not show: this bounds what the
default's image side can learn from a set.

    .venv/bin/python bench/world_lights.py --frames bench/results/work-world-heldout --out bench/results
"""
import argparse
from pathlib import Path

from owled_ros.data.calib import read_samples
from owled_ros.data.metadrive_world import lamp_pixels
from owled_ros.data.world import LIGHT_STATES
from results_io import write_results


def shown(samples):
    """{labelled light: {"frame_sets": n, colour: frame sets whose front view shows that colour}}."""
    counts = {}
    for sample in samples:
        front = sample.image("CAM_FRONT")
        row = counts.setdefault(sample.truth["light"], {"frame_sets": 0} | {colour: 0 for colour in LIGHT_STATES})
        row["frame_sets"] += 1
        for colour in LIGHT_STATES:
            row[colour] += lamp_pixels(front, colour) > 0
    return counts


def markdown(summary):
    lines = [f"Front views of {summary['frame_sets']} frame sets of `{summary['set']}` (those with a front view) whose "
             "upper half shows a lit lamp of each colour, by the light the labels name:", "",
             "| labelled light | frame sets | " + " | ".join(f"{c} lamp shown" for c in LIGHT_STATES) + " |",
             "|---|---|" + "---|" * len(LIGHT_STATES)]
    for light, row in sorted(summary["shown"].items()):
        cells = [f"{row[c]} ({row[c] / row['frame_sets']:.0%})" for c in LIGHT_STATES]
        lines.append(f"| {light} | {row['frame_sets']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    samples = [s for s in read_samples(args.frames) if s.truth and "CAM_FRONT" in s.cameras]
    summary = {"set": args.frames.name, "frame_sets": len(samples), "shown": shown(samples)}
    write_results(args.out, "world_lights", summary, markdown(summary))


if __name__ == "__main__":
    main()
