"""Sliding-window perplexity of the language model alone on a text file."""
import math

import torch


@torch.inference_mode()
def perplexity(lm, tokenizer, text, context=256, stride=128):
    """exp(mean NLL) with windows of `context` tokens moved by `stride`; each token is scored once, with up
    to context - stride tokens of left context (the Hugging Face recipe)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if ids.shape[1] < 2:
        raise ValueError("text is too short for perplexity")
    nll, counted, previous_end = 0.0, 0, 0
    for begin in range(0, ids.shape[1], stride):
        end = min(begin + context, ids.shape[1])
        window = ids[:, begin:end]
        labels = window.clone()
        labels[:, : -(end - previous_end) or None] = -100  # score only tokens not scored before
        if begin == 0:
            labels[:, 0] = -100
        scored = int((labels != -100).sum())
        if scored:
            nll += lm(input_ids=window, labels=labels).loss.item() * scored
            counted += scored
        previous_end = end
        if end == ids.shape[1]:
            break
    return math.exp(nll / counted)
