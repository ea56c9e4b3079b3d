"""Faster CPU kernels: products of linear layers whose weights do not change (oneDNN, each weight
packed once), and grouped-query attention without copies in compiled graphs.

A decode step of a small model is a chain of matrix-vector products, bound by how fast the
weights stream from memory. PyTorch's default CPU linear (a row-major weight handed to MKL's
sgemm) streams them about half as fast as oneDNN does with the weight reordered once into its
own blocked layout, and falls further behind at a few rows (batch 8-32). vLLM's CPU backend packs
its weights the same way. `benchmarks/decode_breakdown.py` shows the difference per step.

`pack(module)` gives every CPU `nn.Linear` under `module` a packed copy of its weight and a forward
that uses it whenever no gradient is wanted through it. The module stays an `nn.Linear` with the
same parameters and state dict, so saving, loading, training, `.to()` and tied weights work as
before; the copy costs as much memory again as the linear weights it packs. The copy is never
used where autograd wants a gradient through the product, nor for a trainable weight in a
module in training mode, and it is packed again when its weight changed (an optimizer step,
`load_state_dict`, a move). Products differ from the default path by float rounding only
(about 1e-4 in the default model's logits).

Attention too: `group_attention(base)` switches a base whose attention is sdpa to `GROUPED_SDPA`,
which is sdpa except in a graph torch.compile traces (the serving runner's compiled decode steps):
there transformers copies each key/value head once per query head sharing it (`repeat_kv`: for the
default model's 9 query and 3 key/value heads, a copy three times the size of each layer's cache a
step), where sdpa's own `enable_gqa` reads them in place. Outside a compiled graph, and where a
gradient, a position bias or a soft cap is wanted, it is transformers' sdpa as it was.

`BalconyModel` packs its base and balconies and groups the base's attention when built;
`model.set_kernels("eager")` (or `pack(module, False)`, `group_attention(base, False)`) takes the
copies away and runs the base bit for bit as plain transformers does, and `BALCONY_KERNELS=eager`
in the environment keeps every model on PyTorch's default path.
"""

from __future__ import annotations

import ctypes
import glob
import os
import types
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

__all__ = ["GROUPED_SDPA", "KINDS", "available", "check", "group_attention", "pack", "packed_count",
           "release_idle_threads", "torch_threads"]

KINDS = ("packed", "eager")
GROUPED_SDPA = "balcony_sdpa"  # the attention name `group_attention` gives a base (sdpa's masks and calls)

_ATTRIBUTE = "_balcony_packed"  # (packed weight, the weight's version, its data_ptr) on a packed nn.Linear
_LINEAR = torch.ops.mkldnn._linear_pointwise.default if hasattr(torch.ops.mkldnn, "_linear_pointwise") else None


def available(dtype: torch.dtype) -> bool:
    """Whether packed products run here for weights of `dtype` (and the environment allows them)."""
    if _eager_by_environment():
        return False
    if not torch.backends.mkldnn.is_available() or _LINEAR is None:
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return False


def _eager_by_environment() -> bool:
    return os.environ.get("BALCONY_KERNELS", "").strip().lower() == "eager"


def check(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown kernels {kind!r}: use one of {', '.join(KINDS)}")
    return kind


def pack(module: nn.Module, enable: bool = True) -> int:
    """Pack every CPU `nn.Linear` under `module` whose weight dtype oneDNN serves here, dropping any
    copy packed before (`enable=False`: unpack them all). Returns how many linear layers are packed.
    Packing happens on a layer's first use, so this call itself costs nothing."""
    count = 0
    for linear in module.modules():
        if not isinstance(linear, nn.Linear):
            continue
        linear.__dict__.pop(_ATTRIBUTE, None)
        linear.__dict__.pop("forward", None)  # back to nn.Linear.forward
        weight = linear.weight
        if enable and weight.device.type == "cpu" and weight.dim() == 2 and available(weight.dtype):
            linear.__dict__[_ATTRIBUTE] = None
            linear.forward = types.MethodType(_forward, linear)
            count += 1
    return count


def packed_count(module: nn.Module) -> int:
    """How many linear layers under `module` take the packed path."""
    return sum(_ATTRIBUTE in m.__dict__ for m in module.modules() if isinstance(m, nn.Linear))


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # run ~200 times a decode step: the checks stay few and cheap
    weight, bias = self.weight, self.bias
    if (torch.compiler.is_compiling()  # a graph being compiled lowers PyTorch's product its own way
            or (weight.requires_grad and (self.training or torch.is_grad_enabled()))
            or (x.requires_grad and torch.is_grad_enabled()) or x.dtype != weight.dtype or not x.is_cpu
            or not x.numel() or (bias is not None and bias.dtype != x.dtype)):
        return F.linear(x, weight, bias)
    packed = self.__dict__[_ATTRIBUTE]
    if packed is None or packed[1] != weight._version or packed[2] != weight.data_ptr():
        if not weight.is_cpu or not available(weight.dtype):
            return F.linear(x, weight, bias)
        with torch.no_grad():
            packed = (torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None),
                      weight._version, weight.data_ptr())
        self.__dict__[_ATTRIBUTE] = packed
    return _LINEAR(x if x.is_contiguous() else x.contiguous(), packed[0], bias, "none", [], "")


def group_attention(base: nn.Module, enable: bool = True) -> bool:
    """Switch `base`'s attention from sdpa to `GROUPED_SDPA` (`enable=False`: back to sdpa). Other
    attention kinds stay as they are. Returns whether the base now runs `GROUPED_SDPA`."""
    config = base.config
    current = getattr(config, "_attn_implementation", None)
    if current not in ("sdpa", GROUPED_SDPA):
        return False
    enable = enable and not _eager_by_environment()
    if enable:
        AttentionInterface.register(GROUPED_SDPA, _grouped_sdpa)
        AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)  # the masks sdpa takes
    config._attn_implementation = GROUPED_SDPA if enable else "sdpa"
    return enable


def _grouped_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    # one query per row (a decode step) in a compiled graph on the CPU: the case transformers serves
    # with copies of the keys and values; the rest goes to its sdpa unchanged
    if (not torch.compiler.is_compiling() or getattr(module, "num_key_value_groups", 1) == 1
            or query.shape[2] != 1 or not query.is_cpu or (query.requires_grad and torch.is_grad_enabled())
            or any(kwargs.get(k) is not None for k in ("position_bias", "softcap"))):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def release_idle_threads() -> bool:
    """Let go of the calling thread's idle OpenMP worker team (`omp_pause_resource_all`).

    OpenMP keeps a team of worker threads for each thread that ran parallel work. Once a process
    holds more of them than it has cores (the main thread loaded the model, an engine thread now
    decodes), GNU OpenMP stops letting idle workers spin and puts them to sleep, so each of a decode
    step's ~200 products pays wake-ups: about twice as slow a step. A thread that hands its parallel
    work to another calls this first. Returns False where torch's OpenMP runtime has no such call
    (then nothing changes); the thread's next parallel work makes a new team."""
    for path in glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp*.so*")):
        try:
            pause = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        pause.restype, pause.argtypes = ctypes.c_int, [ctypes.c_int]
        return pause(1) == 0  # omp_pause_soft: the threads go, the settings stay
    return False


@contextmanager
def torch_threads(count: int | None):
    """This thread's torch threads set to `count` inside the block (None: unchanged)."""
    before = torch.get_num_threads()
    if count and count != before:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
