"""A prepared model's weights moved into one huge-page mapping (``pages.move_weights``): every
weight inside it in read order, the same values and tokens, tied weights still tied, the
weight accounting unchanged, the old copies freed, and the switch that turns it off."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from carpool.capacity.weights import resident_weight_bytes
from carpool.model import kernel_build, pages, vnni_linear
from carpool.model.layers import prepack_linears
from carpool.model.loader import load_model
from helpers.carpool_ref import greedy
from helpers.hf_models import save_tiny_hf_model, save_tiny_model_dir

vnni_linear.load()  # the layout prepare_model packs into, where the CPU has AVX-512 BF16


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return pages._weights_in_read_order(model)


def _in_arena(t: torch.Tensor, arena: torch.Tensor) -> bool:
    start = arena.data_ptr()
    return start <= t.data_ptr() and t.data_ptr() + t.nbytes <= start + arena.nbytes


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_weights_move_in_read_order_with_values_tokens_and_ties_kept(tmp_path, tied, dtype):
    # vocab 16,384 x hidden 64: the embedding alone is 2-4 MiB, the arena past a huge page.
    save_tiny_hf_model("llama", tmp_path, tie_word_embeddings=tied, vocab_size=16384)
    ref, _ = load_model(tmp_path, dtype=dtype)
    model, _ = load_model(tmp_path, dtype=dtype)
    prepack_linears(ref)
    prepack_linears(model)
    before = [t.clone() for t in _weights(model)]
    ids = [id(t) for t in _weights(model)]
    bytes_before = resident_weight_bytes(model)

    moved = pages.move_weights(model)

    arena = pages.weight_arena(model)
    assert moved == arena.nbytes > pages.HUGE_PAGE and arena.data_ptr() % pages.HUGE_PAGE == 0
    weights = _weights(model)
    assert [id(t) for t in weights] == ids  # the same tensor objects, new bytes under them
    assert all(_in_arena(t, arena) for t in weights)
    starts = [t.data_ptr() for t in weights]
    assert starts == sorted(starts), "the arena holds the weights in the order they are read"
    assert all(s % pages.ALIGN == 0 for s in starts)
    assert all(torch.equal(a, b) for a, b in zip(before, weights, strict=True))
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    # The accounting counts the arena once: the same bytes, up to each weight's alignment.
    assert 0 <= resident_weight_bytes(model) - bytes_before < pages.ALIGN * len(weights)
    prompt = list(range(3, 600, 7))
    assert greedy(model, prompt, 12) == greedy(ref, prompt, 12)
    assert pages.move_weights(model) == 0  # once only


def test_turned_off_leaves_the_weights_where_they_are(tmp_path, monkeypatch):
    save_tiny_hf_model("llama", tmp_path)
    model, _ = load_model(tmp_path, dtype="bfloat16")
    ptrs = [t.data_ptr() for t in _weights(model)]
    monkeypatch.setenv(pages.ENV_WEIGHT_PAGES, "0")
    assert pages.move_weights(model) == 0
    assert [t.data_ptr() for t in _weights(model)] == ptrs
    assert pages.weight_arena(model) is None


def test_the_engine_runs_on_moved_weights(tmp_path, monkeypatch):
    # A mixed batch (ragged prefill and decode, continuous batching) through prepare_model's
    # move: the same greedy tokens as the same engine with the weights left in place.
    from carpool import LLM, SamplingParams

    save_tiny_model_dir("llama", tmp_path, vocab_size=16384)
    prompts = [[3 + (7 * i) % 9000 for i in range(n)] for n in (1, 17, 40, 5)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    kw = dict(dtype="bfloat16", max_num_batched_tokens=32, max_num_seqs=4)
    llm = LLM(tmp_path, **kw)
    model = llm.engine.model
    # Moved where the linears run on the VNNI kernel (every CPU with AVX-512 BF16).
    assert (pages.weight_arena(model) is not None) == vnni_linear.available("cpu")
    if vnni_linear.available("cpu"):
        assert all(_in_arena(t, pages.weight_arena(model)) for t in _weights(model))
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    monkeypatch.setenv(pages.ENV_WEIGHT_PAGES, "0")
    plain = LLM(tmp_path, **kw)
    assert pages.weight_arena(plain.engine.model) is None
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    assert got == want


# In a fresh process (the test process's RSS moves with whatever ran before): moving 64 MiB
# of weights leaves the resident size about where it was, the old copies freed as it goes.
MEMORY_PROBE = """
import json, sys, torch
from carpool.model import cpu_allocator, pages, vnni_linear
if sys.argv[1] == "blocks":
    assert cpu_allocator.install()

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

def hwm_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

if sys.argv[2] == "many":
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(16)])  # 64 MiB
else:  # one weight of 64 MiB: copied a slice at a time, its old pages given back behind
    model = torch.nn.Sequential(torch.nn.Linear(4096, 4096, bias=False))
before, peak_before = rss_mib(), hwm_mib()
moved = pages.move_weights(model)
smaps = open("/proc/self/smaps").read()
huge = sum(int(l.split()[1]) for l in smaps.splitlines() if l.startswith("AnonHugePages:"))
print(json.dumps(dict(moved=moved / 2**20, before=before, after=rss_mib(),
                      peak_before=peak_before, peak=hwm_mib(), huge_mib=huge / 1024)))
"""


@pytest.mark.parametrize("weights", ["many", "one"])
@pytest.mark.parametrize("allocator", ["torch", "blocks"])
def test_moving_frees_the_old_copies_as_it_goes(allocator, weights):
    # "blocks": the weights (4 MiB each) in carpool's block allocator, as load_model leaves them.
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, allocator, weights],
        capture_output=True,
        text=True,
        check=True,
    )
    r = json.loads(out.stdout)
    assert r["moved"] >= 64
    assert r["after"] - r["before"] < 16, f"the old copies stayed resident: {r}"
    # At most one trim interval (8 MiB) and one weight (4 MiB) or slice above where it started
    # (one 64 MiB weight copied whole: 64 MiB above).
    assert r["peak"] - max(r["before"], r["peak_before"]) < 24, r


def test_a_weight_held_elsewhere_keeps_its_old_bytes_when_moved():
    # A tensor over the old bytes outside the model: they are not given back behind the copy.
    model = torch.nn.Sequential(torch.nn.Linear(2048, 2048, bias=False))  # 16 MiB, two slices
    held = model[0].weight.detach()
    before = held.clone()
    assert pages.move_weights(model) > 0
    assert held.data_ptr() != model[0].weight.data_ptr()
    assert torch.equal(held, before) and torch.equal(model[0].weight.detach(), before)


def test_release_pages_gives_back_whole_pages_only():
    import mmap

    buf = pages.zeroed_lazily((1 << 20,), torch.uint8, "cpu")
    buf.fill_(7)
    page = mmap.PAGESIZE
    # From the middle of a page to the middle of another: the whole pages between them.
    got = pages.release_pages(buf.data_ptr() + page // 2, 4 * page)
    assert got in (3 * page, 0)  # 0: no madvise here (not Linux)
    if got:
        assert bool((buf[:page] == 7).all()) and bool((buf[4 * page :] == 7).all())
        assert bool((buf[page : 4 * page] == 0).all())
    assert pages.release_pages(buf.data_ptr() + 1, page - 2) == 0  # no whole page inside


def _thp_on() -> bool:
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[always]" in mode or "[madvise]" in mode


def test_huge_page_bytes_reads_the_mapping_of_a_tensor():
    arena = pages.zeroed_lazily((8 << 20,), torch.uint8, "cpu")
    arena.fill_(1)  # resident now: on huge pages where the kernel grants them
    heap = torch.ones(1024)
    assert pages.huge_page_bytes(heap) == 0
    if _thp_on():
        assert pages.huge_page_bytes(arena) >= 4 << 20
    else:
        assert pages.huge_page_bytes(arena) == 0


def test_prepare_model_tells_the_linear_kernel_where_huge_pages_are(tmp_path):
    from carpool.worker.model_runner import prepare_model

    save_tiny_hf_model("llama", tmp_path, vocab_size=16384)
    model, _ = load_model(tmp_path, dtype="bfloat16")
    prepare_model(model, "cpu")
    arena = pages.weight_arena(model)
    assert (arena is not None) == vnni_linear.available("cpu")
    if arena is not None:
        huge = pages.huge_page_bytes(arena) >= arena.nbytes // 2
        assert vnni_linear.streams_from_huge_pages(arena) == huge


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_a_quantized_model_moves_onto_huge_pages_where_its_kernels_gain(
    tmp_path, monkeypatch, quantization
):
    from carpool.worker.model_runner import prepare_model, weights_want_huge_pages

    save_tiny_hf_model("llama", tmp_path, vocab_size=16384)
    ref, _ = load_model(tmp_path, dtype="float32", quantization=quantization)
    model, _ = load_model(tmp_path, dtype="float32", quantization=quantization)
    # AVX2 loops or AMX tiles (measured faster from huge pages); not AVX-512 without AMX.
    gains = torch.backends.cpu.get_cpu_capability() == "AVX2" or kernel_build.amx_tiles()
    assert weights_want_huge_pages(model) == gains
    with monkeypatch.context() as m:  # the reference: the same preparation, weights in place
        m.setenv(pages.ENV_WEIGHT_PAGES, "0")
        prepare_model(ref, "cpu")
    assert pages.weight_arena(ref) is None
    prepare_model(model, "cpu")
    arena = pages.weight_arena(model)
    assert (arena is not None) == gains
    if arena is not None:  # the quantized codes inside it, the same tokens
        codes = [b for n, b in model.named_buffers() if n.endswith(("qweight", "packed"))]
        assert codes and all(_in_arena(t, arena) for t in codes)
    for prompt in ([1, 5, 9, 200, 3000], [7, 7, 42]):
        assert greedy(model, prompt, 6) == greedy(ref, prompt, 6)


@pytest.mark.parametrize(
    ("capability", "amx", "moved"),
    [("AVX2", False, True), ("AVX512", False, False), ("AVX512", True, True)],
)
def test_the_quantized_models_rule_follows_the_kernels_loops(
    tmp_path, monkeypatch, capability, amx, moved
):
    from carpool.worker.model_runner import weights_want_huge_pages

    save_tiny_hf_model("llama", tmp_path, vocab_size=16384)
    quantized, _ = load_model(tmp_path, dtype="float32", quantization="int8")
    plain, _ = load_model(tmp_path, dtype="float32")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(kernel_build, "amx_tiles", lambda: amx)
    assert weights_want_huge_pages(quantized) == moved
    assert not weights_want_huge_pages(plain)  # float32 linears: torch's kernels, left in place
