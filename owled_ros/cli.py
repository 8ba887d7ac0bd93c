"""`owled` — one command line over the core: build, answer, prune, calibration data, replay, eval, bench, demo."""
import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

from .data.frames import SYNC_SLOP_S
from .model import load_model
from .runtime import BACKENDS, prepare
from .pruning.calibration import ANSWERS
from .pruning.engine import ALLOCATIONS, LAM_GRID, M_GRID, OUTLIER_RATIOS, PRUNERS
from .pruning.run import LAYOUTS, METHODS


def cmd_build_default(args):
    from .model.build import BUILD, DEFAULT_SHA256, DEFAULT_WEIGHTS, build_default

    digest = build_default(args.out, args.frames, BUILD | {"steps": args.steps} if args.steps else BUILD)
    same = "the same as" if digest == DEFAULT_SHA256 else "not the shipped file (renders and training round differently across CPUs):"
    print(f"{Path(args.out) / DEFAULT_WEIGHTS.name}: SHA-256 {digest}, {same} {DEFAULT_SHA256}\n"
          f"model directory (--model {args.out}) and the shippable file are in {args.out}")


def cmd_answer(args):
    from .data.calib import read_samples
    from .data.metadrive_world import DEMO_FRAMES

    frames = args.frames or DEMO_FRAMES
    samples = read_samples(frames)
    if args.index >= len(samples):
        raise ValueError(f"--index {args.index} is out of range: {frames} has {len(samples)} frame sets")
    model = load_model(args.model)
    backend = prepare(model, args.backend)
    sample = samples[args.index]
    questions = [args.question] if args.question else [p["question"] for p in sample.qa]
    start = time.perf_counter()
    answers = model.answer([sample.images()] * len(questions), questions, args.max_new_tokens)
    seconds = time.perf_counter() - start
    reference = {p["question"]: p.get("answer", "") for p in sample.qa}
    for question, answer in zip(questions, answers):
        print(json.dumps({"question": question, "answer": answer, "reference": reference.get(question, "")}))
    print(f"# {model.model_id} on {backend}: {len(questions)} answers in {seconds:.2f} s", file=sys.stderr)


def cmd_prune(args):
    from .pruning.run import prune

    logging.getLogger("owled_ros.pruning").setLevel(logging.INFO)  # per-block targets, achieved, outlier ratios
    report = prune(args.model, args.out, args.method, args.sparsity, args.calib, args.nm, args.M,
                   args.lam, args.nsamples, args.seed, pruner=args.pruner, allocation=args.allocation,
                   outlier_ratio=args.outlier_ratio, layout=args.layout, max_memory=args.max_memory, answers=args.answers,
                   questions=args.questions)
    achieved = report["achieved"]
    print(f"pruned {report['model_id']} with {report['method']}: achieved sparsity "
          f"{achieved['pruned_components']:.4f} over pruned components ({achieved['whole_model']:.4f} of all "
          f"parameters) in {report['seconds']} s, peak RSS {report['peak_rss_mb']} MB -> {args.out}")


def cmd_calib_synth(args):
    from .data.calib import write_synthetic

    samples = write_synthetic(args.out, args.count, args.seed, vehicle=args.vehicle)
    print(f"wrote {len(samples)} synthetic frame sets to {args.out}")


def cmd_calib_world(args):
    from .data.bags import write_drive
    from .data.metadrive_world import render_world

    samples = render_world(args.out, seeds=(args.seed, args.count), shard_size=args.shard_size)
    print(f"wrote {len(samples)} MetaDrive frame sets to {args.out}")
    if args.bag:
        write_drive(args.bag, ((s.stamp_ns, s.images()) for s in samples))
        print(f"wrote them as a rosbag2 (CARLA bridge topics) to {args.bag}")


def cmd_calib_from_bag(args):
    from .data.bags import carla_topics, import_bag

    if args.topics and len(args.topics) != len(args.cameras):
        raise ValueError(f"{len(args.topics)} --topics for {len(args.cameras)} --cameras: give one camera name per topic")
    topics = dict(zip(args.cameras, args.topics)) if args.topics else carla_topics(args.role)
    written, bad = import_bag(args.bag, args.out, topics, args.slop, args.vehicle)
    print(f"imported {written} frame sets from {args.bag} into {args.out} ({bad} bad frames skipped)")


def cmd_calib_push(args):
    from .data.store import push

    uploaded = push(args.set, args.url, args.endpoint_url)
    print(f"uploaded {len(uploaded)} shard(s) to {args.url}: {', '.join(uploaded) or 'none new'}")


def cmd_calib_pull(args):
    from .data.store import pull

    print(f"calibration set in {pull(args.url, args.out, args.endpoint_url)}")


def cmd_replay(args):
    from .nodes.replay import replay

    replay(args.bag, args.rate, args.loop, args.topics, args.wait_subscribers, args.wait_timeout)


def cmd_demo(args):
    from .nodes.demo import run_demo

    run_demo(Path(args.workdir), args.sparsity)


def cmd_eval(args):
    import json as json_

    from .data.calib import read_samples, write_synthetic
    from .eval.evaluate import evaluate
    from .eval.perplexity import perplexity
    model = load_model(args.model)
    if args.text:
        print(json_.dumps({"perplexity": perplexity(model.lm, model.tokenizer, Path(args.text).read_text(),
                                                    args.context, args.stride), "text": args.text}))
        return
    if not model.sees_images:
        raise ValueError(f"{model.model_id} is a text-only model: only perplexity applies (--text FILE)")
    prepare(model, args.backend, exact=True)
    if args.frames is None:
        args.frames = str(Path(args.workdir) / "eval")
        if not Path(args.frames).exists():
            write_synthetic(args.frames, args.count, seed=999, vehicle="eval")
    samples = read_samples(args.frames)
    result = {"model": model.model_id}
    for name, blank in (("images", False), ("blank_images", True))[:2 if args.blank else 1]:
        scored = evaluate(model, samples, args.generated, args.max_new_tokens, blank)
        result[name] = {"frame_sets": scored["frame_sets"], "generated_frame_sets": scored["generated_frame_sets"],
                        "metrics": {k: dict(zip(("value", "low", "high"), v)) for k, v in scored["metrics"].items()}}
    print(json_.dumps(result, indent=2))


def cmd_bench(args):
    from .eval.bench import run_bench

    plan = {key: tuple(getattr(args, key)) for key in ("sparsities", "methods", "high_methods", "nm_methods",
                                                        "answer_methods", "question_methods") if getattr(args, key) is not None}
    run_bench(args.model, args.out, nsamples=args.nsamples, eval_frames=args.eval_frames,
              generated_frames=args.generated_frames, calib=args.calib, eval_set=args.eval, resume=args.resume,
              skip=args.skip, **plan)


class Parser(argparse.ArgumentParser):
    """Usage errors in one line, exit code 2 (subcommand parsers are built from this class too)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def number(kind, low=None, high=None, open_low=False, open_high=False):
    """An argparse type: a finite `kind` between low and high (each included unless open)."""
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n' if kind is int else ''} {kind.__name__}") from None
        above = low is None or (value > low if open_low else value >= low)
        below = high is None or (value < high if open_high else value <= high)
        if not (math.isfinite(value) and above and below):
            interval = (f"{'(' if open_low or low is None else '['}{'-∞' if low is None else low}, "
                        f"{'∞' if high is None else high}{')' if open_high or high is None else ']'}")
            raise argparse.ArgumentTypeError(f"{text} is not in {interval}")
        return value
    return convert


POSITIVE, COUNT, SECONDS = number(int, 1), number(int, 0), number(float, 0.0)


def parser():
    p = Parser(prog="owled", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("build-default", help="rebuild the shipped default model (renders MetaDrive scenes, aligns)")
    s.add_argument("--out", default="runs/build-default", help="directory for the model and the shippable file")
    s.add_argument("--frames", help="rendered training scenes to use (default: render them into OUT/training-scenes)")
    s.add_argument("--steps", type=POSITIVE, nargs=2, metavar=("A", "B"), help="stage A and B steps (default: the recipe's)")
    s.set_defaults(func=cmd_build_default)

    s = sub.add_parser("answer", help="answer driving questions about a frame set")
    s.add_argument("--model", default="default")
    s.add_argument("--frames", help="calibration/QA set to take the frame set from (default: the shipped MetaDrive scenes)")
    s.add_argument("--index", type=COUNT, default=0)
    s.add_argument("--question")
    s.add_argument("--max-new-tokens", type=POSITIVE, default=48)
    s.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="runtime: auto (the fastest installed), torch (eager), torch-int8 (int8 weights, least "
                        "memory), openvino (compiled), openvino-int8 (int8 weights), openvino-w8a8 (int8 weights and activations: AMX, sparse)")
    s.set_defaults(func=cmd_answer)

    s = sub.add_parser("prune", help="prune a model (magnitude, Wanda, SparseGPT, ALPS; uniform, OWL or AlphaPruning allocation; unstructured or N:M)")
    s.add_argument("--model", default="default")
    s.add_argument("--calib", help="calibration set directory (driving), text file (generic) or s3://bucket/prefix")
    s.add_argument("--method", default="owled", choices=list(METHODS),
                   help="preset: pruner + allocation + the calibration data it expects")
    s.add_argument("--pruner", choices=PRUNERS, help="override the preset's pruner")
    s.add_argument("--allocation", choices=ALLOCATIONS, help="override the preset's allocation")
    s.add_argument("--outlier-ratio", choices=OUTLIER_RATIOS, default="per-layer",
                   help="OWL's ratio per block: mean of per-linear ratios, or over all linears pooled")
    s.add_argument("--sparsity", help="0.5 (language model) or llm=0.5,vision=0.2 (default 0.5; with --nm, 1 - N/M)")
    s.add_argument("--nm", help="semi-structured N:M on every pruned linear, e.g. 2:4; a --sparsity below 1 - N/M "
                                "keeps the most outlier-heavy layers dense (owl allocation)")
    s.add_argument("--M", type=float, help="OWL's outlier threshold, scores above M x mean (default: chosen from the "
                                           f"calibration data among {', '.join(f'{m:g}' for m in M_GRID)})")
    s.add_argument("--lam", type=float, help="the allocation's band is 2 lambda wide (owl, alpha; default: chosen from the "
                                           f"calibration data among {', '.join(f'{l:g}' for l in LAM_GRID)})")
    s.add_argument("--nsamples", type=POSITIVE, default=128, help="calibration samples: frame sets, or text windows")
    s.add_argument("--questions", type=POSITIVE, default=1,
                   help="samples of each driving frame set, one per question in turn (a small drive calibrates on "
                        "more of what the model answers)")
    s.add_argument("--answers", choices=ANSWERS, default="reference",
                   help="driving calibration answers: the set's (the dense model's where it has none), or the dense "
                        "model's own for every sample (calibrates on what the model says)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--layout", choices=LAYOUTS, default="auto",
                   help="pruned weights as plain safetensors with the zeros (dense: transformers/vLLM load it), our "
                        "compact bitmask, or auto (transformers checkpoints dense, owled_ros models bitmask)")
    s.add_argument("--max-memory", help="transformers checkpoints larger than this (e.g. 8GB) keep the rest of their "
                                        "weights on disk, each block loaded while it runs or is pruned")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_prune)

    calib = sub.add_parser("calib", help="calibration data").add_subparsers(dest="calib_command", required=True)
    s = calib.add_parser("synth", help="write a synthetic driving set in the calibration format")
    s.add_argument("out")
    s.add_argument("--count", type=POSITIVE, default=128)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--vehicle", default="sim")
    s.set_defaults(func=cmd_calib_synth)
    s = calib.add_parser("world", help="render MetaDrive scenes (six cameras, ground-truth QA) in the calibration format")
    s.add_argument("out")
    s.add_argument("--count", type=POSITIVE, default=64)
    s.add_argument("--seed", type=number(int, 0), default=0, help="first scene seed; from 1000000 on: held-out maps")
    s.add_argument("--shard-size", type=POSITIVE, default=64)
    s.add_argument("--bag", help="also write the frame sets as a rosbag2 here")
    s.set_defaults(func=cmd_calib_world)
    s = calib.add_parser("from-bag", help="turn a rosbag2's camera topics into a calibration set")
    s.add_argument("bag")
    s.add_argument("out")
    s.add_argument("--topics", nargs="+", help="image topics (default: CARLA ROS bridge cameras)")
    s.add_argument("--cameras", nargs="+", default=["CAM_FRONT", "CAM_FRONT_LEFT", "CAM_FRONT_RIGHT", "CAM_BACK",
                                                     "CAM_BACK_LEFT", "CAM_BACK_RIGHT"], help="view name per topic")
    s.add_argument("--role", default="ego_vehicle", help="CARLA role name in the default topics")
    s.add_argument("--slop", type=SECONDS, default=SYNC_SLOP_S, help="seconds between views of one frame set "
                   "(under half the camera period)")
    s.add_argument("--vehicle", default="bag")
    s.set_defaults(func=cmd_calib_from_bag)
    for name, func, help_text in (("push", cmd_calib_push, "upload completed shards to s3://bucket/prefix"),
                                  ("pull", cmd_calib_pull, "download complete shards from s3://bucket/prefix")):
        s = calib.add_parser(name, help=help_text)
        s.add_argument("set" if name == "push" else "url")
        s.add_argument("url" if name == "push" else "out")
        s.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL or AWS)")
        s.set_defaults(func=func)

    s = sub.add_parser("replay", help="publish a rosbag2's camera topics live with the original timing")
    s.add_argument("bag")
    s.add_argument("--rate", type=number(float, 0.0, open_low=True), default=1.0)
    s.add_argument("--loop", action="store_true")
    s.add_argument("--topics", nargs="+")
    s.add_argument("--wait-subscribers", type=COUNT, default=0, help="wait for this many subscribers per topic")
    s.add_argument("--wait-timeout", type=number(float, 0.0, open_low=True), default=30.0,
                   help="seconds --wait-subscribers waits at most before publishing anyway")
    s.set_defaults(func=cmd_replay)

    s = sub.add_parser("eval", help="driving + language metrics on a QA set, or perplexity on a text")
    s.add_argument("--model", default="default")
    s.add_argument("--frames", help="QA set with ground truth (default: held-out synthetic frame sets)")
    s.add_argument("--count", type=POSITIVE, default=200, help="synthetic frame sets when --frames is not given")
    s.add_argument("--generated", type=COUNT, default=20, help="frame sets whose answers are generated (language metrics)")
    s.add_argument("--workdir", default="runs")
    s.add_argument("--blank", action="store_true", help="also score with every image blanked (do images matter?)")
    s.add_argument("--text", help="perplexity of the language model on this text file instead")
    s.add_argument("--context", type=number(int, 2), default=256)
    s.add_argument("--stride", type=POSITIVE, default=128)
    s.add_argument("--max-new-tokens", type=POSITIVE, default=40)
    s.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="runtime: auto (the fastest installed that answers as torch eager fp32 does), torch (eager), torch-int8 (int8 weights, least "
                        "memory), openvino (compiled), openvino-int8 (int8 weights), openvino-w8a8 (int8 weights and activations: AMX, sparse)")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("bench", help="methods x sparsities sweep -> results.md, results.json, plots")
    s.add_argument("--model", default="default")
    s.add_argument("--out", default="bench/results")
    s.add_argument("--nsamples", type=POSITIVE, default=32)
    s.add_argument("--eval-frames", type=POSITIVE, default=200, help="held-out frame sets for the closed questions")
    s.add_argument("--generated-frames", type=COUNT, default=100, help="of which answers are generated (language metrics)")
    s.add_argument("--calib", help="calibration frame sets (default: synthetic 2-D ones)")
    s.add_argument("--eval", help="held-out frame sets with ground truth (default: synthetic 2-D ones)")
    s.add_argument("--resume", action="store_true", help="keep the rows an interrupted run with the same settings measured")
    s.add_argument("--sparsities", type=number(float, 0.0, 1.0, open_low=True, open_high=True), nargs="+",
                   help="targets (default 0.5 0.6 0.7); every method runs at the first")
    for flag, help_text in (("--methods", "pruned at the first sparsity"), ("--high-methods", "also at the other sparsities"),
                            ("--nm-methods", "in 2:4 (OWL ones at 40 %% with the outlier-heavy layers dense)"),
                            ("--answer-methods", "at every sparsity again, calibrated on the dense model's answers"),
                            ("--question-methods", "at every sparsity again, calibrated on every question of each frame set")):
        s.add_argument(flag, nargs="*", choices=list(METHODS), help=f"{help_text} (default: the full sweep's)")
    s.add_argument("--skip", nargs="+", default=[], metavar="RUN", help="runs of the plan to leave out, by name (owled-alps-0.6)")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("demo", help="the whole loop on the default model: MetaDrive drive bag -> recorder -> OWLed -> drive node")
    s.add_argument("--workdir", default="runs/demo")
    s.add_argument("--sparsity", default="0.5")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError, ChildProcessError) as error:
        print(f"owled {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
