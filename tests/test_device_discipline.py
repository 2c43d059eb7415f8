"""One device discipline: the event loop never runs a tensor operation.

On CUDA every tensor a device uses must be made and consumed on that device's inference/encode threads, where the
streams and the events between them are managed; an operation on the event-loop thread runs on the default stream
against tensors of the inference stream, with nothing ordering the two (silent wrong mouths under load). This holds
on every device, so it is checked here on the CPU: a real server runs in this process with a dispatch mode on its
event-loop thread that records every aten call made there (modes are per thread: the device threads are not seen),
while real gRPC clients call every RPC that touches a model. Any call recorded fails the test, with where it came
from.

The per-frame host→device copies are counted the same way on the device threads (`HostCopies`): tensors built from
Python data (`aten.lift_fresh`, one host→device copy each on a GPU) and copies from the host.
"""
from __future__ import annotations

import asyncio
import threading
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SPEECH
from test_server import model_override
from torch.utils._python_dispatch import TorchDispatchMode

from lipsync._proto import lipsync_pb2 as pb
from lipsync._proto import lipsync_pb2_grpc as pb_grpc
from lipsync._proto import monolithic_pb2 as mono
from lipsync._proto import monolithic_pb2_grpc as mono_grpc
from lipsync.apps.client import Say, channel, converse
from lipsync.codec import audio

S16 = pb.AudioFormat(encoding=pb.PCM_S16LE, sample_rate=16000, channels=1)
LIPSYNC = str(Path(__file__).resolve().parent.parent / "lipsync")


class LoopOps(TorchDispatchMode):
    """Records every aten call made on the thread it is entered on, with the lipsync line that made it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        frames = [f for f in traceback.extract_stack()[:-1] if f.filename.startswith(LIPSYNC)]
        where = f"{frames[-1].filename[len(LIPSYNC) - 7:]}:{frames[-1].lineno} {frames[-1].name}" if frames else "?"
        self.calls.append((str(func), where))
        return func(*args, **(kwargs or {}))


TRANSFER = str(Path(LIPSYNC) / "model" / "transfer.py")
CODEC = str(Path(LIPSYNC) / "codec")


class HostCopies(TorchDispatchMode):
    """Counts, on the thread it is entered on, what would copy host data to the device outside the staging module
    (lipsync.model.transfer: pinned, asynchronous): tensors built from Python data (`aten.lift_fresh`; on a GPU a
    blocking copy from pageable memory each) and copies between devices. The codec layer (PCM decoding and
    resampling) works on host tensors by design, before the staging module moves its samples: not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        crossing = func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default) and any(
            isinstance(a, torch.Tensor) and a.device.type == "cpu" for a in args[:2]) and (
            str(kwargs.get("device", args[0].device)) != "cpu" if func is torch.ops.aten._to_copy.default
            else args[0].device.type != "cpu")
        if func is torch.ops.aten.lift_fresh.default or crossing:
            stack = traceback.extract_stack()[:-1]
            mine = [f for f in stack if f.filename.startswith(LIPSYNC)]
            if not any(f.filename == TRANSFER for f in stack) and not (mine and mine[-1].filename.startswith(CODEC)):
                where = f"{mine[-1].filename[len(LIPSYNC) - 7:]}:{mine[-1].lineno} {mine[-1].name}" if mine else "?"
                self.calls.append((str(func), where))
        return func(*args, **kwargs)


class InProcessServer:
    """`lipsync serve` built from its configuration in this process, its event loop on a thread of its own with
    LoopOps entered there."""

    def __init__(self, overrides: list[str], device: str = "cpu") -> None:
        from lipsync.api.server import ServeConfig
        from lipsync.config import load_config
        self.config = ServeConfig.from_dict(load_config(["server.host=127.0.0.1", "server.port=0",
                                                         "server.metrics_port=-1", "engine=eager",
                                                         "models=none", *overrides]))
        self.device = torch.device(device)
        self.ops = LoopOps()
        self.copies = HostCopies()  # entered on the device's inference and encode threads
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop_requested: asyncio.Event | None = None
        self.failed: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="server-loop", daemon=True)
        self.thread.start()
        if not self.ready.wait(120) or self.failed:
            raise RuntimeError(f"in-process server did not start: {self.failed!r}")

    def _run(self) -> None:
        from lipsync.api.server import build

        async def main() -> None:
            server, state, self.port = await build(self.config)
            self.state = state
            for pool in state.registry.workers.get(self.device):  # the threads that serve the device
                pool.submit(self.copies.__enter__).result()
            self.stop_requested = asyncio.Event()
            self.loop = asyncio.get_running_loop()
            self.ready.set()
            await self.stop_requested.wait()
            state.accepting = False
            await server.stop(5)
            await state.registry.close()
        try:
            with self.ops:
                asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.failed = exc
            self.ready.set()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.stop_requested.set)
        self.thread.join(60)


def pcm(seconds: float, offset: int = 0) -> bytes:
    wave = audio.load_wav(SPEECH)[offset:offset + int(seconds * 16000)]
    return (wave.numpy() * 32767).astype(np.int16).tobytes()


async def every_rpc(target: str) -> dict[str, int]:
    """Every RPC that touches a model, as clients use them; what each returned, in counts."""
    seen: dict[str, int] = {}
    async with channel(target) as ch:
        stub, compat = pb_grpc.LipSyncStub(ch), mono_grpc.MonolithicServiceStub(ch)
        loaded = await stub.LoadModel(pb.LoadModelRequest(model_id="tiny"))
        seen["load"] = int(loaded.model.loaded)
        for output in (pb.FULL_FRAME, pb.SQUARE):
            got = await stub.Synthesize(pb.SynthesizeRequest(model_id="tiny", audio=pcm(0.6), format=S16,
                                                             jpeg_quality=80, output=output))
            seen[f"synthesize-{output}"] = len(got.frames)
        wav_rate = pb.AudioFormat(encoding=pb.PCM_S16LE, sample_rate=22050, channels=1)
        for output, fmt in ((pb.FULL_FRAME, S16), (pb.SQUARE, wav_rate)):
            data = pcm(0.8)

            async def requests(output=output, fmt=fmt, data=data):
                yield pb.StreamRequest(config=pb.StreamConfig(model_id="tiny", format=fmt, jpeg_quality=70,
                                                              output=output))
                for lo in range(0, len(data), 3200):
                    yield pb.StreamRequest(audio=data[lo:lo + 3200])
                yield pb.StreamRequest(end_of_audio=True)
            seen[f"stream-{output}"] = sum([len(r.frames) async for r in stub.Stream(requests())])
        seen["avatar"] = len([f async for f in stub.GetAvatar(pb.GetAvatarRequest(model_id="tiny", jpeg_quality=60))])
        fmt = audio.AudioFormat("s16le", 16000, 1)
        # speech played to its end (however long a loaded machine makes its lead), at another output rate
        played = await converse(stub, "tiny", [Say(pcm(0.5), fmt, at=0.1, id="a")], 60, quality=70,
                                output_rate=24000, until_played=True)
        seen["converse-speech"] = sum(f.kind == pb.SPEECH for f in played.frames)
        # SQUARE output, idle frames, and a barge-in cutting what was queued
        cut = await converse(stub, "tiny", [Say(pcm(0.5), fmt, at=0.1, id="a"),
                                            Say(pcm(1.5, 8000), fmt, at=1.2, interrupt_at=1.8, id="b")],
                             2.6, quality=70, output=pb.SQUARE)
        seen["converse-barge-in"] = len(cut.frames)
        raw = (np.frombuffer(pcm(0.4), np.int16) / 32768).astype("<f4").tobytes()
        answer = await compat.InferBatchComposite(mono.CompositeBatchRequest(model_id="tiny", raw_audio=raw,
                                                                             batch_size=4, start_frame_idx=1))
        seen["compat"] = len(answer.composited_frames)
        seen["unload"] = int((await stub.UnloadModel(pb.UnloadModelRequest(model_id="tiny"))).was_loaded)
        seen["reload"] = int((await stub.LoadModel(pb.LoadModelRequest(model_id="tiny"))).model.loaded)
    return seen


@pytest.fixture(scope="module")
def discipline(weights, tiny_avatar):
    srv = InProcessServer([model_override("tiny", weights, tiny_avatar, variant="160"),
                           "server.live.time_scale=2"])
    try:
        seen = asyncio.run(every_rpc(srv.target))
    finally:
        srv.stop()
    return srv, seen


def test_every_rpc_ran(discipline):
    """The calls really reached the model (so an empty record below means something)."""
    _, seen = discipline
    assert all(seen.values()), seen


def test_the_event_loop_runs_no_tensor_operation(discipline):
    srv, _ = discipline
    assert srv.failed is None, srv.failed
    made: dict[str, int] = {}
    for func, where in srv.ops.calls:
        made[f"{func} at {where}"] = made.get(f"{func} at {where}", 0) + 1
    assert not made, "tensor operations on the event-loop thread:\n" + "\n".join(
        f"  {n:5d} × {call}" for call, n in sorted(made.items(), key=lambda kv: -kv[1]))


def test_no_host_to_device_copy_per_frame(discipline):
    """Served frames make no tensor from Python data and copy nothing from the host outside the staging module
    (indices made on the device or staged through pinned memory): 0 per frame."""
    srv, seen = discipline
    frames = sum(n for rpc, n in seen.items() if rpc.startswith(("synthesize", "stream", "converse", "compat")))
    made: dict[str, int] = {}
    for func, where in srv.copies.calls:
        made[f"{func} at {where}"] = made.get(f"{func} at {where}", 0) + 1
    assert frames >= 50, seen
    assert not made, f"host→device copies on the device threads ({len(srv.copies.calls) / frames:.2f} per frame):\n" \
        + "\n".join(f"  {n:5d} × {call}" for call, n in sorted(made.items(), key=lambda kv: -kv[1]))


def test_the_recorder_sees_operations_on_its_thread():
    """The guard fires (and only on the thread it was entered on)."""
    ops = LoopOps()
    with ops:
        torch.zeros(2) + 1
        other = threading.Thread(target=lambda: torch.ones(2) * 2)
        other.start()
        other.join()
    assert [f for f, _ in ops.calls] == ["aten.zeros.default", "aten.add.Tensor"]


