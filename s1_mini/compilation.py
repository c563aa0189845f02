"""Choosing whether and how to ``torch.compile``, and compiling without ever failing a
request: a compile error falls back to plain PyTorch.

Backends: ``"inductor"`` generates kernels (Triton on CUDA, C++ on CPU); ``"eager"``
runs the function through TorchDynamo without generating code (same speed as plain
PyTorch; useful to find graph breaks); ``"disabled"`` (``None``) calls the function
as is.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import platform
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch._dynamo.exc import FailOnRecompileLimitHit, TorchDynamoException

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "inductor", "eager", "disabled")


@dataclass(frozen=True)
class PlatformInfo:
    system: str
    python_version: str
    torch_version: str
    cuda_available: bool
    triton_available: bool
    compiler_available: bool  # a C/C++ compiler: Triton builds its launchers with one, inductor's CPU code needs one
    recommended_backend: str  # "inductor" or "eager"


@functools.lru_cache(maxsize=1)
def _triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except Exception:  # absent, or present but broken (ImportError, OSError, RuntimeError...)
        return False
    return True


def _compiler_available() -> bool:
    names = [os.environ.get("CXX"), os.environ.get("CC"), "c++", "g++", "clang++", "cc", "gcc", "clang", "cl"]
    return any(name and shutil.which(name) for name in names)


def get_platform_info() -> PlatformInfo:
    system = platform.system()
    cuda = torch.cuda.is_available()
    triton = _triton_available()
    compiler = _compiler_available()
    # Windows: inductor's support there is partial and toolchain-dependent, so default to eager.
    recommended = "inductor" if cuda and triton and compiler and system != "Windows" else "eager"
    return PlatformInfo(system, platform.python_version(), torch.__version__, cuda, triton, compiler, recommended)


def get_compilation_recommendations() -> list[str]:
    """Human-readable lines on what compilation this machine supports and what is missing."""
    info = get_platform_info()
    lines = [f"{info.system}, Python {info.python_version}, torch {info.torch_version}: "
             f"recommended compile backend {info.recommended_backend!r}"]
    if not info.cuda_available:
        lines.append("No CUDA GPU: running eager; inductor on CPU takes long to compile and gains little for this model.")
    if info.system == "Windows":
        lines.append("Windows: torch.compile support is partial; running eager. Use Linux for compiled kernels.")
    if info.cuda_available and not info.triton_available:
        lines.append("Triton is not installed or does not import: install the 'triton' package matching "
                     "your torch build to compile CUDA kernels.")
    if not info.compiler_available:
        lines.append("No C/C++ compiler found (set CC/CXX or install gcc or clang): Triton and inductor need one.")
    if info.recommended_backend == "inductor":
        lines.append("inductor is available: the first requests after start-up are slow while kernels compile.")
    return lines


def resolve_backend(requested: str, device: torch.device) -> str | None:
    """The backend to use for ``requested`` on ``device``: ``None`` for ``"disabled"``.

    ``"auto"`` picks inductor only on CUDA with Triton and a compiler; on CPU it picks
    eager, because inductor's CPU compile adds minutes to start-up and gains little for
    this model's small decode steps. An explicit ``"inductor"`` whose toolchain is missing
    falls back to eager with a warning.
    """
    if requested not in BACKENDS:
        raise ValueError(f"compile_backend: must be one of {', '.join(BACKENDS)}, got {requested!r}")
    if requested == "disabled":
        return None
    if requested == "eager":
        return "eager"
    info = get_platform_info()
    if requested == "auto":
        return "inductor" if device.type == "cuda" and info.recommended_backend == "inductor" else "eager"
    missing = []
    if device.type == "cuda" and not info.triton_available:
        missing.append("Triton")
    if not info.compiler_available:
        missing.append("a C/C++ compiler")
    if missing:
        logger.warning("compile_backend 'inductor' needs %s on %s; falling back to 'eager'",
                       " and ".join(missing), device.type)
        return "eager"
    return "inductor"


def without_cudagraphs(mode: str | None) -> str | None:
    """The inductor mode to use for a step the runner captures in its own CUDA graphs:
    inductor must not wrap it in cudagraph trees too (``reduce-overhead`` and
    ``max-autotune`` do)."""
    return {"reduce-overhead": None, "max-autotune": "max-autotune-no-cudagraphs"}.get(mode, mode)


def compile_or_eager(fn: Callable[..., Any], backend: str | None, mode: str | None, *,
                     fullgraph: bool = False, dynamic: bool | None = None) -> Callable[..., Any]:
    """``fn`` compiled with ``backend`` (``None``: ``fn`` itself).

    If compiling fails (at the first call, or at a later recompile for new shapes), one
    warning is logged and ``fn`` is called directly from then on. Errors raised by ``fn``
    itself pass through unchanged. Without ``fullgraph``, a compile failure after a graph
    break can come after part of ``fn`` has run, so ``fn`` is then run again from the
    start: it should be safe to repeat (model steps are: they rewrite the same cache
    slots). ``mode`` applies to inductor only; other backends ignore it. An unknown
    backend or mode raises at once.
    """
    if backend is None:
        return fn
    kwargs = {"mode": mode} if backend == "inductor" else {}
    compiled = torch.compile(fn, backend=backend, fullgraph=fullgraph, dynamic=dynamic, **kwargs)
    failed = False

    @functools.wraps(fn)
    def run(*args: Any, **kw: Any) -> Any:
        nonlocal failed
        if not failed:
            try:
                return compiled(*args, **kw)
            except (TorchDynamoException, FailOnRecompileLimitHit) as exc:  # compiler failures, not errors of fn
                failed = True
                logger.warning("torch.compile (backend %r) of %s failed; running eager from now on: %s",
                               backend, getattr(fn, "__qualname__", fn), exc)
        return fn(*args, **kw)

    return run


def buckets(limit: int, smallest: int = 1) -> list[int]:
    """Powers of two from ``smallest`` below ``limit``, then ``limit``: the row counts of
    the decode graphs and the prompt lengths of the prefill graphs. A step runs the
    smallest bucket that holds it."""
    sizes = [1 << i for i in range(limit.bit_length()) if smallest <= 1 << i < limit]
    return sizes + [limit]


def capture_graph(step: Callable[[], Tensor], pool: tuple) -> tuple[torch.cuda.CUDAGraph, Tensor]:
    """Run ``step`` twice on a side stream (compiling it and settling its allocations),
    then capture it as a CUDA graph; returns the graph and its output tensor."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = step()
    return graph, out
