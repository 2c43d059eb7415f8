"""Generated from protos/ by lipsync.protos; do not edit."""
PROTO_DIGEST = "72524670a0ee9092e5167000d528446584a96c050b44a1de841045ef18d3cdf7"
