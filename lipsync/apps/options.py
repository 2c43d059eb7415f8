"""What the subcommands' parsers share, and where each subcommand lives: `lipsync --help` lists them all from here
and builds only the parser of the command it runs, so no command pays for another's imports (torch, gRPC, hydra)."""
from __future__ import annotations

import argparse


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every option's default, also for options without a help text."""

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:  # nothing worth saying ("default: None")
            return action.help
        return super()._get_help_string(action)


# subcommand → (module, function that adds its parser, its one line in `lipsync --help`)
COMMANDS = {
    "render": ("lipsync.apps.cli", "add_render", "render speech with a SyncTalk_2D model to MP4 and/or numbered "
                                                 "frames"),
    "tune": ("lipsync.apps.cli", "add_tune", "measure the engines for a model on this machine again (the decision "
                                             "every later load reads)"),
    "avatar": ("lipsync.apps.cli", "add_avatar", "inspect, import or synthesise avatars"),
    "bench": ("lipsync.apps.cli", "add_bench", "run a benchmark from benchmarks/ (pipeline, engines, server, live)"),
    "export": ("lipsync.apps.export.cli", "add_parser", "export a SyncTalk_2D checkpoint to ONNX or a TensorRT engine"),
    "serve": ("lipsync.apps.serve", "add_parser", "run the gRPC server (hydra overrides: server.port=50100 "
                                                  "engine=eager …)"),
    "client": ("lipsync.apps.client", "add_parser", "send a WAV to a lipsync server (Synthesize or Stream), or play a "
                                                    "conversation script through a live session (--converse)"),
    "cluster": ("lipsync.apps.cluster", "add_parser", "N workers behind a real Envoy on this machine (routing by "
                                                      "x-model-id)"),
    "web": ("lipsync.apps.cli", "add_web", "a browser page to watch and talk to an avatar live over WebRTC "
                                           "(pip install -e '.[web]' from a checkout)"),
}


def command_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    """The parser of subcommand `name`, with its line from COMMANDS."""
    return sub.add_parser(name, help=COMMANDS[name][2], description=COMMANDS[name][2],
                          formatter_class=DefaultsFormatter)


def add_connection_options(p: argparse.ArgumentParser) -> None:
    """How a client reaches a server: address, token, TLS files."""
    p.add_argument("--server", default="127.0.0.1:50051")
    p.add_argument("--token", help="bearer token (default: $LIPSYNC_TOKEN)")
    p.add_argument("--tls", action="store_true", help="use TLS, trusting the system's CAs (implied by --tls-ca)")
    p.add_argument("--tls-ca", metavar="CA.pem", help="CA that signed the server's certificate")
    p.add_argument("--tls-cert", metavar="CERT.pem", help="client certificate, for servers that require mutual TLS")
    p.add_argument("--tls-key", metavar="KEY.pem", help="the client certificate's private key")
    p.add_argument("--tls-server-name", help="name to verify the server certificate against (when --server is an "
                                             "address the certificate does not name)")
    p.add_argument("--allow-insecure-token", action="store_true", help="send --token over plaintext to a server "
                   "that is not on this machine (refused otherwise)")
