"""Generated from protos/ by lipsync.protos; do not edit."""
PROTO_DIGEST = "f43eb1d8985eca1f3ac6b1aedfd0d4c957c36480642bcd2eddf3d4ce636664ae"
