"""Answer quality of a model on a QA set with ground truth (the synthetic world): driving and language metrics."""
import math
import time

import numpy as np

from .metrics import accuracy, language_metrics, mean_absolute_error
from .parse import parse_action, parse_description, parse_light, parse_speed

CATEGORIES = ("perception", "prediction", "planning", "behavior")


def generate(model, samples, max_new_tokens=40, blank=False):
    """[(sample, qa pair, answer)] for every QA pair; each frame set's questions in one batch."""
    results, seconds = [], []
    for sample in samples:
        images = sample.images()
        if blank:
            images = {c: np.zeros_like(i) for c, i in images.items()}
        questions = [q["question"] for q in sample.qa]
        start = time.perf_counter()
        answers = model.answer([images] * len(questions), questions, max_new_tokens)
        seconds.append((time.perf_counter() - start) / len(questions))
        results += [(sample, q, a) for q, a in zip(sample.qa, answers)]
    return results, float(np.mean(seconds))


def exact_match(results):
    return accuracy([a.strip().lower() for _, _, a in results], [q["answer"].strip().lower() for _, q, _ in results])


def score(results):
    """Metrics overall and per category. Driving metrics parse the answers (eval/parse.py)."""
    by_kind = lambda kind: [(s, q, a) for s, q, a in results if q.get("kind") == kind]
    perception = by_kind("perception")
    described = [parse_description(a) for _, _, a in perception]
    planning = by_kind("planning")
    lights = by_kind("lights")
    speeds = [(parse_speed(a), s.truth["target_speed_mps"]) for s, _, a in planning]
    speeds = [(p, t) for p, t in speeds if p is not None]
    metrics = {
        "vehicle_count_mae": mean_absolute_error([d["n_cars"] for d in described], [s.truth["n_cars"] for s, _, _ in perception]),
        "pedestrian_count_mae": mean_absolute_error([d["n_pedestrians"] for d in described],
                                                    [s.truth["n_pedestrians"] for s, _, _ in perception]),
        "light_accuracy": accuracy([parse_light(a) for _, _, a in perception + lights],
                                   [s.truth["light"] for s, _, _ in perception + lights]),
        "action_accuracy": accuracy([parse_action(a) for _, _, a in planning], [s.truth["action"] for s, _, _ in planning]),
        "speed_mae_mps": float(np.mean([abs(p - t) for p, t in speeds])) if speeds else math.nan,
        "action_exact_match": exact_match(planning),
        "description_bleu4": language_metrics([a for _, _, a in perception], [q["answer"] for _, q, _ in perception])["bleu4"],
        "exact_match": exact_match(results),
        **language_metrics([a for _, _, a in results], [q["answer"] for _, q, _ in results]),
        "answers": len(results),
    }
    for category in CATEGORIES:
        chosen = [(s, q, a) for s, q, a in results if q["category"] == category]
        metrics[category] = {"exact_match": exact_match(chosen),
                             **language_metrics([a for _, _, a in chosen], [q["answer"] for _, q, _ in chosen])}
    return metrics


def evaluate(model, samples, max_new_tokens=40, blank=False):
    results, seconds_per_answer = generate(model, samples, max_new_tokens, blank)
    return score(results) | {"seconds_per_answer": seconds_per_answer}
