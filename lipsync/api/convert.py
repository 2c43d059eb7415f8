"""Protocol buffers ↔ lipsync's own types, in one place: audio formats, the client's streaming messages, frames,
timings, live events, model and device descriptions. Services call these and hold no message-building code."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

import torch

from lipsync import timebase
from lipsync._proto import lipsync_pb2 as pb
from lipsync.codec.audio import AudioFormat
from lipsync.errors import InvalidRequest
from lipsync.runtime.messages import (
    Audio,
    EndOfAudio,
    EndUtterance,
    Interrupt,
    LiveMessage,
    StartUtterance,
    StreamMessage,
)

if TYPE_CHECKING:
    from lipsync.api.limits import Limits
    from lipsync.runtime.live import Event, Frame, LiveSession
    from lipsync.runtime.registry import ModelEntry, Registry

# Audio encodings on the wire, proto enum → codec name (UNSPECIFIED means s16le, SPEC §9); the other way round is
# lipsync_client.audio.format_message, which clients use.
ENCODING_NAMES = {pb.AUDIO_ENCODING_UNSPECIFIED: "s16le", pb.PCM_S16LE: "s16le", pb.PCM_F32LE: "f32le", pb.WAV: "wav"}
FRAME_KINDS = {"idle": pb.IDLE, "speech": pb.SPEECH, "held": pb.HELD}
MAX_UTTERANCE_ID = 256  # characters of a client's utterance id kept (it is echoed in events and logs)


# --------------------------------------------------------------------------- requests → domain
def square_output(output: int) -> bool:
    """A request's FrameOutput: whether it asked for SQUARE output (an unknown enum value is refused by name)."""
    if output not in (pb.FULL_FRAME, pb.SQUARE):
        raise InvalidRequest(f"output {output} is not a FrameOutput; use FULL_FRAME ({pb.FULL_FRAME}) or SQUARE "
                             f"({pb.SQUARE})")
    return output == pb.SQUARE


def audio_format(limits: Limits, fmt: pb.AudioFormat, allow_wav: bool) -> AudioFormat:
    """A request's audio format, checked (an unknown enum value is refused by name)."""
    return limits.audio_format(ENCODING_NAMES.get(fmt.encoding), fmt.sample_rate, fmt.channels, allow_wav)



STREAM_MESSAGES: dict[str, Callable[[Any], StreamMessage]] = {
    "audio": lambda m: Audio(m.audio),
    "end_of_audio": lambda m: EndOfAudio(),
}
LIVE_MESSAGES: dict[str, Callable[[Any], LiveMessage]] = {
    "audio": lambda m: Audio(m.audio),
    "start_utterance": lambda m: StartUtterance(m.start_utterance.utterance_id[:MAX_UTTERANCE_ID],
                                                m.start_utterance.interrupt),
    "end_utterance": lambda m: EndUtterance(),
    "interrupt": lambda m: Interrupt(),
}


async def _parsed(requests: AsyncIterator, parsers: dict[str, Callable], rpc: str) -> AsyncIterator:
    """A streaming call's messages after its config, as runtime messages; a second config, or a message with
    none of its fields set, breaks the protocol."""
    async for message in requests:
        kind = message.WhichOneof("message")
        if kind == "config":
            raise InvalidRequest("config may only be sent once, as the first message")
        if kind not in parsers:
            raise InvalidRequest(f"empty {rpc} message: set {' or '.join(parsers)}")
        yield parsers[kind](message)


def stream_messages(requests: AsyncIterator[pb.StreamRequest]) -> AsyncIterator[StreamMessage]:
    return _parsed(requests, STREAM_MESSAGES, "stream")


def live_messages(requests: AsyncIterator[pb.ConverseRequest]) -> AsyncIterator[LiveMessage]:
    return _parsed(requests, LIVE_MESSAGES, "Converse")


# --------------------------------------------------------------------------- domain → responses
def timings(t: dict[str, float]) -> pb.StageTimings:
    return pb.StageTimings(audio_ms=t.get("audio", 0), queue_ms=t.get("queue", 0), inference_ms=t.get("inference", 0),
                           composite_ms=t.get("composite", 0), encode_ms=t.get("encode", 0),
                           total_ms=t.get("total", 0), batch_size=int(t.get("batch_size", 0)))


def rect(corners: list[int] | tuple[int, ...] | None) -> pb.Rect | None:
    """An avatar crop rectangle [x1, y1, x2, y2] as a Rect (x, y, width, height); None stays None."""
    if corners is None:
        return None
    x1, y1, x2, y2 = corners
    return pb.Rect(x=x1, y=y1, width=x2 - x1, height=y2 - y1)


def frames(first_index: int, avatar_frames: list[int], jpegs: list[bytes],
           squares: list[list[int]] | None = None) -> list[pb.Frame]:
    """Frames of a response; `squares` (SQUARE output): each frame's crop rectangle, where its JPEG goes."""
    return [pb.Frame(index=first_index + k, avatar_frame=f, jpeg=j, pts_ms=(first_index + k) * timebase.FRAME_MS,
                     square=rect(squares[k]) if squares is not None else None)
            for k, (f, j) in enumerate(zip(avatar_frames, jpegs))]


def avatar_frame(index: int, count: int, jpeg: bytes, corners: list[int], width: int, height: int) -> pb.AvatarFrame:
    return pb.AvatarFrame(index=index, frame_count=count, jpeg=jpeg, square=rect(corners), width=width, height=height)


def session_info(session: LiveSession, entry: ModelEntry, loaded_now: bool, load_ms: float) -> pb.SessionInfo:
    return pb.SessionInfo(session_id=session.id, fps=timebase.FPS, frame_interval_ms=session.interval * 1e3,
                          output_sample_rate=session.out_rate, samples_per_frame=session.samples_per_frame,
                          avatar_frames=session.avatar.frame_count, device=entry.device, model_loaded=loaded_now,
                          model_load_ms=load_ms if loaded_now else 0)


def event(e: Event) -> pb.ConverseEvent:
    if e.kind == "started":
        return pb.ConverseEvent(started=pb.UtteranceStarted(**e.fields))
    if e.kind == "finished":
        return pb.ConverseEvent(finished=pb.UtteranceFinished(**e.fields))
    return pb.ConverseEvent(late=pb.LateFrame(**e.fields))


def live_frame(frame: Frame, events: list[Event]) -> pb.ConverseResponse:
    return pb.ConverseResponse(frame=pb.LiveFrame(
        index=frame.index, pts_ms=frame.index * timebase.FRAME_MS, avatar_position=frame.avatar_position,
        avatar_frame=frame.avatar_frame, jpeg=frame.jpeg, audio=frame.audio, kind=FRAME_KINDS[frame.kind],
        utterance_id=frame.utterance_id, utterance_frame=max(frame.utterance_frame, 0), square=rect(frame.square)),
        events=[event(e) for e in events])


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _length_tag(message: Any, field_name: str) -> bytes:
    """The wire tag of a length-delimited field (wire type 2), from the message's own descriptor."""
    return _varint(message.DESCRIPTOR.fields_by_name[field_name].number << 3 | 2)


_FRAME_TAG, _JPEG_TAG, _AUDIO_TAG = (_length_tag(pb.ConverseResponse, "frame"), _length_tag(pb.LiveFrame, "jpeg"),
                                     _length_tag(pb.LiveFrame, "audio"))
_FRAMES_TAG, _FRAME_JPEG_TAG = _length_tag(pb.StreamResponse, "frames"), _length_tag(pb.Frame, "jpeg")


def live_frame_bytes(frame: Frame, events: list[Event]) -> bytes:
    """`live_frame` as wire bytes, the JPEG and audio copied once (into the result) rather than into a message and
    again out of it: the frame's small fields are serialized by protobuf, the two byte fields are appended (fields
    may come in any order on the wire), and the events follow as a serialized ConverseResponse of their own (two
    serialized parts of one message concatenate to their merge). Parses to exactly `live_frame(...)`."""
    head = pb.LiveFrame(index=frame.index, pts_ms=frame.index * timebase.FRAME_MS,
                        avatar_position=frame.avatar_position, avatar_frame=frame.avatar_frame,
                        kind=FRAME_KINDS[frame.kind], utterance_id=frame.utterance_id,
                        utterance_frame=max(frame.utterance_frame, 0), square=rect(frame.square)).SerializeToString()
    parts = [head]
    for tag, data in ((_JPEG_TAG, frame.jpeg), (_AUDIO_TAG, frame.audio)):
        if data:  # proto3 leaves empty bytes off the wire
            parts += (tag, _varint(len(data)), data)
    size = sum(len(p) for p in parts)
    tail = pb.ConverseResponse(events=[event(e) for e in events]).SerializeToString() if events else b""
    return b"".join((_FRAME_TAG, _varint(size), *parts, tail))


def stream_response_bytes(first_index: int, avatar_frames: list[int], jpegs: list[bytes], t: dict[str, float],
                          squares: list[list[int]] | None = None, **fields: Any) -> bytes:
    """A StreamResponse of frames as wire bytes, each JPEG copied once (into the result): every Frame's small
    fields serialized by protobuf with its JPEG appended, then the timings and `fields` as a serialized
    StreamResponse of their own (parts of one message concatenate to their merge). Parses to exactly
    `StreamResponse(frames=frames(...), timings=timings(t), **fields)`."""
    parts: list[bytes] = []
    for k, (f, data) in enumerate(zip(avatar_frames, jpegs)):
        index = first_index + k
        head = pb.Frame(index=index, avatar_frame=f, pts_ms=index * timebase.FRAME_MS,
                        square=rect(squares[k]) if squares is not None else None).SerializeToString()
        body = (head, _FRAME_JPEG_TAG, _varint(len(data)), data) if data else (head,)
        parts += (_FRAMES_TAG, _varint(sum(len(b) for b in body)), *body)
    parts.append(pb.StreamResponse(timings=timings(t), **fields).SerializeToString())
    return b"".join(parts)


def unix_ms(monotonic_s: float) -> int:
    """A time.monotonic() instant as Unix milliseconds (0 stays 0: never)."""
    return int((time.time() - (time.monotonic() - monotonic_s)) * 1e3) if monotonic_s else 0


def model_info(e: ModelEntry) -> pb.ModelInfo:
    return pb.ModelInfo(model_id=e.spec.name, loaded=e.loaded, device=e.device, memory_bytes=e.memory_bytes,
                        requests=e.requests, frames=e.frames, load_ms=e.load_ms, last_used_unix_ms=unix_ms(e.last_used),
                        pinned=e.pinned, backend=e.pipeline.generator.backend if e.pipeline else "",
                        variant=e.spec.variant, avatar_frames=e.pipeline.avatar.frame_count if e.pipeline else 0,
                        in_flight=e.in_flight)


def model_stats(e: ModelEntry) -> pb.ModelStats:
    stages = {k: pb.LatencySummary(mean_ms=v["mean"], p50_ms=v["p50"], p95_ms=v["p95"], count=v["count"])
              for k, v in e.latency_summary().items()}
    return pb.ModelStats(info=model_info(e), stages=stages)


def devices(registry: Registry) -> list[pb.DeviceInfo]:
    out = []
    for d in registry.devices:
        cuda = d.startswith("cuda")
        out.append(pb.DeviceInfo(device=d, name=torch.cuda.get_device_name(d) if cuda else "cpu",
                                 memory_used_bytes=registry.used_bytes(d),
                                 memory_budget_bytes=int(registry.config.memory_budget_mb * 2**20),
                                 memory_total_bytes=torch.cuda.get_device_properties(d).total_memory if cuda else 0,
                                 loaded_models=len(registry.loaded_on(d))))
    return out
