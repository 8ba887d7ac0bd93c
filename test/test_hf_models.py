"""Bring your own VLM: tiny transformers checkpoints of three families pruned through the CLI on driving frame
sets, reloaded by plain transformers, served by the drive node; a real-weight text check; bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

import hf_models
from owled_ros.data.calib import read_samples, write_synthetic
from owled_ros.model import ModelLoadError, load_model
from owled_ros.model.hf import load_processor
from owled_ros.model.sparse_kernels import is_two_four

FAMILIES = list(hf_models.FAMILIES)


def owled(*args):
    return subprocess.run([sys.executable, "-m", "owled_ros.cli", *map(str, args)], capture_output=True, text=True,
                          env=os.environ | {"TRANSFORMERS_VERBOSITY": "error"})


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("byo")
    write_synthetic(root / "calib", 4, seed=3)
    for family, build in hf_models.FAMILIES.items():
        build(root / family)
    return root


def pruned(work, family, nm=None):
    """The family's checkpoint pruned through the CLI (OWLed-SparseGPT, 50 % or 2:4, on 4 driving frame sets),
    once per module."""
    out = work / f"{family}-{nm or 'unstructured'}".replace(":", "of")
    if not out.exists():
        result = owled("prune", "--model", work / family, "--method", "owled-sparsegpt", "--sparsity", "llm=0.5,vision=0.5",
                       *(["--nm", nm] if nm else []), "--calib", work / "calib", "--nsamples", 4, "--out", out)
        assert result.returncode == 0, result.stderr
    return out


def pruned_linears(report):
    """(component, block, linear, target or None for N:M, sparsity) of every pruned linear in a report."""
    return [(b["component"], b["index"], name, None if b["nm"] else b["target"], layer["sparsity"])
            for b in report["blocks"] for name, layer in b["layers"].items()]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("nm", [None, "2:4"])
def test_a_family_is_pruned_on_driving_frame_sets_and_reloads_in_plain_transformers(work, family, nm):
    out = pruned(work, family, nm)
    report = json.loads((out / "report.json").read_text())
    assert set(report["achieved"]) >= {"llm", "vision", "vision.projector"}
    assert report["calibration"]["kind"] == "driving" and report["peak_rss_mb"] > 0 and (out / "sparsity.png").is_file()
    linears = pruned_linears(report)
    assert len(linears) >= 2 * 4 + 2 * 4 + 1
    for component, index, name, target, sparsity in linears:
        assert abs(sparsity - (0.5 if target is None else target)) <= 0.01, (component, index, name)
    assert any(target != 0.5 for *_, target, _ in linears if target is not None) or nm  # OWL moved the targets

    model = AutoModelForImageTextToText.from_pretrained(out)  # plain transformers, the pruned safetensors
    served = load_model(out)
    path = {id(m): name.removeprefix("hf.") for name, m in served.named_modules()}
    for component, blocks in served.components().items():  # the blocks as the pruner found them
        for index, block in enumerate(blocks):
            recorded = next(b for b in report["blocks"] if b["component"] == component and b["index"] == index)
            for name, layer in recorded["layers"].items():
                weight = model.get_submodule(path[id(block)]).get_submodule(name).weight
                assert int((weight == 0).sum()) == layer["zeros"], (component, index, name)
                if nm:
                    assert is_two_four(weight), (component, index, name)
    assert model.config.owled["compression"]["method"] == "owled-sparsegpt"
    processor = load_processor(out)
    sample = read_samples(work / "calib")[0]
    text = served.chat(sample.images(), "What should the ego vehicle do?")
    batch = served.inputs([sample.images()], [text])
    generated = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == batch["input_ids"].shape[1] + 4 or generated[0, -1] == processor.tokenizer.eos_token_id


def test_answer_and_eval_take_a_transformers_checkpoint(work):
    result = owled("answer", "--model", work / "llava", "--frames", work / "calib", "--max-new-tokens", 3)
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert answers and all(set(a) == {"question", "answer", "reference"} for a in answers)
    result = owled("eval", "--model", work / "llava", "--frames", work / "calib", "--generated", 2, "--max-new-tokens", 4)
    assert result.returncode == 0, result.stderr
    scored = json.loads(result.stdout)["images"]
    assert scored["generated_frame_sets"] == 2 and "closed_mean_acc" not in scored["metrics"]
    rates = {k: v["value"] for k, v in scored["metrics"].items() if k.endswith("_parsed")}
    assert set(rates) == {"gen_action_parsed", "gen_light_parsed", "gen_count_parsed"}
    assert all(0 <= value <= 1 for value in rates.values())


def test_a_bfloat16_checkpoint_is_pruned_in_bfloat16_and_the_bitmask_layout_reloads(work, tmp_path):
    hf_models.llava(tmp_path / "bf16", dtype=torch.bfloat16)
    result = owled("prune", "--model", tmp_path / "bf16", "--method", "owled-sparsegpt", "--calib", work / "calib",
                   "--nsamples", 4, "--layout", "bitmask", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["dtype"] == "bfloat16" and report["layout"] == "bitmask"
    with safe_open(str(tmp_path / "out" / "owled-sparse.safetensors"), "pt") as f:
        assert any(k.endswith(".bitmask") for k in f.keys())
    model = load_model(tmp_path / "out")
    assert model.hf.dtype == torch.bfloat16 and model.compression["method"] == "owled-sparsegpt"
    zeros = sum(int((b.get_submodule(name).weight == 0).sum()) for b in model.components()["llm"]
                for name in report["blocks"][0]["layers"])
    assert zeros == sum(layer["zeros"] for b in report["blocks"] if b["component"] == "llm" for layer in b["layers"].values())


def test_a_checkpoint_larger_than_its_memory_cap_is_pruned_block_by_block_from_disk(work, tmp_path):
    """--max-memory far below the checkpoint's size: accelerate keeps the weights on disk and loads each
    module for its forward pass; the pruned blocks are written back there. Same weights as pruning in memory."""
    from safetensors.torch import load_file

    capped = tmp_path / "capped"
    # M and lambda are not searched on an offloaded model: it gets the in-memory run's choice by hand
    chosen = json.loads((pruned(work, "llava") / "report.json").read_text())
    result = owled("prune", "--model", work / "llava", "--method", "owled-sparsegpt", "--sparsity", "llm=0.5,vision=0.5",
                   "--calib", work / "calib", "--nsamples", 4, "--max-memory", "1MB", "--M", chosen["M"],
                   "--lam", chosen["lambda"], "--out", capped)
    assert result.returncode == 0, result.stderr
    report = json.loads((capped / "report.json").read_text())
    size = (work / "llava" / "model.safetensors").stat().st_size
    assert report["max_memory"] == "1MB" and report["offloaded_parameters"] * 4 > 0.9 * size  # nearly all on disk
    assert not (tmp_path / ".capped.offload").exists()
    in_memory, from_disk = load_file(pruned(work, "llava") / "model.safetensors"), load_file(capped / "model.safetensors")
    assert set(in_memory) == set(from_disk) and all(torch.equal(in_memory[k], from_disk[k]) for k in in_memory)


def test_a_model_whose_vision_tower_cannot_be_placed_fails_naming_its_modules(work):
    from torch import nn

    from owled_ros.model.hf import find_components

    hf = AutoModelForImageTextToText.from_pretrained(work / "llava")
    assert list(find_components(hf, True)) == ["vision", "vision.projector", "llm"]
    hf.model.vision_tower.encoder.layers = nn.ModuleList()
    with pytest.raises(ModelLoadError, match=r"cannot place the vision tower of LlavaForConditionalGeneration: .*"
                                             r"top-level modules: model \(LlavaModel\), lm_head \(Linear\)"):
        find_components(hf, True)


@pytest.mark.parametrize("case", ["no config", "no image-text class", "no processor", "vision on text-only",
                                  "unknown component", "hub id"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(work, tmp_path, case):
    from transformers import LlamaConfig, LlamaForCausalLM, ViTConfig

    model = work / "llava"
    sparsity = "0.5"
    if case == "no config":
        model = tmp_path / "empty"
        model.mkdir()
    elif case == "no image-text class":
        model = tmp_path / "vit"
        ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(model)
    elif case == "no processor":
        model = tmp_path / "bare"
        AutoModelForImageTextToText.from_pretrained(work / "llava").save_pretrained(model)
    elif case == "vision on text-only":
        model = tmp_path / "text"
        LlamaForCausalLM(LlamaConfig(**hf_models.text_config(hf_models.tokenizer_with([])))).save_pretrained(model)
        hf_models.tokenizer_with([]).save_pretrained(model)
        sparsity = "llm=0.5,vision=0.3"
    elif case == "unknown component":
        sparsity = "vision.roof=0.3"
    else:
        model = "HuggingFaceTB/SmolVLM-256M-Instruct"
    result = owled("prune", "--model", model, "--method", "wanda", "--sparsity", sparsity, "--calib", work / "calib",
                   "--nsamples", 4, "--out", tmp_path / "out")
    expected = {"no config": "has no config.json", "no image-text class": "no image-text-to-text or causal-LM class",
                "no processor": "has no processor", "vision on text-only": "vision: not a component",
                "unknown component": "vision.roof: not a component", "hub id": "never downloads"}[case]
    assert result.returncode == 2 and expected in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()


def test_smollm2_as_a_plain_llama_directory_prunes_like_the_default_model_path(tmp_path):
    """Real weights: the same Wanda run on SmolLM2-135M through a transformers directory (`--model smollm2`:
    the raw model of bench/text_check.py, written out on first use) and through our default model's language
    model gives the same held-out perplexity."""
    from owled_ros.eval.bench import text_path
    from owled_ros.eval.perplexity import perplexity
    from owled_ros.model.build import default_model_untrained
    from owled_ros.pruning import calibration
    from owled_ros.pruning.engine import PruneSpec, prune_model

    result = subprocess.run([sys.executable, "-m", "owled_ros.cli", "prune", "--model", "smollm2", "--method", "wanda",
                             "--calib", text_path("generic"), "--nsamples", "8", "--out", tmp_path / "pruned"],
                            capture_output=True, text=True, env=os.environ | {"OWLED_HOME": str(tmp_path / "home")})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "home" / "models" / "SmolLM2-135M-Instruct" / "model.safetensors").is_file()
    model = default_model_untrained()  # its language model: the same SmolLM2 weights, not pruned yet
    heldout = text_path("heldout").read_text()[:4000]
    dense = perplexity(model.lm, model.tokenizer, heldout, 256, 256)
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    through_transformers = perplexity(pruned, model.tokenizer, heldout, 256, 256)
    del pruned

    samples, run, _ = calibration.load(text_path("generic"), model.tokenizer, 8)
    prune_model(model, samples, run, PruneSpec("wanda", "uniform", {"llm": 0.5}), progress=False)
    through_default = perplexity(model.lm, model.tokenizer, heldout, 256, 256)
    assert through_transformers == pytest.approx(through_default, rel=0.01)
    assert through_default > 1.05 * dense  # it did prune


@pytest.mark.parametrize("family", FAMILIES)
def test_the_drive_node_serves_a_pruned_checkpoint(work, family, tmp_path):
    from diagnostic_msgs.msg import DiagnosticArray
    from owled_ros.eval.parse import parse_description
    from owled_ros.msg import PerceptionDescription, PredictedAction, QAAnswer, Question
    from rosutil import RELIABLE, Peer, frame, image_msg, start_node, stop_node
    from sensor_msgs.msg import Image

    topics = ["/byo/front/image", "/byo/back/image"]
    peer = Peer("byo_test")
    for kind, topic in ((PerceptionDescription, "/owled/perception"), (PredictedAction, "/owled/action"),
                        (QAAnswer, "/owled/answers")):
        peer.collect(kind, topic)
    peer.collect(DiagnosticArray, "/diagnostics")
    publishers = [peer.node.create_publisher(Image, topic, RELIABLE) for topic in topics]
    node = start_node("owled_ros.nodes.drive_node", {
        "model_dir": str(pruned(work, family)), "camera_topics": "[" + ",".join(topics) + "]",
        "camera_names": "[CAM_FRONT,CAM_BACK]", "camera_transports": "[raw,raw]", "max_new_tokens": 4,
        "max_rate_hz": 50.0}, tmp_path / "node.log")
    try:
        # every camera's subscription matched before its frame goes out, or a view can miss the frame set
        assert all(peer.wait_for_subscribers(p) for p in publishers), (tmp_path / "node.log").read_text()
        for seed, publisher in enumerate(publishers):
            publisher.publish(image_msg(frame(seed), 1_700_000_000_000_000_000))
        peer.spin(60, until=lambda: peer.received["/owled/perception"] and peer.received["/owled/action"])
        assert peer.received["/owled/perception"], (tmp_path / "node.log").read_text()
        perception, action = peer.received["/owled/perception"][0], peer.received["/owled/action"][0]
        assert sorted(perception.cameras_used) == ["CAM_BACK", "CAM_FRONT"]
        assert perception.model.method == "owled-sparsegpt" and 0.49 < perception.model.sparsity < 0.51
        assert action.action_label  # "unknown" where the random model's text names no action: counted, no crash
        assert 0 < action.confidence <= 1
        asker = peer.node.create_publisher(Question, "/owled/questions", 10)
        peer.wait_for_subscribers(asker)
        asker.publish(Question(question_id="q1", category="planning", question="Is the light red?"))
        peer.spin(30, until=lambda: peer.received["/owled/answers"])
        assert peer.received["/owled/answers"] and peer.received["/owled/answers"][0].question_id == "q1"
        # answers the parsers cannot read are counted on /diagnostics: one per perception without any value read
        # and one per action read as "unknown"
        unread = sum(all(v is None for v in parse_description(p.description).values()) for p in peer.received["/owled/perception"]) \
            + sum(a.action_label == "unknown" for a in peer.received["/owled/action"])
        counted = lambda: [kv.value for a in peer.received["/diagnostics"] for s in a.status for kv in s.values
                           if kv.key == "unparsed_answers"]
        peer.spin(5, until=lambda: counted() and counted()[-1] == str(unread))
        assert counted()[-1] == str(unread)
    finally:
        assert stop_node(node) == 0, (tmp_path / "node.log").read_text()
        peer.close()
