"""Generated from protos/ by lipsync.protos; do not edit."""
PROTO_DIGEST = "c4d4ffb4a59e777f632402fe8b326221fc2d3a1b6340d8f61233f07717cd05af"
