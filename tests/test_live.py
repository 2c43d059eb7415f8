"""Live sessions (Converse) against a real `lipsync serve` on 127.0.0.1, and the session clock in process.

The CPU cannot render 25 fps, so the server runs its pacing clock at `server.live.time_scale=3` (one frame every
120 ms of wall time); the pacing code under test is the real one.
"""
from __future__ import annotations

import asyncio
import json
import time

import grpc
import numpy as np
import pytest
import torch
from conftest import decoded, psnr, worst_psnr
from test_server import ServerProcess, model_override

from lipsync._proto import lipsync_pb2 as pb
from lipsync._proto import lipsync_pb2_grpc as pb_grpc
from lipsync.apps.client import Say, channel, converse, open_stream
from lipsync.codec import audio, jpeg
from lipsync.model import audio_features
from lipsync.model.avatar import load_avatar
from lipsync.runtime.live import SUBMIT_FRAMES, LiveConfig, LiveSession
from lipsync.runtime.scheduler import DeviceWorkers, ModelScheduler, Priority

TIME_SCALE = 3.0
QUALITY = 80
OUT_RATE = 22050
S16 = audio.AudioFormat("s16le", 16000, 1)
INTERRUPT_AT = 6.0  # media seconds into the conversation fixture


def pcm_of(wave: torch.Tensor) -> bytes:
    return (wave.numpy() * 32767).astype(np.int16).tobytes()




@pytest.fixture(scope="module")
def live_server(weights, tiny_avatar, tmp_path_factory):
    # 160: its capacity stays above the slowed clock's 8.3 frames/s on a loaded 2-core machine (with 328 the
    # lead planned for a slow device could outlast the conversation). slow_device=buffer: these tests hold every
    # speech frame to Synthesize's, which a machine loaded below that rate would otherwise degrade (every 2nd
    # frame rendered: tested on its own below)
    srv = ServerProcess([model_override("tiny", weights, tiny_avatar, variant="160"),
                         f"server.live.time_scale={TIME_SCALE}", "server.live.slow_device=buffer"],
                        tmp_path_factory.mktemp("live"))
    yield srv
    srv.stop()


def run_session(server, says: list[Say], duration: float, **kw):
    async def main():
        async with channel(server.target) as ch:
            return await converse(pb_grpc.LipSyncStub(ch), "tiny", says, duration, quality=QUALITY, **kw)
    return asyncio.run(main())


@pytest.fixture(scope="module")
def conversation(live_server, speech):
    """9 s: utterance `a` (1.5 s) at 0.3 s, a pause, utterance `b` (4 s) at 3.5 s, interrupted at 6 s."""
    a, b = pcm_of(speech[:24000]), pcm_of(speech[4000:68000])
    says = [Say(a, S16, at=0.3, id="a"), Say(b, S16, at=3.5, interrupt_at=INTERRUPT_AT, id="b")]
    sent = time.perf_counter()
    result = run_session(live_server, says, 9.0, output_rate=OUT_RATE)
    return result, {"a": a, "b": b}, sent


def events_of(result, kind: str) -> dict[str, object]:
    return {getattr(e, kind).utterance_id: getattr(e, kind) for _, e in result.events if e.WhichOneof("event") == kind}


def test_session_is_paced_continuous_video(conversation):
    result, _, _ = conversation
    frames = result.frames
    # the session lasts as long as the client keeps it open: 9 media s (225 slots) after the session info, plus
    # however late the client's own half-close came (a loaded machine delays it, not the server's pacing)
    interval = result.session.frame_interval_ms / 1e3
    assert 9.0 * TIME_SCALE <= result.closed_s < 9.0 * TIME_SCALE + 1.0
    # ...and it ends within a few slots of the half-close reaching the server (in two clean-clone runs of the whole
    # suite the last frame came 2 slots after it: 227 frames for a close at 27.0 s)
    assert -1.5 <= len(frames) - result.closed_s / interval <= 3.5, (len(frames), result.closed_s / interval)
    assert [f.index for f in frames] == list(range(len(frames)))
    assert all(f.pts_ms == pytest.approx(40.0 * f.index) for f in frames)
    assert interval == pytest.approx(0.04 * TIME_SCALE)
    # frames leave on their slots (measured from frame 0's arrival) and the clock does not drift: 95 % within half
    # an interval, the last second too; a loaded machine may hold a single frame back (174 ms once in a clean-clone
    # run of the whole suite, interval 120 ms), never the stream (bench_live measures pacing under load)
    offsets = [t - result.received_s[0] - f.index * interval for f, t in zip(frames, result.received_s)]
    spread = sorted(abs(o) for o in offsets)
    assert spread[len(spread) * 95 // 100] < interval / 2, spread[-10:]
    assert sorted(abs(o) for o in offsets[-25:])[12] < interval / 2, offsets[-25:]
    assert spread[-1] < 3 * interval, max(offsets, key=abs)
    # the avatar position never jumps: it advances by one per slot, except after a HELD slot (which shows the
    # position the late frame will use)
    for before, after in zip(frames, frames[1:]):
        step = after.avatar_position - before.avatar_position
        assert step == (0 if before.kind == pb.HELD else 1), (before, after)
    # every frame carries exactly 40 ms of audio at the output rate
    assert all(len(f.audio) == 2 * OUT_RATE // 25 for f in frames)


def test_the_server_logs_how_late_each_session_handed_its_frames_to_grpc(conversation, live_server):
    """The server's own account of its pacing (bench_live reads it: the client's side of 127.0.0.1 shares the
    CPU), in the session's close line: slot lateness p50/p99 in whole ms, and the worst."""
    result, _, _ = conversation
    closes = [json.loads(line[line.index("{"):]) for line in live_server.logs().splitlines()
              if '"event": "live_session_close"' in line]
    mine = [c for c in closes if c["session"] == result.session.session_id]
    assert len(mine) == 1, closes
    close = mine[0]
    assert close["frames"] >= len(result.frames) - 1  # the last frame may be counted and not delivered
    assert 1.0 <= close["pacing_late_ms_p50"] <= close["pacing_late_ms_p99"] < result.session.frame_interval_ms
    assert close["pacing_late_ms_max"] >= close["pacing_late_ms_p99"] - 1.0


def test_idle_frames_are_the_cached_avatar_jpegs(conversation, tiny_avatar):
    result, _, _ = conversation
    avatar = load_avatar(tiny_avatar)
    cached = jpeg.encode_frames(avatar.frames, QUALITY)
    idle = [f for f in result.frames if f.kind == pb.IDLE]
    assert len(idle) > 80
    for f in idle:
        assert f.jpeg == cached[f.avatar_frame] and f.avatar_frame == avatar.frame_for(f.avatar_position)
        assert f.audio == bytes(len(f.audio)) or f.utterance_id  # silent unless it carries an utterance's tail


def test_speech_frames_equal_synthesize_at_the_same_position(conversation, live_server):
    result, pcms, _ = conversation
    started = events_of(result, "started")["a"]
    finished = events_of(result, "finished")["a"]
    speech = [f for f in result.frames if f.kind == pb.SPEECH and f.utterance_id == "a"]
    assert not finished.interrupted and finished.frames_played == finished.frames_total == len(speech)
    assert len(speech) == audio_features.frame_count(len(pcms["a"]) // 2)
    assert speech[0].index == started.first_frame and speech[0].avatar_position == started.avatar_position
    assert [f.utterance_frame for f in speech] == list(range(len(speech)))

    async def synthesize():
        async with channel(live_server.target) as ch:
            return await pb_grpc.LipSyncStub(ch).Synthesize(pb.SynthesizeRequest(
                model_id="tiny", audio=pcms["a"], format=pb.AudioFormat(encoding=pb.PCM_S16LE, sample_rate=16000),
                start_frame=started.avatar_position, jpeg_quality=QUALITY))
    unary = asyncio.run(synthesize())
    assert [f.avatar_frame for f in speech] == [f.avatar_frame for f in unary.frames]
    worst = worst_psnr(speech, unary.frames)
    assert worst >= 40.0, f"live speech vs Synthesize: worst PSNR {worst:.1f} dB"


def test_speech_frames_carry_the_utterance_audio(conversation):
    result, pcms, _ = conversation
    frames = [f for f in result.frames if f.utterance_id == "a" and f.kind != pb.HELD]  # SPEECH, then the tail
    assert [f.utterance_frame for f in frames] == list(range(len(frames)))
    assert all(f.kind == pb.IDLE for f in frames[audio_features.frame_count(len(pcms["a"]) // 2):])
    carried = np.frombuffer(b"".join(f.audio for f in frames), dtype=np.int16)
    wave = audio.decode_pcm(pcms["a"], S16)
    expected = (audio.resample(wave, 16000, OUT_RATE) * 32768.0).round().clamp(-32768, 32767).to(torch.int16)
    assert len(carried) >= len(expected)
    np.testing.assert_array_equal(carried[:len(expected)], expected.numpy())
    assert not carried[len(expected):].any()  # the frames past the end of the audio carry silence


def test_interrupt_stops_the_utterance(conversation):
    result, _, _ = conversation
    finished = events_of(result, "finished")["b"]
    assert finished.interrupted
    b_frames = [f for f in result.frames if f.utterance_id == "b"]
    assert finished.frames_played == sum(f.kind == pb.SPEECH for f in b_frames)
    assert finished.played_ms == pytest.approx(40.0 * finished.frames_played)
    # the interrupt was sent at media time INTERRUPT_AT: nothing of `b` is shown after the next slot or two
    interval = result.session.frame_interval_ms / 1e3
    cutoff = INTERRUPT_AT * TIME_SCALE + 2 * interval
    after = [f for f, t in zip(result.frames, result.received_s) if f.utterance_id == "b" and t > cutoff]
    assert not after, [f.index for f in after]
    # and the session returned to idle, continuing from the position where `b` stopped
    last_b = max(f.index for f in b_frames) if b_frames else None
    if last_b is not None:
        nxt, last = result.frames[last_b + 1], result.frames[last_b]
        advanced = 1 if last.kind == pb.SPEECH else 0  # a HELD slot shows its position without advancing it
        assert nxt.kind == pb.IDLE and nxt.avatar_position == last.avatar_position + advanced


def test_events_report_latency_and_played_time(conversation):
    result, _, _ = conversation
    started = events_of(result, "started")
    assert started["a"].latency_ms > 0
    summary = result.summary()
    assert summary["utterances"]["a"]["first_frame_latency_ms"] == pytest.approx(started["a"].latency_ms, abs=0.1)
    assert summary["late_frames"] == sum(f.kind == pb.HELD for f in result.frames)


def test_admission_refuses_sessions_beyond_measured_capacity(live_server):
    """The tiny CPU model renders a few frames/s: at a 50 % duty cycle it cannot sustain many sessions."""
    async def main():
        async with channel(live_server.target) as ch:
            stub = pb_grpc.LipSyncStub(ch)
            open_calls, refused = [], None
            for _ in range(20):
                call = stub.Converse()
                await call.write(pb.ConverseRequest(config=pb.ConverseConfig(model_id="tiny")))
                try:
                    first = await call.read()
                    assert first.HasField("session")
                    open_calls.append(call)
                except grpc.aio.AioRpcError as exc:
                    refused = exc
                    break
            for call in open_calls:
                call.cancel()
            return len(open_calls), refused
    admitted, refused = asyncio.run(main())
    assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "cannot sustain" in refused.details() and admitted >= 1


@pytest.mark.parametrize("messages,text", [
    ([pb.ConverseRequest(audio=b"\x00\x00")], "first Converse message must be `config`"),
    ([pb.ConverseRequest(config=pb.ConverseConfig(model_id="tiny", output_sample_rate=22051))], "multiple of 25"),
    ([pb.ConverseRequest(config=pb.ConverseConfig(model_id="tiny")), pb.ConverseRequest(audio=b"\x00")],
     "not a multiple of 2"),
    ([pb.ConverseRequest(config=pb.ConverseConfig(model_id="tiny")), pb.ConverseRequest(end_utterance=True)],
     "without an open utterance"),
    ([pb.ConverseRequest(config=pb.ConverseConfig(model_id="tiny")),
      pb.ConverseRequest(config=pb.ConverseConfig(model_id="tiny"))], "only be sent once"),
    ([pb.ConverseRequest(config=pb.ConverseConfig(model_id="tiny", format=pb.AudioFormat(encoding=pb.WAV)))],
     "WAV is not accepted"),
    ([pb.ConverseRequest(config=pb.ConverseConfig(model_id="tiny", output=2))], "output 2 is not a FrameOutput"),
])
def test_bad_live_sessions(live_server, messages, text):
    async def main():
        async with channel(live_server.target) as ch:
            call = pb_grpc.LipSyncStub(ch).Converse(iter(messages))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in call:
                    pass
            return info.value
    error = asyncio.run(main())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and text in error.details()


def test_unknown_model_is_not_found(live_server):
    async def main():
        async with channel(live_server.target) as ch:
            call = pb_grpc.LipSyncStub(ch).Converse(iter([pb.ConverseRequest(config=pb.ConverseConfig(
                model_id="nobody"))]))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in call:
                    pass
            return info.value
    assert asyncio.run(main()).code() == grpc.StatusCode.NOT_FOUND


# --------------------------------------------------------------------------- in process
def test_live_frames_are_served_before_batch_work(pipeline):
    """Deadline-aware batching: a live job submitted behind a long Synthesize is served in the next batch, and a
    second Synthesize shares the generator with the first instead of waiting for it to drain."""
    order: list[str] = []

    async def main():
        scheduler = ModelScheduler(pipeline, DeviceWorkers(), max_batch=4, max_delay_ms=0)
        scheduler.start()
        feats = torch.zeros(16, 32, 16, 16)
        ids = pipeline.avatar.frames_for(0, 0, 16)

        def record(name):
            return lambda lo, hi, jpegs: order.extend([name] * (hi - lo))
        long = scheduler.submit(feats, ids, 75, on_frames=record("long"))
        await asyncio.sleep(0.05)  # the first batch of `long` is in flight
        short = scheduler.submit(feats[:4], ids[:4], 75, on_frames=record("short"))
        live = scheduler.submit(feats[:4], ids[:4], 75, priority=Priority.LIVE, deadline=time.perf_counter() + 10,
                                on_frames=record("live"))
        await asyncio.gather(long, short, live)
        await scheduler.stop()
    asyncio.run(main())
    assert order[4:8] == ["live"] * 4  # right after the batch that was in flight
    assert order.index("short") < len(order) - 4  # not after the whole long job
    assert order[-1] == "long"


def test_session_clock_does_not_drift(pipeline):
    """1500 frames: frame n leaves near start + n·interval, never early, and lateness does not accumulate.

    A shared CI machine (and the suite's other workers) may stall the event loop for a few milliseconds now and
    then, so single-frame jitter is bounded at the 99th percentile; the drift bound compares the start and the end
    of the run.
    """
    interval_scale = 0.25  # 10 ms per frame
    count = 1500

    async def main():
        scheduler = ModelScheduler(pipeline, DeviceWorkers())
        scheduler.start()
        idle = await scheduler.idle_jpegs(75)
        session = LiveSession(scheduler, LiveConfig(time_scale=interval_scale), S16, 16000, 0, 75, idle)
        loop = asyncio.get_running_loop()
        lateness = []
        t0 = None
        async for frame, _ in session.frames():
            now = loop.time()
            t0 = now if t0 is None else t0
            lateness.append(now - t0 - frame.index * session.interval)
            if frame.index + 1 == count:
                session.close()
        await scheduler.stop()
        return lateness, session.interval
    lateness, interval = asyncio.run(main())
    assert len(lateness) == count
    assert min(lateness) > -interval
    # jitter: under a real-time frame (40 ms) at the 99th percentile, with the other test workers and their
    # servers on the same cores (make test runs four: 28 ms was seen there)
    assert np.percentile(lateness, 99) < 0.040
    assert abs(np.median(lateness[-200:]) - np.median(lateness[:200])) < interval / 2  # no drift


def test_in_process_session_passes_input_audio_through(pipeline, speech):
    """Output rate = input rate: the carried audio is the client's own samples, byte for byte."""
    pcm = pcm_of(speech[:5000])

    async def main():
        scheduler = ModelScheduler(pipeline, DeviceWorkers(), max_batch=4)
        scheduler.start()
        session = LiveSession(scheduler, LiveConfig(time_scale=2.0), S16, 16000, 3, 75,
                              await scheduler.idle_jpegs(75))
        frames = []
        async for frame, events in session.frames():
            frames.append(frame)
            if frame.index == 0:
                session.start_utterance("x")
                session.audio(pcm[:3000])
                session.audio(pcm[3000:])
                session.end_utterance()
            if any(e.kind == "finished" for e in events):
                session.close()
            assert frame.index < 400, "the utterance never finished"
        await scheduler.stop()
        return frames
    frames = asyncio.run(main())
    speech_frames = [f for f in frames if f.kind == "speech"]
    assert len(speech_frames) == audio_features.frame_count(len(pcm) // 2)
    carried = b"".join(f.audio for f in frames if f.utterance_id == "x" and f.kind != "held")
    assert carried[:len(pcm)] == pcm and not any(carried[len(pcm):])
    assert frames[0].avatar_position == 3


def test_the_frame_stride_follows_the_measured_capacity_and_the_speakers(pipeline):
    """degrade: 1 while a session's share of the measured frames/s (within the headroom) keeps up with 25 fps, else
    the smallest k that does, at most max_frame_stride; two speaking sessions split the capacity; buffer: always 1."""
    async def main():
        scheduler = ModelScheduler(pipeline, DeviceWorkers())
        idle = [b""] * pipeline.avatar.frame_count
        one = LiveSession(scheduler, LiveConfig(time_scale=1.0), S16, 16000, 0, 75, idle)
        got = {}
        for capacity in (None, 100.0, 25.0, 10.0, 1.0):
            scheduler.capacity_fps = capacity
            got[capacity] = one.frame_stride()
        scheduler.capacity_fps = 40.0
        alone = one.frame_stride()
        two = LiveSession(scheduler, LiveConfig(time_scale=1.0), S16, 16000, 0, 75, idle)
        one.start_utterance("a"), two.start_utterance("b")  # both speaking: 18 frames/s each
        shared = one.frame_stride()
        buffered = LiveSession(scheduler, LiveConfig(time_scale=1.0, slow_device="buffer"), S16, 16000, 0, 75, idle)
        slow = buffered.frame_stride()
        for s in (one, two, buffered):
            s.close()
        return got, alone, shared, slow
    got, alone, shared, slow = asyncio.run(main())
    assert got == {None: 1, 100.0: 1, 25.0: 2, 10.0: 3, 1.0: 4}
    assert (alone, shared, slow) == (1, 2, 1)


def test_a_slow_device_shows_every_second_frame_twice_with_every_slots_audio(pipeline, speech):
    """Measured below real time (capacity forced to 10 frames/s against 12.5 needed at time_scale 2): the utterance
    starts after the render latency, not after buffering; every 2nd frame is rendered and shown for two slots (the
    avatar frame of what is shown, the same JPEG); every slot carries its own audio, sample-exact; the events say
    so (frame_stride 2, frames_repeated)."""
    pcm = pcm_of(speech[:16000])
    config = LiveConfig(time_scale=2.0, render_ahead_s=0.2, max_frame_stride=2)

    async def main():
        scheduler = ModelScheduler(pipeline, DeviceWorkers(), max_batch=16)  # batches of a few frames: never full,
        scheduler.start()                                                     # so the forced figure stays
        idle = await scheduler.idle_jpegs(75)
        await scheduler.calibrate()
        scheduler.capacity_fps = 10.0
        session = LiveSession(scheduler, config, S16, 16000, 0, 75, idle)
        frames, events = [], []
        async for frame, happened in session.frames():
            frames.append(frame)
            events += happened
            if frame.index == 0:
                session.start_utterance("x")
                session.audio(pcm)
                session.end_utterance()
            if any(e.kind == "finished" for e in happened):
                session.close()
            assert frame.index < 600, "the utterance never finished"
        await scheduler.stop()
        return frames, events, session.stats
    frames, events, stats = asyncio.run(main())
    started = next(e.fields for e in events if e.kind == "started")
    finished = next(e.fields for e in events if e.kind == "finished")
    speech_frames = [f for f in frames if f.kind == "speech"]
    total = audio_features.frame_count(len(pcm) // 2)
    assert started["frame_stride"] == 2 and len(speech_frames) == total
    avatar = pipeline.avatar
    for f in speech_frames:
        shown = f.utterance_frame - f.utterance_frame % 2
        assert f.avatar_frame == avatar.frame_for(started["avatar_position"] + shown)
    by_frame = {f.utterance_frame: f.jpeg for f in speech_frames}
    assert all(by_frame[k] is by_frame[k - 1] for k in range(1, total, 2))  # the same rendered frame, twice
    assert len({id(j) for j in by_frame.values()}) == (total + 1) // 2
    assert finished["frames_repeated"] == stats["repeated"] == total // 2 and not finished["dropped"]
    carried = b"".join(f.audio for f in frames if f.utterance_id == "x" and f.kind != "held")
    assert carried[:len(pcm)] == pcm and not any(carried[len(pcm):])


def test_client_plays_a_conversation_script(live_server, speech, tmp_path):
    """`lipsync client --converse SCRIPT --out talk.mp4`, as a user runs it."""
    import subprocess
    import sys
    import wave as wavfile

    import av

    with wavfile.open(str(tmp_path / "hi.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(pcm_of(speech[:8000]))
    (tmp_path / "talk.yaml").write_text("duration: 3\nutterances:\n  - {id: hi, audio: hi.wav, at: 0.2}\n")
    done = subprocess.run([sys.executable, "-m", "lipsync", "client", "--server", live_server.target, "--model", "tiny",
                           "--converse", str(tmp_path / "talk.yaml"), "--out", str(tmp_path / "talk.mp4")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert summary["mode"] == "converse" and abs(summary["frames"] - 75) <= 1 and "hi" in summary["utterances"]
    with av.open(str(tmp_path / "talk.mp4")) as container:
        assert sorted(s.type for s in container.streams) == ["audio", "video"]
        assert abs(sum(1 for _ in container.decode(video=0)) - summary["frames"]) <= 1


# --------------------------------------------------------------------------- a session under load or failure
def _feed(session: LiveSession, utterance: str, pcm: bytes, piece: int = 6400) -> None:
    session.start_utterance(utterance)
    for lo in range(0, len(pcm), piece):
        session.audio(pcm[lo:lo + piece])
    session.end_utterance()


def test_a_flood_of_queued_speech_is_held_within_its_bound(pipeline, speech):
    """Five 2-s utterances sent at once against a 6-s bound: three are kept, the rest end with an event that says
    why; at no slot does the session have more frames waiting for the generator than its horizon (and one
    submission beyond it), and what it holds stays within `memory_bound`. Speech queued ahead of the clock goes to
    the scheduler SUBMIT_FRAMES at a time, not as a job per slot."""
    config = LiveConfig(time_scale=1.0, render_ahead_s=0.4, max_queued_speech_s=6.0, slow_device="buffer")
    pcm = pcm_of(speech[:32000])

    async def main():
        scheduler = ModelScheduler(pipeline, DeviceWorkers(), max_batch=4)
        scheduler.start()
        idle = await scheduler.idle_jpegs(75)
        session = LiveSession(scheduler, config, S16, 16000, 0, 75, idle)
        submit = scheduler.submit

        def counted(features, frame_ids, *args, **kwargs):  # the real scheduler's submit, counting job sizes
            jobs.append(len(frame_ids))
            return submit(features, frame_ids, *args, **kwargs)
        jobs: list[int] = []
        scheduler.submit = counted
        peak_queue, peak_held, horizon, finished = 0, 0, 0, {}
        async for frame, events in session.frames():
            if frame.index == 0:
                for k in range(5):
                    _feed(session, f"u{k}", pcm)
            peak_queue = max(peak_queue, scheduler.queued_frames)
            peak_held = max(peak_held, session.held_bytes())
            horizon = max([horizon, *(u.horizon for u in session.queue)])
            finished.update({e.fields["utterance_id"]: e.fields for e in events if e.kind == "finished"})
            if frame.index >= 75 and (sum(jobs) >= 3 * SUBMIT_FRAMES or frame.index >= 300):
                session.close()  # on a loaded machine the first utterance starts later (a longer lead)
        bound = session.memory_bound(max(len(j) for j in idle) * 2)
        await scheduler.stop()
        return peak_queue, peak_held, bound, horizon, finished, session.horizon, jobs
    peak_queue, peak_held, bound, horizon, finished, base, jobs = asyncio.run(main())
    print(f"peak queue {peak_queue} frames (horizon {horizon}), held {peak_held / 1e6:.2f} MB of {bound / 1e6:.2f} MB;"
          f" live jobs of {jobs} frames")
    assert base == 10 and horizon >= base
    assert peak_queue <= horizon + SUBMIT_FRAMES - 1, (peak_queue, horizon)
    # one job per slot before ([8, 1, 1, ...]): 17 or more for these 24 frames
    assert sum(jobs) >= 3 * SUBMIT_FRAMES and len(jobs) <= sum(jobs) / SUBMIT_FRAMES + 3, jobs
    assert 0 < peak_held <= bound, (peak_held, bound)
    for k in (3, 4):
        assert finished[f"u{k}"]["interrupted"] and "server.live.max_queued_speech_s" in finished[f"u{k}"]["error"]
    assert not any(finished.get(f"u{k}", {}).get("error") for k in (0, 1, 2))


def test_a_failed_render_ends_its_utterance_with_an_event(pipeline, speech):
    """The generator fails once (as a device out of memory would): that utterance ends interrupted with the
    reason, the session goes on, and the next utterance plays."""
    pcm = pcm_of(speech[:8000])

    async def main():
        scheduler = ModelScheduler(pipeline, DeviceWorkers(), max_batch=4)
        scheduler.start()
        session = LiveSession(scheduler, LiveConfig(time_scale=2.0), S16, 16000, 0, 75,
                              await scheduler.idle_jpegs(75))
        infer, failures = scheduler._infer, []

        def failing(batch):
            if not failures:
                failures.append(1)
                raise RuntimeError("CUDA out of memory (injected)")
            return infer(batch)
        scheduler._infer = failing
        finished, kinds = {}, []
        async for frame, events in session.frames():
            kinds.append(frame.kind)
            if frame.index == 0:
                _feed(session, "x", pcm)
            for e in events:
                if e.kind == "finished":
                    finished[e.fields["utterance_id"]] = e.fields
                    if e.fields["utterance_id"] == "x":
                        _feed(session, "y", pcm)
            if "y" in finished or frame.index > 400:
                session.close()
        await scheduler.stop()
        return finished, kinds, session.stats
    finished, kinds, stats = asyncio.run(main())
    assert finished["x"]["interrupted"] and "rendering failed (RuntimeError)" in finished["x"]["error"]
    assert not finished["y"]["interrupted"] and finished["y"]["error"] == ""
    assert finished["y"]["frames_played"] == audio_features.frame_count(len(pcm) // 2)
    assert stats["failed"] == 1 and "speech" in kinds


@pytest.fixture(scope="module")
def flood_server(weights, tiny_avatar, tmp_path_factory):
    """A clock slowed enough (one frame per 400 ms) that one speaking session leaves this CPU's generator room for
    other clients, and a 60-s bound on queued speech."""
    srv = ServerProcess([model_override("tiny", weights, tiny_avatar, variant="160"), "server.live.time_scale=10",
                         "server.live.max_queued_speech_s=60"], tmp_path_factory.mktemp("flood"))
    yield srv
    srv.stop()


def test_a_flooding_session_leaves_other_clients_served(flood_server, speech):
    """A live session sends 16 utterances of 10 s at once: what passes server.live.max_queued_speech_s (60 s)
    ends with an event, and another client's Synthesize during its speech stays within a few times its latency
    on the server without it, before and after (the session renders only its horizon ahead, so its frames cannot
    fill the queue)."""
    short = pcm_of(speech[:8000])
    long = pcm_of(speech.repeat(4)[:16000 * 10])

    async def synthesize_s(stub) -> float:
        started = time.perf_counter()
        response = await stub.Synthesize(pb.SynthesizeRequest(model_id="tiny", audio=short, format=pb.AudioFormat(
            encoding=pb.PCM_S16LE, sample_rate=16000, channels=1)))
        assert len(response.frames) == audio_features.frame_count(len(short) // 2)
        return time.perf_counter() - started

    async def main():
        async with channel(flood_server.target) as ch:
            stub = pb_grpc.LipSyncStub(ch)
            await synthesize_s(stub)
            # each figure is the best of three: on a machine shared with other test workers a burst of their load
            # can slow any one call, while a session that held the generator would slow all three
            idle = min([await synthesize_s(stub) for _ in range(3)])
            speaking, done = asyncio.Event(), asyncio.Event()

            async def requests():
                yield pb.ConverseRequest(config=pb.ConverseConfig(model_id="tiny", format=pb.AudioFormat(
                    encoding=pb.PCM_S16LE, sample_rate=16000, channels=1)))
                for k in range(16):  # all at once, as a TTS far faster than real time would
                    yield pb.ConverseRequest(start_utterance=pb.UtteranceStart(utterance_id=f"f{k}"))
                    for lo in range(0, len(long), 32000):
                        yield pb.ConverseRequest(audio=long[lo:lo + 32000])
                    yield pb.ConverseRequest(end_utterance=True)
                await done.wait()

            async def flood():
                frames, finished = [], {}
                async for response in open_stream(stub.Converse, requests()):
                    if response.HasField("frame"):
                        frames.append(response.frame.kind)
                        if response.frame.kind == pb.SPEECH:
                            speaking.set()
                    for e in response.events:
                        if e.WhichOneof("event") == "finished":
                            finished[e.finished.utterance_id] = e.finished
                    if done.is_set():
                        break
                return frames, finished
            task = asyncio.ensure_future(flood())
            await asyncio.wait_for(speaking.wait(), 120)
            loaded = min([await synthesize_s(stub) for _ in range(3)])
            speaking_after = task.done() is False
            done.set()
            frames, finished = await task
            after = min([await synthesize_s(stub) for _ in range(3)])  # the machine's load now, without the flood
            return max(idle, after), loaded, frames, finished, speaking_after
    idle, loaded, frames, finished, speaking_after = asyncio.run(main())
    print(f"Synthesize of 0.5 s: {idle * 1e3:.0f} ms idle, {loaded * 1e3:.0f} ms beside the flooding session")
    refused = sorted(int(u[1:]) for u, f in finished.items() if "max_queued_speech_s" in f.error)
    assert refused == list(range(6, 16)), {u: f.error for u, f in finished.items()}
    assert speaking_after and pb.SPEECH in frames  # measured while the flood's first utterance played
    assert loaded <= 4 * idle + 0.25, (idle, loaded)


def test_concurrent_admissions_never_overshoot_the_capacity(pipeline):
    """Ten sessions asking at once, as the server admits them (idle JPEGs first, then admit and construct with no
    await between): with capacity for four, four open."""
    from lipsync.runtime.live import admit

    async def main():
        scheduler = ModelScheduler(pipeline, DeviceWorkers())
        scheduler.capacity_fps = 100.0  # 4 sessions speaking all the time at 25 fps
        config = LiveConfig(duty_cycle=1.0, headroom=1.0)

        async def ask():
            idle = await scheduler.idle_jpegs(75)
            ok, _ = admit(scheduler, config)
            return LiveSession(scheduler, config, S16, 16000, 0, 75, idle) if ok else None
        sessions = await asyncio.gather(*(ask() for _ in range(10)))
        opened = [s for s in sessions if s is not None]
        counted = len(scheduler.live_sessions)
        for s in opened:
            s.close()
        return len(opened), counted, len(scheduler.live_sessions)
    assert asyncio.run(main()) == (4, 4, 0)


def test_pacing_lateness_percentiles_from_millisecond_counts():
    from lipsync.runtime.live import Lateness

    late = Lateness()
    assert late.summary() == {"pacing_late_ms_p50": 0.0, "pacing_late_ms_p99": 0.0, "pacing_late_ms_max": 0.0}
    for ms in [0.2] * 98 + [12.5, 2500.0]:  # 98 on time, one 12.5 ms late, one 2.5 s late
        late.add(ms / 1e3)
    late.add(-0.004)  # early counts as on time
    summary = late.summary()
    assert summary["pacing_late_ms_p50"] == 1.0  # the 0–1 ms bucket
    assert summary["pacing_late_ms_p99"] == 13.0  # rank 100 of 101: the 12–13 ms bucket
    assert summary["pacing_late_ms_max"] == 2500.0


@pytest.mark.parametrize("frame, events", [
    (("speech", 5, 7, 3, b"\xff\xd8" + bytes(300), bytes(1280), "u1", 2),
     [("started", {"utterance_id": "u1", "first_frame": 5, "avatar_position": 7, "latency_ms": 12.5}),
      ("late", {"frame": 4, "utterance_id": "u1"})]),
    (("idle", 0, 0, 0, b"", b"", "", -1), []),
    (("held", 10**9, 2**40, 23, b"\x01" * 200_000, bytes(960), "z", -1), []),
])
def test_live_frames_built_as_wire_bytes_parse_to_the_message(frame, events):
    """The Converse fast path (frames written as bytes, JPEG copied once) and the message it stands for are the
    same to any client: protobuf's own parser reads them equal."""
    from lipsync.api import convert
    from lipsync.runtime.live import Event, Frame

    kind, index, position, avatar_frame, jpeg, audio, utterance, k = frame
    f = Frame(index, position, avatar_frame, jpeg, audio, kind, utterance, k)
    e = [Event(kind_, fields) for kind_, fields in events]
    built = convert.live_frame_bytes(f, e)
    assert pb.ConverseResponse.FromString(built) == convert.live_frame(f, e)
    assert len(built) == convert.live_frame(f, e).ByteSize()


def test_a_load_test_client_can_keep_frames_without_their_images(live_server):
    """`converse(..., keep_images=False)` (bench_live's 200 sessions) keeps every frame's index, kind and timing,
    and drops the JPEG and audio bytes it does not measure."""
    result = run_session(live_server, [], 1.0, keep_images=False)
    assert result.frames and [f.index for f in result.frames] == list(range(len(result.frames)))
    assert all(f.jpeg == b"" and f.audio == b"" and f.kind == pb.IDLE for f in result.frames)
    assert len(result.received_s) == len(result.frames)


def test_square_output_sessions_send_squares_and_no_idle_images(live_server, speech):
    """A SQUARE-output session: IDLE (and HELD) frames carry no JPEG, the client shows its copy of the avatar frame;
    SPEECH frames carry their crop rectangle's JPEG, which pasted onto the avatar (GetAvatar) is the Synthesize
    frame at the same position (PSNR >= 40 dB)."""
    import lipsync_client as ls

    a = pcm_of(speech[:16000])

    async def main():
        async with channel(live_server.target) as ch:
            stub = pb_grpc.LipSyncStub(ch)
            avatar = await ls.get_avatar(stub, "tiny", QUALITY)
            result = await converse(stub, "tiny", [Say(a, S16, at=0.2, id="a")], 8.0, quality=QUALITY,
                                    until_played=True, output=pb.SQUARE)
            started = events_of(result, "started")["a"]
            unary = await stub.Synthesize(pb.SynthesizeRequest(
                model_id="tiny", audio=a, format=pb.AudioFormat(encoding=pb.PCM_S16LE, sample_rate=16000),
                start_frame=started.avatar_position, jpeg_quality=QUALITY))
        return avatar, result, unary
    avatar, result, unary = asyncio.run(main())
    idle = [f for f in result.frames if f.kind != pb.SPEECH]
    speech_frames = [f for f in result.frames if f.kind == pb.SPEECH]
    assert idle and all(f.jpeg == b"" and not f.HasField("square") for f in idle)
    assert len(speech_frames) == len(unary.frames)
    compositor = ls.Compositor(avatar)
    for f, full in zip(speech_frames, unary.frames):
        assert f.avatar_frame == full.avatar_frame
        assert (f.square.x, f.square.y, f.square.width, f.square.height) == avatar.squares[f.avatar_frame]
        assert psnr(torch.from_numpy(compositor.rgb(f)).permute(2, 0, 1).float(), decoded(full.jpeg)) >= 40
    picture = compositor.rgb(idle[0])
    assert np.array_equal(picture, ls.decode_rgb(avatar.jpegs[idle[0].avatar_frame]))


def test_square_live_frames_built_as_wire_bytes_parse_to_the_message():
    from lipsync.api import convert
    from lipsync.runtime.live import Frame

    f = Frame(12, 40, 3, b"\xff\xd8" + bytes(500), bytes(1280), "speech", "u", 4, [10, 20, 74, 84])
    built = convert.live_frame_bytes(f, [])
    parsed = pb.ConverseResponse.FromString(built)
    assert parsed == convert.live_frame(f, []) and len(built) == parsed.ByteSize()
    assert (parsed.frame.square.x, parsed.frame.square.y, parsed.frame.square.width) == (10, 20, 64)


def test_unnamed_utterances_get_names_and_a_session_ended_first_still_reports_them(live_server, speech):
    """An utterance the client did not name is `utterance-N` in its events; a session the client ends before its
    utterance showed a frame still reports it, on one last frame: finished{interrupted, dropped}, so the client's
    summary is never empty for what it sent."""
    async def main():
        async with channel(live_server.target) as ch:
            return await converse(pb_grpc.LipSyncStub(ch), "tiny", [Say(pcm_of(speech[:24000]), S16, at=0.0)],
                                  0.12, quality=QUALITY)
    result = asyncio.run(main())
    utterances = result.summary()["utterances"]
    assert list(utterances) == ["utterance-1"], utterances
    assert utterances["utterance-1"]["outcome"] == "dropped" and utterances["utterance-1"]["interrupted"]


def test_sigterm_during_an_utterance_ends_the_session_with_a_reason(weights, tiny_avatar, tmp_path, speech):
    """SIGTERM while a live session speaks: after server.drain_s the session's utterance finishes interrupted with
    the reason, said on a last frame, and the call ends UNAVAILABLE with lipsync's own message naming the setting
    (not gRPC's "Cancelling all calls" after the grace period); no traceback in the server's log."""
    import signal

    srv = ServerProcess([model_override("tiny", weights, tiny_avatar, variant="160"), "server.drain_s=0.3",
                         f"server.live.time_scale={TIME_SCALE}"], tmp_path)
    pcm = pcm_of(speech[:64000])  # 4 s: still playing when the server is stopped

    async def main():
        events, status = [], None
        stop_sent = asyncio.Event()

        async def requests():
            yield pb.ConverseRequest(config=pb.ConverseConfig(model_id="tiny", format=pb.AudioFormat(
                encoding=pb.PCM_S16LE, sample_rate=16000, channels=1), jpeg_quality=QUALITY))
            yield pb.ConverseRequest(start_utterance=pb.UtteranceStart(utterance_id="long"))
            yield pb.ConverseRequest(audio=pcm)
            yield pb.ConverseRequest(end_utterance=True)
            await stop_sent.wait()
            await asyncio.sleep(30)  # the client keeps its side open: the server ends the call
        async with channel(srv.target) as ch:
            call = open_stream(pb_grpc.LipSyncStub(ch).Converse, requests())
            try:
                async for response in call:
                    events += list(response.events)
                    if response.frame.kind == pb.SPEECH and not stop_sent.is_set():
                        srv.proc.send_signal(signal.SIGTERM)
                        stop_sent.set()
            except grpc.aio.AioRpcError as exc:
                status = (exc.code(), exc.details())
        return events, status
    try:
        events, status = asyncio.run(main())
        code = srv.proc.wait(120)  # it stops by itself after the SIGTERM
    finally:
        srv.stop()
    finished = [e.finished for e in events if e.WhichOneof("event") == "finished"]
    assert status is not None and status[0] == grpc.StatusCode.UNAVAILABLE, status
    assert "shutting down" in status[1] and "server.drain_s" in status[1], status
    assert [(f.utterance_id, f.interrupted) for f in finished] == [("long", True)], finished
    assert "shutting down" in finished[0].error
    assert code == 0 and "Traceback" not in srv.logs(), srv.logs()[-3000:]
