"""Hostile input at random: a seeded mix of malformed and valid requests on every RPC of a real server, some at
once. Whatever a client sends, the answer is a status the client can act on (never UNKNOWN or INTERNAL), no answer
shows a server path, the log holds no traceback, and the server stays healthy with nothing left queued."""
from __future__ import annotations

import random
import struct
import threading
from typing import Callable

import grpc
import pytest
from test_server import ServerProcess, model_override

from lipsync._proto import lipsync_pb2 as pb
from lipsync._proto import lipsync_pb2_grpc as pb_grpc
from lipsync._proto import monolithic_pb2 as mono
from lipsync._proto import monolithic_pb2_grpc as mono_grpc

CALLS = 120
SEED = 7
BROKEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS,
          grpc.StatusCode.UNIMPLEMENTED}


class Hostile:
    """Requests drawn from a seeded generator: valid ones, most of them with one field (or one message) replaced by
    an edge case, so that every check along the way is reached, not only the first."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def pick(self, *options):
        return self.rng.choice(options)

    def mutated(self, valid: dict, edges: dict) -> dict:
        """`valid` fields, most of the time with one of them replaced by one of its edge cases."""
        fields = dict(valid)
        if self.rng.random() < 0.7:
            key = self.pick(*edges)
            fields[key] = self.pick(*edges[key])
        return fields

    def audio_format(self) -> pb.AudioFormat:
        return pb.AudioFormat(**self.mutated(
            dict(encoding=self.pick(0, 1, 2), sample_rate=self.pick(0, 8000, 22050, 48000),
                 channels=self.pick(0, 1, 2)),
            dict(encoding=(3, 4, -1), sample_rate=(-1, 1, 7999, 48001, 2**31 - 1), channels=(-1, 3, 1000))))

    def samples(self) -> bytes:
        """Up to 2 s of audio whose size fits every PCM format (silence, noise or full scale), or one that does not:
        empty, a stray byte count, NaN floats."""
        n = 8 * self.rng.randrange(1, 8000)
        kind = self.pick("silence", "noise", "full", "silence", "noise", "full", "empty", "stray", "nan")
        if kind == "noise":
            return self.rng.randbytes(n)
        if kind == "full":
            return struct.pack("<hh", 32767, -32768) * (n // 4)
        if kind == "nan":
            return struct.pack("<f", float("nan")) * (n // 4)
        return {"silence": bytes(n), "empty": b"", "stray": bytes(self.pick(1, 3, 5, n + 1))}[kind]

    def wav(self) -> bytes:
        """A RIFF/WAVE file whose header fields may lie."""
        data = self.samples()
        header = self.mutated(dict(tag=1, channels=1, rate=16000, byte_rate=32000, align=2, bits=16, size=len(data)),
                              dict(tag=(3, 0, 65535), channels=(0, 2, 65535), rate=(0, 7, 2**32 - 1),
                                   byte_rate=(0, 2**32 - 1), align=(0, 4), bits=(0, 8, 32), size=(0, 2**32 - 1)))
        fmt = struct.pack("<HHIIHH", header["tag"], header["channels"], header["rate"], header["byte_rate"],
                          header["align"], header["bits"])
        return (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt " + struct.pack("<I", 16) + fmt + b"data"
                + struct.pack("<I", header["size"]) + data)

    def synthesize(self) -> pb.SynthesizeRequest:
        fmt = self.audio_format()
        fields = self.mutated(dict(model_id="tiny", start_frame=5, jpeg_quality=self.pick(0, 1, 100),
                                   output=self.pick(0, 1)), EDGES)
        return pb.SynthesizeRequest(audio=self.wav() if fmt.encoding == 3 else self.samples(), format=fmt, **fields)

    def stream(self) -> list[pb.StreamRequest]:
        config = pb.StreamConfig(format=self.audio_format(), **self.mutated(
            dict(model_id="tiny", start_frame=0, jpeg_quality=75, output=self.pick(0, 1),
                 lookahead_frames=self.pick(0, 1, 6)), {**EDGES, "lookahead_frames": (-1, 7, 2**31 - 1)}))
        return self.session(pb.StreamRequest(config=config), lambda: pb.StreamRequest(audio=self.samples()),
                            [pb.StreamRequest(end_of_audio=True), pb.StreamRequest(config=config)])

    def converse(self) -> list[pb.ConverseRequest]:
        config = pb.ConverseConfig(format=self.audio_format(), **self.mutated(
            dict(model_id="tiny", start_frame=0, jpeg_quality=75, output=self.pick(0, 1),
                 output_sample_rate=self.pick(0, 16000, 48000)),
            {**EDGES, "output_sample_rate": (1, -16000, 16001, 2**31 - 1)}))
        opening = pb.UtteranceStart(utterance_id=self.pick("", "u1", "x" * 100_000, "\x00"),
                                    interrupt=self.pick(True, False))
        return self.session(pb.ConverseRequest(config=config), lambda: pb.ConverseRequest(audio=self.samples()),
                            [pb.ConverseRequest(end_utterance=True), pb.ConverseRequest(start_utterance=opening),
                             pb.ConverseRequest(interrupt=True), pb.ConverseRequest(config=config)])

    def session(self, config, audio: Callable[[], object], others: list) -> list:
        """A stream's messages: usually its config first, then audio chunks with other messages among them."""
        messages = [config] if self.rng.random() < 0.9 else []
        for _ in range(self.rng.randrange(0, 8)):
            messages.append(audio() if self.rng.random() < 0.6 else self.pick(*others))
        return messages + ([others[0]] if self.rng.random() < 0.7 else [])  # usually ended as a client would

    def composite_batch(self) -> mono.CompositeBatchRequest:
        """The Go server's call: batch size, visual inputs, float audio and features of any size."""
        fields = self.mutated(
            dict(model_id="tiny", batch_size=self.pick(1, 4), visual_frames=b"", raw_audio=bytes(4 * 16000),
                 audio_features=b"", start_frame_idx=0, sample_rate=16000),
            dict(model_id=EDGES["model_id"], batch_size=(0, -1, 33, 2**31 - 1),
                 visual_frames=(bytes(6 * 160 * 160 * 4), self.rng.randbytes(999)),
                 raw_audio=(b"", bytes(3), struct.pack("<f", float("nan")) * 640),
                 audio_features=(bytes(8192 * 4), self.rng.randbytes(100)), start_frame_idx=(-1, 2**31 - 1),
                 sample_rate=(-1, 7, 10**6)))
        return mono.CompositeBatchRequest(**fields)

    def model(self) -> str:
        return self.pick(*EDGES["model_id"], "tiny", "tiny", "tiny")


EDGES = dict(model_id=("", "nope", "../../etc/passwd", "a" * 5000, "\x00", "TINY", "tiny ", "é"),
             start_frame=(-1, 2**31 - 1), jpeg_quality=(-1, 101, 2**31 - 1), output=(2, -1))


@pytest.fixture(scope="module")
def target(weights, tiny_avatar, tmp_path_factory):
    srv = ServerProcess([model_override("tiny", weights, tiny_avatar, variant="160"), "server.live.max_sessions=4"],
                        tmp_path_factory.mktemp("fuzz"))
    yield srv
    srv.stop()


def one_call(stub: pb_grpc.LipSyncStub, compat: mono_grpc.MonolithicServiceStub,
             hostile: Hostile) -> Callable[[], object]:
    """A random RPC with random content, as a thunk that returns its answer or raises its gRPC error."""
    kind = hostile.pick("synthesize", "stream", "converse", "admin", "compat")
    if kind == "compat":
        request = hostile.composite_batch()
        return lambda: compat.InferBatchComposite(request, timeout=60)
    if kind == "synthesize":
        request = hostile.synthesize()
        return lambda: stub.Synthesize(request, timeout=60)
    if kind in ("stream", "converse"):
        messages = hostile.stream() if kind == "stream" else hostile.converse()
        rpc = stub.Stream if kind == "stream" else stub.Converse
        return lambda: list(rpc(iter(messages), timeout=hostile.pick(3, 10)))
    model, device = hostile.model(), hostile.pick("", "cpu", "cuda:0", "cuda:99", "cpu:7", "../x", "tpu")
    return hostile.pick(
        lambda: stub.LoadModel(pb.LoadModelRequest(model_id=model, device=device), timeout=60),
        lambda: stub.UnloadModel(pb.UnloadModelRequest(model_id=model), timeout=60),
        lambda: stub.GetModelStats(pb.GetModelStatsRequest(model_id=model), timeout=60),
        lambda: list(stub.GetAvatar(pb.GetAvatarRequest(model_id=model), timeout=60)),
        lambda: stub.ListModels(pb.ListModelsRequest(), timeout=60))


def test_hostile_requests_get_actionable_statuses(target, weights, tiny_avatar):
    hostile = Hostile(seed=SEED)
    server_paths = {str(tiny_avatar.parent), str(weights["160"].parent)}  # where the server's files live

    def shows_internals(text: str) -> bool:
        return "Traceback" in text or any(path in text for path in server_paths)

    answers: dict[str, int] = {}
    broken: list[str] = []
    with grpc.insecure_channel(target.target) as channel:
        stub, compat = pb_grpc.LipSyncStub(channel), mono_grpc.MonolithicServiceStub(channel)

        def run(call: Callable[[], object]) -> None:
            try:
                answer = call()
                code = grpc.StatusCode.OK
                error = getattr(answer, "error", "")  # the compatibility service answers failures in a field
                if shows_internals(error):
                    broken.append(f"compat error: {error[:200]}")
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details() or ""
                if code in BROKEN or shows_internals(details):
                    broken.append(f"{code}: {details[:200]}")
            answers[code.name] = answers.get(code.name, 0) + 1

        done = 0
        while done < CALLS:
            calls = [one_call(stub, compat, hostile) for _ in range(hostile.pick(1, 1, 3))]  # some at once
            threads = [threading.Thread(target=run, args=(call,)) for call in calls]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            done += len(calls)
        health = stub.Health(pb.HealthRequest(), timeout=30)
    assert not broken, broken
    assert answers.get("OK", 0) >= 10 and answers.get("INVALID_ARGUMENT", 0) >= 10, answers  # both kinds reached
    assert health.healthy and health.queued_frames == 0
    assert target.proc.poll() is None and "Traceback" not in target.logs()


@pytest.mark.parametrize("rate", [8000, 22050, 48000])
def test_empty_audio_then_the_end_at_any_rate(target, rate):
    """Edge cases the random mix reaches rarely, each on its own: a stream or an utterance whose only audio is an
    empty message, at a rate that is resampled, ends cleanly — the stream with the frames of no audio at 16 kHz
    (SPEC §3 pads short audio)."""
    with grpc.insecure_channel(target.target) as channel:
        stub = pb_grpc.LipSyncStub(channel)

        def frames_of_an_empty_stream(rate: int) -> int:
            fmt = pb.AudioFormat(encoding=pb.PCM_S16LE, sample_rate=rate)
            responses = list(stub.Stream(iter([
                pb.StreamRequest(config=pb.StreamConfig(model_id="tiny", format=fmt)),
                pb.StreamRequest(audio=b""), pb.StreamRequest(end_of_audio=True)]), timeout=60))
            assert responses[-1].end_of_stream
            return sum(len(r.frames) for r in responses)

        assert frames_of_an_empty_stream(rate) == frames_of_an_empty_stream(16000)
        fmt = pb.AudioFormat(encoding=pb.PCM_S16LE, sample_rate=rate)
        ended = threading.Event()

        def conversation():
            yield pb.ConverseRequest(config=pb.ConverseConfig(model_id="tiny", format=fmt))
            yield pb.ConverseRequest(start_utterance=pb.UtteranceStart(utterance_id="empty"))
            yield pb.ConverseRequest(audio=b"")
            yield pb.ConverseRequest(end_utterance=True)
            ended.wait(30)

        call = stub.Converse(conversation(), timeout=60)
        finished, frames = None, 0
        for response in call:
            frames += response.HasField("frame")
            finished = next((e.finished for e in response.events if e.HasField("finished")), None)
            if finished is not None or frames > 75:  # an utterance of no frames ends at once; 3 s is plenty
                break
        ended.set()
        call.cancel()
    assert finished is not None and finished.utterance_id == "empty" and not finished.error, (finished, frames)
