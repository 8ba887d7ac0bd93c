"""Runtime backends: the compiled OpenVINO model answers with the same greedy tokens as torch eager (fp32, tiny
models), guesses from earlier answers included; fallbacks to torch eager are one warning, never a crash."""
import os

import pytest
import torch

from models import tiny_decoder, tiny_t5
from owled_ros.data.world import CAMERAS, render, sample_scene
from owled_ros.runtime import installed, prepare

QUESTIONS = ["What should the ego vehicle do?", "What are the important objects in the current scene?"]


def frame_sets(count=3):
    return [render(sample_scene(seed), CAMERAS, 64, 96) for seed in range(count)]


def test_openvino_answers_as_torch_eager_does_and_encodes_the_same_image_tokens():
    pytest.importorskip("openvino")
    eager, compiled = tiny_decoder(seed=1), tiny_decoder(seed=1)
    warnings = []
    assert prepare(compiled, "openvino", warn=warnings.append) == "openvino" and not warnings
    assert set(compiled.compiled) == {"decoder", "vision"}
    frames = frame_sets()
    with torch.no_grad():
        assert torch.allclose(eager.image_tokens(frames), compiled.image_tokens(frames), atol=1e-4)
    asked = [f for f in frames for _ in QUESTIONS], QUESTIONS * len(frames)
    expected = eager.answer(*asked, max_new_tokens=12, draft_tokens=0)
    assert compiled.answer(*asked, max_new_tokens=12, draft_tokens=0) == expected
    # guesses from earlier answers, checked in one pass; one frame set, as history is kept per question
    one = asked[0][:len(QUESTIONS)], asked[1][:len(QUESTIONS)]
    history = {q: [a] for q, a in zip(one[1], expected)}
    timing = {}
    assert compiled.answer(*one, max_new_tokens=12, history=history, timing=timing) == expected[:len(QUESTIONS)]
    assert timing["decode_steps"] < 11  # the guesses held


def test_a_backend_that_cannot_run_falls_back_to_torch_with_one_warning(tmp_path, monkeypatch):
    warnings = []
    assert prepare(tiny_t5(tmp_path), "openvino", warn=warnings.append) == "torch"
    assert len(warnings) == 1 and "runs owled_ros decoder models only" in warnings[0]
    model = tiny_decoder()
    import owled_ros.runtime.openvino as backend

    def broken(*_, **__):
        raise RuntimeError("aten::frobnicate is not supported\nmore detail")
    monkeypatch.setattr(backend, "compile_model", broken)
    warnings.clear()
    assert prepare(model, "openvino", warn=warnings.append) == "torch" and model.compiled == {}
    assert warnings == ["backend openvino could not compile tiny-decoder (RuntimeError: aten::frobnicate is not "
                        "supported); running torch eager"]
    assert model.answer(frame_sets(1), QUESTIONS[:1], max_new_tokens=3)  # still answers
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        prepare(model, "tensorrt")


def test_auto_takes_int8_weights_unless_the_answers_must_be_torch_fp32s():
    pytest.importorskip("nncf")
    assert prepare(tiny_decoder(), "auto") == "openvino-int8"
    assert prepare(tiny_decoder(), "auto", exact=True) == "openvino"


def test_the_drive_node_runs_on_the_fastest_backend_installed_and_names_it(tmp_path):
    pytest.importorskip("openvino")
    from diagnostic_msgs.msg import DiagnosticArray
    from owled_ros.msg import PredictedAction
    from rosutil import RELIABLE, Peer, frame, image_msg, start_node, stop_node
    from sensor_msgs.msg import Image

    tiny_decoder().save_pretrained(tmp_path / "tiny")
    peer = Peer("runtime_test")
    peer.collect(PredictedAction, "/owled/action")
    peer.collect(DiagnosticArray, "/diagnostics")
    camera = peer.node.create_publisher(Image, "/runtime/front/image", RELIABLE)
    node = start_node("owled_ros.nodes.drive_node", {"model_dir": str(tmp_path / "tiny"), "camera_topics": "[/runtime/front/image]",
                                                     "camera_names": "[CAM_FRONT]", "camera_transports": "[raw]",
                                                     "max_new_tokens": 4}, tmp_path / "node.log")
    try:
        assert peer.wait_for_subscribers(camera, timeout=120), (tmp_path / "node.log").read_text()
        camera.publish(image_msg(frame(1), 1_700_000_000_000_000_000))
        peer.spin(60, until=lambda: peer.received["/owled/action"])
        assert peer.received["/owled/action"], (tmp_path / "node.log").read_text()
        backend = lambda: [kv.value for a in peer.received["/diagnostics"] for s in a.status for kv in s.values if kv.key == "backend"]
        peer.spin(5, until=backend)
        fastest = "openvino-int8" if installed("openvino-int8") else "openvino"
        assert backend()[-1] == fastest
        threads = max(1, len(os.sched_getaffinity(0)) - 1)  # one core stays free for camera reception
        assert f"runtime backend: {fastest} (float32, {threads} inference threads" in (tmp_path / "node.log").read_text()
    finally:
        assert stop_node(node) == 0, (tmp_path / "node.log").read_text()
        peer.close()


def prune_half(model):
    """Every decoder linear at least 50 % zeros (the smallest magnitudes), marked as a pruned model."""
    for linear in model.lm.base_model.layers.modules():
        if isinstance(linear, torch.nn.Linear):
            weight = linear.weight.data
            weight[weight.abs() <= weight.abs().median()] = 0
    model.config["compression"] = {"method": "magnitude", "sparsity": 0.5}
    return model


@pytest.mark.parametrize("pruned", [False, True])
def test_w8a8_runs_the_decoder_linears_as_int8_kernels_and_tracks_torch_eagers_logits(pruned):
    pytest.importorskip("nncf")
    from owled_ros.model.vlm import decoder_step
    from owled_ros.runtime.openvino import has_amx, kernels

    eager, compiled = tiny_decoder(seed=1), tiny_decoder(seed=1)
    if pruned:
        prune_half(eager), prune_half(compiled)
    warnings = []
    assert prepare(compiled, "openvino-w8a8", warn=warnings.append) == "openvino-w8a8" and not warnings
    steps = []  # the decoder's inputs while eager answers: prefills and every decoding step

    def record(*tensors):
        steps.append(tensors)
        return decoder_step(eager.lm, *tensors)
    eager.compiled["decoder"] = record
    frames = frame_sets(3)
    eager.answer([f for f in frames for _ in QUESTIONS], QUESTIONS * len(frames), max_new_tokens=12, draft_tokens=0)
    # int8 activations move a random tiny model's near-flat logits enough to flip a greedy token now and then (which
    # then changes the rest of the answer), so it is held to eager's next token at each step, not to whole answers;
    # their relative error is about 0.29 at most steps of this tiny model
    agree, error = [], []
    with torch.no_grad():
        for tensors in steps:
            expected, logits = decoder_step(eager.lm, *tensors)[0], compiled.compiled["decoder"](*tensors)[0]
            agree += (expected.argmax(-1) == logits.argmax(-1)).flatten().tolist()
            error.append(float((logits - expected).norm() / (expected - expected.mean(-1, keepdim=True)).norm()))
    assert len(agree) > 50 and sum(agree) / len(agree) >= 0.8 and max(error) < 0.35, (sum(agree) / len(agree), max(error))
    ran = kernels(compiled.compiled["decoder"].runtime)
    assert sum(ran.values()) == 1 + 7 * compiled.lm.config.num_hidden_layers  # the head, and 7 per block
    assert all(kernel.lower().endswith("_i8") for kernel in ran), ran
    # OpenVINO's sparse weights decompression: AMX CPUs, pruned models only
    assert any("sparse" in kernel for kernel in ran) == (pruned and has_amx()), ran


def test_serving_only_drops_the_torch_copy_of_the_compiled_decoder():
    pytest.importorskip("openvino")
    eager, served = tiny_decoder(seed=2), tiny_decoder(seed=2)
    assert prepare(served, "openvino", serve_only=True) == "openvino"
    assert all(p.device.type == "meta" for p in served.lm.base_model.layers.parameters())
    frames = frame_sets(2)
    assert served.answer(frames, QUESTIONS, max_new_tokens=8) == eager.answer(frames, QUESTIONS, max_new_tokens=8)


def test_the_converted_model_cache_keeps_the_entries_used_last_of_models_that_still_exist(tmp_path):
    pytest.importorskip("openvino")
    from owled_ros.runtime.openvino import evict

    models, root = tmp_path / "models", tmp_path / "openvino"
    for i in range(5):
        (models / str(i)).mkdir(parents=True)
        (models / str(i) / "model.safetensors").write_text("w")
        (root / f"entry{i}").mkdir(parents=True)
        (root / f"entry{i}" / "source").write_text(str(models / str(i) / "model.safetensors"))
        os.utime(root / f"entry{i}" / "source", (1000 + i, 1000 + i))
    (models / "4" / "model.safetensors").unlink()  # entry4, the newest, is of a model deleted since
    (root / "older-version").mkdir()  # no source file, made long ago
    os.utime(root / "older-version", (1000, 1000))
    (root / "being-made").mkdir()  # no source file yet, made just now
    evict(root, keep=2)
    assert sorted(e.name for e in root.iterdir()) == ["being-made", "entry2", "entry3"]


@pytest.mark.parametrize("bf16_product", [True, False])
def test_int8_linears_are_within_their_rounding_error_in_both_kernels(monkeypatch, bf16_product):
    from owled_ros.runtime import int8
    from owled_ros.runtime.int8 import KERNEL_ROWS, Int8Linear

    monkeypatch.setattr(int8, "BF16_PRODUCT", bf16_product)  # long inputs: bfloat16, or fp32 a slice at a time
    monkeypatch.setattr(int8, "SLICE_WEIGHTS", 96 * 7)  # width 96: slices of 7 output rows, the last one 5
    torch.manual_seed(0)
    for width in (96, 200, 12, 4):  # the kernel takes inputs 16 wide at a time: 200 and 12 crashed it, 4 gave NaN
        dense = torch.nn.Linear(width, 40)
        quantized = Int8Linear(dense.weight, dense.bias)
        assert quantized.qweight.dtype == torch.int8 and quantized.qweight.abs().max() == 127
        for rows in (2, KERNEL_ROWS + 5):  # the int8 kernel, then the dequantized product
            x = torch.randn(rows, width)
            # half an int8 step per weight, and bfloat16's rounding (8 bits) of the input and the output
            step = quantized.scales.float()[:, None] / 2 + dense.weight.detach().abs() / 2**7
            bound = x.abs() @ step.T + dense(x).abs() / 2**7 + 1e-4
            assert ((quantized(x) - dense(x)).abs() <= bound).all()
        if not bf16_product:  # fp32 throughout: only the weights' rounding, to fp32's precision
            x = torch.randn(KERNEL_ROWS + 5, width)
            dequantized = quantized.qweight.float() * quantized.scales.float()[:, None]
            assert torch.allclose(quantized(x), torch.nn.functional.linear(x, dequantized, dense.bias), atol=1e-5)
    dense = torch.nn.Linear(96, 40)
    quantized = Int8Linear(dense.weight, dense.bias)
    x = torch.randn(3, 7, 96)  # leading dimensions kept; both paths give the same product
    assert quantized(x).shape == (3, 7, 40)
    assert torch.allclose(quantized(x[:1, :2]), quantized(x)[:1, :2], atol=1e-5)


def test_torch_int8_holds_every_linear_in_int8_and_still_answers(tmp_path):
    model = tiny_decoder(seed=3)
    fp32_bytes = sum(m.weight.numel() * 4 for m in model.modules() if type(m) is torch.nn.Linear)
    frames = frame_sets(2)
    warnings = []
    assert prepare(model, "torch-int8", warn=warnings.append) == "torch-int8" and not warnings
    from owled_ros.runtime.int8 import Int8Embedding, Int8Linear

    assert not [m for m in model.modules() if type(m) is torch.nn.Linear]
    int8_bytes = sum(m.qweight.numel() for m in model.modules() if isinstance(m, Int8Linear))
    assert int8_bytes * 4 == fp32_bytes
    embeddings = model.lm.get_input_embeddings()  # tied: reads the output layer's table, no copy of its own
    assert isinstance(embeddings, Int8Embedding) and embeddings.table is model.lm.get_output_embeddings()
    answers = model.answer(frames, QUESTIONS, max_new_tokens=8)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert prepare(tiny_t5(tmp_path), "torch-int8", warn=warnings.append) == "torch-int8"  # T5: linears only
    from hf_models import llava
    from owled_ros.model import load_model

    assert prepare(load_model(llava(tmp_path / "llava")), "torch-int8", warn=warnings.append) == "torch"
    assert warnings == ["backend torch-int8 runs owled_ros models only; llava runs on torch eager"]
