"""Pipecat: a video service that puts a lipsync avatar after the TTS in a Pipecat pipeline.

`LipsyncVideoService` holds one live session (Converse) on a lipsync server. It takes the TTS's audio frames
(`TTSAudioRawFrame`; a `TTSStoppedFrame` ends the utterance), and pushes downstream, at 25 fps from the session's
clock, the avatar as `OutputImageRawFrame` (RGB, pts = the frame's presentation time in ns) — idle between
utterances — and the utterance's audio as `TTSAudioRawFrame`, 40 ms with each speech frame, so the transport plays
the two together. An `InterruptionFrame` interrupts the session (the next frames are idle) and goes on downstream.
Needs `pip install './clients/python[pipecat]'` from a checkout (the server's `pip install -e '.[pipecat]'`
includes it).
"""
from __future__ import annotations

import asyncio
import itertools

import grpc

try:
    from pipecat.frames.frames import (
        CancelFrame,
        EndFrame,
        Frame,
        InterruptionFrame,
        OutputImageRawFrame,
        StartFrame,
        TTSAudioRawFrame,
        TTSStoppedFrame,
    )
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessorSetup
    from pipecat.services.ai_service import AIService
    from pipecat.services.settings import ServiceSettings
except ModuleNotFoundError as missing:  # the extra is not installed: say which
    raise ModuleNotFoundError(f"lipsync_client.pipecat needs pipecat-ai ({missing.name} is missing): "
                              "pip install './clients/python[pipecat]' (from a lipsync checkout)") from missing

from lipsync_client._proto import lipsync_pb2 as pb
from lipsync_client._proto import lipsync_pb2_grpc as pb_grpc
from lipsync_client.audio import MonoResampler
from lipsync_client.avatar import compositor_for, frame_rgb, output_value
from lipsync_client.connection import Credentials, channel, open_stream, routing


class LipsyncVideoService(AIService):
    """The avatar of `model` on the lipsync server at `server`, driven by the TTS audio that reaches it."""

    def __init__(self, *, server: str, model: str, credentials: Credentials | None = None, sample_rate: int = 0,
                 jpeg_quality: int = 0, start_frame: int = 0, end_timeout_s: float = 30.0, output: str = "full",
                 **kwargs):
        """`sample_rate`: of the session's audio, in and out (0: the pipeline's audio output rate); TTS audio at
        another rate is resampled to it. On `EndFrame` the utterances already sent play to their end (at most
        `end_timeout_s`) before the session closes. `output`: "full" (whole JPEG frames) or "square" (the server
        sends each speech frame's generated square only; pasted here onto the avatar's frames, fetched once)."""
        output_value(output)  # a name it knows, checked here rather than once the pipeline starts
        super().__init__(settings=ServiceSettings(model=None), **kwargs)
        self.output, self._compositor = output, None
        self.server, self.model, self.credentials = server, model, credentials
        self.sample_rate, self.jpeg_quality, self.start_frame = sample_rate, jpeg_quality, start_frame
        self.end_timeout_s = end_timeout_s
        self.session: pb.SessionInfo | None = None
        self._requests: asyncio.Queue[pb.ConverseRequest | None] = asyncio.Queue()
        self._channel = self._call = self._reader = None
        self._open_utterance: str | None = None
        self._ids = itertools.count(1)
        self._resample: MonoResampler | None = None
        self._playing: set[str] = set()  # utterances sent and not yet finished
        self._all_played = asyncio.Event()
        self._all_played.set()

    # ------------------------------------------------------------------ lifecycle
    async def setup(self, setup: FrameProcessorSetup) -> None:
        """Open the live session (loading the model on the server if it must)."""
        await super().setup(setup)
        self.sample_rate = self.sample_rate or setup.audio_out_sample_rate
        self._channel = channel(self.server, credentials=self.credentials)
        config = pb.ConverseConfig(model_id=self.model, start_frame=self.start_frame, jpeg_quality=self.jpeg_quality,
                                   output_sample_rate=self.sample_rate, output=output_value(self.output),
                                   format=pb.AudioFormat(encoding=pb.PCM_S16LE, sample_rate=self.sample_rate,
                                                         channels=1))
        stub = pb_grpc.LipSyncStub(self._channel)
        try:
            self._compositor = await compositor_for(stub, self.model, self.output, self.jpeg_quality)
            self._requests.put_nowait(pb.ConverseRequest(config=config))
            self._call = open_stream(stub.Converse, self._messages(), metadata=routing(self.model))
            first = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            await self.push_error(error_msg=f"lipsync session for {self.model!r} refused: {exc.code().name}: "
                                            f"{exc.details()}", exception=exc, fatal=True)
            return
        self.session = first.session

    async def _messages(self):
        while (message := await self._requests.get()) is not None:
            yield message

    async def stop(self, frame: EndFrame) -> None:
        """Graceful end: the utterances already sent play out, then the session closes."""
        await super().stop(frame)
        self._end_utterance()
        try:
            await asyncio.wait_for(self._all_played.wait(), self.end_timeout_s)
        except asyncio.TimeoutError:
            pass
        await self._close()

    async def cancel(self, frame: CancelFrame) -> None:
        await super().cancel(frame)
        await self._close()

    async def cleanup(self) -> None:
        await super().cleanup()
        await self._close()

    async def _close(self) -> None:
        self._requests.put_nowait(None)
        if self._reader is not None:
            await self.cancel_task(self._reader)
            self._reader = None
        if self._call is not None:
            self._call.cancel()
            self._call = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    # ------------------------------------------------------------------ frames in
    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame):
            await self.push_frame(frame, direction)
            if self.session is not None:  # the avatar's frames flow once the pipeline has started
                self._reader = self.create_task(self._read(), name="lipsync-frames")
        elif isinstance(frame, TTSAudioRawFrame):
            self._send_audio(frame)  # it comes back, with the video, as the avatar speaks
        elif isinstance(frame, TTSStoppedFrame):
            self._end_utterance()
            await self.push_frame(frame, direction)
        elif isinstance(frame, InterruptionFrame):
            self._interrupt()
            await self.push_frame(frame, direction)
        else:
            await self.push_frame(frame, direction)

    def _send_audio(self, frame: TTSAudioRawFrame) -> None:
        if self._open_utterance is None:
            self._open_utterance = f"tts-{next(self._ids)}"
            self._playing.add(self._open_utterance)
            self._all_played.clear()
            self._requests.put_nowait(pb.ConverseRequest(
                start_utterance=pb.UtteranceStart(utterance_id=self._open_utterance)))
        self._requests.put_nowait(pb.ConverseRequest(audio=self._session_pcm(frame)))

    def _session_pcm(self, frame: TTSAudioRawFrame) -> bytes:
        """TTS audio (s16, any rate and channel count) → s16 mono at the session rate."""
        if self._resample is None:
            self._resample = MonoResampler(self.sample_rate)
        return self._resample(frame.audio, frame.sample_rate, frame.num_channels)

    def _end_utterance(self) -> None:
        if self._open_utterance is not None:
            self._requests.put_nowait(pb.ConverseRequest(end_utterance=True))
            self._open_utterance = None

    def _interrupt(self) -> None:
        self._open_utterance = None
        self._playing.clear()
        self._all_played.set()
        self._requests.put_nowait(pb.ConverseRequest(interrupt=True))

    # ------------------------------------------------------------------ frames out
    async def _read(self) -> None:
        """Session frames → image frames (every slot) and TTS audio frames (an utterance's slots)."""
        rate = self.session.output_sample_rate
        try:
            while (response := await self._call.read()) is not grpc.aio.EOF:
                live = response.frame
                rgb = frame_rgb(live, self._compositor)
                image = OutputImageRawFrame(image=rgb.tobytes(),
                                            size=(rgb.shape[1], rgb.shape[0]), format="RGB")
                image.pts = int(live.pts_ms * 1e6)
                await self.push_frame(image)
                if live.utterance_id and live.audio:
                    speech = TTSAudioRawFrame(audio=live.audio, sample_rate=rate, num_channels=1)
                    speech.pts = image.pts
                    await self.push_frame(speech)
                for event in response.events:
                    if event.WhichOneof("event") == "finished":
                        self._playing.discard(event.finished.utterance_id)
                        if not self._playing:
                            self._all_played.set()
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                await self.push_error(error_msg=f"lipsync session ended: {exc.code().name}: {exc.details()}",
                                      exception=exc)
