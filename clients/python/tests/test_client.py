"""The package alone (no torch): Synthesize, Stream and a live session with barge-in against a real server."""
from __future__ import annotations

import asyncio
import subprocess
import sys

import lipsync_client as ls
import numpy as np

HEAVY = ("torch", "torchvision", "torchaudio", "openvino", "onnxruntime", "av", "lipsync")


def test_import_is_light():
    code = "import sys, lipsync_client; print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                 .stdout.split())
    assert "lipsync_client" in loaded and not loaded & set(HEAVY)


def test_synthesize_and_stream(target, model, speech):
    pcm, fmt = speech
    one_second = pcm[:fmt.sample_rate * fmt.frame_bytes]

    async def main():
        async with ls.channel(target) as ch:
            stub = ls.LipSyncStub(ch)
            return (await ls.synthesize(stub, model, one_second, fmt),
                    await ls.stream(stub, model, one_second, fmt, chunk_ms=100))
    whole, streamed = asyncio.run(main())
    count = len(whole.frames)  # about 25 for a second of audio (SPEC §5 gives the exact count)
    assert 20 <= count <= 30 and [f.index for f in streamed.frames] == [f.index for f in whole.frames] == \
        list(range(count))
    first = ls.decode_rgb(whole.frames[0].jpeg)
    assert first.dtype == np.uint8 and first.shape[2] == 3 and first.flags["C_CONTIGUOUS"]


def test_square_output_composited_without_torch(target, model, speech):
    """SQUARE output with the package alone: the avatar fetched once, each square pasted back (numpy and
    simplejpeg) into the full frame's picture, within JPEG's error of the full-frame output."""
    pcm, fmt = speech
    half = pcm[:fmt.sample_rate * fmt.frame_bytes // 2]

    async def main():
        async with ls.channel(target) as ch:
            stub = ls.LipSyncStub(ch)
            return (await ls.get_avatar(stub, model), await ls.synthesize(stub, model, half, fmt),
                    await ls.synthesize(stub, model, half, fmt, output=ls.pb.SQUARE))
    avatar, full, square = asyncio.run(main())
    compositor = ls.Compositor(avatar)
    for f, g in zip(full.frames, square.frames):
        whole, pasted = ls.decode_rgb(f.jpeg).astype(float), compositor.rgb(g).astype(float)
        assert pasted.shape == whole.shape and g.HasField("square") and len(g.jpeg) < len(f.jpeg)
        assert 10 * np.log10(255**2 / max(((whole - pasted) ** 2).mean(), 1e-9)) >= 40


def test_live_session_speaks_then_is_interrupted(target, model, speech):
    pcm, fmt = speech
    short = pcm[:fmt.sample_rate * fmt.frame_bytes // 2]  # 0.5 s
    says = [ls.Say(short, fmt, at=0.2, id="hello"), ls.Say(pcm, fmt, at=2.5, interrupt_at=3.5, id="cut")]

    async def main():
        async with ls.channel(target) as ch:
            return await ls.converse(ls.LipSyncStub(ch), model, says, duration_s=5.0)
    result = asyncio.run(main())
    summary = result.summary()
    assert summary["utterances"]["hello"]["interrupted"] is False
    assert summary["utterances"]["cut"]["interrupted"] is True
    indices = [f.index for f in result.frames]
    assert indices == list(range(indices[0], indices[0] + len(indices)))  # continuous video
    # its own audio, 40 ms a frame, then silence; a held frame (not rendered in time) carries 40 ms of silence and
    # moves the rest one frame later, as its video
    pieces = [f.audio for f in result.frames if f.utterance_id == "hello"]
    size = len(pieces[0])
    sent = [short[k:k + size].ljust(size, b"\0") for k in range(0, len(short), size)]
    assert [p for p in pieces if any(p)] == [p for p in sent if any(p)] and len(pieces) >= len(sent)


def test_resampler_streams_like_the_whole(speech):
    pcm, fmt = speech
    whole = np.frombuffer(ls.MonoResampler(16000)(pcm, fmt.sample_rate), np.int16)
    resample = ls.MonoResampler(16000)
    chunked = np.frombuffer(b"".join(resample(pcm[k:k + 1764], fmt.sample_rate) for k in range(0, len(pcm), 1764)),
                            np.int16)
    expected = len(pcm) // 2 * 16000 // fmt.sample_rate
    assert expected - 400 <= len(chunked) <= len(whole) <= expected  # what is held back is the filter's delay only
    assert np.array_equal(whole[:len(chunked)], chunked)
    stereo = np.repeat(np.frombuffer(pcm, np.int16), 2).tobytes()
    assert ls.MonoResampler(16000)(stereo, fmt.sample_rate, channels=2) == whole.tobytes()
