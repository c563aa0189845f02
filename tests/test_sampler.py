"""The sampler's chunked reductions; the compiled runner's counter noise, its
batch-independence, the attention lengths a decode step reads, and every captured step
traced whole by torch.compile (CPU)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from s1_mini.compilation import buckets
from s1_mini.model import load_text2semantic
from s1_mini.prompt import build_prompt
import s1_mini.runner as runner_module
from s1_mini.runner import ModelRunner, SequenceState
from s1_mini.sampler import (CHUNK, BatchSampling, SamplingParams, argmax_last, counter_noise, sample,
                              softmax_last)
from s1_mini.testing.make_checkpoint import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_counter_noise_is_a_function_of_seed_step_draw_and_id():
    probs = torch.full((3, 50), 1 / 50)
    noise = counter_noise(torch.tensor([5, 6, 5]), torch.tensor([0, 0, 0]))
    a, b = noise(probs, 0), noise(probs, 0)
    assert torch.equal(a, b)  # no state
    assert torch.equal(a[0], a[2]) and not torch.equal(a[0], a[1])  # seed decides, not the row
    assert not torch.equal(a, noise(probs, 1))  # each draw of a frame differs
    later = counter_noise(torch.tensor([5, 6, 5]), torch.tensor([1, 1, 1]))(probs, 0)
    assert not torch.equal(a, later)  # each step differs
    alone = counter_noise(torch.tensor([6]), torch.tensor([0]))(probs[:1], 0)
    assert torch.equal(alone[0], a[1])  # the same row alone or in a batch
    assert torch.isfinite(a).all() and (a > 0).all()
    huge = counter_noise(torch.tensor([2**63 - 1]), torch.tensor([-1]))(probs[:1], 9)
    assert torch.isfinite(huge).all() and (huge > 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_argmax_is_argmax(dtype):
    """The first index of the maximum, as argmax: ties across and within chunks, a row
    whose maximum is in the last (padded) chunk, rows not longer than one chunk."""
    torch.manual_seed(0)
    V = 3 * CHUNK + 17
    x = torch.rand(6, V).to(dtype)
    x[1] = 0
    x[1, [CHUNK + 5, 2 * CHUNK + 1]] = 1  # a tie between chunks: the first
    x[2, [9, 10]] = 2  # a tie within a chunk
    x[3, -1] = 3  # in the padded chunk
    x[4] = float("-inf")
    x[4, 3 * CHUNK] = 0
    x[5, :] = 1  # all equal: index 0
    assert torch.equal(argmax_last(x), x.argmax(-1))
    assert argmax_last(x).tolist()[:4] == [x[0].argmax().item(), CHUNK + 5, 9, V - 1]
    short = torch.rand(3, CHUNK).to(dtype)
    assert torch.equal(argmax_last(short), short.argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_softmax_is_softmax(dtype):
    """Equal to F.softmax up to float32 summation order (bf16: within one rounding),
    with -inf entries, a padded last chunk, and its argmax ties as softmax's."""
    torch.manual_seed(0)
    x = (torch.randn(5, 3 * CHUNK + 17) * 4).to(dtype)
    x[1, ::3] = float("-inf")
    x[2] = 0
    ours, torch_softmax = softmax_last(x), torch.softmax(x, -1)
    assert ours.dtype == dtype and torch.isfinite(ours).all()
    tolerance = dict(rtol=1e-5, atol=1e-9) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-9)
    torch.testing.assert_close(ours.float(), torch_softmax.float(), **tolerance)
    assert torch.equal(argmax_last(ours), torch_softmax.argmax(-1))


def test_counter_noise_draws_follow_the_distribution():
    """The exponential race with counter noise samples from softmax(logits / T)."""
    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 2
    n = 20000
    s = BatchSampling.build([SamplingParams(temperature=1.0, top_p=1.0, repetition_penalty=1.0)] * n, None,
                            torch.float32, "cpu")
    s.noise = counter_noise(torch.arange(n), torch.zeros(n, dtype=torch.long))
    ids = sample(logits.expand(n, -1).clone(), None, s)
    empirical = np.bincount(ids.numpy(), minlength=12) / n
    expected = torch.softmax(logits[0] / SamplingParams(1.0).effective()[0], -1).numpy()
    assert 0.5 * np.abs(empirical - expected).sum() < 0.02


def _run(model, tok, runner: ModelRunner, texts: list[str], seeds: list[int | None],
         batched: bool = False) -> list[torch.Tensor]:
    seqs = [SequenceState(build_prompt(tok, t, [], model.config.num_codebooks, model.config.codebook_size),
                          24, SamplingParams(), seed, None if seed is None else torch.Generator().manual_seed(seed))
            for t, seed in zip(texts, seeds)]
    for s in seqs:
        runner.acquire(s)
        if not batched:
            runner.prefill(s)
    if batched:
        runner.prefill_batch(seqs)
    while any(not s.finished for s in seqs):
        runner.decode([s for s in seqs if not s.finished])
    for s in seqs:
        runner.release(s)
    return [s.codes() for s in seqs]


def test_compiled_runner_greedy_equals_eager_and_seeds_ignore_the_batch(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", "tiny", seed=0, codec=False)
    model, tok = load_text2semantic(ckpt)
    texts = ["First sentence here.", "A second, longer sentence for the batch.", "Third!", "Fourth one."]
    eager = ModelRunner(model, tok.im_end_id, 4, 256)
    greedy_eager = _run(model, tok, eager, texts, [None] * 4)
    compiled = ModelRunner(model, tok.im_end_id, 4, 256)
    compiled.compile(lambda fn, dynamic: fn)  # the compiled path's state and noise, not compiled
    greedy_compiled = _run(model, tok, compiled, texts, [None] * 4)
    for a, b in zip(greedy_eager, greedy_compiled):
        assert torch.equal(a, b)
    batch = _run(model, tok, compiled, texts, [11, 12, 13, 14])
    alone = [_run(model, tok, compiled, [t], [seed])[0] for t, seed in zip(texts, [11, 12, 13, 14])]
    mixed = _run(model, tok, compiled, texts[:2], [None, 12])  # greedy and seeded rows share steps
    for a, b in zip(batch, alone):
        assert torch.equal(a, b)
    assert torch.equal(mixed[0], greedy_eager[0]) and torch.equal(mixed[1], alone[1])


def test_a_seed_gives_the_same_codes_alone_and_in_a_batch_of_32(tmp_path):
    """fp32, both paths: the compiled path's counter noise and the eager path's
    per-request generators. (bf16 on a GPU can differ in the last bits between batch
    buckets, whose GEMMs differ; see README.)"""
    ckpt = make_checkpoint(tmp_path / "ckpt", "tiny", seed=0, codec=False)
    model, tok = load_text2semantic(ckpt)
    texts = [f"Sentence number {i} of the batch." for i in range(32)]
    for compiled in (False, True):
        runner = ModelRunner(model, tok.im_end_id, 32, 256)
        if compiled:
            runner.compile(lambda fn, dynamic: fn)
        batch = _run(model, tok, runner, texts, list(range(100, 132)))
        alone = _run(model, tok, runner, texts[7:8], [107])[0]
        assert torch.equal(batch[7], alone)


def test_decode_with_a_step_in_flight_gives_the_codes_of_steps_read_at_once(tmp_path):
    """``decode(lag=1)``, as the scheduler runs a compiled runner: frames read one step
    late equal those read at once; a sequence that ends gets no frame past its end (its
    extra step's frame is dropped), its slot goes to a waiting sequence while that step
    is in flight, and attention covers the position the step in flight writes (the
    steps cross attention buckets)."""
    ckpt = make_checkpoint(tmp_path / "ckpt", "tiny", seed=0, codec=False)
    model, tok = load_text2semantic(ckpt)
    texts = ["Short.", "Hi there, second.", "A third one, admitted later.", "Fourth!"]
    limits = [8, 13, 9, 16]  # frames per sequence, so they end at different steps
    results = []
    for lag in (0, 1):
        runner = ModelRunner(model, tok.im_end_id, 2, 256)
        runner.kv_lengths = buckets(256, smallest=16)
        runner.compile(lambda fn, dynamic: fn)  # the compiled path (counter noise), not compiled
        uncovered = []  # decode steps whose attention length misses a position they write

        def block(layer, x, rope, cache, slots, pos, mask, run=runner.decode_block):
            written = int(pos[sorted(runner.occupied)].max())
            if written >= mask.shape[-1]:
                uncovered.append((written, mask.shape[-1]))
            return run(layer, x, rope, cache, slots, pos, mask)

        runner.decode_block = block
        seqs = [SequenceState(build_prompt(tok, t, [], model.config.num_codebooks, model.config.codebook_size),
                              n, SamplingParams(), 30 + i) for i, (t, n) in enumerate(zip(texts, limits))]
        waiting, active = list(seqs), []
        while waiting or active:
            while waiting and runner.free_slots:
                active.append(waiting.pop(0))
                runner.acquire(active[-1])
                runner.prefill(active[-1])
            runner.decode(active, lag=lag)
            for s in [s for s in active if s.finished]:
                runner.release(s)
                active.remove(s)
        results.append([s.codes() for s in seqs])
        assert [len(s.frames) for s in seqs] == limits
        assert not uncovered
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled-path"])
def test_batched_prefill_gives_the_codes_of_one_prefill_each(tmp_path, compiled):
    """Prompts of different lengths, greedy and seeded rows, prefilled as one padded batch:
    the same codes as prefilling them one by one (the eager path draws from each
    request's generator, the compiled path from counter noise), also with a batch of
    three in four rows (the compiled path's last row repeats the third prompt) and with
    more prompts than a batch holds."""
    ckpt = make_checkpoint(tmp_path / "ckpt", "tiny", seed=0, codec=False)
    model, tok = load_text2semantic(ckpt)
    texts = ["Short.", "A second, much longer sentence for the padded batch of prompts.", "Third one!", "Four.",
             "Five, and more than a batch of four."]
    seeds = [None, 21, 22, None, 23]
    runner = ModelRunner(model, tok.im_end_id, 5, 256, prefill_batch_size=4)
    if compiled:
        runner.compile(lambda fn, dynamic: fn)  # the compiled path's padding and noise, not compiled
    one_by_one = _run(model, tok, runner, texts, seeds)
    for n in (3, 4, 5):
        together = _run(model, tok, runner, texts[:n], seeds[:n], batched=True)
        for a, b in zip(one_by_one, together):
            assert torch.equal(a, b)


def test_decode_attends_to_a_bucket_that_covers_every_row(tmp_path):
    """Steps read only the caches' first kv_len positions (a bucket covering the longest
    row): the codes equal those of steps reading the whole cache, on the eager and the
    compiled path, while the steps cross several buckets; one compile of the decode
    block serves every length (the length is a dynamic dimension)."""
    ckpt = make_checkpoint(tmp_path / "ckpt", "tiny", seed=0, codec=False)
    model, tok = load_text2semantic(ckpt)
    texts = ["Short.", "Hi there, second."]  # 19 and 27 prompt positions, then 24 frames
    compiles = []

    def counting(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    for compiled in (False, True):
        codes, counts = [], []
        for kv_lengths in ([256], buckets(256, smallest=16)):  # the whole cache; 16, 32, 64, ...
            used = []
            runner = ModelRunner(model, tok.im_end_id, 2, 256)
            runner.kv_lengths = kv_lengths
            runner._kv_len = lambda n, pick=runner._kv_len: used.append(pick(n)) or used[-1]
            if compiled:
                runner.compile(lambda fn, dynamic: torch.compile(fn, backend=counting, dynamic=dynamic,
                                                                 fullgraph=True))
            torch._dynamo.reset()  # compiled code is kept per function: each runner compiles afresh
            before = len(compiles)
            codes.append(_run(model, tok, runner, texts, [None, 7]))
            counts.append(len(compiles) - before)
        for a, b in zip(*codes):
            assert torch.equal(a, b)
        assert {32, 64} <= set(used) and max(used) < 256  # the steps crossed 32 -> 64
        assert counts[0] == counts[1]  # several lengths, no more compiles than one


def test_every_captured_step_traces_whole(tmp_path):
    """Every step the runner captures on CUDA (decode per bucket of rows and attention
    length; prefill per bucket of rows, prompt length and attention length) traced by
    torch.compile with ``fullgraph=True``, through ``bench/compile_count.py``. On the GPU
    a graph break or a tracing error in any of them makes ``compile_or_eager`` run that
    region eagerly from then on: no failure, only a slow engine. The tiny model groups its
    heads (4 over 2 K/V heads) as S1-mini does, and the batched prefill traces its rows
    with dynamic shapes, where a head-count test on tensor sizes is a symbolic bool SDPA
    refuses."""
    ckpt = make_checkpoint(tmp_path / "ckpt", "tiny", seed=0)
    model, _ = load_text2semantic(ckpt)
    assert model.slow_shape.n_kv_head < model.slow_shape.n_head
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "compile_count.py"), "--checkpoint", str(ckpt),
                           "--max-batch-size", "8", "--max-seq-len", "256", "--prefill-batch-size", "4"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    captured = out["captured_steps"]
    assert out["steps_run"] == captured["decode"] + captured["prefill"]
    assert out["prefill_rows"] == [1, 2, 4]
    # Static decode shapes: one compile per bucket of rows for each stack, none per attention length.
    assert out["graphs"]["run_block (dynamic=False)"] == 2 * len(out["decode_row_buckets"])
    # The sampler: static, dynamic rows and one row, each with a penalty history (decode)
    # and without (prefill). The codebooks' histories have the slow token's layout, so no
    # graph is compiled for a strided one (the ring was slot-major: 8).
    assert out["graphs"]["sample (dynamic=None)"] == 6


class _ReplayedStep:
    """A captured CUDA graph's stand-in on the CPU: ``replay()`` runs the step again into
    the output tensor of its capture, as a graph rewrites its static output."""

    def __init__(self, step) -> None:
        self.step = step
        with torch.inference_mode():  # as the runner's steps run
            self.out = step()

    def replay(self) -> None:
        with torch.inference_mode():
            self.out.copy_(self.step())


def _capture_on_cpu(step, pool):
    graph = _ReplayedStep(step)
    return graph, graph.out


def test_replayed_graphs_give_the_codes_of_the_steps(tmp_path, monkeypatch):
    """The graph dispatch of a compiled runner on CUDA, with stand-in graphs on the CPU:
    every decode and prefill the runner picks was captured (buckets of rows, prompt length
    and attention length), a graph's output is taken before its next replay rewrites it,
    and a batch with a prompt too long for batched graphs is prefilled one by one; the
    codes equal those of the same compiled path run without graphs."""
    monkeypatch.setattr(runner_module, "BATCHED_PREFILL_LENGTH", 64)
    ckpt = make_checkpoint(tmp_path / "ckpt", "tiny", seed=0, codec=False)
    model, tok = load_text2semantic(ckpt)
    texts = ["Short.", "A second, much longer sentence for the padded batch of prompts.", "Third one!"]
    seeds = [None, 21, 22]
    results = []
    for graphs in (False, True):
        runner = ModelRunner(model, tok.im_end_id, 4, 256, prefill_batch_size=4)
        runner.kv_lengths = buckets(256, smallest=16)
        runner.compile(lambda fn, dynamic: fn)  # the compiled path, not compiled
        if graphs:
            runner.capture_graphs(_capture_on_cpu, None)
            assert (4, 64, 16) not in runner.prefill_graphs and (4, 64, 64) in runner.prefill_graphs
            assert (4, 128, 128) not in runner.prefill_graphs and (1, 128, 128) in runner.prefill_graphs
        results.append([_run(model, tok, runner, texts, seeds),
                        _run(model, tok, runner, texts, seeds, batched=True),  # 66 positions: one by one
                        _run(model, tok, runner, texts[::2], seeds[::2], batched=True)])  # a graph of 2 rows
    without, replayed = results
    for a, b in zip(without, replayed):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    assert all(torch.equal(x, y) for x, y in zip(without[0][::2], without[2]))
