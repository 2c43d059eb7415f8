"""`lipsync web`: watch and talk to an avatar in a browser, over WebRTC.

One HTTP server (aiohttp) serves the page and bridges each browser to one live session (Converse) on a lipsync
server, like any other gRPC client. The session's frames become the peer connection's video track (JPEG decoded
here, encoded once per browser by aiortc as VP8 or H.264) and the audio they carry its Opus track, both paced by
the server's clock. What the avatar says comes from the browser's microphone (cut into utterances by a level gate:
it repeats what you said), a dropped audio file (PyAV decodes it) or text spoken by espeak-ng where it is
installed. Needs `pip install -e '.[web]'` from a checkout.
"""
from __future__ import annotations

import asyncio
import collections
import fractions
import hmac
import ipaddress
import logging
import math
import shutil
import ssl
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

import av
import grpc
import numpy as np
import torch
from aiohttp import web
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from lipsync_client.avatar import OUTPUTS, Compositor, compositor_for

from lipsync import timebase
from lipsync._proto import lipsync_pb2 as pb
from lipsync._proto import lipsync_pb2_grpc as pb_grpc
from lipsync.apps.client import Credentials, channel, open_stream, routing
from lipsync.apps.web.config import WebConfig
from lipsync.codec import audio
from lipsync.codec.jpeg import decode_rgb

log = logging.getLogger(__name__)

PAGE = Path(__file__).resolve().parent.parent / "static" / "web.html"
VIDEO_CLOCK = 90000  # RTP video clock (Hz)
HTTP_STATUS = {  # gRPC status of a refused session → HTTP status for the page
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 503, grpc.StatusCode.UNAVAILABLE: 502, grpc.StatusCode.DEADLINE_EXCEEDED: 504}


class WebError(Exception):
    """A request the page made that cannot be served: its HTTP status and a message for the user."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------- microphone → utterances
def level_dbfs(block: np.ndarray) -> float:
    """RMS level of s16 samples in dB relative to full scale."""
    rms = math.sqrt(float(np.mean(block.astype(np.float64) ** 2))) / 32768.0 if len(block) else 0.0
    return 20.0 * math.log10(max(rms, 1e-6))


class SpeechGate:
    """Cuts a microphone's s16 mono audio into utterances by level, in 20 ms blocks: speech starts at a block
    above the threshold (with the pre-roll before it) and ends after the hangover of blocks below it; bursts with
    fewer loud blocks than the minimum are dropped; an utterance reaching the maximum length is cut there."""

    def __init__(self, rate: int, threshold_dbfs: float, min_speech_ms: int, hangover_ms: int, preroll_ms: int,
                 max_utterance_s: float):
        self.block = rate // 50
        self.threshold = threshold_dbfs
        self.min_loud = max(1, math.ceil(min_speech_ms / 20))
        self.hangover = max(1, math.ceil(hangover_ms / 20))
        self.tail = min(self.hangover, 10)  # trailing quiet blocks kept (200 ms)
        self.max_blocks = max(1, int(max_utterance_s * 50))
        self.preroll: collections.deque[np.ndarray] = collections.deque(maxlen=max(1, preroll_ms // 20))
        self.level = -120.0  # of the latest block
        self.reset()

    def reset(self) -> None:
        self.rest = np.zeros(0, np.int16)
        self.speech: list[np.ndarray] | None = None
        self.loud = self.quiet = 0
        self.preroll.clear()

    @property
    def speaking(self) -> bool:
        return self.speech is not None

    def push(self, pcm: np.ndarray) -> list[bytes]:
        """Feed samples; returns the utterances completed by them (s16le bytes)."""
        samples = np.concatenate([self.rest, pcm.astype(np.int16, copy=False)])
        whole = len(samples) // self.block * self.block
        self.rest = samples[whole:]
        done = []
        for block in samples[:whole].reshape(-1, self.block):
            self.level = level_dbfs(block)
            loud = self.level >= self.threshold
            if self.speech is None:
                if loud:
                    self.speech, self.loud, self.quiet = [*self.preroll, block], 1, 0
                    self.preroll.clear()
                else:
                    self.preroll.append(block)
                continue
            self.speech.append(block)
            self.loud, self.quiet = (self.loud + 1, 0) if loud else (self.loud, self.quiet + 1)
            if self.quiet >= self.hangover or len(self.speech) >= self.max_blocks:
                if (utterance := self._close()) is not None:
                    done.append(utterance)
        return done

    def _close(self) -> bytes | None:
        blocks, loud, quiet = self.speech or [], self.loud, self.quiet
        self.speech, self.loud, self.quiet = None, 0, 0
        if loud < self.min_loud:
            return None
        return np.concatenate(blocks[:len(blocks) - quiet + min(quiet, self.tail)]).tobytes()


# --------------------------------------------------------------------------- session frames → WebRTC tracks
def to_video_frame(live: pb.LiveFrame, compositor: Compositor | None) -> av.VideoFrame:
    """A session frame as a video frame: a full frame's JPEG decoded, or (SQUARE output) its square pasted."""
    rgb = compositor.rgb(live) if compositor is not None else decode_rgb(live.jpeg).numpy()
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
    frame.pts, frame.time_base = live.index * VIDEO_CLOCK // timebase.FPS, fractions.Fraction(1, VIDEO_CLOCK)
    return frame


class QueuedTrack(MediaStreamTrack):
    """A track fed by the session reader: at most `backlog` items wait for the encoder; beyond, the oldest is
    dropped (counted), so a slow peer sees a skip rather than a growing delay."""

    def __init__(self, backlog: int):
        super().__init__()
        self.items: asyncio.Queue = asyncio.Queue()
        self.backlog, self.dropped = backlog, 0

    def put(self, item) -> None:
        while self.items.qsize() >= self.backlog:
            self.items.get_nowait()
            self.dropped += 1
        self.items.put_nowait(item)

    def end(self) -> None:
        self.items.put_nowait(None)

    async def next_item(self):
        """The next item; the track stops once the session ended or the peer went away."""
        item = await self.items.get()
        if item is None or self.readyState != "live":
            self.stop()
            raise MediaStreamError
        return item


class SessionVideoTrack(QueuedTrack):
    """The session's frames (LiveFrame items) as a video track: the encoder takes them as they arrive (the server
    paces them). SQUARE output: `compositor` pastes each square onto its avatar frame."""
    kind = "video"

    def __init__(self, backlog: int):
        super().__init__(backlog)
        self.sent = 0
        self.decode_ms = 0.0  # JPEG → frame, mean
        self.compositor: Compositor | None = None

    async def recv(self) -> av.VideoFrame:
        live = await self.next_item()
        started = time.perf_counter()
        frame = await asyncio.to_thread(to_video_frame, live, self.compositor)
        self.sent += 1
        self.decode_ms += ((time.perf_counter() - started) * 1e3 - self.decode_ms) / min(self.sent, 100)
        return frame


class SessionAudioTrack(QueuedTrack):
    """The audio the session's frames carry (40 ms of s16le each, silence while idle) as an audio track."""
    kind = "audio"

    def __init__(self, rate: int, backlog: int):
        super().__init__(backlog)
        self.rate, self.samples = rate, 0

    async def recv(self) -> av.AudioFrame:
        pcm = await self.next_item()
        frame = av.AudioFrame.from_ndarray(np.frombuffer(pcm, np.int16).reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = self.rate, self.samples, fractions.Fraction(1, self.rate)
        self.samples += frame.samples
        return frame


def to_session_pcm(wave: torch.Tensor, rate: int, session_rate: int) -> bytes:
    """Mono float samples at `rate` → s16le at the session's rate."""
    return audio.encode_s16(audio.resample(wave, rate, session_rate) if rate != session_rate else wave)


# --------------------------------------------------------------------------- one browser ↔ one live session
class BrowserSession:
    """A browser's peer connection bridged to one Converse session."""

    def __init__(self, stub: pb_grpc.LipSyncStub, model: str, config: WebConfig):
        self.id = uuid.uuid4().hex[:12]
        self.stub, self.model, self.config = stub, model, config
        self.requests: asyncio.Queue[pb.ConverseRequest | None] = asyncio.Queue()
        self.video = SessionVideoTrack(config.video_backlog)
        self.audio = SessionAudioTrack(config.sample_rate, config.audio_backlog)
        self.gate = SpeechGate(config.sample_rate, config.gate_threshold_dbfs, config.gate_min_speech_ms,
                               config.gate_hangover_ms, config.gate_preroll_ms, config.max_utterance_s)
        self.mic_on = False
        self.pc: RTCPeerConnection | None = None
        self.call = None
        self.info: pb.SessionInfo | None = None
        self.tasks: list[asyncio.Task] = []
        self.closed = asyncio.Event()
        self.utterance_ids = iter(range(1, 1 << 62))
        self.counts = collections.Counter()  # frames by kind, utterances sent/started/finished/interrupted, late
        self.showing_speech = False  # the last frame was a speech frame (or held in one)
        self.latency_ms = 0.0      # server: the last utterance's first audio → its first frame
        self.lag_ms = 0.0          # the last frame's arrival behind the earliest-arriving one's schedule (jitter)
        self.first_arrival: float | None = None
        self.error = ""
        self.speaking_text = False  # a text-to-speech run for this session is under way

    async def open(self, offer: RTCSessionDescription) -> RTCSessionDescription:
        """Start the live session, then answer the browser's offer with its video and audio tracks."""
        rate = self.config.sample_rate
        self.requests.put_nowait(pb.ConverseRequest(config=pb.ConverseConfig(
            model_id=self.model, jpeg_quality=self.config.jpeg_quality, output_sample_rate=rate,
            format=pb.AudioFormat(encoding=pb.PCM_S16LE, sample_rate=rate, channels=1),
            output=OUTPUTS[self.config.output])))
        try:
            self.video.compositor = await compositor_for(self.stub, self.model, self.config.output,
                                                         self.config.jpeg_quality, keep=8)
            self.call = open_stream(self.stub.Converse, self._messages(), metadata=routing(self.model))
            first = await self.call.read()
        except grpc.aio.AioRpcError as exc:
            raise WebError(HTTP_STATUS.get(exc.code(), 502), f"{exc.code().name}: {exc.details()}") from None
        if first is grpc.aio.EOF or not first.HasField("session"):
            raise WebError(502, "the server ended the session before it started")
        self.info = first.session
        log.info("session %s: model %s on %s (lipsync session %s)", self.id, self.model, self.info.device,
                 self.info.session_id)
        self.pc = pc = RTCPeerConnection()

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                self.tasks.append(asyncio.ensure_future(self._listen(track)))

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            log.info("session %s: peer connection %s", self.id, pc.connectionState)
            if pc.connectionState in ("failed", "closed"):
                await self.close()

        try:
            await pc.setRemoteDescription(offer)
            pc.addTrack(self.video)
            pc.addTrack(self.audio)
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:  # noqa: BLE001 - the offer is the page's input: failing to negotiate it is a 400
            log.info("session %s: the offer could not be answered: %r", self.id, exc)
            raise WebError(400, f"the offer is not a WebRTC offer this bridge can answer "
                                f"({type(exc).__name__})") from None
        self.tasks.append(asyncio.ensure_future(self._read()))
        return pc.localDescription

    async def _messages(self) -> AsyncIterator[pb.ConverseRequest]:
        while (message := await self.requests.get()) is not None:
            yield message

    async def _read(self) -> None:
        """Session frames → the tracks; events → the counters the page shows."""
        interval = self.info.frame_interval_ms / 1e3 if self.info and self.info.frame_interval_ms else timebase.FRAME_S
        try:
            while (response := await self.call.read()) is not grpc.aio.EOF:
                frame = response.frame
                now = time.perf_counter()
                scheduled = now - frame.index * interval  # the session's start, as this frame's arrival implies
                self.first_arrival = scheduled if self.first_arrival is None else min(self.first_arrival, scheduled)
                self.lag_ms = (now - self.first_arrival - frame.index * interval) * 1e3
                self.video.put(frame)
                self.audio.put(frame.audio)
                kind = pb.FrameKind.Name(frame.kind).lower()
                self.counts[kind] += 1
                for event in response.events:
                    which = event.WhichOneof("event")
                    if which == "started":
                        self.latency_ms = event.started.latency_ms
                    elif which == "finished" and event.finished.dropped:
                        which = "dropped"  # cut before it showed: it will not start
                    elif which == "finished" and event.finished.interrupted:
                        which = "interrupted"
                    self.counts[which] += 1
                self.showing_speech = frame.kind in (pb.SPEECH, pb.HELD)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.error = f"{exc.code().name}: {exc.details()}"
                log.warning("session %s ended: %s", self.id, self.error)
        except Exception as exc:  # a bug here must not pass silently: the page shows it
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("session %s: reading frames failed", self.id)
        finally:
            self.video.end()
            self.audio.end()

    async def _listen(self, track: MediaStreamTrack) -> None:
        """The browser's microphone → the level gate → utterances (while the microphone is switched on)."""
        to_session = av.AudioResampler(format="s16", layout="mono", rate=self.config.sample_rate)
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            for piece in to_session.resample(frame):
                pcm = piece.to_ndarray().reshape(-1)
                if not self.mic_on:
                    self.gate.level = level_dbfs(pcm)
                    continue
                for utterance in self.gate.push(pcm):
                    self.say(utterance, "mic")

    def set_mic(self, on: bool) -> None:
        self.mic_on = on
        self.gate.reset()

    def say(self, pcm: bytes, source: str) -> str:
        """Queue one utterance (s16le mono at the session rate); it plays after those before it."""
        if self.closed.is_set():
            raise WebError(410, "this session has ended")
        utterance = f"{source}-{next(self.utterance_ids)}"
        self.requests.put_nowait(pb.ConverseRequest(start_utterance=pb.UtteranceStart(utterance_id=utterance)))
        step = 2 * self.config.sample_rate  # one second per message
        for k in range(0, len(pcm), step):
            self.requests.put_nowait(pb.ConverseRequest(audio=pcm[k:k + step]))
        self.requests.put_nowait(pb.ConverseRequest(end_utterance=True))
        self.counts["sent"] += 1
        log.info("session %s: utterance %s, %.2f s", self.id, utterance, len(pcm) / step)
        return utterance

    def interrupt(self) -> None:
        self.requests.put_nowait(pb.ConverseRequest(interrupt=True))
        self.counts["interrupt_requests"] += 1

    def state(self) -> str:
        """What the page's badge says: speaking, or preparing speech (an utterance sent whose first frame has not
        come yet: the server plans and renders it), or idle."""
        if self.showing_speech:
            return "speaking"
        waiting = self.counts["sent"] - self.counts["started"] - self.counts["dropped"] > 0
        return "preparing speech" if waiting else "idle"

    def stats(self) -> dict[str, Any]:
        c = self.counts
        return {
            "session": self.id, "model": self.model, "device": self.info.device if self.info else "",
            "state": self.state(), "error": self.error, "frames": sum(c[k] for k in ("idle", "speech", "held")),
            "speech_frames": c["speech"], "idle_frames": c["idle"], "late_frames": c["late"],
            "dropped_frames": self.video.dropped, "utterances_sent": c["sent"], "utterances_started": c["started"],
            "utterances_finished": c["finished"], "utterances_interrupted": c["interrupted"],
            "start_latency_ms": round(self.latency_ms, 1), "arrival_lag_ms": round(self.lag_ms, 1),
            "decode_ms": round(self.video.decode_ms, 2), "mic_on": self.mic_on, "mic_speaking": self.gate.speaking,
            "mic_level_dbfs": round(self.gate.level, 1),
        }

    async def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        self.requests.put_nowait(None)
        if self.call is not None:
            self.call.cancel()
        for task in self.tasks:
            task.cancel()
        if self.pc is not None:
            await self.pc.close()
        log.info("session %s closed (%d frames, %d utterances)", self.id, self.stats()["frames"], self.counts["sent"])


# --------------------------------------------------------------------------- the HTTP side
class WebBridge:
    """The page, its JSON API and the browser sessions."""

    def __init__(self, server: str, config: WebConfig, credentials: Credentials | None = None):
        self.server, self.config, self.credentials = server, config, credentials
        self.sessions: dict[str, BrowserSession] = {}
        self.opening = 0  # sessions counted against web.max_sessions while their offer is answered
        self._janitors: set[asyncio.Future] = set()  # forget closed sessions a while after they end
        self.tts = shutil.which(config.tts_command) if config.tts_command else None
        self.tts_running = 0  # text-to-speech children alive now (web.max_tts_jobs)
        self.token = config.token()
        self.hosts = allowed_hosts(config)
        self.channel: grpc.aio.Channel | None = None
        self.stub: pb_grpc.LipSyncStub | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=int(self.config.max_upload_mb * 2**20))
        app.router.add_get("/", self.page)
        app.router.add_get("/api/config", self.describe)
        app.router.add_post("/api/sessions", self.start)
        app.router.add_get("/api/sessions/{id}", self.session_stats)
        app.router.add_post("/api/sessions/{id}/mic", self.mic)
        app.router.add_post("/api/sessions/{id}/audio", self.upload)
        app.router.add_post("/api/sessions/{id}/say", self.say_text)
        app.router.add_post("/api/sessions/{id}/interrupt", self.interrupt)
        app.router.add_post("/api/sessions/{id}/close", self.close_session)
        app.on_startup.append(self._connect)
        app.on_shutdown.append(self._shutdown)
        app.middlewares.append(self._errors)
        app.middlewares.append(self._gate)
        return app

    async def _connect(self, app: web.Application) -> None:
        self.channel = channel(self.server, credentials=self.credentials)
        self.stub = pb_grpc.LipSyncStub(self.channel)

    async def _shutdown(self, app: web.Application) -> None:
        await asyncio.gather(*(s.close() for s in list(self.sessions.values())))
        for janitor in list(self._janitors):
            janitor.cancel()
        if self.channel is not None:
            await self.channel.close()

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except WebError as exc:
            return web.json_response({"error": str(exc)}, status=exc.status)
        except audio.AudioTooLong as exc:
            return web.json_response({"error": str(exc)}, status=413)
        except audio.AudioFormatError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        except grpc.aio.AioRpcError as exc:
            return web.json_response({"error": f"{exc.code().name}: {exc.details()}"},
                                     status=HTTP_STATUS.get(exc.code(), 502))

    @web.middleware
    async def _gate(self, request: web.Request, handler):
        """Before any route: the Host must be one this bridge answers to (a page on another site that rebinds its
        name to this address gets 421), a POST from a browser must come from this origin, and with web.token_file
        every request carries the token (the page's URL ?token=… sets a cookie the page's own calls send)."""
        host = request.headers.get("Host", "")
        if self.hosts is not None and host_name(host) not in self.hosts:
            raise WebError(421, f"this bridge does not answer to the host {host[:80]!r} (web.allowed_hosts)")
        origin = request.headers.get("Origin")
        if request.method == "POST" and origin is not None and origin.split("://", 1)[-1] != host:
            raise WebError(403, "cross-origin request refused")
        if self.token is None:
            return await handler(request)
        given = request.query.get("token") or request.cookies.get(TOKEN_COOKIE) or \
            request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            raise WebError(401, "this page needs its token: open it as /?token=TOKEN (web.token_file)")
        response = await handler(request)
        if request.query.get("token"):
            response.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="Strict",
                                secure=bool(self.config.certfile))
        return response

    def _session(self, request: web.Request) -> BrowserSession:
        session = self.sessions.get(request.match_info["id"])
        if session is None:
            raise WebError(404, "no such session (it ended, or the page is from an earlier run)")
        return session

    async def page(self, request: web.Request) -> web.Response:
        return web.FileResponse(PAGE)

    async def describe(self, request: web.Request) -> web.Response:
        """The models the server offers and what this bridge can do."""
        models = await self.stub.ListModels(pb.ListModelsRequest(), timeout=10)
        return web.json_response({
            "server": self.server, "models": [{"id": m.model_id, "loaded": m.loaded, "device": m.device}
                                              for m in models.models],
            "tts": bool(self.tts), "tts_hint": "" if self.tts else
            f"text to speech needs {self.config.tts_command} on the machine running `lipsync web` "
            f"(Debian/Ubuntu: apt install espeak-ng)",
            "max_upload_mb": self.config.max_upload_mb, "max_text_chars": self.config.max_text_chars})

    async def start(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        model, sdp, kind = body.get("model"), body.get("sdp"), body.get("type")
        if not isinstance(model, str) or not isinstance(sdp, str) or not model or not sdp or kind != "offer":
            raise WebError(400, "send {model, sdp, type: 'offer'}")
        open_sessions = self.opening + sum(1 for s in self.sessions.values() if not s.closed.is_set())
        if open_sessions >= self.config.max_sessions:
            raise WebError(503, f"{open_sessions} browser sessions are open; the limit is web.max_sessions "
                                f"({self.config.max_sessions})")
        self.opening += 1  # counted from here, before the first await, so concurrent offers cannot overshoot
        session = BrowserSession(self.stub, model, self.config)
        try:
            answer = await session.open(RTCSessionDescription(sdp=sdp, type=kind))
        except BaseException:
            await session.close()
            raise
        finally:
            self.opening -= 1
        self.sessions[session.id] = session
        forget = asyncio.ensure_future(self._forget(session))
        self._janitors.add(forget)
        forget.add_done_callback(self._janitors.discard)
        return web.json_response({"session": session.id, "sdp": answer.sdp, "type": answer.type,
                                  "info": {"fps": session.info.fps, "device": session.info.device,
                                           "avatar_frames": session.info.avatar_frames}})

    async def _forget(self, session: BrowserSession) -> None:
        await session.closed.wait()
        await asyncio.sleep(30)  # the page may still read its final counters
        self.sessions.pop(session.id, None)

    async def session_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self._session(request).stats())

    async def mic(self, request: web.Request) -> web.Response:
        session = self._session(request)
        session.set_mic(bool((await json_body(request)).get("on")))
        return web.json_response({"mic_on": session.mic_on})

    async def upload(self, request: web.Request) -> web.Response:
        """An audio file in the body (WAV, MP3, OGG, …) becomes one utterance."""
        session = self._session(request)
        name = request.query.get("name", "the uploaded file")
        blob = await request.read()
        if not blob:
            raise WebError(400, "the request carried no audio")
        pcm = await asyncio.to_thread(self._session_pcm, blob, name)
        return web.json_response({"utterance": session.say(pcm, "file"), "seconds": len(pcm) / 2 /
                                  self.config.sample_rate})

    def _session_pcm(self, blob: bytes, name: str) -> bytes:
        """An audio file → s16le at the session rate; decoding stops at web.max_utterance_s (413)."""
        data, fmt = audio.decode_audio(blob, name, self.config.max_utterance_s, "web.max_utterance_s")
        if not data:
            raise WebError(400, f"{name} holds no audio")
        return to_session_pcm(audio.decode_pcm(data, fmt), fmt.sample_rate, self.config.sample_rate)

    async def say_text(self, request: web.Request) -> web.Response:
        """Text → espeak-ng → one utterance. The text goes to the child on stdin, never as an argument (text that
        begins with `-` would be read as an option); one run per session and web.max_tts_jobs per bridge."""
        session = self._session(request)
        text = (await json_body(request)).get("text", "")
        text = text.strip() if isinstance(text, str) else ""
        if not self.tts:
            raise WebError(501, f"text to speech is not available: {self.config.tts_command} is not installed")
        if not text or len(text) > self.config.max_text_chars:
            raise WebError(400, f"send 1..{self.config.max_text_chars} characters of text")
        if session.speaking_text:
            raise WebError(429, "this session is already turning text into speech; wait for it")
        if self.tts_running >= self.config.max_tts_jobs:
            raise WebError(503, f"{self.tts_running} texts are being spoken; the limit is web.max_tts_jobs")
        session.speaking_text = True
        self.tts_running += 1
        try:
            wav = await self._speak(text)
        finally:
            session.speaking_text = False
            self.tts_running -= 1
        pcm = await asyncio.to_thread(self._session_pcm, wav, "the spoken text")
        return web.json_response({"utterance": session.say(pcm, "text"),
                                  "seconds": len(pcm) / 2 / self.config.sample_rate})

    async def _speak(self, text: str) -> bytes:
        """Run the text-to-speech child: WAV from its stdout, at most what web.max_utterance_s needs (more is the
        413 the decoder gives); killed after web.tts_timeout_s; its stderr goes to this log, not to the page."""
        proc = await asyncio.create_subprocess_exec(
            self.tts, "-v", self.config.tts_voice, "--stdout", "--stdin", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        cap = int(self.config.max_utterance_s * 48000 * 2 * 4) + 4096  # the longest WAV the limit lets through

        async def run() -> tuple[bytes, bytes]:
            proc.stdin.write(text.encode())
            proc.stdin.close()
            err = asyncio.ensure_future(_head(proc.stderr, 4096))
            wav = await proc.stdout.read(cap + 1)
            while len(wav) <= cap and (more := await proc.stdout.read(cap + 1 - len(wav))):
                wav += more
            if len(wav) > cap:
                proc.kill()
            await proc.wait()
            return wav, await err
        try:
            wav, err = await asyncio.wait_for(run(), self.config.tts_timeout_s)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            log.warning("%s did not finish within %g s (web.tts_timeout_s): killed", self.config.tts_command,
                        self.config.tts_timeout_s)
            raise WebError(504, f"text to speech took longer than {self.config.tts_timeout_s:g} s") from None
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if proc.returncode != 0 and len(wav) <= cap:
            log.warning("%s failed (exit %s): %s", self.config.tts_command, proc.returncode,
                        err.decode(errors="replace").strip()[:500])
            raise WebError(500, f"text to speech failed (exit {proc.returncode}); the bridge's log has the reason")
        return wav

    async def interrupt(self, request: web.Request) -> web.Response:
        self._session(request).interrupt()
        return web.json_response({"ok": True})

    async def close_session(self, request: web.Request) -> web.Response:
        await self._session(request).close()
        return web.json_response({"ok": True})


async def _head(stream: asyncio.StreamReader, limit: int) -> bytes:
    """Read a pipe to its end (so the child never blocks on it) and keep its first `limit` bytes."""
    kept = b""
    while chunk := await stream.read(65536):
        kept += chunk[:max(0, limit - len(kept))]
    return kept


TOKEN_COOKIE = "lipsync_web_token"
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


def host_name(host_header: str) -> str:
    """The name of a Host header, without its port (and brackets of an IPv6 address), lower-cased."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def allowed_hosts(config: WebConfig) -> frozenset[str] | None:
    """The Host names the page answers to: loopback, web.host and web.allowed_hosts; None (any) only when the
    bridge listens on a wildcard address and no names are configured."""
    names = {h.lower() for h in config.allowed_hosts}
    try:
        wildcard = ipaddress.ip_address(config.host).is_unspecified
    except ValueError:
        wildcard = False
    if wildcard and not names:
        return None
    return frozenset(LOOPBACK_NAMES | names | ({config.host.lower()} if not wildcard else set()))


async def json_body(request: web.Request) -> dict[str, Any]:
    """A request's JSON object; anything else (broken JSON, a list, a string) is a 400."""
    try:
        body = await request.json()
    except ValueError:
        raise WebError(400, "the request body is not JSON") from None
    if not isinstance(body, dict):
        raise WebError(400, "the request body must be a JSON object")
    return body


def ssl_context(config: WebConfig) -> ssl.SSLContext | None:
    """HTTPS for the page when web.certfile/keyfile are set (paths checked here, named in full on error)."""
    if not config.certfile:
        return None
    paths = [Path(p).expanduser().resolve() for p in (config.certfile, config.keyfile)]
    for role, path in zip(("web.certfile", "web.keyfile"), paths):
        if not path.is_file():
            raise FileNotFoundError(f"{role}: no such file: {path}")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(paths[0]), str(paths[1]))
    return context


async def serve(server: str, config: WebConfig, credentials: Credentials | None = None) -> None:
    """Run the page until cancelled; prints `WEB http(s)://host:port/` once it listens."""
    torch.set_num_threads(1)  # JPEG decoding here must not compete with a server on the same machine
    bridge = WebBridge(server, config, credentials)
    runner = web.AppRunner(bridge.app(), access_log=None)
    await runner.setup()
    context = ssl_context(config)
    site = web.TCPSite(runner, config.host, config.port, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1] if runner.addresses else config.port
    if bridge.hosts is None:
        log.warning("web.host=%s with no web.allowed_hosts: the page answers to any Host name (set "
                    "web.allowed_hosts to the names browsers use, against DNS rebinding)", config.host)
    url = f"{'https' if context else 'http'}://{config.host}:{port}/"
    print(f"WEB {url}", flush=True)
    log.info("page at %s, bridging to the lipsync server at %s (text to speech: %s)", url, server,
             bridge.tts or "not installed")
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
