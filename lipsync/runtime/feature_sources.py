"""Where a render job's audio features come from, resolved on the device's inference thread.

The event loop submits work by reference: a tensor the device made (an utterance's features), a range of one,
a live utterance's stored rows, or silence. It never slices, reshapes or builds a tensor itself: on CUDA an
operation on the loop's thread runs on the default stream, unordered with the inference stream that made its
input (the device discipline: tensors are made and consumed on the device's threads). `frames_of` turns a source
into the features of a batch's frames, on the thread that runs the batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Union

import torch
from torch import Tensor

from lipsync.model import audio_features
from lipsync.model.audio_features import CONTEXT_AFTER, CONTEXT_BEFORE

CONTEXT_ROWS = CONTEXT_BEFORE + CONTEXT_AFTER - 1  # rows a run of frames has past its frames
MERGE_FRAMES = 64  # stored chunks shorter than this are merged with the next (their context rows cost)


class FeatureSource(Protocol):
    def frames(self, lo: int, hi: int) -> Tensor:
        """Features [hi - lo, 32, 16, 16] (or visual inputs) of frames lo..hi-1, on the device thread."""


Source = Union[Tensor, FeatureSource]


def frames_of(source: Source, lo: int, hi: int) -> Tensor:
    return source[lo:hi] if isinstance(source, Tensor) else source.frames(lo, hi)


@dataclass(frozen=True)
class Part:
    """Frames lo..hi-1 of another source (a long request split into jobs)."""
    source: Source
    lo: int
    hi: int

    def frames(self, lo: int, hi: int) -> Tensor:
        return frames_of(self.source, self.lo + lo, self.lo + hi)


@dataclass(frozen=True)
class Strided:
    """Every `stride`-th frame from `first` on (a live utterance rendered below real time: the frames in between
    show these again)."""
    source: Source
    first: int
    stride: int

    def frames(self, lo: int, hi: int) -> Tensor:
        a, s = self.first + lo * self.stride, self.stride
        return frames_of(self.source, a, a + (hi - lo - 1) * s + 1)[::s]


@dataclass(frozen=True)
class Repeated:
    """One frame's features [1,...] for every frame (the Go server's deprecated fixed audio features)."""
    features: Tensor

    def frames(self, lo: int, hi: int) -> Tensor:
        return self.features.expand(hi - lo, *self.features.shape[1:])


@dataclass(frozen=True)
class Silence:
    """Zero features (the capacity measurement's batches)."""
    shape: tuple[int, ...]
    device: torch.device

    def frames(self, lo: int, hi: int) -> Tensor:
        return torch.zeros(hi - lo, *self.shape, device=self.device)


class UtteranceRows:
    """A live utterance's features not yet rendered, kept as padded embedding rows (16× smaller than features),
    and owned by the device's inference thread: rows arrive there from the audio encoder (`add`) and leave there
    into batches (`frames`). The event loop counts frames and reads `nbytes`; it never touches the tensors.

    Frames are asked for in order (an utterance's jobs are due in order): asking for frame `lo` frees the rows
    only frames before it needed."""

    def __init__(self) -> None:
        self.chunks: list[tuple[int, Tensor]] = []  # (first frame, rows [n + 15, 512]), in frame order
        self.nbytes = 0  # storage held, for the session's memory bound

    def add(self, first: int, features: Tensor) -> tuple[int, int]:
        """Features [n,32,16,16] of frames first..first+n-1 from the encoder → (first, n). Small chunks adjacent to
        the last are merged with it, so chunks stay large."""
        n = features.shape[0]
        if n:
            rows = audio_features.rows_from_features(features)
            if self.chunks:
                before_first, before = self.chunks[-1]
                if before.shape[0] - CONTEXT_ROWS < MERGE_FRAMES and \
                        before_first + before.shape[0] - CONTEXT_ROWS == first:
                    self.chunks[-1] = (before_first, torch.cat([before, rows[CONTEXT_ROWS:]]))
                    self._count()
                    return first, n
            self.chunks.append((first, rows))
            self._count()
        return first, n

    def frames(self, lo: int, hi: int) -> Tensor:
        """Features of frames lo..hi-1 (all received), gathered from the chunks that hold them."""
        self._drop_before(lo)
        parts = []
        for first, rows in self.chunks:
            end = first + rows.shape[0] - CONTEXT_ROWS
            a, b = max(lo, first), min(hi, end)
            if a < b:
                parts.append(audio_features.features_from_rows(rows[a - first:b - first + CONTEXT_ROWS]))
        found = parts[0] if len(parts) == 1 else torch.cat(parts)
        if found.shape[0] != hi - lo:
            raise RuntimeError(f"frames {lo}..{hi - 1} of the utterance are not all stored")
        return found

    def clear(self) -> None:
        self.chunks = []
        self.nbytes = 0

    def _drop_before(self, lo: int) -> None:
        """Free the rows of frames before `lo`: whole chunks, and the head of the one that holds `lo` (copied once
        what is left is under half its storage: amortised copies)."""
        keep: list[tuple[int, Tensor]] = []
        for first, rows in self.chunks:
            end = first + rows.shape[0] - CONTEXT_ROWS
            if end <= lo:
                continue
            if first < lo:
                rows, first = rows[lo - first:], lo
                if rows.untyped_storage().nbytes() > 2 * rows.numel() * rows.element_size():
                    rows = rows.clone()
            keep.append((first, rows))
        self.chunks = keep
        self._count()

    def _count(self) -> None:
        self.nbytes = sum(rows.untyped_storage().nbytes() for _, rows in self.chunks)
