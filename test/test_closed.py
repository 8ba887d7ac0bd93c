"""Closed questions by likelihood: the teacher-forced scorer against the training loss and the chain rule,
a model made to prefer one answer picks it, ties and unknown reference answers."""
import numpy as np
import pytest
import torch

from models import tiny_decoder, tiny_t5
from owled_ros.data.world import CAMERAS, qa, render, sample_scene
from owled_ros.eval.closed import FIELDS, choose, score_frame_sets

FRAMES = {"CAM_FRONT": np.full((64, 96, 3), 90, np.uint8), "CAM_BACK": np.full((64, 96, 3), 30, np.uint8)}


def model_of(family, tmp_path):
    return tiny_decoder(seed=2) if family == "decoder" else tiny_t5(tmp_path, seed=2)


def answer_tokens(model, answer):
    end = 1 if model.is_t5 else len(model._encode(model.config["prompt"]["end"]))
    return len(model._encode(answer)) + end


@pytest.mark.parametrize("family", ["decoder", "t5"])
def test_logprob_of_a_whole_answer_is_minus_the_training_loss(family, tmp_path):
    model = model_of(family, tmp_path)
    questions = ["What should the ego vehicle do?", "What is the state of the traffic light?"]
    answers = ["Stop, because the traffic light is red.", "No."]
    scored = model.continuation_logprobs([FRAMES], [(0, q, "", a, True) for q, a in zip(questions, answers)])
    for q, a, logprob in zip(questions, answers, scored):
        with torch.no_grad():
            loss = model([FRAMES], [q], [a]).item()
        assert logprob.item() == pytest.approx(-loss * answer_tokens(model, a), rel=1e-4)


@pytest.mark.parametrize("family", ["decoder", "t5"])
def test_prefix_and_continuation_follow_the_chain_rule(family, tmp_path):
    model = model_of(family, tmp_path)
    q = "What are the important objects in the current scene?"
    other_frames = {"CAM_FRONT": np.full((64, 96, 3), 200, np.uint8)}
    requests = [
        (0, q, "", "There are 2 vehicles and 1 pedestrian within 30 meters.", True),
        (0, q, "", "There are", False),
        (0, q, "There are", " 2 vehicles and 1 pedestrian within 30 meters.", True),
        (0, "Is the vehicle ahead of the ego vehicle moving?", "", "No, it is stopped.", True),  # another context
        (1, q, "There are", " 2 vehicles and 1 pedestrian within 30 meters.", True),  # another frame set
    ]
    whole, head, tail, other, elsewhere = model.continuation_logprobs([FRAMES, other_frames], requests).tolist()
    assert whole == pytest.approx(head + tail, rel=1e-4)
    assert other < 0
    alone = model.continuation_logprobs([other_frames], [(0,) + requests[4][1:]]).item()
    assert elsewhere == pytest.approx(alone, rel=1e-4)  # batching frame sets changes nothing


def prefer(model, question, answer, steps=40):
    """Teach the model one answer to one question on FRAMES."""
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        optimiser.zero_grad()
        model([FRAMES], [question], [answer]).backward()
        optimiser.step()
    return model.eval()


def test_a_model_made_to_prefer_one_candidate_picks_it():
    model = prefer(tiny_decoder(seed=3), "What is the state of the traffic light?", "The traffic light is green.")
    pair = {"kind": "lights", "question": "What is the state of the traffic light?"}
    assert score_frame_sets(model, [FRAMES] * 2, [[pair | {"answer": "The traffic light is green."}],
                                                  [pair | {"answer": "The traffic light is red."}]]) \
        == [{"light_acc": 1.0}, {"light_acc": 0.0}]


def test_every_field_of_a_synthetic_frame_set_is_scored():
    scene = sample_scene(11)
    values, = score_frame_sets(tiny_decoder(seed=1), [render(scene, CAMERAS, 64, 96)], [qa(scene)])
    assert set(values) == {f"{f.name}_acc" for f in FIELDS} | {"vehicle_count_mae", "pedestrian_count_mae"}
    assert all(0 <= v <= 1 for k, v in values.items() if k.endswith("_acc"))


def test_ties_share_the_credit_and_nan_scores_are_chance():
    assert choose([-1.0, -1.0, -5.0], ["a", "b", "c"], "a") == (0.5, None)
    assert choose([-1.0, -1.0, -5.0], ["a", "b", "c"], "c") == (0.0, None)
    assert choose([float("nan")] * 4, [0, 1, 2, 3], 1) == (0.25, 1.0)  # MAE: mean of |0-1|, 0, 1, 2
    assert choose([-3.0, -0.5, -2.0], [0, 1, 2], 2) == (0.0, 1.0)


def test_unknown_reference_answer_is_a_clear_error():
    pair = {"id": "s1-lights", "kind": "lights", "question": "What is the state of the traffic light?",
            "answer": "The traffic light is blue."}
    with pytest.raises(ValueError, match="s1-lights.*blue.*light candidates"):
        score_frame_sets(tiny_decoder(seed=1), [FRAMES], [[pair]])


def test_bootstrap_interval_covers_a_known_mean_at_its_nominal_rate():
    from owled_ros.eval.stats import interval

    p, n = 0.7, 400
    rng = np.random.default_rng(0)
    intervals = [interval((rng.random(n) < p).astype(float), n_resamples=1000, seed=i)[1:] for i in range(300)]
    coverage = np.mean([low <= p <= high for low, high in intervals])
    width = np.mean([high - low for low, high in intervals])
    assert 0.91 <= coverage <= 0.98
    assert width == pytest.approx(2 * 1.96 * (p * (1 - p) / n) ** 0.5, rel=0.1)  # the normal approximation


def test_paired_difference_finds_a_real_shift_and_no_shift_in_noise():
    from owled_ros.eval.stats import paired_difference

    rng = np.random.default_rng(1)
    a = (rng.random(300) < 0.6).astype(float)
    worse = a.copy()
    worse[np.flatnonzero(a)[:30]] = 0  # b loses 30 answers a got right, on the same items
    diff, low, high, verdict = paired_difference(a, worse)
    assert diff == pytest.approx(0.1) and low > 0 and verdict == 1
    assert paired_difference(worse, a)[3] == -1
    noise = np.where(rng.random(300) < 0.05, 1 - a, a)  # 5 % of answers flipped at random, both ways
    assert paired_difference(a, noise)[3] == 0 and paired_difference(a, a)[:3] == (0.0, 0.0, 0.0)
