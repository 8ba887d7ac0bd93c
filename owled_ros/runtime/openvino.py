"""OpenVINO backend: the decoder's forward pass (decoder_step, with its KV cache as plain tensors) and the image
side compiled for the CPU. Converted with torch.export + openvino.convert_model (optimum-intel pins an older
transformers). The decoder's linears optionally in int8 through NNCF (QUANTIZATION): weights only
(compress_weights; the CPU widens them per layer), or weights and activations (quantize, its activation ranges
calibrated on the shipped calibration drive), which AMX CPUs run as int8 matrix products and, for pruned
weights, as sparse ones. The decoding loop, prompt-lookup guesses included, stays DrivingVLM.answer's own."""
import hashlib
import shutil
import time
from pathlib import Path

import numpy as np
import openvino as ov
import torch
from torch import nn
from torch.export import Dim

from .. import __version__
from ..model import cache_dir
from ..model.vlm import decoder_step

PRECISION = {"float32": "f32", "bfloat16": "bf16"}
QUANTIZATION = (None, "int8", "w8a8")
# OpenVINO runs w8a8 linears at least this sparse with its sparse weights decompression, on CPUs with AMX only
# (weight-only int8 runs its dense kernels whatever the sparsity)
SPARSE_RATE = 0.5
CACHE_ENTRIES = 8  # converted models kept in the cache
CALIBRATION_SETS = 4  # frame sets of the shipped calibration drive whose decoder inputs calibrate w8a8


def has_amx():
    """Whether this CPU has AMX (int8 tiles), which OpenVINO's sparse weights decompression needs."""
    try:
        return "amx_int8" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def sparse_weights(model, quantization):
    """Whether the compiled model asks for its pruned linears as sparse weights."""
    # rounded: a pruner's 50 % measures 0.49999 when a few weights it kept were already zero
    return quantization == "w8a8" and has_amx() and round(model.compression.get("sparsity", 0), 2) >= SPARSE_RATE


def kernels(compiled):
    """{kernel: count} over the compiled model's linears, as the CPU plugin ran them last (e.g.
    brgemm_avx512_amx_sparse_i8 where sparse weights ran; undef before the first inference)."""
    counts = {}
    for op in compiled.get_runtime_model().get_ops():
        info = {key: value.astype(str) for key, value in op.get_rt_info().items()}
        if info.get("layerType", "").startswith("FullyConnected"):
            counts[info.get("primitiveType")] = counts.get(info.get("primitiveType"), 0) + 1
    return counts


def decoder_calibration(model, count=CALIBRATION_SETS):
    """The decoder's inputs (prefills and decoding steps) while the eager model answers every question of
    `count` frame sets of the shipped calibration drive: what NNCF's quantize sets activation ranges from."""
    from ..data.calib import read_samples
    from ..data.metadrive_world import DEMO_CALIB

    inputs = []

    def record(embeds, mask, positions, keep, keys=None, values=None):
        if keys is None:
            keys = values = torch.zeros(cache_shape(model.lm, len(embeds), 0))
        tensors = (embeds.float(), mask, positions, keep, keys.float(), values.float())
        inputs.append([np.ascontiguousarray(t.detach().numpy()) for t in tensors])
        return decoder_step(model.lm, *tensors)

    model.compiled["decoder"] = record
    try:
        for sample in read_samples(DEMO_CALIB)[:count]:
            images = sample.images()
            model.answer([images] * len(sample.qa), [qa["question"] for qa in sample.qa], draft_tokens=0)
    finally:
        del model.compiled["decoder"]
    return inputs


class Step(nn.Module):
    """decoder_step as a module to export. One graph serves the prefill too (a cache of 0 positions): two would
    hold the weights twice."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, embeds, mask, positions, keep, keys, values):
        return decoder_step(self.lm, embeds, mask, positions, keep, keys, values)


class Vision(nn.Module):
    def __init__(self, vision):
        super().__init__()
        self.vision = vision

    def forward(self, pixels, camera_ids, mask):
        return self.vision(pixels, camera_ids, mask)


def cache_shape(lm, batch, past):
    config = lm.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, batch, heads, past, head_dim


def examples(lm):
    """Inputs of Step at sizes that specialise nothing (batch 2, 3 new tokens, 5 cached)."""
    batch, tokens, past = 2, 3, 5
    cache = torch.randn(cache_shape(lm, batch, past))
    return (torch.randn(batch, tokens, lm.config.hidden_size), torch.ones(batch, past + tokens, dtype=torch.long),
            torch.arange(past, past + tokens).expand(batch, -1), torch.tensor([[1, 2], [0, 2]]), cache, cache.clone())


def convert(module, args, dynamic_shapes):
    with torch.no_grad():
        exported = torch.export.export(module.eval(), args, dynamic_shapes=dynamic_shapes, strict=False)
    return ov.convert_model(exported)


class Compiled:
    """A compiled OpenVINO model called with torch tensors, returning torch tensors."""

    def __init__(self, model, core, config):
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()

    def __call__(self, *tensors):
        self.request.infer([np.ascontiguousarray(t.detach().numpy()) for t in tensors], share_inputs=True)
        return tuple(torch.from_numpy(self.request.get_output_tensor(i).data.copy()) for i in range(len(self.compiled.outputs)))


def ir_cache(model, quantization):
    """Directory for the converted models of a model directory (conversion takes minutes on the real model);
    None for a model built in memory."""
    source = getattr(model, "source", None)
    weights = Path(source or "") / "model.safetensors"
    if not weights.is_file():
        return None
    stat = weights.stat()
    key = f"{weights.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{quantization}|{ov.__version__}|{__version__}"
    root = cache_dir() / "openvino"
    entry = root / hashlib.sha256(key.encode()).hexdigest()[:16]
    entry.mkdir(parents=True, exist_ok=True)
    (entry / "source").write_text(str(weights.resolve()))  # also marks the entry as the last one used
    evict(root)
    return entry


def evict(root, keep=CACHE_ENTRIES):
    """Drop the cache entries of models that are gone, and all but the `keep` entries used last (a real
    model's entry holds about 1 GB)."""
    live = []
    for entry in root.iterdir():
        source = entry / "source"
        try:
            if Path(source.read_text()).is_file():
                live.append((source.stat().st_mtime, entry))
                continue
        except OSError:  # no source: an older version's entry, or one another process is making this minute
            if time.time() - entry.stat().st_mtime < 60:
                continue
        shutil.rmtree(entry, ignore_errors=True)
    for _, entry in sorted(live, reverse=True)[keep:]:
        shutil.rmtree(entry, ignore_errors=True)


def converted(cache, name, build, quantization=None, calibration=None):
    """An OpenVINO model: its cached IR file (compiled from the path, the plugin holds the weights once), or built
    (torch.export + convert, quantized if asked; calibration() gives w8a8's inputs) and saved there."""
    path = cache / f"{name}.xml" if cache else None
    if path and path.is_file():
        return str(path)
    model = build()
    if quantization:
        import nncf

        if quantization == "int8":
            model = nncf.compress_weights(model)
        else:
            inputs = calibration()
            model = nncf.quantize(model, nncf.Dataset(inputs), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(inputs))
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        ov.save_model(model, path.with_suffix(".tmp.xml"), compress_to_fp16=False)
        path.with_suffix(".tmp.bin").rename(path.with_suffix(".bin"))
        path.with_suffix(".tmp.xml").rename(path)
        return str(path)
    return model


def compile_model(model, dtype="float32", quantization=None, threads=None):
    """{"decoder": callable with decoder_step's signature (lm bound), "vision": callable like model.vision}.
    quantization: one of QUANTIZATION, for the decoder's linears."""
    if quantization not in QUANTIZATION:
        raise ValueError(f"unknown quantization {quantization!r}; choose one of {QUANTIZATION}")
    core = ov.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": PRECISION[dtype]}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    if sparse_weights(model, quantization):
        config["CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE"] = SPARSE_RATE
    cache = ir_cache(model, quantization)
    if cache:
        config["CACHE_DIR"] = str(cache / "compiled")  # the plugin's own blobs: later starts skip compiling
    lm = model.lm.float()
    batch, tokens, past, keep = Dim("batch", max=256), Dim("tokens", max=8192), Dim("past", max=8192), Dim("keep", max=8192)
    kv = {1: batch, 3: past}
    step = Compiled(converted(cache, "step", lambda: convert(Step(lm), examples(lm), (
        {0: batch, 1: tokens}, {0: batch, 1: Dim.AUTO}, {0: batch, 1: tokens}, {0: batch, 1: keep}, kv, kv)),
        quantization, lambda: decoder_calibration(model)), core, config)

    def decoder(embeds, mask, positions, keep, keys=None, values=None):
        if keys is None:
            keys = values = torch.zeros(cache_shape(lm, len(embeds), 0))
        return step(embeds.float(), mask, positions, keep, keys.float(), values.float())

    views = len(model.cameras)
    height, width = model.config["vision"]["image_size"]
    images = Dim("images", max=256)
    vision_args = (torch.randn(2, views, 3, height, width), torch.arange(views), torch.ones(2, views, dtype=torch.bool))
    vision = Compiled(converted(cache, "vision", lambda: convert(Vision(model.vision.float()), vision_args, (
        {0: images}, None, {0: images}))), core, config)
    decoder.runtime = step.compiled  # kernels(decoder.runtime) once it has run
    return {"decoder": decoder, "vision": lambda pixels, camera_ids, mask: vision(pixels.float(), camera_ids, mask)[0]}
