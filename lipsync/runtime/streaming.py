"""The Stream RPC's session logic: audio chunks in, frames out in order as soon as their look-ahead is in.

A reader task turns each message into features (shared encoder calls) and render jobs; the output side awaits
the jobs in order. At most `buffer_frames` frames are rendered or in flight but not yet taken by the client: past
that the reader stops reading, so a slow client slows its own sender instead of filling the server's memory.
Knows nothing of gRPC: messages come in parsed (`runtime.messages`) and chunks go out as `StreamChunk`s.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import torch

from lipsync.codec import audio
from lipsync.codec.audio import AudioFormat, StreamResampler
from lipsync.errors import InvalidRequest
from lipsync.runtime.feature_sources import Part
from lipsync.runtime.messages import Audio, EndOfAudio, StreamMessage
from lipsync.runtime.scheduler import ModelScheduler, Priority


@dataclass
class StreamChunk:
    """Consecutive frames of a stream (or, with `end`, its end)."""
    first_index: int = 0
    avatar_frames: list[int] = field(default_factory=list)
    jpegs: list[bytes] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    end: bool = False


class StreamSession:
    def __init__(self, scheduler: ModelScheduler, fmt: AudioFormat, start_frame: int, quality: int, lookahead: int,
                 buffer_frames: int, max_audio_s: float, square: bool = False, frames_per_chunk: int = 1 << 30):
        """`frames_per_chunk`: the most frames one chunk (one response) may carry, so that a response is sized
        before any work (a large audio message is answered in several)."""
        self.scheduler, self.fmt, self.start, self.quality, self.square = scheduler, fmt, start_frame, quality, square
        self.buffer_frames, self.max_audio_s = buffer_frames, max_audio_s
        self.frames_per_chunk = max(1, frames_per_chunk)
        self.avatar = scheduler.pipeline.avatar
        self.features = scheduler.feature_stream(lookahead)
        self.resampler = StreamResampler(fmt.sample_rate)
        self.received = 0  # input samples
        self.sent = 0  # frames handed out
        self._room: asyncio.Future | None = None  # the reader waits on it while the buffer is full
        self._buffered = 0  # frames submitted but not yet handed out

    def _decode(self, data: bytes) -> torch.Tensor:
        """One chunk → 16 kHz samples (CPU work, kept off the event loop)."""
        return self.resampler.push(audio.decode_pcm(data, self.fmt, allow_empty=True))

    async def _wait_for_room(self) -> None:
        """Returns at once while the buffer has room (every chunk asks: no lock on that path)."""
        while self._buffered >= self.buffer_frames:
            self._room = asyncio.get_running_loop().create_future()
            await self._room

    def _handed_out(self, n: int) -> None:
        self._buffered -= n
        if self._room is not None and not self._room.done():
            self._room.set_result(None)

    async def run(self, messages: AsyncIterator[StreamMessage]) -> AsyncIterator[StreamChunk]:
        """Frames of the stream in order; ends after end_of_audio (with an `end` chunk) or when the client
        half-closes without it (no more frames)."""
        pending: asyncio.Queue = asyncio.Queue()  # (render future, ids, first, audio ms, arrival) | None | exc

        async def read() -> None:
            ended = False
            try:
                async for message in messages:
                    if ended:
                        raise InvalidRequest("audio received after end_of_audio")
                    t0 = time.perf_counter()
                    if isinstance(message, Audio):
                        self.received += len(message.data) // self.fmt.frame_bytes
                        audio.check_duration(self.received, self.fmt.sample_rate, self.max_audio_s,
                                             "server.max_audio_seconds")
                        # decoded on the device thread, in the hand-off that makes its mel windows
                        first, feats = await self.scheduler.features(self.features, None, end=False,
                                                                     decode=lambda d=message.data: self._decode(d))
                    elif isinstance(message, EndOfAudio):
                        ended = True
                        first, feats = await self.scheduler.features(self.features, None, end=True,
                                                                     decode=self.resampler.finish)
                    else:
                        raise InvalidRequest(f"{type(message).__name__} is not a Stream message")
                    for lo in range(0, feats.shape[0], self.frames_per_chunk):  # chunks a response can carry
                        n = min(self.frames_per_chunk, feats.shape[0] - lo)
                        await self._wait_for_room()
                        ids = self.avatar.frames_for(self.start, first + lo, n)
                        self._buffered += len(ids)
                        job = self.scheduler.submit(Part(feats, lo, lo + n), ids, self.quality,
                                                    priority=Priority.STREAM, square=self.square)
                        pending.put_nowait((job, ids, first + lo, (time.perf_counter() - t0) * 1e3, t0))
                    if ended:
                        pending.put_nowait(None)
                if not ended:  # half-closed without end_of_audio: no more frames
                    pending.put_nowait(asyncio.CancelledError())
            except Exception as exc:
                failed.append(exc)  # seen before anything still queued is sent (e.g. audio after end_of_audio)
                pending.put_nowait(exc)

        failed: list[Exception] = []
        reader = asyncio.ensure_future(read())
        try:
            while True:
                item = await pending.get()
                await asyncio.sleep(0)  # let the reader see what the client sent meanwhile
                if failed:
                    raise failed[0]
                if item is None:
                    yield StreamChunk(first_index=self.sent, end=True)
                    return
                if isinstance(item, asyncio.CancelledError):
                    return
                if isinstance(item, BaseException):
                    raise item
                job, ids, first, audio_ms, arrived = item
                jpegs, timings = await job
                self._handed_out(len(ids))
                timings = {**timings, "audio": audio_ms, "total": (time.perf_counter() - arrived) * 1e3}
                self.sent += len(ids)
                yield StreamChunk(first, ids, jpegs, timings)
        finally:
            reader.cancel()
            while not pending.empty():
                item = pending.get_nowait()
                if isinstance(item, tuple):
                    item[0].cancel()
