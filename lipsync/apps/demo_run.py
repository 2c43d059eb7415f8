"""`make demo`: start the server on the demo model, stream the demo speech through it with the client as a live
source would (in real time), write out/demo.mp4, print what the figures mean, stop the server."""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from lipsync.apps.client import add_parser as add_client_parser
from lipsync.apps.client import run as run_client
from lipsync.apps.serve import spawn
from lipsync.config import SOURCE_ROOT

ROOT = SOURCE_ROOT


def main() -> int:
    out = ROOT / "out" / "demo.mp4"
    print("starting `lipsync serve` on the demo model (a SyncTalk_2D model trained on a drawn presenter; the first "
          "start draws its avatar) …", flush=True)
    server, port = spawn(["server.metrics_port=-1", "+models.demo.preload=true"], cwd=str(ROOT))
    try:
        parser = argparse.ArgumentParser(prog="lipsync")
        add_client_parser(parser.add_subparsers(dest="command"))
        args = parser.parse_args(["client", "--server", f"127.0.0.1:{port}", "--model", "demo", "--audio",
                                  str(ROOT / "assets" / "speech.wav"), "--stream", "--realtime", "--out", str(out)])
        print("streaming assets/speech.wav through the Stream RPC in real time, 40 ms of audio at a time, as a "
              "microphone or a TTS would …", flush=True)
        summary = asyncio.run(run_client(args))
        print(json.dumps(summary, indent=2))
        print(explain(summary), flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(120)
    print(f"server stopped (exit {code}); demo video: {out}")
    return 0 if out.is_file() else 1


def explain(summary: dict) -> str:
    """The summary's figures in words, for a first reader."""
    latency, stages = summary["latency_ms"], summary["stage_ms_per_frame"]
    device_ms = sum(v for k, v in stages.items() if k in ("inference", "composite", "encode"))
    return "\n".join([
        f"{summary['frames']} frames of 25 fps video came back in {summary['wall_s']:.1f} s while the audio played "
        f"in real time.",
        f"latency: from the moment the last audio a frame needs was sent (its own 40 ms and the ~0.45 s after it: "
        f"a frame hears the next 6 frames' audio) to its JPEG arriving here: p50 {latency['p50'] / 1e3:.2f} s, "
        f"p95 {latency['p95'] / 1e3:.2f} s (the server's audio step, batching, generator, compositing, JPEG).",
        f"the device spent {device_ms:.0f} ms per frame on the generator, compositing and JPEG "
        f"({', '.join(f'{k} {v:.1f}' for k, v in stages.items())}): "
        + ("faster than the 40 ms a frame lasts, so it keeps up with real time." if device_ms < 40 else
           "slower than the 40 ms a frame lasts: this machine renders below real time (a GPU does not); live "
           "sessions then render every 2nd or 3rd frame to keep talking on time (docs/live.md)."),
    ])


if __name__ == "__main__":
    sys.exit(main())
