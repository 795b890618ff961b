"""Memory mappings of our own on the CPU: tensors on transparent huge pages.

``zeroed_lazily`` maps the KV cache (zero, resident only where written); ``move_weights``
copies a prepared model's weights into one mapping (an "arena"), in the order the layers read
them. Both ask the kernel for 2 MiB pages: a decode step streams every weight byte once and
reads the KV cache's blocks all over it, and with 4 KiB pages the hardware prefetcher stops
at every page boundary and each page costs a page walk (a VM's nested one).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import math
import mmap
import os
from collections.abc import Callable

import torch
from torch import nn

from carpool.model import cpu_allocator

HUGE_PAGE = 2 << 20  # x86-64's transparent huge page


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None (musl, macOS, Windows: nothing to call)."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def trim_heap() -> bool:
    """Hand the C heap's free pages back to the kernel (glibc's ``malloc_trim(0)``); False
    where the C library has no such call.

    glibc keeps freed memory in its heap: its mmap threshold rises to the size of any mapped
    block freed (up to 32 MiB), so after a few large temporaries most allocations come from
    the heap, and their freed pages stay resident (fragmented, rarely at the top, where glibc
    trims by itself). The callers trim after work that frees many temporaries: a GGUF tensor's
    decoding, a load, the weights' move, a prefill step. A trim with little to return costs
    microseconds. The block allocator's free blocks (``cpu_allocator``) are unmapped first,
    at the same points.
    """
    cpu_allocator.release()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def zeroed_lazily(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """A zero tensor whose CPU pages are only made resident when first written.

    ``torch.zeros`` writes every byte, so a KV cache sized for a full server (gigabytes) was
    resident from the start. An anonymous mapping of its own is zero by the kernel's guarantee
    and untouched, so resident memory grows with the blocks actually used, as llama.cpp's does.
    (``calloc``, numpy's ``zeros``, only maps blocks above glibc's mmap threshold, and that
    threshold rises to the size of any mapped block freed, up to 32 MiB: after the GGUF
    loader's temporaries, SmolLM2's 2-5 MB per-layer caches came from the heap, cleared with
    memset, and the whole cache was resident at start.) Other devices: ``torch.zeros``.

    A mapping of at least one huge page is aligned to 2 MiB and asks for transparent huge
    pages (``MADV_HUGEPAGE``; honoured where the kernel's THP mode is ``madvise`` or
    ``always``): decode attention reads each sequence's blocks in table order, i.e. all over
    the cache, and with 4 KiB pages every 8.7 KB block of a medium model's int8 cache cost
    page walks (a VM's nested ones): 1.15-1.25x on the kernel from memory (BENCHMARKS.md,
    issue 11, twelfth pass). Pages still become resident only where written, 2 MiB at a time.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if torch.device(device).type != "cpu" or nbytes == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    huge = nbytes >= HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE")
    # The tensor holds the mapping (frombuffer keeps a reference): unmapped with the tensor.
    raw = mmap.mmap(
        -1, nbytes + (HUGE_PAGE if huge else 0), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    )
    offset = 0
    if huge:
        start = ctypes.addressof(ctypes.c_char.from_buffer(raw))
        offset = -start % HUGE_PAGE  # a multiple of the 4 KiB page: a valid madvise start
        # A kernel without transparent huge pages refuses: 4 KiB pages, as before.
        with contextlib.suppress(OSError):
            raw.madvise(mmap.MADV_HUGEPAGE, offset, nbytes)
    flat = torch.frombuffer(raw, dtype=torch.uint8, count=nbytes, offset=offset)
    return flat.view(dtype).view(shape)


ENV_WEIGHT_PAGES = "CARPOOL_WEIGHT_PAGES"  # "0": leave the weights where the loader put them
ALIGN = 64  # each weight starts on a cache line (the kernels' vector loads)
# The heap's freed old copies go back to the kernel every this many bytes moved, so the move's
# peak is about one such run above the model's resident size, not the whole arena above it.
TRIM_EVERY = 8 << 20


def _weights_in_read_order(model: nn.Module) -> list[torch.Tensor]:
    """The model's parameters and persistent buffers, in module order (the order a decode step
    reads them: embedding, each layer's projections, the head), each tensor once."""
    seen: set[int] = set()
    out: list[torch.Tensor] = []
    for module in model.modules():
        skip = module._non_persistent_buffers_set  # rotary tables: not weights, rebuilt at will
        named = list(module._parameters.items()) + [
            (n, b) for n, b in module._buffers.items() if n not in skip
        ]
        for _, t in named:
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            out.append(t)
    return out


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    """The C library's ``madvise``, or None where there is none to call (or no
    ``MADV_DONTNEED``)."""
    if not hasattr(mmap, "MADV_DONTNEED"):
        return None
    try:
        call = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).madvise
    except (OSError, AttributeError, TypeError):
        return None
    call.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    call.restype = ctypes.c_int
    return call


def release_pages(address: int, nbytes: int) -> int:
    """Give back to the kernel the whole pages inside ``[address, address + nbytes)`` whose
    contents are no longer needed (``MADV_DONTNEED``: they read as zero if touched again);
    returns the bytes given back (0 where the call is missing or refused). For memory the
    caller alone owns and is about to free: glibc's own trim does the same to free heap pages.
    """
    call = _madvise()
    first = -(-address // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (address + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if call is None or end <= first:
        return 0
    return end - first if call(first, end - first, mmap.MADV_DONTNEED) == 0 else 0


def sole_tensor_over(t: torch.Tensor) -> bool:
    """Whether ``t`` is the one tensor over its storage, which covers just its bytes (the
    storage's references: ``t`` and the storage object asked here): then its bytes can be
    rewritten or given back without any other tensor seeing it."""
    storage = t.untyped_storage()
    return storage.nbytes() == t.nbytes and torch._C._storage_Use_Count(storage._cdata) == 2


def _copy_releasing(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` (same shape and dtype, both contiguous), ``TRIM_EVERY`` bytes at a
    time, the old pages of ``src`` given back behind the copy when ``src`` is the one tensor
    over them (it is freed right after). Why: the move's peak was the model plus its largest
    weight, held twice while it was copied (the 65 MB head of the medium model; a Llama 3
    vocabulary's head at 1B's width, 500 MiB)."""
    if src.nbytes <= TRIM_EVERY or not sole_tensor_over(src):
        dst.copy_(src)
        return
    old = src.detach().view(-1).view(torch.uint8)
    new = dst.view(-1).view(torch.uint8)
    start = old.data_ptr()
    for a in range(0, old.numel(), TRIM_EVERY):
        b = min(old.numel(), a + TRIM_EVERY)
        new[a:b].copy_(old[a:b])
        # Its whole pages, and the one it shares with the slice before (copied by now).
        lo = max(0, a - mmap.PAGESIZE)
        release_pages(start + lo, b - lo)


def _movable(t: torch.Tensor) -> bool:
    return (
        t.device.type == "cpu"
        and not t.is_mkldnn  # oneDNN's opaque packed weights have no storage to copy
        and t.layout == torch.strided
        and t.is_contiguous()
        and t.numel() > 0
    )


def move_weights(model: nn.Module) -> int:
    """Copy a CPU model's weights into one huge-page mapping, in read order; returns its bytes
    (0: nothing moved).

    Call it once the weights are in their final layout (after packing) and before anything
    keeps raw pointers to them (the decode stack's plan). Each tensor keeps its identity (its
    ``.data`` is replaced), so tied weights stay tied: tensors over the same bytes share the
    copy. The old copies are freed as the last reference goes (and the heap trimmed as the
    move goes, so the move does not raise the peak). Weights on another device stay where they
    are; an arena under a huge page is an ordinary mapping (the same code path, no gain). Off
    with ``CARPOOL_WEIGHT_PAGES=0`` (to compare).

    Why: a batch-1 decode step is a stream of the linears' weights (84 MB for the small model),
    and ``torch.empty`` puts each packed weight on 4 KiB pages. On the Zen 4 VM of issue 11, a
    pass of the small model's bf16 linears at one row from huge pages took 0.80-0.91x the time
    from 4 KiB pages (BENCHMARKS.md, issue 11, fourteenth pass).
    """
    if os.environ.get(ENV_WEIGHT_PAGES, "1").strip() == "0" or weight_arena(model) is not None:
        return 0  # turned off, or moved already (prepare_model ran before)
    # Tensors over the same bytes (tied weights held by two modules) get one place.
    movable = [t for t in _weights_in_read_order(model) if _movable(t)]
    weights = [((t.data_ptr(), t.numel(), t.dtype), t) for t in movable]
    places: dict[tuple[int, int, torch.dtype], int] = {}
    total = 0
    for key, t in weights:
        if key not in places:
            places[key] = total
            total += -(-t.nbytes // ALIGN) * ALIGN
    if total == 0:
        return 0
    arena = zeroed_lazily((total,), torch.uint8, "cpu")
    copies: dict[tuple[int, int, torch.dtype], torch.Tensor] = {}
    since_trim = 0
    with torch.no_grad():
        for key, t in weights:
            copy = copies.get(key)
            if copy is None:
                start = places[key]
                copy = arena[start : start + t.nbytes].view(t.dtype).view(t.shape)
                _copy_releasing(copy, t)
                copies[key] = copy
                since_trim += t.nbytes
            t.data = copy.view(t.shape)  # the old copy is freed here unless shared
            if since_trim >= TRIM_EVERY:
                # The old copies that came from the heap rather than a mapping of their own
                # would otherwise stay resident: the move would cost memory, not move it.
                trim_heap()
                since_trim = 0
    model._carpool_weight_arena = arena  # weight_arena() finds it; marks the model as moved
    del copies, weights, movable
    trim_heap()
    return total


def weight_arena(model: nn.Module) -> torch.Tensor | None:
    """The mapping ``move_weights`` moved ``model``'s weights into (None: not moved)."""
    return getattr(model, "_carpool_weight_arena", None)


def huge_page_bytes(t: torch.Tensor) -> int:
    """Bytes of the mapping holding ``t`` that the kernel backs with transparent huge pages now
    (``AnonHugePages`` in ``/proc/self/smaps``; 0 where there is no such file)."""
    address = t.data_ptr()
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split(maxsplit=1)[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = (int(v, 16) for v in head.split("-"))
                    inside = lo <= address < hi
                elif inside and head == "AnonHugePages:":
                    return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0
