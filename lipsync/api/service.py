"""`lipsync.v1.LipSync`: each RPC parses its request (api.convert, api.limits), hands the work to the runtime
(registry, scheduler, Stream and live sessions) and builds its response; `api.protocol` wraps every one."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, AsyncIterator

from lipsync import __version__
from lipsync._proto import lipsync_pb2 as pb
from lipsync._proto import lipsync_pb2_grpc as pb_grpc
from lipsync.api import convert, metrics
from lipsync.api.limits import model_id as checked_model_id
from lipsync.api.protocol import first_config, server_streaming, streaming, unary
from lipsync.api.security import principal
from lipsync.errors import FailedPrecondition, ResourceExhausted
from lipsync.model import audio_features
from lipsync.runtime.live import LiveSession, admit
from lipsync.runtime.scheduler import Priority
from lipsync.runtime.streaming import StreamSession

if TYPE_CHECKING:
    from lipsync.api.server import Server

log = logging.getLogger("lipsync.api.server")

# methods whose responses may be wire bytes (api.protocol.PreSerialized)
PRESERIALIZED = {"/lipsync.v1.LipSync/Stream", "/lipsync.v1.LipSync/Converse"}


class LipSyncService(pb_grpc.LipSyncServicer):
    def __init__(self, server: Server):
        self.s = server

    @unary
    async def Synthesize(self, request: pb.SynthesizeRequest, context, started: float) -> pb.SynthesizeResponse:
        limits = self.s.limits
        quality, start = limits.quality(request.jpeg_quality), limits.start_frame(request.start_frame)
        square = convert.square_output(request.output)
        fmt = convert.audio_format(limits, request.format, allow_wav=True)
        self.s.entry(checked_model_id(request.model_id))
        wave = await asyncio.to_thread(self.s.decode_audio, request.audio, fmt)
        async with self.s.model(request.model_id) as (entry, loaded_now, load_ms):
            await self.s.check_response_fits(entry, audio_features.frame_count(wave.numel()), quality)
            t0 = time.perf_counter()
            _, features = await entry.scheduler.features(entry.scheduler.feature_stream(), wave, end=True)
            audio_ms = (time.perf_counter() - t0) * 1e3
            ids = entry.pipeline.avatar.frames_for(start, 0, features.shape[0])
            jpegs, timings = await entry.scheduler.render(features, ids, quality, priority=Priority.BATCH,
                                                          square=square)
            squares = [entry.pipeline.avatar.rects[f] for f in ids] if square else None
        timings.update(audio=audio_ms, total=(time.perf_counter() - started) * 1e3)
        response = pb.SynthesizeResponse(frames=convert.frames(0, ids, jpegs, squares),
                                         timings=convert.timings(timings),
                                         model_loaded=loaded_now, model_load_ms=load_ms if loaded_now else 0,
                                         model_id=request.model_id, device=entry.device)
        if response.ByteSize() > limits.max_message_bytes:  # the estimate was beaten: say so, do not fail to send
            limits.check_response_size(len(ids), response.ByteSize() / max(len(ids), 1))
        self.s.record("synthesize", entry, len(ids), timings)
        return response

    async def Stream(self, requests, context) -> AsyncIterator[pb.StreamResponse]:
        limits = self.s.limits
        async for response in streaming("Stream", self.s, "streams", metrics.ACTIVE_STREAMS,
                                        (limits.stream_idle_timeout_s, "server.stream_idle_timeout_s"), requests,
                                        context, self._stream):
            yield response

    async def _opened(self, requests, rpc: str):
        """A streaming call's config, checked before any model is touched: (the messages after it, the config,
        JPEG quality, start frame, audio format)."""
        limits = self.s.limits
        requests = requests.__aiter__()
        cfg = await first_config(requests, rpc, limits.config_timeout_s)
        quality, start = limits.quality(cfg.jpeg_quality), limits.start_frame(cfg.start_frame)
        fmt = convert.audio_format(limits, cfg.format, allow_wav=False)
        self.s.entry(checked_model_id(cfg.model_id))
        return requests, cfg, quality, start, fmt

    async def _stream(self, requests, context) -> AsyncIterator[pb.StreamResponse]:
        s, limits = self.s, self.s.limits
        requests, cfg, quality, start, fmt = await self._opened(requests, "Stream")
        lookahead, square = limits.lookahead(cfg.lookahead_frames), convert.square_output(cfg.output)
        async with s.model(cfg.model_id) as (entry, loaded_now, load_ms):
            await s.accept(context)
            per_message = await s.frames_per_message(entry, quality, square)  # responses sized before any work
            session = StreamSession(entry.scheduler, fmt, start, quality, lookahead, limits.stream_buffer_frames,
                                    limits.max_audio_s, square, per_message)
            rects = entry.pipeline.avatar.rects
            loaded = dict(model_loaded=loaded_now, model_load_ms=load_ms if loaded_now else 0)
            try:
                async for chunk in session.run(convert.stream_messages(requests)):
                    if chunk.end:
                        yield pb.StreamResponse(end_of_stream=True, **loaded)
                        break
                    s.record("stream_chunk", entry, len(chunk.jpegs), chunk.timings)
                    squares = [rects[f] for f in chunk.avatar_frames] if square else None
                    yield convert.stream_response_bytes(chunk.first_index, chunk.avatar_frames, chunk.jpegs,
                                                        chunk.timings, squares, **loaded)  # wire bytes
                    loaded = {}  # said once, in the first response
            finally:
                log.info(json.dumps({"event": "stream", "model": cfg.model_id, "frames": session.sent,
                                     "audio_s": round(session.received / fmt.sample_rate, 3)}))

    async def Converse(self, requests, context) -> AsyncIterator[pb.ConverseResponse]:
        live = self.s.limits.live
        async for response in streaming("Converse", self.s, "sessions", metrics.LIVE_SESSIONS,
                                        (live.idle_timeout_s, "server.live.idle_timeout_s"), requests, context,
                                        self._converse):
            yield response

    async def _converse(self, requests, context) -> AsyncIterator[pb.ConverseResponse]:
        s, limits = self.s, self.s.limits
        requests, cfg, quality, start, fmt = await self._opened(requests, "Converse")
        square = convert.square_output(cfg.output)
        async with s.model(cfg.model_id) as (entry, loaded_now, load_ms):
            scheduler = entry.scheduler
            await scheduler.calibrate()
            idle = [] if square else await scheduler.idle_jpegs(quality)
            ok, why = admit(scheduler, limits.live)  # admitted and counted with no await between: atomic
            if not ok:
                raise ResourceExhausted(why)
            session = LiveSession(scheduler, limits.live, fmt, cfg.output_sample_rate or fmt.sample_rate, start,
                                  quality, idle, square)
            try:
                log.info(json.dumps({"event": "live_session_open", "session": session.id, "model": cfg.model_id,
                                     "admitted": why}))
                await s.accept(context)
                yield pb.ConverseResponse(session=convert.session_info(session, entry, loaded_now, load_ms))
                async for frame, events in session.run(convert.live_messages(requests)):
                    yield convert.live_frame_bytes(frame, events)  # wire bytes (api.protocol.PreSerialized)
                    metrics.observe_live(cfg.model_id, events)
            finally:
                session.close()  # also if the call ended before its frames began
                log.info(json.dumps({"event": "live_session_close", "session": session.id, "model": cfg.model_id,
                                     **session.stats, **session.pacing.summary()}))

    @server_streaming
    async def GetAvatar(self, request: pb.GetAvatarRequest, context) -> AsyncIterator[pb.AvatarFrame]:
        """The avatar's frames as JPEG (encoded once per quality and kept, as live sessions' idle frames are) and
        their crop rectangles, one message per frame."""
        quality = self.s.limits.quality(request.jpeg_quality)
        wanted = self.s.entry(checked_model_id(request.model_id))
        if not wanted.loaded and wanted.loading is None and "admin" not in principal().roles:
            # the avatar of a model not in memory: an infer token does not load (and evict) models by asking for it
            raise FailedPrecondition(f"model {request.model_id!r} is not loaded: it loads with its first Synthesize, "
                                     "Stream or Converse (or an admin's LoadModel); ask for its avatar then")
        async with self.s.model(request.model_id) as (entry, _, _):
            avatar = entry.pipeline.avatar
            jpegs = await entry.scheduler.idle_jpegs(quality)  # encoded once per quality, kept for live sessions
            # one frame a message: refused with the setting's name, never gRPC's own "larger than max" after sending
            self.s.limits.check_response_size(1, max(len(j) for j in jpegs) + 1024)
            height, width = avatar.frames.shape[2:]
        for index, (data, corners) in enumerate(zip(jpegs, avatar.rects)):
            yield convert.avatar_frame(index, len(jpegs), data, corners, width, height)

    @unary
    async def ListModels(self, request, context, started) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[convert.model_info(e) for e in self.s.visible_entries()])

    @unary
    async def LoadModel(self, request, context, started) -> pb.LoadModelResponse:
        self.s.entry(checked_model_id(request.model_id))
        entry, already, ms = await self.s.registry.load(request.model_id, request.device or None)
        return pb.LoadModelResponse(model=convert.model_info(entry), already_loaded=already, load_ms=ms)

    @unary
    async def UnloadModel(self, request, context, started) -> pb.UnloadModelResponse:
        self.s.entry(checked_model_id(request.model_id))
        return pb.UnloadModelResponse(was_loaded=await self.s.registry.unload(request.model_id))

    @unary
    async def GetModelStats(self, request, context, started) -> pb.GetModelStatsResponse:
        entries = [self.s.entry(checked_model_id(request.model_id))] if request.model_id else \
            self.s.visible_entries()
        return pb.GetModelStatsResponse(models=[convert.model_stats(e) for e in entries])

    @unary
    async def Health(self, request, context, started) -> pb.HealthResponse:
        r = self.s.registry
        return pb.HealthResponse(healthy=self.s.accepting, loaded_models=sum(e.loaded for e in r.entries.values()),
                                 max_models=r.config.max_models * len(r.devices), devices=convert.devices(r),
                                 version=__version__, active_streams=self.s.open_calls["streams"],
                                 queued_frames=r.queued_frames)

