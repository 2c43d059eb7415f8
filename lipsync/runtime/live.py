"""Live sessions: a conversation's continuous video, paced at 25 fps by the server's monotonic clock.

A session is a timeline of frame slots. Each slot shows one frame:
- IDLE: the avatar's own frame at the session's avatar position (cached JPEG, no generator work); the position
  advances by one.
- SPEECH: the next rendered frame of the utterance at the head of the queue; the position advances by one.
- HELD: that frame is not rendered in time: the avatar frame it will use is shown as idle and the position does
  not advance, so the rest of the utterance (video and its audio) moves one slot later and sync holds.

A device that renders below real time (a laptop's CPU) does not keep people waiting: by default
(`server.live.slow_device: degrade`) an utterance starts after the measured render latency, and only every k-th of
its frames is rendered and shown for k slots, k chosen from the measured capacity and the sessions speaking (back
to 1 as soon as capacity allows, decided again for every submission); every slot still carries its own 40 ms of
audio, so sound stays sample-exact and in sync. `buffer` instead starts each utterance late enough to play every
frame through (the lead grows with the utterance).

An utterance's frames are drawn at avatar positions start_pos + k, fixed when its first frames are submitted:
start_pos is the position of the slot where it is planned to start (after the one before it, or after a lead that
covers the measured render latency and, when the production rate is below 25 fps, enough buffering to play
through). Idle frames walk the position up to start_pos, so speech↔idle transitions never jump, and the frames
equal a Synthesize of the same audio with start_frame = start_pos.

Every SPEECH frame carries its own 40 ms of the utterance's audio at the session's output rate; IDLE and HELD
frames carry silence, except that an utterance's audio outlasts its D + 2 video frames (SPEC §3) by up to two
frames: those frames show the avatar's own frame (IDLE, tagged with the utterance) and carry the rest of its audio.
This module knows nothing of gRPC: `run` takes the client's parsed messages (`runtime.messages`) and yields what
the protocol layer sends.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import torch

from lipsync import timebase
from lipsync.codec import audio
from lipsync.codec.audio import AudioFormat, StreamResampler
from lipsync.config import Section, limit, setting
from lipsync.errors import InvalidRequest
from lipsync.model import audio_features
from lipsync.model.audio_features import FeatureStream
from lipsync.runtime.feature_sources import CONTEXT_ROWS, MERGE_FRAMES, Part, Strided, UtteranceRows
from lipsync.runtime.messages import Audio, EndUtterance, Interrupt, LiveMessage, StartUtterance
from lipsync.runtime.scheduler import ModelScheduler, Priority

log = logging.getLogger(__name__)

IDLE, SPEECH, HELD = "idle", "speech", "held"
# Frames a session hands to the scheduler at once while queued speech comes due (one per slot otherwise): each job
# is a future, a heap entry and callbacks on the event loop, and speech sent ahead of real time (as a TTS sends
# it) would make one per frame. 8 frames (320 ms) past the horizon: a sixth of the default 2-s one.
SUBMIT_FRAMES = 8


class SessionError(InvalidRequest):
    """A live-session message that breaks the protocol (reported to the client as INVALID_ARGUMENT)."""


@dataclass
class LiveConfig(Section):
    """`server.live`: live sessions (Converse)."""
    WHERE = "server.live"
    time_scale: float = limit(1.0, above=0, high=1000, help="wall-clock seconds per media second; 1 = real time "
                                                            "(tests on slow CPUs use more)")
    max_sessions: int = limit(64, low=0, help="open live sessions per server")
    duty_cycle: float = limit(0.5, above=0, high=1, help="share of time a session speaks, for admission against the "
                                                         "measured capacity")
    headroom: float = limit(0.9, above=0, high=1, help="admit while the sessions' speech needs <= headroom x "
                                                       "measured frames/s")
    lead_margin_frames: int = limit(2, low=0, high=250, help="slots added to the measured render latency before an "
                                                             "utterance starts")
    slow_device: str = limit("degrade", choices=("degrade", "buffer"), help="a device that renders below real time: "
                             "degrade (start at once, render every k-th frame and show it k slots, audio unchanged) "
                             "or buffer (start late enough to play every frame)")
    max_frame_stride: int = limit(4, low=1, high=25, help="degrade: render at least every this many frames (4: a "
                                  "6.25 fps mouth); a device slower than that still holds frames")
    latency_safety: float = limit(1.5, low=1, high=10, help="measured batch latency x this when planning an "
                                                            "utterance's start")
    max_utterance_s: float = limit(300.0, above=0, help="longest utterance")
    max_queued_utterances: int = limit(16, low=0, help="utterances waiting behind the one playing")
    max_queued_speech_s: float = setting(
        120.0, "speech received and not yet played (all utterances); the utterance that would pass it ends at once "
        "with finished{interrupted, error}", above=0)
    render_ahead_s: float = setting(
        2.0, "frames go to the generator once due within this many seconds of the session's clock (the rest waits "
        "as feature rows): live work in the queue stays bounded", above=0, high=60)
    idle_timeout_s: float = setting(600.0, "a session whose client sends nothing for this long ends "
                                           "(DEADLINE_EXCEEDED)", above=0)


@dataclass
class Frame:
    """One slot's frame as it leaves the session."""
    index: int
    avatar_position: int
    avatar_frame: int
    jpeg: bytes
    audio: bytes
    kind: str
    utterance_id: str = ""
    utterance_frame: int = -1
    square: list[int] | None = None  # SQUARE output, SPEECH frames: the crop rectangle the JPEG covers


@dataclass
class Event:
    kind: str  # "started" | "finished" | "late"
    fields: dict[str, Any]


@dataclass(eq=False)
class Utterance:
    id: str
    features: FeatureStream
    resampler: StreamResampler                   # input rate → 16 kHz (features)
    out_resampler: StreamResampler | None        # input rate → output rate (carried audio); None: same rate
    first_audio_at: float | None = None
    samples_in: int = 0                          # input samples received
    pending: bytearray = field(default_factory=bytearray)  # input bytes not yet turned into features
    end_requested: bool = False                  # end_utterance received
    ended: bool = False                          # ... and processed
    total: int | None = None                     # frames, once ended and every feature is out
    out_audio: bytearray = field(default_factory=bytearray)  # s16le at the output rate, from byte `audio_base` on
    audio_base: int = 0                          # bytes of carried audio already played and dropped
    rows: UtteranceRows = field(default_factory=UtteranceRows)  # its features not yet rendered (device-owned)
    received: int = 0                            # frames whose features are in `rows`
    submitted: int = 0                           # frames handed to render jobs: frames submitted..received-1 wait
    #                                            (start unknown, or beyond the horizon)
    start_pos: int | None = None
    rendered: dict[int, bytes] = field(default_factory=dict)  # rendered frame k → its JPEG, until its slots pass
    shows: list[int] = field(default_factory=list)  # frame k → the rendered frame its slot shows (k at stride 1), for
    #                                            every frame submitted
    stride: int = 1                              # frames per rendered frame at its start (degrade)
    repeated: int = 0                            # slots that showed a rendered frame again
    next_k: int = 0                              # next frame to show
    first_frame: int = -1
    last_frame: int = -1
    late: int = 0
    jobs: list[asyncio.Future] = field(default_factory=list)
    cancelled: bool = False
    horizon: int = 0                             # frames ahead of the clock that may be rendering (set at start)


class LiveSession:
    """One conversation on one loaded model. Client-side calls (`start_utterance`, `audio`, `end_utterance`,
    `interrupt`, `close`) come from the reader task; `frames()` is the paced output."""

    _ids = itertools.count(1)

    def __init__(self, scheduler: ModelScheduler, config: LiveConfig, in_format: AudioFormat, out_rate: int,
                 start_frame: int, quality: int, idle_jpegs: list[bytes], square: bool = False):
        """`square` (SQUARE output): speech frames are JPEGs of their crop rectangle and IDLE/HELD frames carry no
        JPEG (the client shows its copy of the avatar frame); `idle_jpegs` is then not used."""
        if out_rate % timebase.FPS or not audio.MIN_RATE <= out_rate <= audio.MAX_RATE:
            raise SessionError(f"output_sample_rate {out_rate} must be a multiple of {timebase.FPS} Hz within "
                               f"{audio.MIN_RATE}..{audio.MAX_RATE}")
        self.scheduler, self.config, self.in_format = scheduler, config, in_format
        self.avatar = scheduler.pipeline.avatar
        self.out_rate, self.quality, self.square = out_rate, quality, square
        self.idle = [b""] * self.avatar.frame_count if square else idle_jpegs
        self.samples_per_frame = out_rate // timebase.FPS
        self.silence = bytes(2 * self.samples_per_frame)
        self.interval = timebase.SAMPLES_PER_FRAME / timebase.SAMPLE_RATE * config.time_scale
        self.id = f"{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        self.slot = 0                   # index of the next frame to send
        self.pos = start_frame          # avatar position of the next slot
        self.queue: list[Utterance] = []  # in play order; queue[0] is playing or next
        self.open: Utterance | None = None  # receiving audio
        self.events: list[Event] = []
        self.closed = asyncio.Event()
        self._sleeping: asyncio.Future | None = None  # the clock's wait for the next slot (close wakes it)
        self.pacing = Lateness()  # how late each slot's frame left against its due time
        self._work = asyncio.Event()  # audio or an end is waiting for the feature worker
        self.error: Exception | None = None  # what ended the session, if not the client
        self.started_at: float | None = None  # perf_counter time of slot 0
        self.horizon = max(1, math.ceil(config.render_ahead_s * timebase.FPS))  # frames (media time)
        self.stats = {"frames": 0, "speech": 0, "idle": 0, "held": 0, "utterances": 0, "interrupted": 0,
                      "failed": 0, "repeated": 0}
        scheduler.live_sessions.add(self)  # counted by admission from here (frames() or close() gives it back)

    # ------------------------------------------------------------------ client messages (never wait on the device)
    def start_utterance(self, utterance_id: str = "", interrupt: bool = False) -> None:
        """Open an utterance; one the client did not name is named `utterance-N` (N counts this session's
        utterances from 1), the name its events carry."""
        if interrupt:
            self.interrupt()
        if self.open is not None:
            raise SessionError(f"utterance {self.open.id!r} is still open: send end_utterance first")
        if len(self.queue) > self.config.max_queued_utterances:
            raise SessionError(f"{len(self.queue)} utterances are queued; the limit is "
                               f"{self.config.max_queued_utterances}")
        out = None if self.out_rate == self.in_format.sample_rate else \
            StreamResampler(self.in_format.sample_rate, self.out_rate)
        name = utterance_id or f"utterance-{self.stats['utterances'] + 1}"
        self.open = Utterance(name, self.scheduler.feature_stream(), StreamResampler(self.in_format.sample_rate), out)
        self.queue.append(self.open)
        self.stats["utterances"] += 1

    def audio(self, data: bytes) -> None:
        """Queue audio of the open utterance (opening one if none is); the feature worker takes it from here."""
        if len(data) % self.in_format.frame_bytes:
            raise SessionError(f"{len(data)} bytes is not a multiple of {self.in_format.frame_bytes} "
                               f"({self.in_format.encoding}, {self.in_format.channels} channel(s))")
        if self.open is None:
            self.start_utterance()
        u = self.open
        assert u is not None
        if u.cancelled:
            return  # refused (see below): the rest of its audio is dropped until end_utterance
        u.first_audio_at = u.first_audio_at or time.perf_counter()
        u.samples_in += len(data) // self.in_format.frame_bytes
        if u.samples_in > self.config.max_utterance_s * self.in_format.sample_rate:
            raise SessionError(f"utterance {u.id!r} is longer than server.live.max_utterance_s "
                               f"({self.config.max_utterance_s:g} s)")
        if self.queued_speech_s() > self.config.max_queued_speech_s:
            self._drop(u, f"the session holds more than server.live.max_queued_speech_s "
                          f"({self.config.max_queued_speech_s:g} s) of speech not yet played")
            return
        u.pending += data
        self._work.set()

    def queued_speech_s(self) -> float:
        """Seconds of speech received and not yet played, over the queued utterances."""
        rate = self.in_format.sample_rate
        return sum(max(0.0, u.samples_in / rate - u.next_k / timebase.FPS) for u in self.queue if not u.cancelled)

    def memory_bound(self, jpeg_bytes: int) -> int:
        """The most `held_bytes` can reach, for JPEGs of at most `jpeg_bytes`: per second of queued speech its
        input audio (until decoded), its carried audio at the output rate and its feature rows (25 × 2 KB); the
        rendered frames of one horizon (and one submission beyond it), plus the frames of one utterance's lead."""
        context = CONTEXT_ROWS
        per_second = self.in_format.sample_rate * self.in_format.frame_bytes + self.out_rate * 2 + \
            timebase.FPS * 512 * 4 * 2 * (1 + context / MERGE_FRAMES)  # rows (storage up to twice what waits)
        utterances = self.config.max_queued_utterances + 2
        horizon = max([self.horizon, *(u.horizon for u in self.queue)])
        return int(self.config.max_queued_speech_s * per_second + utterances * 2 * context * 512 * 4
                   + (horizon + SUBMIT_FRAMES + self.scheduler.max_batch) * jpeg_bytes)

    def held_bytes(self) -> int:
        """Memory this session holds for its utterances: audio not yet decoded, features not yet rendered (as
        rows), rendered JPEGs not yet shown, and the carried audio at the output rate."""
        total = 0
        for u in self.queue:
            total += len(u.pending) + len(u.out_audio) + sum(len(j) for j in u.rendered.values()) + u.rows.nbytes
        return total

    def end_utterance(self) -> None:
        u = self.open
        if u is None:
            raise SessionError("end_utterance without an open utterance")
        self.open = None
        u.end_requested = True
        self._work.set()

    def interrupt(self, reason: str = "") -> None:
        """Barge-in: drop every utterance not yet fully shown; the next slot is idle. `reason`: why, when it is not
        the client's (their finished events carry it as `error`)."""
        for u in list(self.queue):
            self._cancel(u, error=reason)
        self.queue.clear()
        self.open = None

    def end(self, error: Exception) -> None:
        """End the session from the server's side (it is shutting down): its utterances finish interrupted with
        the reason, said on one last frame, then the call ends with `error`."""
        if self.error is None:
            self.error = error
        self.interrupt(str(error))
        self._stop_clock()

    def close(self) -> None:
        self.interrupt()
        self._stop_clock()
        self.scheduler.live_sessions.discard(self)

    def _stop_clock(self) -> None:
        """No slot after this one."""
        self.closed.set()
        if self._sleeping is not None and not self._sleeping.done():
            self._sleeping.set_result(True)

    def apply(self, message: LiveMessage) -> None:
        """One client message (none waits on the device)."""
        if isinstance(message, Audio):
            self.audio(message.data)
        elif isinstance(message, StartUtterance):
            self.start_utterance(message.utterance_id, message.interrupt)
        elif isinstance(message, EndUtterance):
            self.end_utterance()
        elif isinstance(message, Interrupt):
            self.interrupt()
        else:
            raise SessionError(f"{type(message).__name__} is not a live-session message")

    async def run(self, messages: AsyncIterator[LiveMessage]) -> AsyncIterator[tuple[Frame, list[Event]]]:
        """The session's frames while a reader applies the client's messages. The session closes when the client
        closes its side or a message breaks the protocol; that error is raised after the last frame."""
        failed: list[BaseException] = []

        async def read() -> None:
            try:
                async for message in messages:
                    self.apply(message)
            except Exception as exc:
                failed.append(exc)
            finally:
                self.close()

        reader = asyncio.ensure_future(read())
        try:
            async for item in self.frames():
                yield item
            if failed:
                raise failed[0]
        finally:
            reader.cancel()

    # ------------------------------------------------------------------ audio → features → render jobs
    async def _feature_worker(self) -> None:
        """Turns queued audio into features, utterance by utterance, all pending chunks in one step."""
        try:
            while True:
                await self._work.wait()
                self._work.clear()
                for u in list(self.queue):
                    while not u.cancelled and (u.pending or (u.end_requested and not u.ended)):
                        if u.pending:
                            data, u.pending = bytes(u.pending), bytearray()
                            # decoded on the device thread, in the hand-off that makes its mel windows
                            await self._features(u, None, end=False, decode=lambda u=u, d=data: self._decode(u, d))
                        else:
                            await self._end(u)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # bad audio, or a failed feature step: the session ends with it
            self.error = exc
            self._stop_clock()

    async def _end(self, u: Utterance) -> None:
        u.ended = True
        if u.samples_in == 0:  # nothing was said: nothing to show
            self.queue.remove(u)
            self._finish(u, interrupted=False)
            return
        await self._features(u, None, end=True, decode=lambda: self._decode_end(u))

    def _decode_end(self, u: Utterance) -> torch.Tensor:
        """On the device thread: the resamplers' tails (carried audio appended; the 16 kHz tail returned)."""
        if u.out_resampler is not None:
            u.out_audio += audio.encode_s16(u.out_resampler.finish())
        return u.resampler.finish()

    def _decode(self, u: Utterance, data: bytes) -> torch.Tensor:
        """Input bytes → 16 kHz samples for features; the carried audio at the output rate is appended."""
        wave = audio.decode_pcm(data, self.in_format, allow_empty=True)
        if u.out_resampler is None:
            u.out_audio += audio.encode_s16(wave)
        else:
            u.out_audio += audio.encode_s16(u.out_resampler.push(wave))
        return u.resampler.push(wave)

    async def _features(self, u: Utterance, wave: torch.Tensor | None, end: bool,
                        decode: Callable[[], torch.Tensor] | None = None) -> None:
        """One step of the utterance's audio: its new features go into its rows on the device thread; the loop
        hears how many frames they are."""
        first, n = await self.scheduler.features(u.features, wave, end, decode, then=u.rows.add)
        if u.cancelled:
            return
        if end:
            u.total = u.features.frames_emitted
        if n:
            u.received = first + n
            if u.start_pos is not None:
                self._submit_waiting(u)

    def _schedule(self) -> None:
        """Fix the start positions that can be known now (called once per slot, so an end_utterance that follows
        its audio within a slot is seen before the start is planned) and submit the frames waiting for them."""
        for i, u in enumerate(self.queue):
            if u.start_pos is None:
                if u.received <= u.submitted:
                    break  # nothing to render yet
                if i == 0:
                    lead = self._lead_frames(u)
                    u.start_pos, u.horizon = self.pos + lead, max(self.horizon, lead + 1)
                    log.debug("session %s: utterance %r starts in %d slots (measured %s frames/s, latency %s s)",
                              self.id, u.id, lead, self.scheduler.capacity_fps, self.scheduler.batch_latency_s)
                else:
                    before = self.queue[i - 1]
                    if before.start_pos is None or before.total is None:
                        break  # where it ends is not known yet
                    u.start_pos, u.horizon = before.start_pos + before.total, self.horizon
            self._submit_waiting(u)

    def _submit_waiting(self, u: Utterance) -> None:
        """Submit the waiting frames that are due within the utterance's horizon of the clock; the rest wait as
        rows (a flood of queued speech costs the generator nothing until it is nearly due). Counts only: the
        rows are read on the device thread when the frames are batched."""
        assert u.start_pos is not None
        until = self.pos - u.start_pos + u.horizon  # frames k < until show within the horizon
        if u.submitted >= u.received or u.submitted >= until:
            return  # nothing due this slot (the common case while speech is queued)
        until += SUBMIT_FRAMES - 1  # due now: the next frames go with it, as one job
        first, last = u.submitted, min(u.received, until)
        self._submit(u, first, last - first, self.frame_stride())
        u.submitted = last

    def frame_stride(self) -> int:
        """Frames per rendered frame this session can afford now: 1 where the device keeps up; else k such that
        this session's share of the measured capacity (headroom kept for other work) renders 25/k frames/s."""
        capacity = self.scheduler.capacity_fps
        if self.config.slow_device != "degrade" or not capacity:
            return 1
        speaking = max(1, sum(1 for s in self.scheduler.live_sessions if s.queue))
        share, play = capacity * self.config.headroom / speaking, 1.0 / self.interval
        return max(1, min(self.config.max_frame_stride, math.ceil(play / share - 1e-9)))

    def _lead_frames(self, u: Utterance) -> int:
        """Slots between now and the start of an utterance that starts from idle: the measured render latency
        (with a safety factor), plus buffering when this session's share of the measured production rate is
        below the playback rate and the utterance's length is known."""
        latency = self.scheduler.batch_latency_s or 0.0
        lead = math.ceil(latency * self.config.latency_safety / self.interval) + self.config.lead_margin_frames
        capacity = self.scheduler.capacity_fps
        if capacity:
            samples = u.samples_in * timebase.SAMPLE_RATE // self.in_format.sample_rate
            frames = u.total or audio_features.frame_count(samples)
            speaking = max(1, sum(1 for s in self.scheduler.live_sessions if s.queue))
            stride = self.frame_stride()  # degrade: every stride-th frame is rendered, so 25/stride frames/s needed
            rate, play = capacity / speaking, 1.0 / self.interval / stride
            if rate < play:  # frame k is ready at ~(k+1)/rate, shown at start + k/play: buffer for the last one
                lead += math.ceil(frames / stride * (play / rate - 1))
        return lead

    def _submit(self, u: Utterance, first: int, n: int, stride: int = 1) -> None:
        """Frames first..first+n-1 of the utterance to the scheduler, their features read from its rows; with a
        stride k, only every k-th of them is rendered, each shown for its k slots."""
        assert u.start_pos is not None and self.started_at is not None
        rendered = list(range(first, first + n, stride))
        u.shows.extend(first + (j // stride) * stride for j in range(n))
        if first == 0:
            u.stride = stride
        ids = [self.avatar.frame_for(u.start_pos + k) for k in rendered]
        slot = self.slot + (u.start_pos + first - self.pos)  # where frame `first` is planned to show
        deadline = self.started_at + slot * self.interval

        def done(lo: int, hi: int, jpegs: list[bytes]) -> None:
            if not u.cancelled:
                for j, data in enumerate(jpegs):
                    u.rendered[rendered[lo + j]] = data

        features = Part(u.rows, first, first + n) if stride == 1 else Strided(u.rows, first, stride)
        job = self.scheduler.submit(features, ids, self.quality, priority=Priority.LIVE, deadline=deadline,
                                    step=self.interval * stride, on_frames=done, square=self.square)
        job.add_done_callback(lambda f: self._rendered(u, f))
        u.jobs.append(job)

    def _rendered(self, u: Utterance, job: asyncio.Future) -> None:
        """A render job's outcome: frames arrive through the callback; a failure (device out of memory, engine
        error) ends its utterance with an event that says so, never a stall."""
        if job.cancelled():
            return
        exc = job.exception()
        if exc is not None and not u.cancelled:
            log.error("live session %s: rendering utterance %r failed: %s: %s", self.id, u.id, type(exc).__name__,
                      exc)
            self.stats["failed"] += 1
            self._drop(u, f"rendering failed ({type(exc).__name__}); the server log has the details")

    def _drop(self, u: Utterance, why: str) -> None:
        """End one utterance early with `why` in its finished event; the session goes on."""
        self._cancel(u, error=why)
        if u in self.queue:
            self.queue.remove(u)

    def _cancel(self, u: Utterance, error: str = "") -> None:
        if u.cancelled:
            return
        u.cancelled = True
        for job in u.jobs:
            job.cancel()  # frames not yet in a batch are dropped by the scheduler
        u.rendered.clear()
        u.rows.clear()
        u.pending.clear()
        self.stats["interrupted"] += 1
        self._finish(u, interrupted=True, error=error)

    def _finish(self, u: Utterance, interrupted: bool, error: str = "") -> None:
        played = min(u.next_k, u.total) if u.total is not None else u.next_k
        self.events.append(Event("finished", {
            "utterance_id": u.id, "last_frame": u.last_frame, "interrupted": interrupted, "frames_played": played,
            "frames_total": u.total if u.total is not None else played, "played_ms": played * 1000.0 / timebase.FPS,
            "late_frames": u.late, "error": error, "frames_repeated": u.repeated,
            "dropped": interrupted and u.first_frame < 0}))

    # ------------------------------------------------------------------ the clock
    def _audio_of(self, u: Utterance, k: int) -> bytes:
        lo, hi = 2 * k * self.samples_per_frame - u.audio_base, 2 * (k + 1) * self.samples_per_frame - u.audio_base
        piece = bytes(u.out_audio[lo:hi])
        if lo >= 2 * timebase.FPS * self.samples_per_frame:  # a second has played: drop it (a long utterance holds
            del u.out_audio[:lo]                           # only what is still to play)
            u.audio_base += lo
        return piece + bytes(hi - lo - len(piece))  # the frames past the audio's end carry silence

    def _tick(self) -> Frame:
        """The frame of the current slot (and its events)."""
        index = self.slot
        self.slot += 1
        head = self.queue[0] if self.queue else None
        if head is None or head.start_pos is None or self.pos < head.start_pos:
            frame = self._idle(index, IDLE)
            self.pos += 1
            return frame
        k = head.next_k
        if head.total is not None and k >= head.total:  # the audio outlasts the video by up to 2 frames: its
            frame = self._idle(index, IDLE)               # tail plays over the avatar's own frames
            frame.audio, frame.utterance_id, frame.utterance_frame = self._audio_of(head, k), head.id, k
            self._advance(head, index)
            return frame
        shown = head.shows[k] if k < len(head.shows) else k  # the rendered frame this slot shows (degrade: earlier)
        data = head.rendered.get(shown)
        if data is None:  # not rendered in time: hold the position, shift the utterance by one slot
            head.late += 1
            self.events.append(Event("late", {"frame": index, "utterance_id": head.id}))
            frame = self._idle(index, HELD)
            frame.utterance_id = head.id
            return frame
        if k + 1 >= len(head.shows) or head.shows[k + 1] != shown:
            del head.rendered[shown]  # its last slot
        if shown != k:
            head.repeated += 1
            self.stats["repeated"] += 1
        if k == 0:
            head.first_frame = index
            waited = time.perf_counter() - (head.first_audio_at or time.perf_counter())
            self.events.append(Event("started", {"utterance_id": head.id, "first_frame": index,
                                                 "avatar_position": head.start_pos, "latency_ms": waited * 1e3,
                                                 "frame_stride": head.stride}))
        f = self.avatar.frame_for(head.start_pos + shown)  # the avatar frame the shown pixels were rendered on
        frame = Frame(index, self.pos, f, data, self._audio_of(head, k), SPEECH, head.id, k,
                      self.avatar.rects[f] if self.square else None)
        self._advance(head, index)
        return frame

    def _advance(self, head: Utterance, index: int) -> None:
        """One frame of the head utterance was shown; finish it after its last video and audio frame."""
        head.next_k += 1
        head.last_frame = index
        self.pos += 1
        if head.total is not None and head.next_k >= max(head.total, self._audio_frames(head)):
            self.queue.pop(0)
            self._finish(head, interrupted=False)

    def _audio_frames(self, u: Utterance) -> int:
        return -(-(u.audio_base + len(u.out_audio)) // (2 * self.samples_per_frame))

    def _idle(self, index: int, kind: str) -> Frame:
        f = self.avatar.frame_for(self.pos)
        return Frame(index, self.pos, f, self.idle[f], self.silence, kind)

    async def frames(self) -> AsyncIterator[tuple[Frame, list[Event]]]:
        """Frame n leaves at start + n × interval (monotonic clock, no drift) until the session closes. Sessions keep
        the phase they opened at: spread over the interval, the loop serves them one at a time instead of all at one
        tick (where the last would wait for every other session's frame: measured 340 vs 236 ms p99 at 200)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        self.started_at = time.perf_counter()
        worker = asyncio.ensure_future(self._feature_worker())
        try:
            while not self.closed.is_set():
                due = start + self.slot * self.interval
                if due > loop.time() and await self._sleep_until(loop, due):
                    break  # closed while waiting
                self.pacing.add(loop.time() - due)
                self._schedule()
                frame = self._tick()
                self.stats["frames"] += 1
                self.stats[frame.kind] += 1
                events, self.events = self.events, []
                yield frame, events
            self.interrupt()  # what the end of the session cut short: finished{interrupted, dropped if never shown}
            if self.events:  # said on one last frame, so a client's summary accounts for every utterance it sent
                frame = self._tick()
                self.stats["frames"] += 1
                self.stats[frame.kind] += 1
                events, self.events = self.events, []
                yield frame, events
            if self.error is not None:
                raise self.error
        finally:
            worker.cancel()
            self.scheduler.live_sessions.discard(self)
            self.interrupt()

    async def _sleep_until(self, loop: asyncio.AbstractEventLoop, due: float) -> bool:
        """Wait for the loop clock to reach `due`; True if the session closed first. One timer and one future a
        slot (a session at 25 fps wakes 25 times a second, so this is kept to the least the loop offers)."""
        self._sleeping = waiter = loop.create_future()
        timer = loop.call_at(due, _wake, waiter)
        try:
            return await waiter
        finally:
            timer.cancel()
            self._sleeping = None


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(False)


class Lateness:
    """How late a session's frames left against their slots, in whole milliseconds up to a second (one count per
    millisecond: fixed memory however long the session runs), for its p50/p99/max."""

    BUCKETS = 1000

    def __init__(self) -> None:
        self.counts = [0] * (self.BUCKETS + 1)  # the last bucket: a second or more
        self.n = 0
        self.max_s = 0.0

    def add(self, late_s: float) -> None:
        late_s = max(0.0, late_s)
        self.counts[min(self.BUCKETS, int(late_s * 1e3))] += 1
        self.n += 1
        self.max_s = max(self.max_s, late_s)

    def percentile_ms(self, q: float) -> float:
        """The upper edge of the millisecond bucket holding the q-th percentile (0 when nothing was counted)."""
        if not self.n:
            return 0.0
        rank, seen = math.ceil(q / 100 * self.n), 0
        for ms, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                return float(ms + 1)
        return float(self.BUCKETS)

    def summary(self) -> dict[str, float]:
        return {"pacing_late_ms_p50": self.percentile_ms(50), "pacing_late_ms_p99": self.percentile_ms(99),
                "pacing_late_ms_max": round(self.max_s * 1e3, 1)}


def admit(scheduler: ModelScheduler, config: LiveConfig) -> tuple[bool, str]:
    """Whether one more live session fits the model's measured capacity at the configured duty cycle. Sessions
    count from their construction, so an admission followed by `LiveSession(...)` with no await between is
    atomic."""
    sessions = len(scheduler.live_sessions)
    if sessions == 0:
        return True, "first live session of this model"
    capacity = scheduler.capacity_fps or 0.0
    need = (sessions + 1) * timebase.FPS / config.time_scale * config.duty_cycle
    if need <= capacity * config.headroom:
        return True, f"{need:.0f} of {capacity * config.headroom:.0f} frames/s"
    return False, (f"the model's device cannot sustain {sessions + 1} live sessions: they need {need:.0f} frames/s "
                   f"at a {config.duty_cycle:.0%} speaking duty cycle and {capacity:.0f} frames/s were measured "
                   f"({config.headroom:.0%} usable)")
