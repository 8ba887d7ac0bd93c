"""The driving VLM: multi-camera image side + a language model (decoder-only or T5), one interface.

A model directory holds config.json, model.safetensors (dense or sparse-bitmask, see checkpoint.py)
and the tokenizer files; DrivingVLM.from_pretrained / save_pretrained read and write it.
"""
import copy
import functools
import json
import math
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache, T5ForConditionalGeneration
from transformers.cache_utils import Cache, DynamicLayer

from . import OWLED_FORMAT, ModelLoadError
from .checkpoint import load_weights, return_freed_memory, save_weights, stored_shapes, unique_state_dict
from .vision import BACKBONES, MultiViewEncoder

FORMAT = OWLED_FORMAT
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
NUSCENES_CAMERAS = ["CAM_FRONT", "CAM_FRONT_LEFT", "CAM_FRONT_RIGHT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT"]
DEFAULT_VISION = {"cameras": NUSCENES_CAMERAS, "image_size": [128, 224], "patch": 32, "width": 256, "stem": [], "backbone": "none",
                  "layers": 4, "heads": 4, "gpa_hidden": 128, "projection": True, "tags": {}, "tag_hidden": 256, "tag_dropout": 0.0,
                  "tag_view_hidden": 0, "tag_rules": {}, "crops": [], "mean": [0.5] * 3, "std": [0.5] * 3}
CHATML = {"before": "<|im_start|>user\n", "after": "<|im_end|>\n<|im_start|>assistant\n", "end": "<|im_end|>"}


class DrivingVLM(nn.Module):
    scores_options = True  # continuation_logprobs: closed questions by likelihood
    sees_images = True
    default_layout = "bitmask"

    def __init__(self, config, lm, tokenizer):
        super().__init__()
        self.config = config
        self.lm = lm
        self.tokenizer = tokenizer
        self.vision = MultiViewEncoder(config["vision"], lm.config.d_model if self.is_t5 else lm.config.hidden_size)
        self.cameras = list(config["vision"]["cameras"])
        # parts a runtime backend compiled (runtime/): "decoder" with decoder_step's signature, "vision" like
        # self.vision; eager torch where absent
        self.compiled = {}

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

    def serve_compiled(self):
        """Drop the torch weights of the parts a runtime compiled (self.compiled), so that a process that only
        answers (the drive node) holds them once; teacher-forced scoring and pruning still need them."""
        if "decoder" in self.compiled:
            self.lm.base_model.layers.to("meta")  # the token embeddings stay: answers embed their text in torch
        if "vision" in self.compiled:
            for name, module in self.vision.named_children():
                if name not in ("conv_proj", "modal_embeddings"):  # still read: device and dtype, the text's modality
                    module.to("meta")
        return_freed_memory()

    def mark_pruned(self, compression, model_id):
        self.config["compression"], self.config["model_id"] = compression, model_id

    def components(self):
        """Prunable stacks of blocks by component name, in forward order. The image side is its encoder (the
        CNN backbone's or conv stem's blocks, then the patch embedding), its transformer blocks (if any) and
        the fusion unit (gated pooling + projection)."""
        parts = {"vision.encoder": [*self.vision.stem, self.vision.conv_proj], "vision": self.vision.blocks,
                 "vision.fusion": [self.vision.fusion]}
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
        weight = self.vision.conv_proj.weight  # the model's device and dtype (float32, bfloat16)
        camera_ids = torch.arange(len(self.cameras), device=weight.device)
        return self.compiled.get("vision", self.vision)(pixels.to(weight), camera_ids, mask.to(weight.device))

    def _text_embeddings(self, ids):
        embedded = self.lm.get_input_embeddings()(torch.tensor(ids, dtype=torch.long, device=self.lm.device))
        return embedded + self.vision.modal_embeddings.weight[0]

    def _encode(self, text):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _prompt_parts(self, image, question):
        """(the part every question about the same frame set shares, the question's own part) of a prompt's
        embeddings; image tokens before the question, or after it as EM-VLM4AD does."""
        prompt = self.config["prompt"]
        before = self._text_embeddings(self._encode(prompt["before"]))
        question = self._text_embeddings(self._encode(question + prompt["after"]) + ([self.tokenizer.eos_token_id] if self.is_t5 else []))
        if self.config["image_position"] == "before":
            return torch.cat([before, image]), question
        return before, torch.cat([question, image])

    def _prompt(self, image, question):
        return torch.cat(self._prompt_parts(image, question))

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
        mask = torch.zeros(len(sequences), longest, dtype=torch.long, device=embeds.device)
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
    def answer(self, frames, questions, max_new_tokens=48, timing=None, history=None, draft_tokens=8, confidences=None):
        """Greedy answers, one per (frame set, question). frames: list of {camera: RGB array}; a frame set
        given for several questions (the same dict) is encoded once, and for the decoder the prompt head it
        shares with them (chat header + image tokens) runs once, its KV cache copied to each question.
        history: {question: [earlier answers]}; the decoder then guesses up to draft_tokens tokens ahead by
        copying what followed the answer's last tokens in an earlier answer to the same question, and checks
        the guess in the same forward pass (prompt-lookup speculative decoding): the answers are those of
        plain greedy decoding, in fewer passes where they repeat earlier ones.
        timing: a dict that receives seconds per stage (encode_s, prefill_s, decode_s), decode_steps (forward
        passes after the prefill) and decode_tokens (the longest answer's tokens, its end included).
        confidences: a list that receives each answer's confidence, the geometric mean of its tokens'
        probabilities (its end included)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        clock = Stopwatch(timing)
        unique = list({id(f): f for f in frames}.values())
        frame_of = torch.tensor([[id(u) for u in unique].index(id(f)) for f in frames])
        images = self.image_tokens(unique)
        clock.lap("encode_s")
        end = self._encode(self.config["prompt"]["end"])
        stop = {t for t in [self.tokenizer.eos_token_id] + end if t is not None}
        if self.is_t5:
            inputs = self._pad([self._prompt(images[f], q) for f, q in zip(frame_of.tolist(), questions)], left=False)
            pad = self.tokenizer.pad_token_id
            output, confidence = greedy_generate(self.lm, inputs, max_new_tokens, sorted(stop), pad)
            clock.lap("decode_s")
            if confidences is not None:
                confidences.extend(confidence)
            return [self.tokenizer.decode(o, skip_special_tokens=True).strip() for o in output]
        run = self.compiled.get("decoder") or functools.partial(decoder_step, self.lm)
        shared = torch.stack([self._prompt_parts(image, "")[0] for image in images])
        _, keys, values = run(shared, torch.ones(shared.shape[:2], dtype=torch.long),
                              torch.arange(shared.shape[1]).expand(len(shared), -1), torch.zeros(len(shared), 1, dtype=torch.long))
        own = self._pad([self._prompt_parts(images[f], q)[1] for f, q in zip(frame_of.tolist(), questions)], left=True)
        mask = torch.cat([own["attention_mask"].new_ones(len(questions), shared.shape[1]), own["attention_mask"]], 1)
        last = torch.full((len(questions), 1), own["inputs_embeds"].shape[1] - 1)
        logits, keys, values = run(own["inputs_embeds"], mask, mask.cumsum(1)[:, shared.shape[1]:] - 1, last,
                                   keys[:, frame_of], values[:, frame_of])
        clock.lap("prefill_s")
        earlier = [[[START] + self._encode(a) + end for a in (history or {}).get(q, [])] for q in questions]
        decoded = [Decoded(stop, max_new_tokens) for _ in questions]
        best_logprob, best = logits[:, -1].float().log_softmax(-1).max(-1)
        for row, token, logprob in zip(decoded, best.tolist(), best_logprob.tolist()):
            row.take([token], [logprob])
        position, steps = mask.sum(1), 0
        while not all(row.done for row in decoded):
            drafts = [[] if row.done else lookup_draft([START] + row.tokens, sources,
                                                       min(draft_tokens, max_new_tokens - len(row.tokens) - 1))
                      for row, sources in zip(decoded, earlier)]
            width = 1 + max(map(len, drafts))
            ids = [[row.last] + d + [0] * (width - 1 - len(d)) for row, d in zip(decoded, drafts)]
            fed = torch.tensor([[0 if row.done else 1] * (1 + len(d)) + [0] * (width - 1 - len(d))
                                for row, d in zip(decoded, drafts)])
            # generated tokens are embedded as text, the way answers were during training
            logits, keys, values = run(self._text_embeddings(ids), torch.cat([mask, fed], 1),
                                       position[:, None] + torch.arange(width), torch.arange(width).expand(len(ids), -1),
                                       keys, values)
            steps += 1
            best_logprobs, predicted = (t.tolist() for t in logits.float().log_softmax(-1).max(-1))
            kept = []  # cache entries that stay visible: the fed token and the accepted guesses
            for row, draft, best, logprobs in zip(decoded, drafts, predicted, best_logprobs):
                accepted = next((j for j, (guess, p) in enumerate(zip(draft, best)) if guess != p), len(draft))
                kept.append(0 if row.done else 1 + accepted)
                if not row.done:  # greedy: every token taken is its position's most likely one
                    row.take(draft[:accepted] + [best[accepted]], logprobs[:accepted + 1])
            kept = torch.tensor(kept)
            mask = torch.cat([mask, (torch.arange(width)[None, :] < kept[:, None]).to(mask.dtype)], 1)
            position = position + kept
        clock.lap("decode_s", decode_steps=steps, decode_tokens=max(row.length for row in decoded))
        if confidences is not None:
            confidences.extend(row.confidence for row in decoded)
        return [self.tokenizer.decode(row.tokens, skip_special_tokens=True).strip() for row in decoded]

    @torch.inference_mode()
    def continuation_logprobs(self, frame_sets, requests):
        """Teacher-forced log-probability of each continuation, summed over its tokens.
        requests: [(frame set index, question, answer prefix, continuation, complete)]; a complete
        continuation ends the answer (its end token is scored too). Each frame set's images are encoded
        once and each distinct (frame set, question, prefix) context runs once; for the decoder the
        continuations run on copies of their context's KV cache, batched by length (no padding)."""
        images = self.image_tokens(frame_sets)
        contexts = list(dict.fromkeys((f, q, prefix) for f, q, prefix, _, _ in requests))
        which = torch.tensor([contexts.index((f, q, prefix)) for f, q, prefix, _, _ in requests])
        prefixes = [self._encode(prefix) if prefix else [] for _, _, prefix in contexts]
        end = [self.tokenizer.eos_token_id] if self.is_t5 else self._encode(self.config["prompt"]["end"])
        continuations = [self._encode(c) + (end if complete else []) for *_, c, complete in requests]
        if any(not c for c in continuations):
            raise ValueError("empty continuation")
        if self.is_t5:
            return self._t5_logprobs(images, contexts, prefixes, which, continuations)
        # 1. each frame set's shared part (chat header + image tokens); 2. every context's own part after it,
        # left-padded; 3. the continuations, one batch per length, each on a copy of its context's cache
        parts = [self._prompt_parts(images[f], q) for f, q, _ in contexts]
        shared = torch.stack([self._prompt_parts(image, "")[0] for image in images])
        head = self.lm.base_model(inputs_embeds=shared, use_cache=True)
        own = self._pad([torch.cat([part[1], self._text_embeddings(p)]) for part, p in zip(parts, prefixes)], left=True)
        mask = torch.cat([torch.ones(len(contexts), shared.shape[1], dtype=torch.long), own["attention_mask"]], 1)
        frame_of = torch.tensor([f for f, _, _ in contexts])
        context = self.lm.base_model(inputs_embeds=own["inputs_embeds"], attention_mask=mask,
                                     position_ids=mask.cumsum(1)[:, shared.shape[1]:] - 1, use_cache=True,
                                     past_key_values=select_cache(head.past_key_values, frame_of))
        lengths = mask.sum(1)
        logprobs = torch.zeros(len(requests))
        for length in sorted({len(c) for c in continuations}):
            rows = torch.tensor([i for i, c in enumerate(continuations) if len(c) == length])
            ids = torch.tensor([continuations[i] for i in rows.tolist()])
            ctx = which[rows]
            hidden = self.lm.base_model(inputs_embeds=self._text_embeddings(ids.tolist()),
                                        past_key_values=select_cache(context.past_key_values, ctx),
                                        attention_mask=torch.cat([mask[ctx], torch.ones_like(ids)], 1),
                                        position_ids=lengths[ctx][:, None] + torch.arange(length)[None, :]).last_hidden_state
            # the state before continuation token t: the context's last state for t = 0, else hidden[t - 1]
            states = torch.cat([context.last_hidden_state[ctx, -1:], hidden[:, :-1]], 1)
            logprobs[rows] = self._sum_logprobs(states, ids, [continuations[i] for i in rows.tolist()])
        return logprobs

    def _t5_logprobs(self, images, contexts, prefixes, which, continuations):
        inputs = self._pad([self._prompt(images[f], q) for f, q, _ in contexts], left=False)
        encoded = self.lm.get_encoder()(**inputs).last_hidden_state[which]
        labels = [prefixes[c] + cont for c, cont in zip(which.tolist(), continuations)]
        longest = max(map(len, labels))
        padded = torch.tensor([label + [self.tokenizer.pad_token_id] * (longest - len(label)) for label in labels])
        hidden = self.lm(encoder_outputs=(encoded,), attention_mask=inputs["attention_mask"][which],
                         decoder_input_ids=self.lm._shift_right(padded), output_hidden_states=True,
                         use_cache=False).decoder_hidden_states[-1]
        if self.lm.config.tie_word_embeddings:
            hidden = hidden * self.lm.model_dim ** -0.5  # T5 rescales before its tied LM head
        starts = [len(prefixes[c]) for c in which.tolist()]
        states = torch.stack([F.pad(hidden[i, s:], (0, 0, 0, s)) for i, s in enumerate(starts)])
        ids = torch.stack([F.pad(padded[i, s:], (0, s)) for i, s in enumerate(starts)])
        return self._sum_logprobs(states, ids, continuations)

    def _sum_logprobs(self, states, ids, continuations):
        """Sum over each row of log p(ids[t] | states[t]) for its first len(continuation) tokens."""
        rows = [i for i, c in enumerate(continuations) for _ in c]
        cols = [t for c in continuations for t in range(len(c))]
        logits = self.lm.get_output_embeddings()(states[rows, cols]).float()
        picked = logits.log_softmax(-1)[torch.arange(len(rows)), ids[rows, cols]]
        return torch.zeros(len(continuations)).index_add_(0, torch.tensor(rows), picked)

    # ----- save / load -----
    def save_pretrained(self, directory, sparse_names=(), layout="bitmask"):
        """layout 'bitmask': the weights in sparse_names in our compact layout; 'dense': all of them dense."""
        if layout == "dense":
            sparse_names = ()
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
        try:
            shapes = stored_shapes(directory / WEIGHTS)
        except Exception as error:  # safetensors raises its own error types for truncated/corrupt files
            raise ModelLoadError(f"{directory / WEIGHTS} is corrupt or incomplete: {error}") from None
        check_config(config, shapes, directory / CONFIG)
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory)
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"model directory {directory}: tokenizer files missing or bad ({error})") from None
        # Build on the meta device first (no memory): a config that does not fit the weights is refused
        # before anything as large as it asks for is allocated.
        try:
            with torch.device("meta"):
                skeleton = cls(config, build_lm(config), tokenizer)
        except ValueError as error:  # a config the model cannot be built from (e.g. a crop's tap past the stem)
            raise ModelLoadError(f"{directory / CONFIG}: {error}") from None
        check_shapes(skeleton, shapes, directory / WEIGHTS)
        model = cls(config, build_lm(config), tokenizer)
        try:
            state = load_weights(directory / WEIGHTS)
        except Exception as error:
            raise ModelLoadError(f"{directory / WEIGHTS} is corrupt or incomplete: {error}") from None
        check_values(state, skeleton, directory / WEIGHTS)
        model.load_state_dict(state, strict=False)
        model.lm.tie_weights()
        del state
        return_freed_memory()
        return model.eval()


def check_config(config, shapes, path):
    """The structure of config.json, and the layer counts it gives against those in the weights file."""
    def need(condition, what):
        if not condition:
            raise ModelLoadError(f"{path}: {what}")
    need(isinstance(config, dict), "must be a JSON object")
    need(config.get("format") == FORMAT, f"format is {config.get('format')!r}, expected {FORMAT!r}")
    need(config.get("family") in ("decoder", "t5"), f"family {config.get('family')!r} is not decoder or t5")
    for key in ("lm", "vision", "prompt"):
        need(isinstance(config.get(key), dict), f"{key!r} is missing or not an object")
    need(isinstance(config["lm"].get("model_type"), str), "lm.model_type is missing")
    vision = DEFAULT_VISION | config["vision"]
    for key in ("patch", "width", "heads", "gpa_hidden"):
        need(type(vision[key]) is int and vision[key] > 0, f"vision.{key} {vision[key]!r} is not a positive integer")
    need(isinstance(vision["image_size"], list) and len(vision["image_size"]) == 2 and
         all(type(v) is int and v >= vision["patch"] for v in vision["image_size"]),
         f"vision.image_size {vision['image_size']!r} is not two integers of at least one patch")
    need(vision["backbone"] in ("none", *BACKBONES), f"vision.backbone {vision['backbone']!r} is not one of "
         f"{['none', *BACKBONES]}")
    need(vision["backbone"] == "none" or vision["patch"] == BACKBONES[vision["backbone"]][1],
         f"vision.patch {vision['patch']!r} must equal the backbone's stride")
    need(type(vision["tag_dropout"]) in (int, float) and 0 <= vision["tag_dropout"] < 1,
         f"vision.tag_dropout {vision['tag_dropout']!r} is not a number in [0, 1)")
    need(type(vision["tag_view_hidden"]) is int and vision["tag_view_hidden"] >= 0,
         f"vision.tag_view_hidden {vision['tag_view_hidden']!r} is not a non-negative integer")
    rules = vision["tag_rules"]
    need(isinstance(rules, dict) and all(name in vision["tags"] and isinstance(inputs, list) and inputs and
                                         set(inputs) <= set(vision["tags"]) - {name} for name, inputs in rules.items()),
         f"vision.tag_rules {rules!r} is not {{tag: [other tags]}} over vision.tags")
    need("crop" not in vision, "vision.crop is the form before vision.crops (a list of crops): rebuild or re-prune "
         "this model with this version")
    crops = vision["crops"]
    need(isinstance(crops, list) and all(
        isinstance(crop, dict) and crop.get("camera") in [*vision["cameras"], "all"] and
        all(type(crop.get(k)) is int and crop[k] > 0 for k in ("rows", "channels")) and
        isinstance(crop.get("strides", [1]), list) and all(type(n) is int and n > 0 for n in crop.get("strides", [1])) and
        (crop.get("tap") is None or type(crop["tap"]) is int and crop["tap"] >= 0) and
        type(crop.get("dropout", 0)) in (int, float) and 0 <= crop.get("dropout", 0) < 1 and
        isinstance(crop.get("grid", [1, 3]), list) and len(crop.get("grid", [1, 3])) == 2 and
        all(type(n) is int and n > 0 for n in crop.get("grid", [1, 3])) and
        isinstance(crop.get("tags"), list) and set(crop["tags"]) <= set(vision["tags"]) for crop in crops),
         f"vision.crops {crops!r} is not a list of {{camera: one of vision.cameras or \"all\", rows, channels: positive "
         "integers, tags: a list of vision.tags[, tap: a stem block, strides: the 3x3 convolutions' strides, grid: [rows, "
         "columns], dropout: in [0, 1)]}")
    stacks = {"vision.blocks": vision["layers"]}
    lm = config["lm"]
    if config["family"] == "t5":
        stacks |= {"lm.encoder.block": lm.get("num_layers"), "lm.decoder.block": lm.get("num_decoder_layers", lm.get("num_layers"))}
    else:
        stacks["lm.model.layers"] = lm.get("num_hidden_layers")
    for stack, count in stacks.items():
        stored = {name[len(stack) + 1:].split(".")[0] for name in shapes if name.startswith(stack + ".")}
        need(count == len(stored), f"{stack} has {count!r} layers in config.json, {len(stored)} in the weights")


def check_shapes(skeleton, shapes, path):
    """Every tensor the config builds is stored with the same shape, and nothing else is stored."""
    expected = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    tied = tied_parameter_names(skeleton)
    missing = sorted(set(expected) - set(shapes) - tied)
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise ModelLoadError(f"{path} does not match config.json: missing {missing[:5]}, unexpected {unexpected[:5]}")
    wrong = [f"{name} {shapes[name]} (config: {expected[name]})" for name in expected if name in shapes
             and shapes[name] != expected[name]]
    if wrong:
        raise ModelLoadError(f"{path} does not match config.json: {', '.join(wrong[:3])}")


def check_values(state, skeleton, path):
    """Floating-point weights where the model has them (integers only where it keeps counters), all finite."""
    expected = skeleton.state_dict()
    for name, tensor in state.items():
        if tensor.is_floating_point() != expected[name].is_floating_point():
            raise ModelLoadError(f"{path}: {name} holds {tensor.dtype}, the model needs {expected[name].dtype}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ModelLoadError(f"{path}: {name} holds NaN or infinite values")


class Stopwatch:
    """Seconds between laps, added into a caller's dict (or into nothing)."""

    def __init__(self, into=None):
        self.into, self.last = into if into is not None else {}, time.perf_counter()

    def lap(self, name, **counts):
        now = time.perf_counter()
        self.into[name] = self.into.get(name, 0.0) + now - self.last
        self.into.update(counts)
        self.last = now


START = -1  # marks where an answer begins, for lookup_draft


class Decoded:
    """One answer being decoded greedily: its tokens, done at a stop token or at max_tokens."""

    def __init__(self, stop, max_tokens):
        self.stop, self.max_tokens, self.tokens, self.length, self.done = stop, max_tokens, [], 0, False
        self.last = None  # the latest token taken, the next pass's input
        self.logprob = 0.0  # of the tokens taken

    @property
    def confidence(self):
        return math.exp(self.logprob / max(1, self.length))

    def take(self, tokens, logprobs):
        for token, logprob in zip(tokens, logprobs):
            self.length += 1
            self.last, self.logprob = token, self.logprob + logprob
            if token in self.stop:
                self.done = True
                return
            self.tokens.append(token)
            if len(self.tokens) == self.max_tokens:
                self.done = True
                return


def greedy_generate(lm, inputs, max_new_tokens, eos, pad):
    """transformers' greedy generate: (the new tokens of each row, each row's confidence: the geometric mean
    of its tokens' probabilities up to and with its end)."""
    output = lm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, top_p=None, top_k=None,
                         temperature=None, pad_token_id=pad, eos_token_id=eos, output_scores=True,
                         return_dict_in_generate=True)
    new = output.sequences[:, -len(output.scores):]
    logprobs = lm.compute_transition_scores(output.sequences, output.scores, normalize_logits=True)
    ended = torch.isin(new, torch.tensor(eos)).int().cumsum(1)
    taken = (ended == 0) | ((ended == 1) & torch.isin(new, torch.tensor(eos)))  # up to the first end, with it
    confidence = ((logprobs * taken).sum(1) / taken.sum(1).clamp_min(1)).exp()
    return new, confidence.tolist()


def lookup_draft(context, sources, length):
    """Up to `length` tokens that followed the newest earlier occurrence of the context's last 3 (else 2,
    else 1) tokens in sources (token lists, oldest first); [] where there is none."""
    if length < 1:
        return []
    for n in range(min(3, len(context)), 0, -1):
        tail = context[-n:]
        for source in reversed(sources):
            for start in range(len(source) - n - 1, -1, -1):
                if source[start:start + n] == tail:
                    return source[start + n:start + n + length]
    return []


def decoder_step(lm, embeds, mask, positions, keep, keys=None, values=None):
    """One forward pass of a decoder-only LM over new embeddings, its KV cache as two plain tensors (layers,
    batch, kv heads, positions, head dim): the seam where a compiled runtime takes over (runtime/).
    keep: (batch, k) positions of the new embeddings whose logits are returned. Returns (logits (batch, k,
    vocabulary), keys, values), the cache with the new positions appended."""
    cache = Cache(layer_class_to_replicate=RankedLayer)
    if keys is not None:
        for index, (layer_keys, layer_values) in enumerate(zip(keys, values)):
            cache.update(layer_keys, layer_values, index)
    output = lm.base_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, past_key_values=cache,
                           use_cache=True)
    hidden = output.last_hidden_state.gather(1, keep[..., None].expand(-1, -1, output.last_hidden_state.shape[-1]))
    layers = output.past_key_values.layers
    return (lm.get_output_embeddings()(hidden), torch.stack([layer.keys for layer in layers]),
            torch.stack([layer.values for layer in layers]))


class RankedLayer(DynamicLayer):
    """A DynamicLayer that grows from an empty (batch, heads, 0, dim) tensor instead of a 1-D one: a graph
    exported for a compiled runtime (OpenVINO) keeps the rank of what it concatenates."""

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]
        self.is_initialized = True


def select_cache(cache, rows):
    """A new DynamicCache holding `rows` (indices, repeats allowed) of `cache`'s batch."""
    return DynamicCache([(layer.keys[rows], layer.values[rows]) for layer in cache.layers])


def tied_parameter_names(model):
    """Names of a tensor already named earlier (tied; dropped on save, re-tied on load). By identity, which
    also holds on the meta device, where every tensor has data_ptr 0."""
    seen, tied = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = id(tensor)
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
