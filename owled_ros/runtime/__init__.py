"""Backends that run an already-pruned model: torch eager, torch eager with int8 weights (torch-int8: the
least memory), or compiled for the CPU with OpenVINO (its fp32 or bf16 inference precision, int8 weights
through NNCF, or int8 weights and activations: w8a8, AMX's int8 and sparse kernels). prepare() installs the compiled parts into the model
(DrivingVLM.compiled) and says which backend runs; a backend that is missing or fails to compile leaves the
model on torch eager with one warning. Pruning never imports this package."""
import importlib.util
import logging

import torch

from ..model.checkpoint import return_freed_memory

BACKENDS = ("auto", "torch", "torch-int8", "openvino", "openvino-int8", "openvino-w8a8")
# the OpenVINO backends: quantization of the decoder's linears (runtime/openvino.py)
OPENVINO = {"openvino": None, "openvino-int8": "int8", "openvino-w8a8": "w8a8"}
log = logging.getLogger(__name__)


def installed(backend):
    module = "torch" if backend.startswith("torch") else "nncf" if OPENVINO[backend] else "openvino"
    return importlib.util.find_spec(module) is not None and (module != "nncf" or installed("openvino"))


def fastest(model, exact=False):
    """The fastest backend installed for this model, as bench/runtime.py measured it on both CPUs it ran on:
    OpenVINO with int8 weights, then OpenVINO fp32, then torch eager. exact: only a backend that answers as
    torch eager fp32 does (evaluation, where int8's rounding would blur what pruning did)."""
    if not supports(model) or not installed("openvino"):
        return "torch"
    return "openvino-int8" if not exact and installed("openvino-int8") else "openvino"


def supports(model):
    return hasattr(model, "compiled") and not getattr(model, "is_t5", True)


def prepare(model, backend="auto", dtype="float32", threads=None, warn=log.warning, serve_only=False, exact=False):
    """Compile `model` for `backend` in place; returns the backend that runs it ('torch' after a fallback).
    threads: intra-op threads of whichever backend runs it (default: the backend's own, every core).
    serve_only: the model will only answer (the drive node): the torch copies of what the backend compiled are
    dropped, so the process holds the weights once (teacher-forced scoring and pruning need them).
    exact: `auto` takes the fastest backend that answers as torch eager fp32 does."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    backend = fastest(model, exact) if backend == "auto" else backend
    if threads:
        torch.set_num_threads(threads)  # also what runs on torch after a fallback
    if backend == "torch":
        return backend
    if backend == "torch-int8":
        if not hasattr(model, "compiled"):
            warn(f"backend torch-int8 runs owled_ros models only; {model.model_id} runs on torch eager")
            return "torch"
        from .int8 import quantize

        quantize(model)
        return_freed_memory()
        return backend
    if not supports(model):
        warn(f"backend {backend} runs owled_ros decoder models only; {model.model_id} runs on torch eager")
        return "torch"
    if not installed(backend):
        warn(f"backend {backend} is not installed (pip install openvino{' nncf' if OPENVINO[backend] else ''}); "
             "running torch eager")
        return "torch"
    from .openvino import compile_model

    try:
        model.compiled.update(compile_model(model, dtype, OPENVINO[backend], threads=threads))
    except Exception as error:  # noqa: BLE001 -- any conversion failure falls back, named
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        warn(f"backend {backend} could not compile {model.model_id} ({type(error).__name__}: {first}); running torch eager")
        model.compiled.clear()
        return "torch"
    if serve_only:
        model.serve_compiled()
    return backend
