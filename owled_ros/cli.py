"""`owled` — one command line over the core: build, answer, prune, calibration data, replay, eval, bench, demo."""
import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .model.build import resolve_model


def cmd_build_default(args):
    from .model.build import build_default, default_model_dir

    out = Path(args.out) if args.out else default_model_dir()
    out.parent.mkdir(parents=True, exist_ok=True)
    model = build_default(out, args.minutes)
    print(f"{model.model_id} ready in {out}")


def cmd_answer(args):
    from .data.calib import read_samples
    from .data.world import CAMERAS, qa, render, sample_scene
    from .model.vlm import DrivingVLM

    model = DrivingVLM.from_pretrained(resolve_model(args.model))
    if args.frames:
        sample = read_samples(args.frames)[args.index]
        frames, pairs = sample.images(), sample.qa
    else:
        scene = sample_scene(args.seed)
        frames, pairs = render(scene, CAMERAS), qa(scene)
    questions = [args.question] if args.question else [p["question"] for p in pairs]
    answers, seconds = model.timed_answer([frames] * len(questions), questions, args.max_new_tokens)
    reference = {p["question"]: p.get("answer", "") for p in pairs}
    for question, answer in zip(questions, answers):
        print(json.dumps({"question": question, "answer": answer, "reference": reference.get(question, "")}))
    print(f"# {model.model_id}: {len(questions)} answers in {seconds:.2f} s", file=sys.stderr)


def cmd_prune(args):
    from .pruning.run import prune

    logging.getLogger("owled_ros.pruning").setLevel(logging.INFO)  # per-block targets, achieved, outlier ratios
    report = prune(resolve_model(args.model), args.out, args.method, args.sparsity, args.calib, args.nm, args.M,
                   args.lam, args.nsamples, args.seed)
    achieved = report["achieved"]
    print(f"pruned {report['model_id']} with {report['method']}: achieved sparsity "
          f"{achieved['pruned_components']:.4f} over pruned components ({achieved['whole_model']:.4f} of all "
          f"parameters) in {report['seconds']} s, peak RSS {report['peak_rss_mb']} MB -> {args.out}")


def cmd_calib_synth(args):
    from .data.calib import write_synthetic

    samples = write_synthetic(args.out, args.count, args.seed, vehicle=args.vehicle)
    print(f"wrote {len(samples)} synthetic frame sets to {args.out}")


def parser():
    p = argparse.ArgumentParser(prog="owled", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("build-default", help="build the embedded default model (SmolLM2 + aligned image side)")
    s.add_argument("--out", help="model directory (default: the cache)")
    s.add_argument("--minutes", type=float, default=4.0, help="training budget")
    s.set_defaults(func=cmd_build_default)

    s = sub.add_parser("answer", help="answer driving questions about a frame set")
    s.add_argument("--model", default="default")
    s.add_argument("--frames", help="calibration/QA set to take the frame set from (default: a synthetic scene)")
    s.add_argument("--index", type=int, default=0)
    s.add_argument("--seed", type=int, default=424242, help="synthetic scene seed")
    s.add_argument("--question")
    s.add_argument("--max-new-tokens", type=int, default=48)
    s.set_defaults(func=cmd_answer)

    s = sub.add_parser("prune", help="prune a model (magnitude, wanda, owl, owled; unstructured or N:M)")
    s.add_argument("--model", default="default")
    s.add_argument("--calib", help="calibration set directory (driving) or text file (generic)")
    s.add_argument("--method", default="owled")
    s.add_argument("--sparsity", default="0.5", help="0.5 (language model) or llm=0.5,vision=0.2")
    s.add_argument("--nm", help="semi-structured N:M, e.g. 2:4")
    s.add_argument("--M", type=float, default=5.0, help="outlier threshold: scores above M x mean")
    s.add_argument("--lam", type=float, default=0.08, help="OWL lambda: allocation spread is 2 lambda")
    s.add_argument("--nsamples", type=int, default=128)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_prune)

    calib = sub.add_parser("calib", help="calibration data").add_subparsers(dest="calib_command", required=True)
    s = calib.add_parser("synth", help="write a synthetic driving set in the calibration format")
    s.add_argument("out")
    s.add_argument("--count", type=int, default=128)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--vehicle", default="sim")
    s.set_defaults(func=cmd_calib_synth)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        print(f"owled {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
