"""Splitting text and Markdown into overlapping chunks.

Text is cut at the strongest boundary that makes pieces short enough — Markdown headings, then
blank lines, lines, sentences, words, and characters as a last resort — and the pieces are packed
into chunks of at most ``size`` characters. Each chunk after the first begins with the last
pieces of the one before, up to ``overlap`` characters, so a fact that straddles a cut is whole in
at least one chunk. A Markdown heading always starts a new chunk, without overlap: a section's
chunks never begin with the end of another section.
"""

from __future__ import annotations

import re

__all__ = ["split_text"]

_HEADING = re.compile(r"^#{1,6} ")
_SEPARATORS = (
    re.compile(r"(?m)(?=^#{1,6} )"),  # before a Markdown heading
    re.compile(r"(?<=\n\n)"),  # after a blank line
    re.compile(r"(?<=\n)"),  # after a line
    re.compile(r"(?<=[.!?;:])\s+"),  # after a sentence
    re.compile(r"(?<= )"),  # after a word
)


def _pieces(text: str, size: int, level: int = 0) -> list[str]:
    if len(text) <= size:
        return [text] if text else []
    if level == len(_SEPARATORS):
        return [text[i : i + size] for i in range(0, len(text), size)]
    pieces: list[str] = []
    for part in _SEPARATORS[level].split(text):
        if part:
            pieces.extend(_pieces(part, size, level + 1))
    return pieces


def split_text(text: str, size: int = 1000, overlap: int = 200) -> list[str]:
    """Chunks of at most ``size`` characters, consecutive ones sharing up to ``overlap``."""
    if not 0 <= overlap < size:
        raise ValueError("need 0 <= overlap < size")
    text = text.replace("\r\n", "\n").strip()
    chunks: list[str] = []
    window: list[str] = []
    length = 0
    for piece in _pieces(text, size):
        if window and _HEADING.match(piece):
            chunks.append("".join(window).strip())
            window, length = [], 0
        if window and length + len(piece) > size:
            chunks.append("".join(window).strip())
            # Keep the tail of the window as the next chunk's overlap.
            while window and (length > overlap or length + len(piece) > size):
                length -= len(window.pop(0))
        window.append(piece)
        length += len(piece)
    if window:
        last = "".join(window).strip()
        if last and (not chunks or not chunks[-1].endswith(last)):
            chunks.append(last)
    return [c for c in chunks if c]
