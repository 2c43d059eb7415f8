"""The three calls as a client makes them: Synthesize (whole audio), Stream (chunks in, frames out) and Converse (a
live session at 25 fps with utterances, barge-in and idle motion), with what each measured."""
from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

from lipsync_client._proto import lipsync_pb2 as pb
from lipsync_client._proto import lipsync_pb2_grpc as pb_grpc
from lipsync_client.audio import AudioFormat, format_message
from lipsync_client.connection import open_stream, routing, worker_of
from lipsync_client.timing import FPS, FRAME_MS, LOOKAHEAD_SAMPLES, SAMPLE_RATE, SAMPLES_PER_FRAME


@dataclass
class SessionResult:
    frames: list[pb.Frame] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)  # per frame (stream) or per request (unary)
    stage_ms: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    model_load_ms: float = 0.0
    workers: set[str] = field(default_factory=set)  # x-lipsync-worker of the server(s) that answered


def _add(stage_ms: dict[str, float], timings: pb.StageTimings) -> None:
    for name in ("audio", "queue", "inference", "composite", "encode", "total"):
        stage_ms[name] = stage_ms.get(name, 0.0) + getattr(timings, f"{name}_ms")


async def synthesize(stub: pb_grpc.LipSyncStub, model: str, pcm: bytes, fmt: AudioFormat,
                     batch_frames: int = 0, start_frame: int = 0, quality: int = 0,
                     timeout: float | None = None, output: int = pb.FULL_FRAME) -> SessionResult:
    """Whole audio in one Synthesize, or chunks of `batch_frames` frames, each its own request. `output`:
    pb.FULL_FRAME or pb.SQUARE (only each frame's generated square; `Compositor` pastes it back)."""
    result, t0 = SessionResult(), time.perf_counter()
    step = batch_frames * SAMPLES_PER_FRAME * fmt.sample_rate // SAMPLE_RATE * fmt.frame_bytes \
        if batch_frames else len(pcm)
    audio_format = format_message(fmt)
    offset = 0
    for lo in range(0, len(pcm), step):
        sent = time.perf_counter()
        call = stub.Synthesize(pb.SynthesizeRequest(
            model_id=model, audio=pcm[lo:lo + step], format=audio_format, start_frame=start_frame + offset,
            jpeg_quality=quality, output=output), timeout=timeout, metadata=routing(model))
        response = await call
        result.workers.add(await worker_of(call))
        result.latencies_ms.append((time.perf_counter() - sent) * 1e3)
        for f in response.frames:
            result.frames.append(pb.Frame(index=offset + f.index, avatar_frame=f.avatar_frame, jpeg=f.jpeg,
                                          pts_ms=(offset + f.index) * FRAME_MS,
                                          square=f.square if f.HasField("square") else None))
        offset += len(response.frames)
        _add(result.stage_ms, response.timings)
        result.model_load_ms += response.model_load_ms
    result.wall_s = time.perf_counter() - t0
    return result


async def stream(stub: pb_grpc.LipSyncStub, model: str, pcm: bytes, fmt: AudioFormat, chunk_ms: float = 40,
                 realtime: bool = False, start_frame: int = 0, quality: int = 0, timeout: float | None = None,
                 send_end: bool = True, progress: Callable[[int], None] | None = None,
                 output: int = pb.FULL_FRAME) -> SessionResult:
    """Stream the audio in `chunk_ms` chunks (paced in real time if asked); frame latency is measured from
    the moment the audio a frame needs (its 450 ms look-ahead) was sent. `output`: as for `synthesize`."""
    result, t0 = SessionResult(), time.perf_counter()
    chunk = max(fmt.frame_bytes, int(fmt.sample_rate * chunk_ms / 1000) * fmt.frame_bytes)
    sent_at: list[tuple[int, float]] = []  # (16 kHz samples sent so far, time)
    total_samples = len(pcm) // fmt.frame_bytes * SAMPLE_RATE // fmt.sample_rate

    async def requests():
        yield pb.StreamRequest(config=pb.StreamConfig(
            model_id=model, start_frame=start_frame, jpeg_quality=quality, output=output,
            format=format_message(fmt)))
        started = time.perf_counter()
        for lo in range(0, len(pcm), chunk):
            if realtime:
                due = started + lo / fmt.frame_bytes / fmt.sample_rate
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
            yield pb.StreamRequest(audio=pcm[lo:lo + chunk])
            sent_at.append((min(lo + chunk, len(pcm)) // fmt.frame_bytes * SAMPLE_RATE // fmt.sample_rate,
                            time.perf_counter()))
        if send_end:
            yield pb.StreamRequest(end_of_audio=True)
            sent_at.append((1 << 62, time.perf_counter()))

    def needed_at(index: int) -> float:
        need = min(index * SAMPLES_PER_FRAME + LOOKAHEAD_SAMPLES, total_samples)
        for samples, when in sent_at:
            if samples >= need:
                return when
        return sent_at[-1][1]

    call = open_stream(stub.Stream, requests(), timeout=timeout, metadata=routing(model))
    async for response in call:
        now = time.perf_counter()
        for f in response.frames:
            result.frames.append(f)
            result.latencies_ms.append((now - needed_at(f.index)) * 1e3)
        if progress and response.frames:
            progress(len(response.frames))
        if response.frames:
            _add(result.stage_ms, response.timings)
        result.model_load_ms += response.model_load_ms
        if response.end_of_stream:
            break
    result.workers.add(await worker_of(call))
    result.wall_s = time.perf_counter() - t0
    return result


@dataclass
class Say:
    """One utterance of a conversation: its audio, when it is sent (seconds from the session's start), and
    optionally when the client barges in on it."""
    pcm: bytes
    fmt: AudioFormat
    at: float = 0.0
    interrupt_at: float | None = None
    id: str = ""
    barge_in: bool = False  # start with interrupt=true (drops whatever is still playing)


@dataclass
class ConverseResult:
    session: pb.SessionInfo
    frames: list[pb.LiveFrame] = field(default_factory=list)
    received_s: list[float] = field(default_factory=list)  # arrival of each frame, seconds after the session info
    events: list[tuple[int, pb.ConverseEvent]] = field(default_factory=list)  # (frame index, event)
    closed_s: float = 0.0  # when this client half-closed (ending the session), seconds after the session info

    def summary(self) -> dict:
        """Per-utterance latency/interruption, late frames and pacing, as a JSON-able dict."""
        kinds = {name: sum(f.kind == value for f in self.frames)
                 for name, value in (("idle", pb.IDLE), ("speech", pb.SPEECH), ("held", pb.HELD))}
        interval = self.session.frame_interval_ms / 1e3
        offsets = [(t - self.received_s[0]) - (f.index - self.frames[0].index) * interval
                   for f, t in zip(self.frames, self.received_s)] if self.frames else []
        utterances: dict[str, dict] = {}
        for index, event in self.events:
            kind = event.WhichOneof("event")
            body = getattr(event, kind)
            if kind == "started":
                utterances.setdefault(body.utterance_id, {}).update(
                    first_frame=body.first_frame, first_frame_latency_ms=round(body.latency_ms, 1),
                    frame_stride=body.frame_stride or 1)
            elif kind == "finished":
                outcome = "dropped" if body.dropped else "interrupted" if body.interrupted else "played"
                utterances.setdefault(body.utterance_id, {}).update(
                    outcome=outcome, last_frame=body.last_frame, interrupted=body.interrupted,
                    frames_played=body.frames_played, frames_total=body.frames_total, played_ms=body.played_ms,
                    late_frames=body.late_frames, frames_repeated=body.frames_repeated,
                    **({"error": body.error} if body.error else {}))
        return {"frames": len(self.frames), **kinds, "late_frames": kinds["held"],
                "frame_interval_ms": round(self.session.frame_interval_ms, 3),
                "pacing_ms": {"max_late": round(max(offsets, default=0) * 1e3, 1),
                              "max_early": round(-min(offsets, default=0) * 1e3, 1)},
                "utterances": utterances}


async def converse(stub: pb_grpc.LipSyncStub, model: str, utterances: list[Say], duration_s: float,
                   start_frame: int = 0, quality: int = 0, output_rate: int = 0, realtime: bool = False,
                   chunk_ms: float = 40.0, timeout: float | None = None, metadata=None,
                   progress: Callable[[int], None] | None = None, keep_images: bool = True,
                   until_played: bool = False, output: int = pb.FULL_FRAME) -> ConverseResult:
    """Run one live session for `duration_s` media seconds, sending each utterance at its time (all at once, as
    a TTS faster than real time would, or paced in real time), and collect every frame and event (without their
    JPEG and audio bytes if not `keep_images`: a load test of many sessions keeps only what it measures).
    `until_played`: close as soon as every utterance has finished, `duration_s` being the longest to wait (the
    server plans an utterance's start from its measured speed, so a slow or busy device starts it later).
    `output`: pb.FULL_FRAME or pb.SQUARE (speech frames carry their square only, idle frames no JPEG)."""
    if not utterances:
        fmt = AudioFormat("s16le", SAMPLE_RATE, 1)
    else:
        fmt = utterances[0].fmt
        if any(u.fmt != fmt for u in utterances):
            raise ValueError("every utterance of a session must have the same audio format")
    ready, played = asyncio.Event(), asyncio.Event()
    scale = [1.0]
    finished = 0

    def plan() -> list[tuple[float, pb.ConverseRequest]]:
        """Every message with its send time (media seconds), in order; an utterance stops at its barge-in."""
        timed = []
        chunk = max(fmt.frame_bytes, int(fmt.sample_rate * chunk_ms / 1000) * fmt.frame_bytes)
        for k, u in enumerate(utterances):
            stop = u.interrupt_at if u.interrupt_at is not None else float("inf")
            timed.append((u.at, 3 * k, pb.ConverseRequest(start_utterance=pb.UtteranceStart(
                utterance_id=u.id, interrupt=u.barge_in))))
            t = u.at
            for lo in range(0, len(u.pcm), chunk):
                t = u.at + lo / fmt.frame_bytes / fmt.sample_rate if realtime else u.at
                if t >= stop:
                    break
                timed.append((t, 3 * k + 1, pb.ConverseRequest(audio=u.pcm[lo:lo + chunk])))
            else:
                timed.append((t, 3 * k + 1, pb.ConverseRequest(end_utterance=True)))
            if u.interrupt_at is not None:
                timed.append((u.interrupt_at, 3 * k + 2, pb.ConverseRequest(interrupt=True)))
        return [(t, m) for t, _, m in sorted(timed, key=lambda x: (x[0], x[1]))]

    async def requests():
        yield pb.ConverseRequest(config=pb.ConverseConfig(
            model_id=model, start_frame=start_frame, jpeg_quality=quality, output_sample_rate=output_rate,
            format=format_message(fmt), output=output))
        await ready.wait()
        origin = time.perf_counter()
        for t, message in plan() + [(duration_s, None)]:
            wait = max(0.0, origin + t * scale[0] - time.perf_counter())
            if message is None and until_played and utterances:
                try:
                    await asyncio.wait_for(played.wait(), wait)
                except asyncio.TimeoutError:
                    pass
            else:
                await asyncio.sleep(wait)
            if message is None:
                if result is not None:
                    result.closed_s = time.perf_counter() - origin
                return  # half-close: the session ends
            yield message

    result: ConverseResult | None = None
    origin = 0.0
    async for response in open_stream(stub.Converse, requests(), timeout=timeout, metadata=routing(model, metadata)):
        now = time.perf_counter()
        if response.HasField("session"):
            result, origin = ConverseResult(response.session), now
            scale[0] = response.session.frame_interval_ms / 1e3 * FPS
            ready.set()
            continue
        assert result is not None, "the first Converse response carries the session info"
        if not keep_images:
            response.frame.ClearField("jpeg")
            response.frame.ClearField("audio")
        result.frames.append(response.frame)
        result.received_s.append(now - origin)
        if progress:
            progress(1)
        result.events.extend((response.frame.index, e) for e in response.events)
        finished += sum(e.WhichOneof("event") == "finished" for e in response.events)
        if finished >= len(utterances):
            played.set()
    if result is None:
        raise RuntimeError("the live session ended before it started")
    return result


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else 0.0


def summarize(results: list[SessionResult], wall_s: float) -> dict:
    frames = sum(len(r.frames) for r in results)
    latencies = [x for r in results for x in r.latencies_ms]
    stages = {}
    for r in results:
        for k, v in r.stage_ms.items():
            stages[k] = stages.get(k, 0.0) + v
    return {"sessions": len(results), "frames": frames, "wall_s": round(wall_s, 3),
            "fps": round(frames / wall_s, 2) if wall_s else 0.0,
            "jpeg_bytes_per_frame": round(sum(len(f.jpeg) for r in results for f in r.frames) / max(frames, 1)),
            "latency_ms": {"p50": round(percentile(latencies, 50), 1), "p95": round(percentile(latencies, 95), 1),
                           "p99": round(percentile(latencies, 99), 1),
                           "mean": round(statistics.fmean(latencies), 1) if latencies else 0.0},
            "stage_ms_per_frame": {k: round(v / max(frames, 1), 2) for k, v in stages.items()},
            "workers": sorted(set().union(*(r.workers for r in results)) - {""})}
