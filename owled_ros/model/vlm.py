"""The driving VLM: multi-camera image side + a language model (decoder-only or T5), one interface.

A model directory holds config.json, model.safetensors (dense or sparse-bitmask, see checkpoint.py)
and the tokenizer files; DrivingVLM.from_pretrained / save_pretrained read and write it.
"""
import copy
import json
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, T5ForConditionalGeneration

from .checkpoint import load_weights, save_weights, unique_state_dict
from .vision import MultiViewEncoder

FORMAT = "owled-vlm/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
NUSCENES_CAMERAS = ["CAM_FRONT", "CAM_FRONT_LEFT", "CAM_FRONT_RIGHT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT"]
DEFAULT_VISION = {"cameras": NUSCENES_CAMERAS, "image_size": [128, 224], "patch": 32, "width": 256, "stem": [],
                  "layers": 4, "heads": 4, "gpa_hidden": 128, "projection": True, "tags": {}, "tag_hidden": 256,
                  "mean": [0.5] * 3, "std": [0.5] * 3}
CHATML = {"before": "<|im_start|>user\n", "after": "<|im_end|>\n<|im_start|>assistant\n", "end": "<|im_end|>"}


class ModelLoadError(ValueError):
    pass


class DrivingVLM(nn.Module):
    def __init__(self, config, lm, tokenizer):
        super().__init__()
        self.config = config
        self.lm = lm
        self.tokenizer = tokenizer
        self.vision = MultiViewEncoder(config["vision"], lm.config.d_model if self.is_t5 else lm.config.hidden_size)
        self.cameras = list(config["vision"]["cameras"])

    # ----- structure -----
    @property
    def is_t5(self):
        return self.config["family"] == "t5"

    @property
    def model_id(self):
        return self.config["model_id"]

    @property
    def compression(self):
        return self.config.get("compression", {"method": "dense", "sparsity": 0.0})

    def components(self):
        """Prunable stacks of blocks by component name, in forward order. The image side is its transformer
        blocks (if any) and the fusion unit (gated pooling + projection)."""
        parts = {"vision": self.vision.blocks, "vision.fusion": [self.vision.fusion]}
        if self.is_t5:
            parts |= {"llm.encoder": self.lm.encoder.block, "llm.decoder": self.lm.decoder.block}
        else:
            parts["llm"] = self.lm.base_model.layers
        return {name: blocks for name, blocks in parts.items() if len(blocks)}

    # ----- inputs -----
    def pixels(self, frames):
        """frames: list of {camera: RGB uint8 HxWx3} -> pixels (B, V, 3, H, W), view mask (B, V)."""
        height, width = self.config["vision"]["image_size"]
        mean, std = (torch.tensor(self.config["vision"][k]).view(3, 1, 1) for k in ("mean", "std"))
        unknown = {c for f in frames for c in f} - set(self.cameras)
        if unknown:
            raise ValueError(f"unknown camera(s) {sorted(unknown)}; this model knows {self.cameras}")
        pixels = torch.zeros(len(frames), len(self.cameras), 3, height, width)
        mask = torch.zeros(len(frames), len(self.cameras), dtype=torch.bool)
        for b, frame in enumerate(frames):
            for camera, image in frame.items():
                if image is None:
                    continue
                v = self.cameras.index(camera)
                resized = cv2.resize(np.asarray(image), (width, height), interpolation=cv2.INTER_AREA)
                pixels[b, v] = (torch.from_numpy(resized).permute(2, 0, 1).float() / 255 - mean) / std
                mask[b, v] = True
        if not mask.any(1).all():
            raise ValueError("every frame set needs at least one camera image")
        return pixels, mask

    def image_tokens(self, frames):
        pixels, mask = self.pixels(frames)
        camera_ids = torch.arange(len(self.cameras))
        return self.vision(pixels, camera_ids, mask)

    def _text_embeddings(self, ids):
        embedded = self.lm.get_input_embeddings()(torch.tensor(ids, dtype=torch.long))
        return embedded + self.vision.modal_embeddings.weight[0]

    def _encode(self, text):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _prompt(self, image, question):
        """Embeddings of one prompt; image tokens before the question, or after it as EM-VLM4AD does."""
        prompt = self.config["prompt"]
        before = self._encode(prompt["before"])
        question = self._encode(question + prompt["after"]) + ([self.tokenizer.eos_token_id] if self.is_t5 else [])
        if self.config["image_position"] == "before":
            return torch.cat([self._text_embeddings(before), image, self._text_embeddings(question)])
        return torch.cat([self._text_embeddings(before + question), image])

    def _batch(self, frames, questions, answers=None):
        """LM inputs for a batch; with answers, also the answer targets (teacher forcing)."""
        images = self.image_tokens(frames)
        prompts = [self._prompt(image, q) for image, q in zip(images, questions)]
        end = self.config["prompt"]["end"]
        targets = None
        if answers is not None:
            eos = [self.tokenizer.eos_token_id] if self.is_t5 else self._encode(end)
            targets = [self._encode(a) + eos for a in answers]
        if self.is_t5:
            return self._pad(prompts, left=False), targets
        if targets is not None:  # decoder-only: the answer follows the prompt in one sequence
            prompts = [torch.cat([p, self._text_embeddings(t)]) for p, t in zip(prompts, targets)]
        return self._pad(prompts, left=targets is None), targets

    @staticmethod
    def _pad(sequences, left):
        longest = max(len(s) for s in sequences)
        embeds = sequences[0].new_zeros(len(sequences), longest, sequences[0].shape[-1])
        mask = torch.zeros(len(sequences), longest, dtype=torch.long)
        for i, s in enumerate(sequences):
            span = slice(longest - len(s), longest) if left else slice(0, len(s))
            embeds[i, span], mask[i, span] = s, 1
        return {"inputs_embeds": embeds, "attention_mask": mask}

    # ----- training / calibration -----
    def forward(self, frames, questions, answers):
        """Mean cross-entropy of the answers given frames and questions (teacher forcing)."""
        inputs, targets = self._batch(frames, questions, answers)
        if self.is_t5:
            labels = torch.full((len(targets), max(map(len, targets))), -100, dtype=torch.long)
            for i, t in enumerate(targets):
                labels[i, : len(t)] = torch.tensor(t)
            return self.lm(**inputs, labels=labels, use_cache=False).loss
        hidden = self.lm.base_model(**inputs, use_cache=False).last_hidden_state
        # logits only where an answer token is predicted: the vocabulary projection dominates otherwise
        rows, cols, labels = [], [], []
        lengths = inputs["attention_mask"].sum(1)
        for i, t in enumerate(targets):
            start = int(lengths[i]) - len(t)
            rows += [i] * len(t)
            cols += range(start - 1, start - 1 + len(t))
            labels += t
        logits = self.lm.get_output_embeddings()(hidden[rows, cols])
        return F.cross_entropy(logits.float(), torch.tensor(labels))

    def forward_text(self, texts):
        """LM-only forward on plain text (generic-text calibration, perplexity)."""
        ids = self.tokenizer(texts, return_tensors="pt", padding=True)
        return self.lm(**ids, labels=ids["input_ids"].masked_fill(ids["attention_mask"] == 0, -100), use_cache=False).loss

    # ----- inference -----
    @torch.inference_mode()
    def answer(self, frames, questions, max_new_tokens=48):
        """Greedy answers, one per (frame set, question). frames: list of {camera: RGB array}."""
        inputs, _ = self._batch(frames, questions)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        stop = [self.tokenizer.eos_token_id] + self._encode(self.config["prompt"]["end"])
        output = self.lm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                  eos_token_id=[t for t in stop if t is not None])
        return [self.tokenizer.decode(o, skip_special_tokens=True).strip() for o in output]

    def timed_answer(self, frames, questions, max_new_tokens=48):
        start = time.perf_counter()
        answers = self.answer(frames, questions, max_new_tokens)
        return answers, time.perf_counter() - start

    # ----- save / load -----
    def save_pretrained(self, directory, sparse_names=()):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(self.config)
        config["lm"] = {k: v for k, v in self.lm.config.to_dict().items() if k != "quantization_config"}
        state = unique_state_dict(self)
        save_weights(directory / WEIGHTS, state, sparse_names, {"model_id": self.model_id})
        (directory / CONFIG).write_text(json.dumps(config, indent=2))
        self.tokenizer.save_pretrained(directory)

    @classmethod
    def from_pretrained(cls, directory):
        directory = Path(directory)
        if not directory.is_dir():
            raise ModelLoadError(f"model directory not found: {directory}")
        for required in (CONFIG, WEIGHTS):
            if not (directory / required).is_file():
                raise ModelLoadError(f"model directory {directory} lacks {required}")
        try:
            config = json.loads((directory / CONFIG).read_text())
        except json.JSONDecodeError as error:
            raise ModelLoadError(f"{directory / CONFIG} is not valid JSON: {error}") from None
        if config.get("format") != FORMAT:
            raise ModelLoadError(f"{directory / CONFIG}: format is {config.get('format')!r}, expected {FORMAT!r}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory)
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"model directory {directory}: tokenizer files missing or bad ({error})") from None
        model = cls(config, build_lm(config), tokenizer)
        try:
            state = load_weights(directory / WEIGHTS)
        except Exception as error:  # safetensors raises its own error types for truncated/corrupt files
            raise ModelLoadError(f"{directory / WEIGHTS} is corrupt or incomplete: {error}") from None
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = {name for name in missing if name in tied_parameter_names(model)}
        if set(missing) - tied or unexpected:
            raise ModelLoadError(f"{directory / WEIGHTS} does not match config.json: missing "
                                 f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}")
        model.lm.tie_weights()
        return model.eval()


def tied_parameter_names(model):
    """Names that share storage with an earlier parameter (dropped on save, re-tied on load)."""
    seen, tied = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = tensor.data_ptr()
        if key in seen:
            tied.add(name)
        seen.setdefault(key, name)
    return tied


def build_lm(config):
    lm_config = dict(config["lm"])
    model_type = lm_config.pop("model_type")
    hf_config = AutoConfig.for_model(model_type, **lm_config)
    if config["family"] == "t5":
        return T5ForConditionalGeneration(hf_config)
    return AutoModelForCausalLM.from_config(hf_config)


def new_config(family, model_id, vision=None, image_position="before", prompt=None):
    return {"format": FORMAT, "model_id": model_id, "family": family, "image_position": image_position,
            "vision": dict(DEFAULT_VISION | (vision or {})), "prompt": prompt or {"before": "", "after": "", "end": ""},
            "compression": {"method": "dense", "sparsity": 0.0}}
