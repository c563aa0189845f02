"""Compile-backend choice and fallback, the VRAM report, and long-text splitting."""

from __future__ import annotations

import itertools
import logging
import re

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from s1_mini import compilation
from s1_mini.compilation import (PlatformInfo, compile_or_eager, get_compilation_recommendations,
                                 get_platform_info, resolve_backend)
from s1_mini.text import split_text
from s1_mini.utils import get_vram_info

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


# ---------------------------------------------------------------- compilation


def _platform(monkeypatch, *, cuda: bool, triton: bool, compiler: bool = True, system: str = "Linux") -> None:
    recommended = "inductor" if cuda and triton and compiler and system != "Windows" else "eager"
    info = PlatformInfo(system, "3.12.0", "2.13.0", cuda, triton, compiler, recommended)
    monkeypatch.setattr(compilation, "get_platform_info", lambda: info)


def test_platform_info_here():
    info = get_platform_info()
    assert info.torch_version == torch.__version__
    assert info.cuda_available == torch.cuda.is_available()
    assert info.recommended_backend in {"inductor", "eager"}
    if not info.cuda_available:
        assert info.recommended_backend == "eager"
    lines = get_compilation_recommendations()
    assert lines and all(isinstance(line, str) and line for line in lines)


def test_triton_detection_survives_a_missing_or_broken_triton(monkeypatch):
    def broken(name):
        raise OSError("libcuda.so: cannot open shared object file")

    compilation._triton_available.cache_clear()
    monkeypatch.setattr(compilation.importlib, "import_module", broken)
    try:
        assert compilation._triton_available() is False
        assert get_platform_info().triton_available is False
    finally:
        compilation._triton_available.cache_clear()


def test_recommendations_name_what_is_missing(monkeypatch):
    _platform(monkeypatch, cuda=True, triton=False, compiler=False)
    text = "\n".join(get_compilation_recommendations())
    assert "Triton is not installed" in text and "No C/C++ compiler" in text
    _platform(monkeypatch, cuda=False, triton=False, system="Windows")
    text = "\n".join(get_compilation_recommendations())
    assert "No CUDA GPU" in text and "Windows" in text


@pytest.mark.parametrize("cuda,triton,compiler,system,device,requested,expected", [
    (False, False, True, "Linux", CPU, "auto", "eager"),
    (True, True, True, "Linux", CUDA, "auto", "inductor"),
    (True, True, True, "Linux", CPU, "auto", "eager"),  # CPU even on a GPU machine
    (True, False, True, "Linux", CUDA, "auto", "eager"),
    (True, True, False, "Linux", CUDA, "auto", "eager"),
    (True, True, True, "Windows", CUDA, "auto", "eager"),
    (True, True, True, "Linux", CUDA, "inductor", "inductor"),
    (False, False, True, "Linux", CPU, "inductor", "inductor"),
    (False, False, False, "Linux", CPU, "inductor", "eager"),
    (True, True, True, "Linux", CUDA, "eager", "eager"),
    (True, True, True, "Linux", CUDA, "disabled", None),
])
def test_resolve_backend(monkeypatch, cuda, triton, compiler, system, device, requested, expected):
    _platform(monkeypatch, cuda=cuda, triton=triton, compiler=compiler, system=system)
    assert resolve_backend(requested, device) == expected


def test_inductor_without_triton_warns_once(monkeypatch, caplog):
    _platform(monkeypatch, cuda=True, triton=False)
    with caplog.at_level(logging.WARNING, logger="s1_mini.compilation"):
        assert resolve_backend("inductor", CUDA) == "eager"
    assert len(caplog.records) == 1 and "Triton" in caplog.records[0].getMessage()


def test_resolve_backend_refuses_unknown_names():
    with pytest.raises(ValueError, match="^compile_backend: must be one of auto, inductor, eager, disabled, got 'fast'"):
        resolve_backend("fast", CPU)


def test_compile_disabled_returns_the_function():
    def f(x):
        return x + 1

    assert compile_or_eager(f, None, None) is f


def test_compile_eager_backend_runs():
    def f(x):
        return x * 2 + 1

    g = compile_or_eager(f, "eager", "reduce-overhead", fullgraph=True)  # mode is for inductor only
    assert torch.equal(g(torch.ones(3)), torch.full((3,), 3.0))
    assert g.__name__ == "f"


@torch._dynamo.register_backend
def s1_test_failing_backend(gm, example_inputs):
    raise RuntimeError("simulated compiler crash")


def test_compile_failure_falls_back_with_one_warning(caplog):
    calls = []

    def f(x):
        calls.append(1)
        return x - 1

    g = compile_or_eager(f, "s1_test_failing_backend", None)
    with caplog.at_level(logging.WARNING, logger="s1_mini.compilation"):
        for _ in range(3):
            assert torch.equal(g(torch.ones(2)), torch.zeros(2))
    warnings = [r for r in caplog.records if "running eager from now on" in r.getMessage()]
    assert len(warnings) == 1 and "simulated compiler crash" in warnings[0].getMessage()
    assert len(calls) == 3  # the failed compile never ran f; each call ran it once


def test_errors_of_the_function_pass_through(caplog):
    def f(x):
        raise KeyError("a bug of f, not of the compiler")

    g = compile_or_eager(f, "eager", None)
    with caplog.at_level(logging.WARNING, logger="s1_mini.compilation"):
        with pytest.raises(KeyError, match="a bug of f"):
            g(torch.ones(1))
    assert caplog.records == []


# ---------------------------------------------------------------- VRAM

VRAM_KEYS = {"available", "used_gb", "total_gb", "allocated_gb", "reserved_gb", "utilization"}


def test_vram_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    info = get_vram_info()
    assert info == {"available": False, "used_gb": 0.0, "total_gb": 0.0, "allocated_gb": 0.0,
                    "reserved_gb": 0.0, "utilization": 0.0}
    assert get_vram_info("cpu")["available"] is False


def test_vram_with_cuda(monkeypatch):
    gib = 1024 ** 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 12 * gib)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 16 * gib)
    for device in [None, 0, "cuda:0", torch.device("cuda")]:
        info = get_vram_info(device)
        assert set(info) == VRAM_KEYS
        assert info == {"available": True, "used_gb": 20.0, "total_gb": 80.0, "allocated_gb": 12.0,
                        "reserved_gb": 16.0, "utilization": 0.25}
    assert get_vram_info("cpu")["available"] is False


# ---------------------------------------------------------------- text splitting


def test_short_text_is_whole():
    assert split_text("Hello.", 6) == ["Hello."]
    assert split_text("", 5) == [""]
    assert split_text("      \n   ", 3) == ["      \n   "]  # only whitespace: nothing to split


def test_sentences_are_packed_greedily():
    text = "Hello world. This is a test! Is it? Yes; ok.\nNext line here."
    assert split_text(text, 20) == ["Hello world. ", "This is a test! ", "Is it? Yes; ok.\n", "Next line here."]
    assert split_text(text, 40) == ["Hello world. This is a test! Is it? ", "Yes; ok.\nNext line here."]


def test_dots_in_numbers_and_names_do_not_end_sentences():
    assert split_text("Pi is 3.14 and example.com is a site, really it is.", 20) == \
        ["Pi is 3.14 and ", "example.com is a ", "site, really it is."]
    assert split_text("He said \"Hi.\" Then left.", 14) == ["He said \"Hi.\" ", "Then left."]


def test_cjk():
    text = "你好世界。今天天气很好！我们去公园吧？好的，走吧、现在就走。"
    assert split_text(text, 8) == ["你好世界。", "今天天气很好！", "我们去公园吧？", "好的，走吧、", "现在就走。"]
    assert split_text("一二三四五六七八九十", 4) == ["一二三四", "五六七八", "九十"]


def test_long_sentence_cut_at_last_break():
    assert split_text("one two three four five six", 10) == ["one two ", "three ", "four five ", "six"]
    assert split_text("count 1,000,000 apples now", 12) == ["count ", "1,000,000 ", "apples now"]
    assert split_text("abcdefghijklmnop", 5) == ["abcde", "fghij", "klmno", "p"]


def test_whitespace_never_forms_a_piece():
    assert split_text("aaaaa  ", 5) == ["aaaa", "a  "]
    assert split_text("aaaa    b  ", 5) == ["aaa", "a    ", "b  "]
    # no split keeps to the limit: the whitespace stays with its text
    assert split_text("          abc", 5) == ["          abc"]
    assert split_text("ab" + " " * 12 + "cd", 4) == ["ab" + " " * 12, "cd"]


def test_max_chars_rule():
    with pytest.raises(ValueError, match="^max_chars: must be a positive integer, got 0"):
        split_text("text", 0)


def _strict_split_exists(text: str, max_chars: int) -> bool:
    """Brute force: can text be cut into pieces of <= max_chars, each with non-whitespace?"""
    n = len(text)
    for k in range(n):
        for cuts in itertools.combinations(range(1, n), k):
            bounds = (0, *cuts, n)
            pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
            if all(len(p) <= max_chars and p.strip() for p in pieces):
                return True
    return False


ALPHABET = st.sampled_from(list("ab .,!?;\n\t，、。！？；…\"”3") + ["  ", "\n\n"])


@settings(max_examples=300, deadline=None)
@given(st.lists(ALPHABET, max_size=80).map("".join), st.integers(1, 30))
@example("a.b. c", 2)
def test_split_properties(text, max_chars):
    pieces = split_text(text, max_chars)
    assert "".join(pieces) == text
    assert all(pieces) or pieces == [""]
    if text.strip():
        assert all(p.strip() for p in pieces), "a whitespace-only piece"
    assert all(len(p.strip()) <= max_chars for p in pieces)
    if not re.search(r"\s{2,}", text) and text == text.strip() and max_chars >= 2:
        assert all(len(p) <= max_chars for p in pieces)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(list("ab. \n，")), min_size=1, max_size=10).map("".join), st.integers(1, 5))
def test_strict_whenever_possible(text, max_chars):
    pieces = split_text(text, max_chars)
    if len(text) > max_chars and text.strip() and _strict_split_exists(text, max_chars):
        assert all(len(p) <= max_chars for p in pieces), pieces
