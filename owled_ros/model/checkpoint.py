"""Weights on disk: dense safetensors, or the sparse-bitmask layout for pruned weights.

Sparse layout (our own, in safetensors; compressed-tensors dropped its sparse compressors): a pruned
weight W, seen as rows x cols (a convolution's out x in·kh·kw), is stored as
    <name>.values   the nonzero entries of W in row-major order (W's dtype)
    <name>.bitmask  uint8 (rows x ceil(cols / 8)), bit j of row i set where W[i, j] is nonzero (big-endian bits)
    <name>.shape    int64, W's shape
At 50 % sparsity in fp32 that is 4.125 instead of 8 bytes per two weights. Loading rebuilds W bit for bit.
"""
import ctypes
import json
import resource
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

SPARSE_SUFFIXES = (".values", ".bitmask", ".shape")


def _nonzero_bits(weight):
    """Mask of entries whose bit pattern is not +0.0 (so -0.0 survives the round trip)."""
    bits = weight.contiguous().view({4: torch.int32, 2: torch.int16, 8: torch.int64}[weight.element_size()])
    return bits != 0


def compress(weight):
    rows = weight.reshape(weight.shape[0], -1)
    mask = _nonzero_bits(rows)
    packed = np.packbits(mask.numpy(), axis=1)
    return {".values": rows[mask].contiguous(), ".bitmask": torch.from_numpy(packed),
            ".shape": torch.tensor(weight.shape, dtype=torch.int64)}


def decompress(values, bitmask, shape):
    shape = shape.tolist()
    cols = int(np.prod(shape[1:]))
    mask = torch.from_numpy(np.unpackbits(bitmask.numpy(), axis=1, count=cols).astype(bool))
    weight = torch.zeros(shape[0], cols, dtype=values.dtype)
    weight[mask] = values
    return weight.reshape(shape)


def unique_state_dict(module):
    """state_dict without the second name of tied parameters (safetensors refuses shared storage)."""
    seen, state = set(), {}
    for name, tensor in module.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            state[name] = tensor.detach().contiguous()
    return state


def save_weights(path, state, sparse_names=(), metadata=None):
    """Write a state dict; names in sparse_names are stored in the sparse-bitmask layout."""
    tensors = {}
    for name, tensor in state.items():
        if name in sparse_names:
            tensors |= {name + suffix: part for suffix, part in compress(tensor).items()}
        else:
            tensors[name] = tensor
    meta = {"format": "owled-sparse-bitmask/1" if sparse_names else "dense"} | (metadata or {})
    save_file(tensors, str(path), metadata={k: json.dumps(v) if not isinstance(v, str) else v for k, v in meta.items()})


def stored_shapes(path):
    """{name: shape} of the weights in a file of either layout, from its header (no values read)."""
    shapes = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            if key.endswith(".shape"):
                shapes[key[: -len(".shape")]] = tuple(f.get_tensor(key).tolist())
            elif not key.endswith((".values", ".bitmask")):
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def load_weights(path):
    """Dense state dict from either layout."""
    path = Path(path)
    state, parts = {}, {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            suffix = next((s for s in SPARSE_SUFFIXES if key.endswith(s)), None)
            if suffix:
                parts.setdefault(key[: -len(suffix)], {})[suffix] = f.get_tensor(key)
            else:
                state[key] = f.get_tensor(key)
    for name, part in parts.items():
        if set(part) != set(SPARSE_SUFFIXES):
            raise ValueError(f"{path.name}: sparse tensor {name} lacks {sorted(set(SPARSE_SUFFIXES) - set(part))}")
        state[name] = decompress(part[".values"], part[".bitmask"], part[".shape"])
    return state


def return_freed_memory():
    """Hand the heap freed while loading back to the OS. glibc keeps it otherwise: rebuilding a pruned model's
    sparse weights left about 0.4 GB of resident memory behind it (bench/drive_node.py, RSS). No-op without
    glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def keep_heap_small():
    """Serve every allocation above 128 KiB from its own mapping, which goes back to the OS when freed (glibc's
    M_MMAP_THRESHOLD, fixed), and return free memory above 128 KiB at the heap's top. Left to itself glibc
    raises both thresholds as large blocks are freed and keeps them in its heap, resident after every prefill.
    Called by processes that only answer, before they load the model; no-op without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD: glibc raised it with the other
    except (OSError, AttributeError):
        pass


def peak_rss_mb():
    """This process's peak RSS. VmHWM, not ru_maxrss: on Linux ru_maxrss carries the parent's peak across
    fork + exec, so a prune started by a big process would report that process's memory."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
