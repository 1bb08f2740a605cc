"""Torch device and precision choices shared by extract, probe, finetune and predict."""
from __future__ import annotations

import os

from featx.errors import FeatxError
from featx.settings import PRECISIONS



def resolve_device(device) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; plain 'cuda' under torchrun -> 'cuda:<LOCAL_RANK>'.

    Raises FeatxError (one line) when CUDA is asked for and torch sees none.
    """
    import torch

    device = str(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FeatxError("--device cuda was asked for, but torch sees no CUDA device (use --device auto or cpu)")
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per local rank
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def resolve_precision(precision, device, choices=PRECISIONS) -> str:
    """'fp32' | 'bf16' | 'fp16' | 'bf16-weights' for `precision` on `device` (a str or torch.device): auto is bf16
    autocast on CUDA (fp16 where the GPU has no bf16) and fp32 on the CPU. bf16-weights (the model itself in bf16)
    runs on the CPU too. FeatxError for a name not in `choices`, autocast on a CPU, or bf16 on a GPU without it."""
    if precision not in choices:
        raise FeatxError(f"--precision must be one of {', '.join(choices)}, not {precision!r}")
    cuda = str(device).startswith("cuda")
    if precision == "bf16-weights":
        import torch

        if cuda and not torch.cuda.is_bf16_supported():
            raise FeatxError("--precision bf16-weights needs a GPU with bf16 (this one has none; use fp16)")
        return precision
    if not cuda:
        if precision in ("bf16", "fp16"):
            raise FeatxError(f"--precision {precision} needs a CUDA device (the CPU runs fp32 or bf16-weights)")
        return "fp32"
    if precision == "auto":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


def weights_dtype(precision):
    """The dtype a resolved precision loads the weights in: torch.bfloat16 for bf16-weights, else None (as saved,
    float32 for every checkpoint featx makes; autocast then runs the matrix products in half precision)."""
    import torch

    return torch.bfloat16 if precision == "bf16-weights" else None


def autocast(device, precision):
    """The autocast context of a resolved precision on `device`: none for fp32 and bf16-weights."""
    import contextlib

    import torch

    if precision in ("fp32", "bf16-weights"):
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
