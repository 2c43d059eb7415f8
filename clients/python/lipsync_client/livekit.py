"""LiveKit Agents: a `VideoGenerator` for `AvatarRunner`, backed by a lipsync live session (Converse).

The agent's speech is pushed in with `push_audio` (each segment becomes an utterance, `AudioSegmentEnd` ends it) and
`clear_buffer` interrupts it. Iterating yields the avatar at 25 fps, idle between utterances (`rtc.VideoFrame`,
RGB24), the audio each speech frame carries (`rtc.AudioFrame`, mono s16 at the input's sample rate) and
`AudioSegmentEnd` once an utterance has played to its end. Needs `pip install './clients/python[livekit]'` from a
checkout (the server's `pip install -e '.[livekit]'` includes it).
"""
from __future__ import annotations

import asyncio
import itertools
from typing import AsyncIterator

try:
    from livekit import rtc
    from livekit.agents.voice.avatar import AudioSegmentEnd, VideoGenerator
except ModuleNotFoundError as missing:  # the extra is not installed: say which
    raise ModuleNotFoundError(f"lipsync_client.livekit needs livekit-agents ({missing.name} is missing): "
                              "pip install './clients/python[livekit]' (from a lipsync checkout)") from missing

from lipsync_client._proto import lipsync_pb2 as pb
from lipsync_client._proto import lipsync_pb2_grpc as pb_grpc
from lipsync_client.avatar import compositor_for, frame_rgb, output_value
from lipsync_client.connection import Credentials, channel, open_stream, routing


class LipsyncVideoGenerator(VideoGenerator):
    """One live session on a lipsync server for one avatar participant. `start()` opens it; `aclose()` ends it."""

    def __init__(self, server: str, model: str, *, sample_rate: int = 24000, channels: int = 1,
                 credentials: Credentials | None = None, jpeg_quality: int = 0, start_frame: int = 0,
                 output: str = "full"):
        """`output`: "full" (whole JPEG frames) or "square" (the server sends each speech frame's generated square
        only, about a tenth of the bytes; this generator pastes it onto the avatar's frames, fetched once)."""
        output_value(output)  # a name it knows, checked here rather than once the session opens
        self.output, self._compositor = output, None
        self.server, self.model, self.sample_rate, self.channels = server, model, sample_rate, channels
        self.credentials, self.jpeg_quality, self.start_frame = credentials, jpeg_quality, start_frame
        self.session: pb.SessionInfo | None = None
        self._requests: asyncio.Queue[pb.ConverseRequest | None] = asyncio.Queue()
        self._segment: str | None = None  # utterance id of the segment being pushed
        self._interrupted: set[str] = set()
        self._ids = itertools.count(1)
        self._channel = self._call = self._responses = self._first = None
        self.width = self.height = 0  # of the video, known once started

    async def start(self) -> pb.SessionInfo:
        """Open the live session; returns its SessionInfo (fps, frame interval, avatar frames, device)."""
        self._channel = channel(self.server, credentials=self.credentials)
        config = pb.ConverseConfig(model_id=self.model, start_frame=self.start_frame, jpeg_quality=self.jpeg_quality,
                                   output_sample_rate=self.sample_rate, output=output_value(self.output),
                                   format=pb.AudioFormat(encoding=pb.PCM_S16LE, sample_rate=self.sample_rate,
                                                         channels=self.channels))
        stub = pb_grpc.LipSyncStub(self._channel)
        self._compositor = await compositor_for(stub, self.model, self.output, self.jpeg_quality)
        self._requests.put_nowait(pb.ConverseRequest(config=config))
        self._call = open_stream(stub.Converse, self._messages(), metadata=routing(self.model))
        self._responses = self._call.__aiter__()
        self.session = (await self._responses.__anext__()).session
        self._first = await self._responses.__anext__()  # frame 0: its size is the video's (AvatarOptions)
        self.height, self.width = frame_rgb(self._first.frame, self._compositor).shape[:2]
        return self.session

    async def _messages(self) -> AsyncIterator[pb.ConverseRequest]:
        while (message := await self._requests.get()) is not None:
            yield message

    async def push_audio(self, frame: rtc.AudioFrame | AudioSegmentEnd) -> None:
        if isinstance(frame, AudioSegmentEnd):
            if self._segment is not None:
                self._requests.put_nowait(pb.ConverseRequest(end_utterance=True))
                self._segment = None
            return
        if frame.sample_rate != self.sample_rate or frame.num_channels != self.channels:
            raise ValueError(f"audio at {frame.sample_rate} Hz × {frame.num_channels} channel(s); this session takes "
                             f"{self.sample_rate} Hz × {self.channels} (set LipsyncVideoGenerator's sample_rate and "
                             "channels)")
        if self._segment is None:
            self._segment = f"segment-{next(self._ids)}"
            self._requests.put_nowait(pb.ConverseRequest(start_utterance=pb.UtteranceStart(
                utterance_id=self._segment)))
        self._requests.put_nowait(pb.ConverseRequest(audio=bytes(frame.data.cast("B"))))

    def clear_buffer(self) -> None:
        """Stop the utterance playing (and drop queued ones): the next frames are idle."""
        if self._segment is not None:
            self._interrupted.add(self._segment)
            self._segment = None
        self._requests.put_nowait(pb.ConverseRequest(interrupt=True))

    def __aiter__(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        return self._frames()

    async def _responses_from_start(self) -> AsyncIterator[pb.ConverseResponse]:
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        async for response in self._responses:
            yield response

    async def _frames(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        async for response in self._responses_from_start():
            live = response.frame
            rgb = frame_rgb(live, self._compositor)
            yield rtc.VideoFrame(rgb.shape[1], rgb.shape[0], rtc.VideoBufferType.RGB24, rgb.tobytes())
            if live.utterance_id and live.audio:  # an utterance's audio (idle frames carry silence: not sent)
                yield rtc.AudioFrame(live.audio, self.session.output_sample_rate, 1, len(live.audio) // 2)
            for event in response.events:
                finished = event.finished if event.HasField("finished") else None
                if finished is not None and not finished.interrupted and \
                        finished.utterance_id not in self._interrupted:
                    yield AudioSegmentEnd()

    async def aclose(self) -> None:
        """End the session (the server closes it when the request stream ends)."""
        self._requests.put_nowait(None)
        if self._call is not None:
            self._call.cancel()
        if self._channel is not None:
            await self._channel.close()
