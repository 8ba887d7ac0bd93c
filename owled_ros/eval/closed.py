"""Closed driving questions scored by likelihood, as lm-evaluation-harness scores multiple choice.

Every candidate answer of a closed question (light state, crossing pedestrian, lead vehicle, action,
vehicle and pedestrian counts) is scored by the model's teacher-forced log-probability given
the frame set and the question, and the best one is the model's answer: deterministic, and not fooled by
a template the model slipped while generating. The two counts live in the perception answer; each is
scored after the reference text that precedes it ("There are" / "There are 2 vehicles and"). The
behaviour question is left to the generated answers: its answer is a function of the action, scored here.
A tie among the best candidates gives the expected score of picking one of them at random (a model whose
scores are all equal, or all NaN, scores chance).
"""
from dataclasses import dataclass

import numpy as np

from ..data.world import (ACTION_TEXT, ACTIONS, LEAD_STATES, LIGHT_STATES, count_text, crossing_answer, lead_answer,
                          light_answer)

# the counts offered as candidates: as many as the MetaDrive world shows within 30 m (the 2-D world, fewer)
MAX_VEHICLES, MAX_PEDESTRIANS = 12, 8


@dataclass(frozen=True)
class Field:
    name: str
    kind: str  # the QA kind whose question is asked
    options: tuple  # (label, continuation)
    complete: bool  # the continuation is the whole answer (its end token is scored too)
    prefix: object = None  # reference answer -> the answer text before the field

    def context(self, reference):
        return self.prefix(reference) if self.prefix else ""

    def truth(self, qa):
        """The label whose text the reference answer holds; a clear error if there is not exactly one."""
        reference, before = qa["answer"], self.context(qa["answer"])
        matches = [label for label, text in self.options
                   if (reference == before + text if self.complete else reference.startswith(before + text))]
        if len(matches) != 1:
            raise ValueError(f"question {qa.get('id', qa['question'])!r}: reference answer {reference!r} is not "
                             f"exactly one of the {self.name} candidates")
        return matches[0]


def _before_pedestrians(reference):
    return reference[:reference.index(" and ")] + " and"


FIELDS = (
    Field("light", "lights", tuple((s, light_answer(s)) for s in ("none",) + LIGHT_STATES), True),
    Field("crossing", "crossing", ((True, crossing_answer(True)), (False, crossing_answer(False))), True),
    Field("lead", "lead", tuple((s, lead_answer(s)) for s in LEAD_STATES), True),
    Field("action", "planning", tuple((a, f"{ACTION_TEXT[a]},") for a in ACTIONS), False),
    Field("vehicle_count", "perception", tuple((n, f" {count_text(n, 'vehicle')} and") for n in range(MAX_VEHICLES + 1)),
          False, lambda reference: "There are"),
    Field("pedestrian_count", "perception",
          tuple((n, f" {count_text(n, 'pedestrian')} within") for n in range(MAX_PEDESTRIANS + 1)), False, _before_pedestrians),
)
COUNTS = ("vehicle_count", "pedestrian_count")


def choose(logprobs, labels, truth):
    """(share of the best-scoring candidates that are right, their mean |label - truth| for numbers)."""
    scores = np.nan_to_num(np.asarray(logprobs, dtype=np.float64), nan=-np.inf)
    best = [labels[i] for i in np.flatnonzero(scores == scores.max())]
    error = float(np.mean([abs(b - truth) for b in best])) if isinstance(truth, int) and not isinstance(truth, bool) else None
    return sum(b == truth for b in best) / len(best), error


def score_frame_sets(model, frame_sets, pairs, fields=FIELDS):
    """[{metric: value}] per frame set: '<field>_acc' (1, 0 or a tie's share) and '<count>_mae'.
    frame_sets: [{camera: image}]; pairs: each frame set's QA pairs. Fields whose question a frame set
    lacks are skipped. All candidates of all frame sets are scored in one call (batched)."""
    asked, requests = [], []
    for index, qa_pairs in enumerate(pairs):
        by_kind = {qa["kind"]: qa for qa in qa_pairs if "kind" in qa}
        for f in fields:
            if f.kind in by_kind:
                qa = by_kind[f.kind]
                asked.append((index, f, f.truth(qa)))
                requests += [(index, qa["question"], f.context(qa["answer"]), text, f.complete) for _, text in f.options]
    logprobs = model.continuation_logprobs(frame_sets, requests).tolist() if requests else []
    values, start = [{} for _ in frame_sets], 0
    for index, f, truth in asked:
        labels = [label for label, _ in f.options]
        correct, error = choose(logprobs[start:start + len(labels)], labels, truth)
        start += len(labels)
        values[index][f"{f.name}_acc"] = correct
        if f.name in COUNTS:
            values[index][f"{f.name}_mae"] = error
    return values
