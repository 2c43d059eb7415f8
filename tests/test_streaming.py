"""runtime.streaming on its own (no gRPC): the frames of a Stream fed in uneven chunks, as parsed messages, are
the frames `synthesize` gives for the whole audio; protocol misuse and the audio limit are refused."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
from conftest import worst_psnr

from lipsync.codec.audio import AudioFormat, decode_pcm
from lipsync.errors import InvalidRequest, ResourceExhausted
from lipsync.model.audio_features import LOOKAHEAD
from lipsync.runtime.messages import Audio, EndOfAudio, Interrupt
from lipsync.runtime.render import synthesize
from lipsync.runtime.scheduler import DeviceWorkers, ModelScheduler
from lipsync.runtime.streaming import StreamSession

FORMAT = AudioFormat("s16le", 16000, 1)


def s16(wave) -> bytes:
    return (wave.numpy().clip(-1, 1) * 32767).astype(np.int16).tobytes()


def run_stream(pipeline, messages, max_audio_s: float = 600.0, start: int = 3):
    async def main():
        scheduler = ModelScheduler(pipeline, DeviceWorkers(), max_batch=4)
        scheduler.start()
        session = StreamSession(scheduler, FORMAT, start, 75, LOOKAHEAD, buffer_frames=50, max_audio_s=max_audio_s)

        async def feed():
            for m in messages:
                yield m
        try:
            return [chunk async for chunk in session.run(feed())]
        finally:
            await scheduler.stop()
    return asyncio.run(main())


def test_a_stream_in_uneven_chunks_gives_the_whole_utterance_frames(pipeline, speech):
    pcm = s16(speech[:24000])
    cuts = [0, 2, 1002, 7000, 7002, 20000, len(pcm)]  # odd sizes too: a sample split across two messages
    chunks = run_stream(pipeline, [Audio(pcm[a:b]) for a, b in zip(cuts, cuts[1:])] + [EndOfAudio()])
    assert chunks[-1].end and not chunks[-1].jpegs
    frames = [(c.first_index + k, f, j) for c in chunks[:-1] for k, (f, j) in enumerate(zip(c.avatar_frames,
                                                                                        c.jpegs))]
    whole = synthesize(pipeline, decode_pcm(pcm, FORMAT), start_frame=3)  # the same s16 samples, whole
    assert [i for i, _, _ in frames] == [f.index for f in whole.frames]  # every frame, in order, exactly once
    assert [f for _, f, _ in frames] == [f.avatar_frame for f in whole.frames]

    class Shown:
        def __init__(self, jpeg):
            self.jpeg = jpeg
    assert worst_psnr([Shown(j) for _, _, j in frames], whole.frames) >= 40


def test_audio_after_the_end_and_foreign_messages_are_refused(pipeline, speech):
    pcm = s16(speech[:8000])
    with pytest.raises(InvalidRequest, match="audio received after end_of_audio"):
        run_stream(pipeline, [Audio(pcm), EndOfAudio(), Audio(pcm)])
    with pytest.raises(InvalidRequest, match="Interrupt is not a Stream message"):
        run_stream(pipeline, [Audio(pcm), Interrupt()])


def test_the_audio_limit_counts_samples_before_decoding_them(pipeline):
    with pytest.raises(ResourceExhausted, match=r"limit per request is 1 s \(server.max_audio_seconds\)"):
        run_stream(pipeline, [Audio(bytes(2 * 16000 * 2)), EndOfAudio()], max_audio_s=1.0)
