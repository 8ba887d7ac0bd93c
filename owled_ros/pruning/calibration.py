"""Calibration inputs for pruning: driving frame sets with questions (OWLed), or plain text (generic baselines)."""
import hashlib
import random
from pathlib import Path

from ..data.calib import read_samples

TEXT_TOKENS = 128


class CalibrationError(ValueError):
    pass


def driving_samples(root, nsamples, seed=0, questions=1):
    """(frames, question, answer) triples from nsamples distinct frame sets, `questions` of each (fewer where a set
    has fewer): question kinds cycle over the frame sets, and each set's next questions follow in turn."""
    try:
        frame_sets = read_samples(root)
    except ValueError as error:
        raise CalibrationError(str(error)) from None
    if len(frame_sets) < nsamples:
        raise CalibrationError(f"calibration set {root} has {len(frame_sets)} frame sets, fewer than the "
                               f"{nsamples} samples asked for (--nsamples)")
    chosen = random.Random(seed).sample(frame_sets, nsamples)
    if empty := next((sample for sample in chosen if not sample.qa), None):
        raise CalibrationError(f"frame set {empty.id} in {empty.shard} has no driving questions")
    try:
        images = [sample.images() for sample in chosen]
    except ValueError as error:
        raise CalibrationError(str(error)) from None
    pairs = [(i, sample.qa[(i + turn) % len(sample.qa)]) for turn in range(questions)
             for i, sample in enumerate(chosen) if turn < len(sample.qa)]
    triples = [(images[i], pair["question"], pair.get("answer", "")) for i, pair in pairs]
    # the samples used, with their frames' hashes, each checked against the frame's bytes when it was read
    digest = hashlib.sha256("".join(s.to_json() for s in chosen).encode()).hexdigest()
    return triples, {"kind": "driving", "source": str(root), "sha256": digest, "frame_sets": len(frame_sets)}


ANSWERS = ("reference", "dense")


def dense_answers(model, samples, replace_all=False, batch=8):
    """The dense model's own greedy answers in place of the samples' missing answers (frame sets recorded on the
    road come with questions only: with none, the calibration would see only prompts), or of every answer
    (replace_all: calibrate on what the model says, the text the pruned model should keep producing).
    Returns the samples and how many answers were the dense model's."""
    chosen = [i for i, (_, _, answer) in enumerate(samples) if replace_all or not answer]
    for start in range(0, len(chosen), batch):
        rows = chosen[start:start + batch]
        answers = model.answer([samples[i][0] for i in rows], [samples[i][1] for i in rows])
        for i, answer in zip(rows, answers):
            samples[i] = (samples[i][0], samples[i][1], answer)
    return samples, len(chosen)


def text_samples(path, tokenizer, nsamples, seed=0, tokens=TEXT_TOKENS):
    """nsamples windows of `tokens` tokens drawn from a text file."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise CalibrationError(f"cannot read calibration text {path}: {error}") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = len(ids) // tokens
    if windows == 0:
        raise CalibrationError(f"calibration text {path} is empty or shorter than {tokens} tokens")
    if windows < nsamples:
        raise CalibrationError(f"calibration text {path} has {windows} windows of {tokens} tokens, fewer than the "
                               f"{nsamples} samples asked for (--nsamples)")
    starts = random.Random(seed).sample(range(windows), nsamples)
    chunks = [tokenizer.decode(ids[s * tokens:(s + 1) * tokens]) for s in starts]
    digest = hashlib.sha256(text.encode()).hexdigest()
    return chunks, {"kind": "text", "source": str(path), "sha256": digest, "tokens": len(ids)}


def load(source, tokenizer, nsamples, seed=0, cache=None, questions=1):
    """(samples, run(model, sample), info) for a calibration directory, text file or s3://bucket/prefix;
    questions: of each driving frame set."""
    if str(source).startswith("s3://"):
        from ..data.store import pull
        from ..model import cache_dir

        local = Path(cache or cache_dir() / "calibration" / hashlib.sha256(str(source).encode()).hexdigest()[:16])
        samples, run, info = load(pull(str(source), local), tokenizer, nsamples, seed, questions=questions)
        return samples, run, info | {"source": str(source)}
    path = Path(source)
    if path.is_dir():
        samples, info = driving_samples(path, nsamples, seed, questions)
        return samples, lambda model, s: model([s[0]], [s[1]], [s[2]]), info
    if path.is_file():
        samples, info = text_samples(path, tokenizer, nsamples, seed)
        return samples, lambda model, s: model.forward_text([s]), info
    raise CalibrationError(f"calibration source not found: {source}")
