"""`make demo`: start the server on the demo model, stream the demo speech through it with the client,
write out/demo.mp4, print the timings, stop the server."""
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
                                  str(ROOT / "assets" / "speech.wav"), "--stream", "--out", str(out)])
        print("streaming assets/speech.wav through the Stream RPC …", flush=True)
        summary = asyncio.run(run_client(args))
        print(json.dumps(summary, indent=2))
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(120)
    print(f"server stopped (exit {code}); demo video: {out}")
    return 0 if out.is_file() else 1


if __name__ == "__main__":
    sys.exit(main())
