"""A Pipecat pipeline with a lipsync avatar after its TTS, runnable as it is against a lipsync server.

    pip install "./clients/python[pipecat]"          # or, with the server: pip install -e ".[pipecat]"
    python examples/pipecat_avatar.py --server 127.0.0.1:50051 --model demo --audio assets/speech.wav

A real agent puts `LipsyncVideoService` between its TTS and its transport:

    Pipeline([transport.input(), stt, context_aggregator.user(), llm, tts, avatar, transport.output(),
              context_aggregator.assistant()])

Here a WAV file stands in for the TTS (its audio is pushed as the TTS's frames would be: TTSStartedFrame,
TTSAudioRawFrame chunks, TTSStoppedFrame) and a small sink stands in for the transport: it counts the avatar's
video frames (RGB, 25 fps) and the speech audio that comes back with them, and prints what it saw.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import wave

from lipsync_client.pipecat import LipsyncVideoService
from pipecat.frames.frames import (
    EndFrame,
    Frame,
    OutputImageRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner


class Sink(FrameProcessor):
    """Where a transport would play the frames: counts the video frames and the speech audio that comes with them,
    and says when the utterance has played (idle video, no audio, for half a second after its audio)."""

    def __init__(self) -> None:
        super().__init__()
        self.images, self.audio_bytes, self.size, self.quiet = 0, 0, None, 0
        self.started, self.done = asyncio.Event(), asyncio.Event()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, OutputImageRawFrame):  # the session's video, 25 fps: idle until the TTS speaks
            self.images, self.size, self.quiet = self.images + 1, frame.size, self.quiet + 1
            self.started.set()
            if self.audio_bytes and self.quiet > 12:
                self.done.set()
        elif isinstance(frame, TTSAudioRawFrame):  # a speech frame's own 40 ms of the utterance
            self.audio_bytes += len(frame.audio)
            self.quiet = 0
        await self.push_frame(frame, direction)


def tts_frames(path: str, ms: int = 20) -> tuple[list[Frame], int, int]:
    """A 16-bit mono WAV as a TTS would send it: (frames, sample rate, audio bytes)."""
    with wave.open(path, "rb") as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise SystemExit(f"{path}: this example takes 16-bit mono WAV")
        rate, pcm = w.getframerate(), w.readframes(w.getnframes())
    step = 2 * rate * ms // 1000
    chunks = [TTSAudioRawFrame(audio=pcm[k:k + step], sample_rate=rate, num_channels=1)
              for k in range(0, len(pcm), step)]
    return [TTSStartedFrame(), *chunks, TTSStoppedFrame()], rate, len(pcm)


async def main(args: argparse.Namespace) -> dict:
    frames, rate, audio_bytes = tts_frames(args.audio)
    avatar = LipsyncVideoService(server=args.server, model=args.model, output=args.output)
    sink = Sink()
    worker = PipelineWorker(Pipeline([avatar, sink]), cancel_on_idle_timeout=False,
                            params=PipelineParams(audio_out_sample_rate=args.sample_rate))
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    running = asyncio.ensure_future(runner.run())
    try:
        await asyncio.wait_for(sink.started.wait(), args.timeout)  # the avatar is on screen (its live session open)
        for frame in frames:  # the "TTS" speaks
            await worker.queue_frame(frame)
        await asyncio.wait_for(sink.done.wait(), args.timeout)
    finally:
        await worker.queue_frame(EndFrame())
        await asyncio.wait_for(running, 60)
    return {"video_frames": sink.images, "frame_size": sink.size, "speech_audio_s": round(
        sink.audio_bytes / 2 / args.sample_rate, 3), "sent_audio_s": round(audio_bytes / 2 / rate, 3)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default="127.0.0.1:50051")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--audio", default="assets/speech.wav", help="16-bit mono WAV standing in for the TTS")
    parser.add_argument("--sample-rate", type=int, default=16000, help="the pipeline's audio output rate")
    parser.add_argument("--output", choices=("full", "square"), default="full")
    parser.add_argument("--timeout", type=float, default=120, help="seconds to wait for the utterance to play")
    print(json.dumps(asyncio.run(main(parser.parse_args())), indent=2))
