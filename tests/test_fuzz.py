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
    """Requests drawn from a seeded generator: each field valid most of the time, else one of its edge cases."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def pick(self, *options):
        return self.rng.choice(options)

    def often(self, valid, *bad):
        return valid if self.rng.random() < 0.75 else self.pick(*bad)

    def number(self) -> int:
        return self.pick(-2**31, -1, 0, 1, 3, 101, 7999, 48001, 10**6, 2**31 - 1)

    def model(self) -> str:
        return self.often("tiny", "", "nope", "../../etc/passwd", "a" * 5000, "\x00", "TINY", "tiny ", "é")

    def audio_format(self) -> pb.AudioFormat:
        if self.rng.random() < 0.85:
            return pb.AudioFormat(encoding=self.pick(0, 1, 2), sample_rate=self.pick(0, 8000, 22050, 48000),
                                  channels=self.pick(0, 1, 2))
        return pb.AudioFormat(encoding=self.pick(3, 4, -1), sample_rate=self.number(),
                              channels=self.pick(-1, 3, 1000))

    def samples(self) -> bytes:
        """Up to 2 s of 16 kHz s16 audio: silence, full-scale, noise, NaN floats, or a stray byte count."""
        n = self.pick(0, 1, 3, 640, 6400, 64000, self.rng.randrange(0, 64001))
        kind = self.pick("silence", "noise", "full", "nan")
        if kind == "noise":
            return self.rng.randbytes(n)
        if kind == "nan":
            return (struct.pack("<f", float("nan")) * (n // 4 + 1))[:n]
        return bytes(n) if kind == "silence" else (struct.pack("<hh", 32767, -32768) * (n // 4 + 1))[:n]

    def wav(self) -> bytes:
        """A RIFF/WAVE file whose header fields may lie."""
        data = self.samples()
        fmt = struct.pack("<HHIIHH", self.pick(1, 3, 0, 65535), self.pick(1, 2, 0, 65535),
                          self.number() & 0xFFFFFFFF, self.number() & 0xFFFFFFFF, self.pick(2, 4, 0),
                          self.pick(16, 32, 8, 0))
        return (b"RIFF" + struct.pack("<I", self.pick(36 + len(data), 0, 2**32 - 1)) + b"WAVEfmt "
                + struct.pack("<I", self.pick(16, 0, 1000)) + fmt + b"data"
                + struct.pack("<I", self.pick(len(data), 2**32 - 1, len(data) + 10)) + data)

    def quality(self) -> int:
        return self.often(self.pick(0, 1, 100), -1, 101, 2**31 - 1)

    def output(self) -> int:
        return self.often(self.pick(0, 1), 2, -1)

    def synthesize(self) -> pb.SynthesizeRequest:
        fmt = self.audio_format()
        audio = self.wav() if fmt.encoding == 3 else self.samples()
        return pb.SynthesizeRequest(model_id=self.model(), audio=audio, format=fmt, output=self.output(),
                                    start_frame=self.often(5, -1, 2**31 - 1), jpeg_quality=self.quality())

    def stream(self) -> list[pb.StreamRequest]:
        messages = []
        if self.rng.random() < 0.9:
            messages.append(pb.StreamRequest(config=pb.StreamConfig(
                model_id=self.model(), format=self.audio_format(), start_frame=self.often(0, -1),
                jpeg_quality=self.quality(), lookahead_frames=self.often(self.pick(0, 1, 6), -1, 2**31 - 1),
                output=self.output())))
        for _ in range(self.rng.randrange(0, 8)):
            r = self.rng.random()
            messages.append(pb.StreamRequest(audio=self.often(bytes(6400), self.samples())) if r < 0.75 else
                            pb.StreamRequest(end_of_audio=True) if r < 0.9 else
                            pb.StreamRequest(config=pb.StreamConfig(model_id="tiny")))
        return messages

    def converse(self) -> list[pb.ConverseRequest]:
        messages = []
        if self.rng.random() < 0.9:
            messages.append(pb.ConverseRequest(config=pb.ConverseConfig(
                model_id=self.model(), format=self.audio_format(), start_frame=self.often(0, -1),
                jpeg_quality=self.quality(), output=self.output(),
                output_sample_rate=self.often(self.pick(0, 16000, 48000), 1, -16000, 2**31 - 1))))
        for _ in range(self.rng.randrange(0, 8)):
            r = self.rng.random()
            messages.append(
                pb.ConverseRequest(audio=self.often(bytes(6400), self.samples())) if r < 0.5 else
                pb.ConverseRequest(end_utterance=True) if r < 0.65 else
                pb.ConverseRequest(start_utterance=pb.UtteranceStart(
                    utterance_id=self.pick("", "u1", "x" * 100_000, "\x00"), interrupt=self.pick(True, False)))
                if r < 0.8 else pb.ConverseRequest(interrupt=True) if r < 0.9 else
                pb.ConverseRequest(config=pb.ConverseConfig(model_id="tiny")))
        return messages

    def composite_batch(self) -> mono.CompositeBatchRequest:
        """The Go server's call: batch size, visual inputs, float audio and features of any size."""
        batch = self.often(self.pick(1, 4), 0, -1, 33, 2**31 - 1)
        visual = self.often(b"", bytes(min(max(batch, 0), 8) * 6 * 160 * 160 * 4), self.rng.randbytes(999))
        return mono.CompositeBatchRequest(
            model_id=self.model(), batch_size=batch, visual_frames=visual,
            raw_audio=self.often(bytes(6400 * 2), self.samples()),
            audio_features=self.often(b"", bytes(8192 * 4), self.rng.randbytes(100)),
            start_frame_idx=self.often(0, -1, 2**31 - 1), sample_rate=self.often(16000, 0, -1, 7, 10**6))


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
    answers: dict[str, int] = {}
    broken: list[str] = []
    with grpc.insecure_channel(target.target) as channel:
        stub, compat = pb_grpc.LipSyncStub(channel), mono_grpc.MonolithicServiceStub(channel)

        def run(call: Callable[[], object]) -> None:
            try:
                answer = call()
                code = grpc.StatusCode.OK
                error = getattr(answer, "error", "")  # the compatibility service answers failures in a field
                if any(path in error for path in server_paths) or "Traceback" in error:
                    broken.append(f"compat error: {error[:200]}")
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details() or ""
                if code in BROKEN or any(path in details for path in server_paths) or "Traceback" in details:
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
