"""Metrics against hand computations and the reference packages, parsers, perplexity, and the bench's columns."""
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from nltk.translate.bleu_score import corpus_bleu

from models import tiny_decoder
from owled_ros.eval.bench import CLOSED, COST, GENERATED, run_bench, runs
from owled_ros.data.calib import read_samples, write_synthetic
from owled_ros.eval.evaluate import CATEGORIES, PAIRED_GENERATED, ResampledScores, paired_generated, score
from owled_ros.eval.metrics import METEOR_SYNONYMS, accuracy, language_metrics, mean_absolute_error, tokenize
from owled_ros.eval.parse import parse_action, parse_description, parse_speed
from owled_ros.eval.perplexity import perplexity


def test_identical_answers_score_perfectly_and_unrelated_ones_do_not():
    refs = ["Stop, because the traffic light is red.", "There are 2 vehicles and 1 pedestrian within 30 meters."]
    perfect = language_metrics(refs, refs)
    assert perfect["bleu4"] == pytest.approx(1.0, abs=1e-6) and perfect["rouge_l"] == pytest.approx(1.0)
    assert perfect["meteor"] > 0.99
    unrelated = language_metrics(["banana bread recipe", "quantum chromodynamics lecture"], refs)
    assert unrelated["bleu4"] < 1e-3 and unrelated["rouge_l"] == 0 and unrelated["cider"] == 0


def test_bleu4_agrees_with_nltk_corpus_bleu():
    hyps = ["the car ahead is stopped so we slow down now", "keep lane because the road ahead is clear today"]
    refs = ["the car ahead is stopped so slow down now", "keep lane because the road ahead is clear"]
    ours = language_metrics(hyps, refs)["bleu4"]
    reference = corpus_bleu([[tokenize(r)] for r in refs], [tokenize(h) for h in hyps])
    assert ours == pytest.approx(reference, abs=1e-3)


def test_rouge_l_by_hand():
    # LCS("the car stops", "the red car stops here") = 3; P = 3/5, R = 3/3; F_beta with beta = 1.2
    p, r, beta = 3 / 5, 1.0, 1.2
    expected = (1 + beta**2) * p * r / (r + beta**2 * p)
    assert language_metrics(["the red car stops here"], ["the car stops"])["rouge_l"] == pytest.approx(expected)


def test_driving_metrics_by_hand():
    assert mean_absolute_error([2, None, 5], [1, 0, 3]) == pytest.approx((1 + 0 + 2) / 3)
    assert accuracy(["stop", "keep_lane", "stop"], ["stop", "stop", "stop"]) == pytest.approx(2 / 3)


def test_parsers():
    assert parse_description("There are 3 vehicles and no pedestrians within 30 meters. The traffic light is green.") \
        == {"n_cars": 3, "n_pedestrians": 0, "light": "green"}
    assert parse_description("I see one car and two people; there is no traffic light.") \
        == {"n_cars": 1, "n_pedestrians": 2, "light": "none"}
    assert parse_description("It is sunny.") == {"n_cars": None, "n_pedestrians": None, "light": None}
    assert parse_action("Slow down, because the traffic light is yellow.") == "slow_down"
    assert parse_action("Change lane to the left, because the vehicle ahead is stopped.") == "change_lane_left"
    assert parse_action("Nice weather.") == "unknown"
    assert parse_speed("Slow down to 36 km/h.") == pytest.approx(10.0) and parse_speed("Stop.") is None


def test_scores_of_ground_truth_answers_and_of_a_constant_action(tmp_path):
    write_synthetic(tmp_path / "set", 12, seed=5)
    samples = read_samples(tmp_path / "set")
    truth = [(s, q, q["answer"]) for s in samples for q in s.qa]
    perfect = score(truth)
    assert perfect["action_exact_match"] == perfect["action_accuracy"] == perfect["light_accuracy"] == 1.0
    assert perfect["description_bleu4"] == pytest.approx(1.0, abs=1e-6) and perfect["vehicle_count_mae"] == 0
    assert all(perfect[c]["exact_match"] == 1.0 for c in CATEGORIES)
    always_stop = [(s, q, "Stop." if q["kind"] == "planning" else a) for s, q, a in truth]
    stopped = score(always_stop)
    assert stopped["action_exact_match"] == 0.0
    assert stopped["action_accuracy"] == pytest.approx(sum(s.truth["action"] == "stop" for s in samples) / len(samples))
    assert stopped["description_bleu4"] == perfect["description_bleu4"]


def test_perplexity_is_lower_on_text_the_model_was_made_to_predict():
    import torch

    model = tiny_decoder(seed=3, layers=2)
    text = "The ego vehicle stops at the red light and waits for the green light. " * 12
    ids = model.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    optimizer = torch.optim.Adam(model.lm.parameters(), lr=3e-3)
    model.lm.train()
    for _ in range(40):
        loss = model.lm(input_ids=ids[:, :96], labels=ids[:, :96]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.lm.eval()
    words = text.split()
    random.Random(0).shuffle(words)
    fitted = perplexity(model.lm, model.tokenizer, text, context=64, stride=32)
    shuffled = perplexity(model.lm, model.tokenizer, " ".join(words), context=64, stride=32)
    assert math.isfinite(fitted) and fitted < shuffled / 3


def test_perplexity_scores_every_token_once():
    model = tiny_decoder(seed=4, layers=1)
    text = "Cars stop at red lights. " * 20
    whole = perplexity(model.lm, model.tokenizer, text, context=1024, stride=1024)
    windowed = perplexity(model.lm, model.tokenizer, text, context=1024, stride=16)  # same context reach
    assert windowed == pytest.approx(whole, rel=1e-4)


def test_bench_writes_every_metric_with_its_interval_and_the_paired_comparisons(tmp_path):
    tiny_decoder().save_pretrained(tmp_path / "model")
    write_synthetic(tmp_path / "eval", 5, seed=31, vehicle="eval")
    write_synthetic(tmp_path / "calib", 8, seed=32, vehicle="calib")
    with pytest.raises(ValueError, match="has 5 frame sets; --eval-frames asks for 6"):
        run_bench(tmp_path / "model", tmp_path / "out", eval_set=tmp_path / "eval", eval_frames=6)
    summary = run_bench(tmp_path / "model", tmp_path / "out", sparsities=(0.5,), nm="2:4", methods=("wanda", "owled"),
                        nm_methods=("wanda", "owled"), answer_methods=("owled",), question_methods=("owled",), nsamples=8,
                        eval_frames=4, generated_frames=2, max_new_tokens=4,
                        eval_set=tmp_path / "eval", calib=tmp_path / "calib", log=lambda *_: None)
    assert summary["frames"] == "synthetic"
    assert summary["cpu"]["cores"] == os.cpu_count() and summary["cpu"]["model"] in (tmp_path / "out" / "results.md").read_text()
    names = [r["name"] for r in summary["results"]]
    assert names == ["dense", "dense, blank images", "wanda-0.5", "owled-0.5", "owled-dense-answers-0.5",
                     "owled-all-questions-0.5", "wanda-2:4", "owled-2:4-0.4"]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    for row in saved["results"]:
        for key in [k for k, _ in CLOSED + GENERATED]:
            value, low, high = row["metrics"][key]
            assert low - 1e-9 <= value <= high + 1e-9, (row["name"], key)
        assert all(len(v) == 4 for v in row["items"].values())  # one value per frame set
        assert {key for key, _ in COST} - {"prune_s", "prune_peak_mb"} <= set(row)
    assert saved["results"][3]["achieved"] == pytest.approx(0.5, abs=0.02)
    assert saved["results"][7]["achieved"] == pytest.approx(0.4, abs=0.1)
    pruned = names[2:]
    assert {(c["challenger"], c["baseline"]) for c in saved["comparisons"]} == {
        ("owled-0.5", "wanda-0.5"), ("owled-dense-answers-0.5", "owled-0.5"),
        ("owled-all-questions-0.5", "owled-0.5")} | {
        (name, "dense") for name in pruned}  # closed mean and generated answers against the dense model's
    for name in pruned:
        assert {c["metric"] for c in saved["comparisons"] if (c["challenger"], c["baseline"]) == (name, "dense")} == {
            "closed_mean_acc", *(f"gen_{k}" for k in PAIRED_GENERATED)}
    assert all(c["low"] <= c["difference"] <= c["high"] for c in saved["comparisons"])
    assert saved["comparison_confidence"] == pytest.approx(1 - 0.05 / len(saved["comparisons"]))
    assert all(len(row["generated"]) == 2 for row in saved["results"])  # answers per generated frame set, kept
    tables = [block.splitlines() for block in (tmp_path / "out" / "results.md").read_text().split("\n\n") if block.startswith("|")]
    closed_table, generated, cost, images, paired = tables
    assert all(title in closed_table[0] for _, title in CLOSED) and len(closed_table) == 2 + len(names)
    assert all(title in generated[0] for _, title in GENERATED) and len(generated) == 2 + len(names)
    assert " [" in closed_table[2]  # value [low, high]
    assert [line.split(" | ")[0] for line in images[2:]] == ["| dense", "| dense, blank images"]
    assert len(paired) == 2 + len(saved["comparisons"])
    # a row's recorded command makes its model again
    assert saved["results"][4]["args"][-2:] == ["--answers", "dense"]
    assert saved["results"][5]["args"][-2:] == ["--questions", "6"]  # every question kind of the world
    args = saved["results"][7]["args"]
    assert args[:2] == ["owled", "prune"] and "--out" in args
    args[args.index("--out") + 1] = str(tmp_path / "again")
    subprocess.run([sys.executable, "-m", "owled_ros.cli", *args[1:]], check=True, capture_output=True)
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    before = json.loads((tmp_path / "out" / "report-owled-2:4-0.4.json").read_text())
    assert [b["layers"] for b in again["blocks"]] == [b["layers"] for b in before["blocks"]]
    assert "held-out synthetic 6-camera frame sets" in (tmp_path / "out" / "results.md").read_text()
    assert (tmp_path / "out" / "metrics_vs_sparsity.png").stat().st_size > 0
    assert (tmp_path / "out" / "report-owled-0.5.json").is_file() and not (tmp_path / "out" / "work").exists()


def test_bench_command_line_chooses_the_plan(monkeypatch):
    import owled_ros.eval.bench
    from owled_ros.cli import main

    called = {}
    monkeypatch.setattr(owled_ros.eval.bench, "run_bench", lambda *args, **kwargs: called.update(kwargs))
    main(["bench", "--sparsities", "0.5", "0.7", "--methods", "wanda", "owled-alps", "--high-methods",
          "--nm-methods", "sparsegpt", "--skip", "wanda-0.5"])
    assert called["skip"] == ["wanda-0.5"]
    assert called["sparsities"] == (0.5, 0.7) and called["methods"] == ("wanda", "owled-alps")
    assert called["high_methods"] == () and called["nm_methods"] == ("sparsegpt",)
    assert "answer_methods" not in called and "question_methods" not in called  # not given: run_bench's own default
    assert runs(called["sparsities"], "2:4", called["methods"], called["high_methods"], called["nm_methods"], 0) == [
        ("wanda-0.5", "wanda", "wanda", "0.5", None, []), ("owled-alps-0.5", "owled-alps", "owled-alps", "0.5", None, []),
        ("sparsegpt-2:4", "sparsegpt", "sparsegpt", None, "2:4", [])]


def test_text_check_prunes_each_run_from_the_same_dense_weights(tmp_path):
    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    import text_check

    model = tiny_decoder(seed=6)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    runs = [r for r in text_check.plan(sparsities=(0.5,), pruners=("wanda", "sparsegpt"))
            if r[0] in ("wanda-uniform-0.5", "sparsegpt-owl-0.5", "sparsegpt-2:4")]
    summary = text_check.check(model, runs, nsamples=4, log=lambda *_: None)
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())  # restored afterwards
    rows = {r["name"]: r for r in summary["results"]}
    assert rows["wanda-uniform-0.5"]["achieved"] == pytest.approx(0.5) and rows["sparsegpt-2:4"]["achieved"] == pytest.approx(0.5)
    assert all(math.isfinite(r["perplexity"]) for r in rows.values())
    assert rows["wanda-uniform-0.5"]["perplexity"] != rows["dense"]["perplexity"]
    text = text_check.markdown(summary, sparsities=(0.5,))
    assert "| sparsegpt | owl | " in text and "2:4 everywhere" in text


@pytest.mark.skipif(not METEOR_SYNONYMS, reason="WordNet not installed (setup needs apt-get download wordnet-base)")
def test_meteor_matches_wordnet_synonyms():
    from nltk.translate.meteor_score import meteor_score

    from owled_ros.eval.metrics import _NoWordNet

    hypothesis, reference = "the automobile halts at the light", "the car stops at the light"
    with_synonyms = language_metrics([hypothesis], [reference])["meteor"]
    exact_and_stem = meteor_score([tokenize(reference)], tokenize(hypothesis), wordnet=_NoWordNet())
    assert with_synonyms > exact_and_stem + 0.1


def test_paired_generated_differences_resample_the_same_frame_sets_for_both_models(tmp_path):
    write_synthetic(tmp_path / "qa", 30, seed=5, vehicle="eval")
    samples = read_samples(tmp_path / "qa")
    truth = [[q["answer"] for q in s.qa] for s in samples]
    wrong_actions = [[q["answer"] if q.get("kind") != "planning" else "Turn around." for q in s.qa] for s in samples]
    same = paired_generated(ResampledScores(samples, truth), ResampledScores(samples, truth))
    assert all(value == (0.0, 0.0, 0.0, 0) for value in same.values())
    better = paired_generated(ResampledScores(samples, truth), ResampledScores(samples, wrong_actions), confidence=0.99)
    difference, low, high, verdict = better["action_exact_match"]
    assert difference == pytest.approx(1.0) and verdict == 1 and 0 < low <= high
    assert better["light_accuracy"][0] == 0 and better["bleu4"][3] == 1


def test_resampled_scores_equal_score_on_the_same_resample(tmp_path):
    write_synthetic(tmp_path / "qa", 12, seed=6, vehicle="eval")
    samples = read_samples(tmp_path / "qa")
    rng = random.Random(0)
    replies = ["Stop.", "Keep lane.", "The traffic light is red.", "There are 2 vehicles within 30 meters.", ""]
    answers = [[q["answer"] if rng.random() < 0.5 else rng.choice(replies) for q in s.qa] for s in samples[:10]]
    scores = ResampledScores(samples, answers)  # the first 10 of 12 frame sets answered
    for chosen in ([0, 0, 3, 9, 9, 9, 5], list(range(10)), [7]):
        expected = score([(samples[i], q, a) for i in chosen for q, a in zip(samples[i].qa, answers[i])], categories=False)
        assert scores(chosen) == pytest.approx([expected[k] for k in PAIRED_GENERATED], nan_ok=True)


def test_an_interrupted_bench_resumes_from_the_rows_it_measured(tmp_path):
    tiny_decoder().save_pretrained(tmp_path / "model")
    write_synthetic(tmp_path / "eval", 2, seed=31, vehicle="eval")
    write_synthetic(tmp_path / "calib", 8, seed=32, vehicle="calib")
    sweep = dict(sparsities=(0.5,), nm=None, methods=("wanda", "sparsegpt"), high_methods=(), answer_methods=(),
                 question_methods=(), nsamples=8, eval_frames=2, generated_frames=1, eval_set=tmp_path / "eval",
                 calib=tmp_path / "calib")
    kept = tmp_path / "out" / "work" / "rows" / "wanda-0.5.json"

    def interrupted(**options):
        def stop_after_wanda(line):
            if line.startswith("wanda-0.5"):
                raise KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt):
            run_bench(tmp_path / "model", tmp_path / "out", log=stop_after_wanda, **sweep, **options)
        marked = json.loads(kept.read_text())
        marked["row"]["prune_s"] = -1.0  # a value no run measures: shows whether the row was kept
        kept.write_text(json.dumps(marked))

    interrupted(max_new_tokens=2)
    summary = run_bench(tmp_path / "model", tmp_path / "out", resume=True, max_new_tokens=2, log=lambda *_: None, **sweep)
    assert [r["name"] for r in summary["results"]] == ["dense", "dense, blank images", "wanda-0.5", "sparsegpt-0.5"]
    assert summary["results"][2]["prune_s"] == -1.0 and summary["results"][3]["prune_s"] >= 0
    assert not (tmp_path / "out" / "work").exists()
    interrupted(max_new_tokens=2)
    other = run_bench(tmp_path / "model", tmp_path / "out", resume=True, max_new_tokens=3, log=lambda *_: None, **sweep)
    assert other["results"][2]["prune_s"] >= 0  # other settings: measured again
    interrupted(max_new_tokens=2)
    fresh = run_bench(tmp_path / "model", tmp_path / "out", max_new_tokens=2, log=lambda *_: None, **sweep)
    assert fresh["results"][2]["prune_s"] >= 0  # without resume the sweep starts over
