"""A local transformers checkpoint behind the model interface (see __init__.py): any AutoModelForImageTextToText
with its processor, or an AutoModelForCausalLM with its tokenizer (text calibration and perplexity only).

Structure comes from what transformers exposes: get_decoder() holds the language model's decoder layers,
get_encoder(modality="image") the vision tower's blocks; the projector is what the base model and the vision
tower hold besides those (LLaVA's multi_modal_projector, Idefics3's connector, Qwen2-VL's merger). A frame set
becomes one chat turn: per view its camera name and its image, then the question; the processor and the
checkpoint's chat template turn that into the model's own inputs.
"""
import contextlib
import inspect
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers
from PIL import Image
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

from accelerate.utils import offload_weight

from . import ModelLoadError
from .checkpoint import load_weights, return_freed_memory, save_weights, unique_state_dict
from .vlm import greedy_generate

SPARSE_WEIGHTS = "owled-sparse.safetensors"  # our bitmask layout (checkpoint.py), an option beside plain safetensors
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.index.json")
WRITTEN = ("config.json", "generation_config.json", "report.json", "sparsity.png")  # written anew on save


class HFModel(nn.Module):
    scores_options = False  # closed questions are phrased in our world's answer templates, not the checkpoint's
    default_layout = "dense"

    def __init__(self, hf, processor, source):
        super().__init__()
        self.hf, self.processor, self.source = hf, processor, Path(source)
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.tokenizer.padding_side = "left"  # generation continues every row from its last token
        self.sees_images = processor is not self.tokenizer
        self.cameras = None  # any view names: the prompt names each view
        self.parts = find_components(hf, self.sees_images)

    # ----- the interface -----
    @property
    def lm(self):
        return self.hf

    @property
    def model_id(self):
        return self.owled.get("model_id") or self.source.name

    @property
    def compression(self):
        return self.owled.get("compression", {"method": "dense", "sparsity": 0.0})

    @property
    def owled(self):
        return getattr(self.hf.config, "owled", None) or {}

    def components(self):
        return dict(self.parts)

    @property
    def device(self):
        """Where inputs go: the device the model computes on (offloaded weights sit on 'meta' between passes)."""
        hook = getattr(self.hf, "_hf_hook", None)
        return torch.device(hook.execution_device) if hook is not None else self.hf.device

    @property
    def offloaded(self):
        """Parameters (elements) whose weights live on disk between forward passes (loaded with max_memory)."""
        return sum(p.numel() for p in self.hf.parameters() if p.device.type == "meta")

    @contextlib.contextmanager
    def onloaded(self, module, changes=True):
        """module's disk-offloaded weights in memory for the duration; on exit, if the caller changes them, they
        are written back to the offload folder, from where accelerate's hooks read them at the next forward and
        save_pretrained."""
        hooked = [m for m in module.modules() if getattr(getattr(m, "_hf_hook", None), "offload", False)]
        for m in hooked:
            m._hf_hook.pre_forward(m)
        try:
            yield
        finally:
            for m in hooked:
                weights = m._hf_hook.weights_map  # the offload folder's loader, seen under m's name prefix
                for name, parameter in m.named_parameters(recurse=False) if changes else ():
                    offload_weight(parameter.detach(), weights.prefix + name, weights.dataset.save_folder, weights.dataset.index)
                m._hf_hook.post_forward(m, None)

    def mark_pruned(self, compression, model_id):
        self.hf.config.owled = {"model_id": model_id, "compression": compression}

    def chat(self, frames, question, answer=None):
        """The chat template's text of one turn: each view's camera name and image, the question (and answer)."""
        if not self.sees_images:
            user = question
        else:
            user = [part for camera, image in frames.items() if image is not None
                    for part in ({"type": "text", "text": f"{camera}: "}, {"type": "image"})]
            user.append({"type": "text", "text": question})
        messages = [{"role": "user", "content": user}]
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}] if self.sees_images else answer})
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=answer is None)

    def inputs(self, frames, texts):
        if not self.sees_images:
            batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            return batch.to(self.device)
        images = [[Image.fromarray(image) for image in f.values() if image is not None] for f in frames]
        batch = self.processor(text=texts, images=images, return_tensors="pt", padding=True)
        return batch.to(self.device, dtype=self.hf.dtype)

    def forward(self, frames, questions, answers):
        """Mean cross-entropy of the answers given frames and questions (teacher forcing)."""
        full = [self.chat(f, q, a) for f, q, a in zip(frames, questions, answers)]
        prompts = [self.chat(f, q) for f, q in zip(frames, questions)]
        batch = self.inputs(frames, full)
        labels = torch.full_like(batch["input_ids"], -100)
        for row, (text, prompt) in enumerate(zip(full, prompts)):
            # the answer (and its end of turn) is what the full text adds to the prompt; left padding puts it last
            answer = len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) - \
                len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
            labels[row, labels.shape[1] - answer:] = batch["input_ids"][row, labels.shape[1] - answer:]
        return self.hf(**batch, labels=labels, use_cache=False).loss

    def forward_text(self, texts):
        ids = self.tokenizer(texts, return_tensors="pt", padding=True).to(self.device)
        labels = ids["input_ids"].masked_fill(ids["attention_mask"] == 0, -100)
        return self.hf(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], labels=labels, use_cache=False).loss

    @torch.inference_mode()
    def answer(self, frames, questions, max_new_tokens=48, timing=None, history=None, draft_tokens=8, confidences=None):
        """Greedy answers, one per (frame set, question), batched; confidences as DrivingVLM.answer. history and
        draft_tokens (our prompt-lookup decoding) do not apply: transformers' generate decodes one token a pass."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        start = time.perf_counter()
        batch = self.inputs(frames, [self.chat(f, q) for f, q in zip(frames, questions)])
        encoded = time.perf_counter()
        eos = self.hf.generation_config.eos_token_id
        eos = [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None] or [self.tokenizer.eos_token_id]
        new, confidence = greedy_generate(self.hf, batch, max_new_tokens, eos, self.tokenizer.pad_token_id)
        if confidences is not None:
            confidences.extend(confidence)
        if timing is not None:
            timing["encode_s"] = timing.get("encode_s", 0.0) + encoded - start
            timing["decode_s"] = timing.get("decode_s", 0.0) + time.perf_counter() - encoded
            timing["decode_steps"] = timing["decode_tokens"] = new.shape[1]
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]

    def continuation_logprobs(self, frame_sets, requests):
        raise NotImplementedError(f"{self.model_id}: closed questions are scored on owled_ros models only")

    # ----- save / load -----
    def save_pretrained(self, directory, sparse_names=(), layout="dense"):
        """layout 'dense': plain safetensors with the zeros (transformers and vLLM load it unchanged);
        'bitmask': our compact layout in SPARSE_WEIGHTS (load_model reads it). Processor and tokenizer files
        are copied from the source checkpoint."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if layout == "dense":
            # offloaded weights are read back one shard at a time: shards of a few blocks keep memory bounded
            with warnings.catch_warnings():  # transformers warns that offloaded weights are read back (as intended)
                warnings.filterwarnings("ignore", "Attempting to save a model with offloaded modules")
                self.hf.save_pretrained(directory, max_shard_size="200MB" if self.offloaded else "50GB")
        else:
            self.hf.config.save_pretrained(directory)
            if self.hf.can_generate():
                self.hf.generation_config.save_pretrained(directory)
            names = {name.removeprefix("hf.") for name in sparse_names}
            save_weights(directory / SPARSE_WEIGHTS, unique_state_dict(self.hf), names, {"model_id": self.model_id})
        for path in self.source.iterdir():
            if path.is_file() and path.name not in WRITTEN and not any(path.match(p) for p in WEIGHT_FILES):
                shutil.copy2(path, directory / path.name)

    @classmethod
    def from_pretrained(cls, directory, dtype=None, max_memory=None, offload_folder=None):
        """max_memory (e.g. '2GB'): keep at most that much of the weights in memory, the rest in offload_folder,
        each module's weights loaded for its forward pass only (accelerate's device_map offload)."""
        if not sys.stderr.isatty():
            transformers.utils.logging.disable_progress_bar()  # logs and errors stay one line each
        directory = Path(directory)
        config = read_config(directory)
        image_text = type(config).__name__ in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values() or \
            config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
        if not image_text and config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ModelLoadError(f"{directory}: model type {config.model_type!r} ({', '.join(config.architectures or [])}) has "
                                 f"no image-text-to-text or causal-LM class in transformers {transformers.__version__}")
        auto = AutoModelForImageTextToText if image_text else AutoModelForCausalLM
        processor = load_processor(directory) if image_text else load_tokenizer(directory)
        try:
            if (directory / SPARSE_WEIGHTS).is_file():
                hf = auto.from_config(config, dtype=dtype or config.dtype or torch.float32)
                load_sparse(hf, directory / SPARSE_WEIGHTS)
            elif max_memory:
                hf = auto.from_pretrained(directory, dtype=dtype or "auto", device_map="auto",
                                          max_memory={"cpu": max_memory}, offload_folder=offload_folder)
            else:
                hf = auto.from_pretrained(directory, dtype=dtype or "auto")
        except (OSError, ValueError, RuntimeError) as error:
            raise ModelLoadError(f"{directory}: cannot load the weights ({first_line(error)})") from None
        return cls(hf.eval(), processor, directory)


def first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def read_config(directory):
    try:
        return AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"{directory}/config.json is not a transformers config: {first_line(error)}") from None


def load_tokenizer(directory):
    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, TypeError) as error:
        raise ModelLoadError(f"{directory}: no usable tokenizer files ({first_line(error)})") from None


def load_processor(directory):
    """AutoProcessor; where that fails only because the family's video processor needs torchvision (Qwen2-VL,
    Qwen2.5-VL, SmolVLM, LLaVA-OneVision on a machine without it), the family's processor without its video
    part: images and text are processed exactly as the full processor does."""
    if not any((directory / name).is_file() for name in ("preprocessor_config.json", "processor_config.json")):
        raise ModelLoadError(f"{directory} has no processor (preprocessor_config.json / processor_config.json): copy "
                             "the processor files of the model it was fine-tuned from into it")
    try:
        return AutoProcessor.from_pretrained(directory)
    except ImportError:
        pass
    except (OSError, ValueError, TypeError) as error:
        raise ModelLoadError(f"{directory}: cannot load its processor ({first_line(error)})") from None
    model_type = read_config(directory).model_type
    family = getattr(transformers, PROCESSOR_MAPPING_NAMES.get(model_type, ""), None)
    if family is None or "video_processor" not in inspect.signature(family.__init__).parameters:
        raise ModelLoadError(f"{directory}: the {model_type} processor cannot be loaded (a dependency of it is missing)")

    def image_only(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        family.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    processor_class = type(f"{family.__name__}ImageOnly", (family,), {"__init__": image_only})
    tokenizer = load_tokenizer(directory)
    template = directory / "chat_template.jinja"
    chat_template = template.read_text() if template.is_file() else tokenizer.chat_template
    return processor_class(AutoImageProcessor.from_pretrained(directory), tokenizer, chat_template=chat_template)


def load_sparse(hf, path):
    """Weights of our bitmask layout into a model built from its config (tied weights re-tied)."""
    state = {k: v.to(hf.dtype) if v.is_floating_point() else v for k, v in load_weights(path).items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    tied = set(getattr(hf, "all_tied_weights_keys", None) or {})
    if unexpected or set(missing) - tied:
        raise ModelLoadError(f"{path} does not match config.json: missing {sorted(set(missing) - tied)[:3]}, "
                             f"unexpected {unexpected[:3]}")
    hf.tie_weights()
    del state
    return_freed_memory()


# ----- structure -----
def has_linear(module):
    return any(isinstance(m, nn.Linear) for m in module.modules())


def block_stack(module, preferred):
    """The stack of repeated blocks in module: the longest ModuleList of one class that holds linears (a class
    named in the model's _no_split_modules wins a tie)."""
    stacks = [m for m in module.modules() if isinstance(m, nn.ModuleList) and len(m) and
              len({type(b) for b in m}) == 1 and has_linear(m[0])]
    return max(stacks, key=lambda m: (len(m), type(m[0]).__name__ in preferred), default=None)


def find_components(hf, sees_images):
    """{"vision": the vision tower's blocks, "vision.projector": the modules between it and the language
    model, "llm": the decoder layers}, in forward order; a clear error naming what was found otherwise."""
    preferred = set(getattr(hf, "_no_split_modules", None) or [])
    found = ", ".join(f"{name} ({type(m).__name__})" for name, m in hf.named_children())
    decoder = hf.get_decoder()
    llm = block_stack(decoder, preferred) if decoder is not hf else None
    if llm is None:
        raise ModelLoadError(f"cannot place the decoder layers of {type(hf).__name__}: get_decoder() gave "
                             f"{type(decoder).__name__}; top-level modules: {found}")
    if not sees_images:
        return {"llm": llm}
    vision = hf.get_encoder(modality="image")
    blocks = block_stack(vision, preferred) if vision not in (hf, hf.base_model, decoder) else None
    if blocks is None:
        raise ModelLoadError(f"cannot place the vision tower of {type(hf).__name__}: get_encoder(modality='image') gave "
                             f"{type(vision).__name__}; top-level modules: {found}")
    holders = [m for m in (hf.base_model, vision) if m is not decoder]
    projector = [child for holder in holders for child in holder.children()
                 if child not in (vision, decoder) and has_linear(child)
                 and not any(m is blocks for m in child.modules())]
    parts = {"vision": blocks, "vision.projector": projector, "llm": llm}
    return {name: blocks for name, blocks in parts.items() if len(blocks)}
