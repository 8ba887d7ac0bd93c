"""Answer quality of a model on a QA set with ground truth (the synthetic world).

Two views of the same model: closed questions scored by likelihood on every frame set (closed.py), and
generated answers on a subset (language metrics, and driving values parsed from the free text). Every
metric comes with a bootstrap 95 % interval over frame sets (stats.py).
"""
import math
import time

import numpy as np

from .closed import score_frame_sets
from .metrics import CorpusResamples, accuracy, language_metrics, mean_absolute_error
from .parse import parse_action, parse_description, parse_light, parse_speed
from .stats import CONFIDENCE, corpus_interval, interval, verdict

CATEGORIES = ("perception", "prediction", "planning", "behavior")


GENERATED = ("action_accuracy", "light_accuracy", "vehicle_count_mae", "pedestrian_count_mae", "bleu4", "meteor",
             "rouge_l", "cider", "action_exact_match", "description_bleu4", "action_parsed", "light_parsed", "count_parsed")


def images_of(sample, blank=False):
    images = sample.images()
    return {c: np.zeros_like(i) for c, i in images.items()} if blank else images


def closed(model, samples, blank=False, batch=8):
    """{metric: [value per frame set]} of the closed questions, by likelihood; plus the mean accuracy."""
    items = {}
    for start in range(0, len(samples), batch):
        chosen = samples[start:start + batch]
        for values in score_frame_sets(model, [images_of(s, blank) for s in chosen], [s.qa for s in chosen]):
            values["closed_mean_acc"] = float(np.mean([v for k, v in values.items() if k.endswith("_acc")]))
            for key, value in values.items():
                items.setdefault(key, []).append(value)
    return items


def generate(model, samples, max_new_tokens=32, blank=False, batch=4):
    """([(sample, qa pair, answer)] for every QA pair, seconds per answer); the questions of `batch` frame
    sets are answered in one batch (greedy decoding is bound by reading the weights, so wider batches
    cost little more per step)."""
    results, seconds = [], 0.0
    for start in range(0, len(samples), batch):
        pairs = [(sample, q) for sample in samples[start:start + batch] for q in sample.qa]
        images = {id(sample): images_of(sample, blank) for sample, _ in pairs}
        began = time.perf_counter()
        answers = model.answer([images[id(s)] for s, _ in pairs], [q["question"] for _, q in pairs], max_new_tokens)
        seconds += time.perf_counter() - began
        results += [(s, q, a) for (s, q), a in zip(pairs, answers)]
    return results, seconds / max(1, len(results))


def exact_match(results):
    return accuracy([a.strip().lower() for _, _, a in results], [q["answer"].strip().lower() for _, q, _ in results])


def score(results, categories=True, meteor=True):
    """Metrics overall and (with categories) per category. Driving metrics parse the answers (eval/parse.py)."""
    by_kind = lambda kind: [(s, q, a) for s, q, a in results if q.get("kind") == kind]
    perception = by_kind("perception")
    described = [parse_description(a) for _, _, a in perception]
    planning = by_kind("planning")
    lights = by_kind("lights")
    speeds = [(parse_speed(a), s.truth["target_speed_mps"]) for s, _, a in planning]
    speeds = [(p, t) for p, t in speeds if p is not None]
    share = lambda flags: float(np.mean(flags)) if flags else math.nan
    metrics = {
        # how many answers the parsers could read (a model that words its answers its own way scores low here)
        "action_parsed": share([parse_action(a) != "unknown" for _, _, a in planning]),
        "light_parsed": share([parse_light(a) is not None for _, _, a in perception + lights]),
        "count_parsed": share([d["n_cars"] is not None for d in described]),
        "vehicle_count_mae": mean_absolute_error([d["n_cars"] for d in described], [s.truth["n_cars"] for s, _, _ in perception]),
        "pedestrian_count_mae": mean_absolute_error([d["n_pedestrians"] for d in described],
                                                    [s.truth["n_pedestrians"] for s, _, _ in perception]),
        "light_accuracy": accuracy([parse_light(a) for _, _, a in perception + lights],
                                   [s.truth["light"] for s, _, _ in perception + lights]),
        "action_accuracy": accuracy([parse_action(a) for _, _, a in planning], [s.truth["action"] for s, _, _ in planning]),
        "speed_mae_mps": float(np.mean([abs(p - t) for p, t in speeds])) if speeds else math.nan,
        "action_exact_match": exact_match(planning),
        "description_bleu4": language_metrics([a for _, _, a in perception], [q["answer"] for _, q, _ in perception], False)["bleu4"],
        "exact_match": exact_match(results),
        **language_metrics([a for _, _, a in results], [q["answer"] for _, q, _ in results], meteor),
        "answers": len(results),
    }
    for category in CATEGORIES if categories else ():
        chosen = [(s, q, a) for s, q, a in results if q["category"] == category]
        metrics[category] = {"exact_match": exact_match(chosen),
                             **language_metrics([a for _, _, a in chosen], [q["answer"] for _, q, _ in chosen])}
    return metrics


def generated_intervals(results, keys=GENERATED):
    """{metric: (value, low, high)} of generated answers, resampling whole frame sets."""
    sets = list(dict.fromkeys(id(s) for s, _, _ in results))
    by_set = [[r for r in results if id(r[0]) == key] for key in sets]

    def statistic(chosen):
        scored = score([r for i in chosen for r in by_set[i]], categories=False)
        return np.array([scored[k] for k in keys], dtype=np.float64)

    value, low, high = corpus_interval(len(by_set), statistic)
    return {k: (float(v), float(lo), float(hi)) for k, v, lo, hi in zip(keys, np.atleast_1d(value), np.atleast_1d(low),
                                                                    np.atleast_1d(high))}


def evaluate(model, samples, generated=20, max_new_tokens=32, blank=False):
    """Closed metrics on every frame set (models that score options), generated-answer metrics on the first
    `generated` of them. Returns {"metrics": {name: (value, low, high)}, "items": {closed metric: [per frame set]},
    "seconds_per_answer", "answers"}."""
    items = closed(model, samples, blank) if model.scores_options else {}
    results, seconds_per_answer = generate(model, samples[:generated], max_new_tokens, blank)
    metrics = {name: interval(values) for name, values in items.items()}
    metrics |= {f"gen_{name}": value for name, value in generated_intervals(results).items()}
    return {"metrics": metrics, "items": items, "seconds_per_answer": seconds_per_answer, "answers": len(results),
            "frame_sets": len(samples), "generated_frame_sets": len(samples[:generated]),
            "generated": [[a for s, _, a in results if s is sample] for sample in samples[:generated]]}


PAIRED_GENERATED = ("action_exact_match", "action_accuracy", "light_accuracy", "bleu4", "cider")


class ResampledScores:
    """The PAIRED_GENERATED metrics of one model's answers (per frame set, in QA order) on any resample of the
    frame sets, equal to score()'s on the same answers: each answer is parsed and its n-grams counted once, and
    every resample's value is kept (the dense model is the baseline of every pruned one, on the same resamples)."""

    def __init__(self, samples, answers):
        """samples: the frame sets, of which the first len(answers) were answered."""
        results = [(i, s, q, a) for i, s in enumerate(samples[:len(answers)]) for q, a in zip(s.qa, answers[i])]
        self.answers_of = [[k for k, (i, *_) in enumerate(results) if i == chosen] for chosen in range(len(answers))]
        self.corpus = CorpusResamples([a for *_, a in results], [q["answer"] for _, _, q, _ in results])
        planning = [(i, s, q, a) for i, s, q, a in results if q.get("kind") == "planning"]
        lights = [(i, s, a) for i, s, q, a in results if q.get("kind") in ("perception", "lights")]
        per_set = lambda items, right: np.bincount([i for i, *_ in items], [float(r) for r in right], len(answers))
        self.planning = per_set(planning, [1] * len(planning))
        self.exact = per_set(planning, [a.strip().lower() == q["answer"].strip().lower() for _, _, q, a in planning])
        self.action = per_set(planning, [parse_action(a) == s.truth["action"] for _, s, _, a in planning])
        self.lights = per_set(lights, [1] * len(lights))
        self.light = per_set(lights, [parse_light(a) == s.truth["light"] for _, s, a in lights])
        self.kept = {}

    def __call__(self, chosen):
        key = np.asarray(chosen).tobytes()
        if key not in self.kept:
            weights = np.bincount(chosen, minlength=len(self.answers_of))
            share = lambda right, total: right @ weights / (total @ weights) if total @ weights else math.nan
            bleu4, cider = self.corpus([k for i in chosen for k in self.answers_of[i]])
            self.kept[key] = np.array([share(self.exact, self.planning), share(self.action, self.planning),
                                       share(self.light, self.lights), bleu4, cider])
        return self.kept[key]


def paired_generated(answers, baseline, confidence=CONFIDENCE):
    """{metric: (difference, low, high, verdict)} of generated answers against a baseline's on the same frame
    sets: answers, baseline: ResampledScores of the two models; the bootstrap resamples frame sets, the same
    ones for both (paired)."""
    value, low, high = corpus_interval(len(answers.answers_of), lambda chosen: answers(chosen) - baseline(chosen),
                                       confidence=confidence)
    return {k: (float(v), float(lo), float(hi), verdict(lo, hi)) for k, v, lo, hi in zip(PAIRED_GENERATED, value, low, high)}
