"""The post-processor that adds BOS/EOS around encoded text."""

from __future__ import annotations

from tokenizers import processors


def bos_eos_processor(
    bos: tuple[str, int] | None, eos: tuple[str, int] | None
) -> processors.TemplateProcessing:
    """A post-processor wrapping each sequence in BOS and/or EOS, as transformers builds it.

    Args:
        bos: ``(text, id)`` of the token to prepend, or ``None``.
        eos: ``(text, id)`` of the token to append, or ``None``.

    Returns:
        The ``tokenizers`` post-processor.
    """
    head = f"{bos[0]}:0 " if bos else ""
    tail = f" {eos[0]}:0" if eos else ""
    head_b = f"{bos[0]}:1 " if bos else ""
    tail_b = f" {eos[0]}:1" if eos else ""
    return processors.TemplateProcessing(
        single=f"{head}$A:0{tail}",
        pair=f"{head}$A:0{tail} {head_b}$B:1{tail_b}",
        special_tokens=[t for t in (bos, eos) if t is not None],
    )
