"""Generated from protos/ by lipsync.protos; do not edit."""
PROTO_DIGEST = "0adc48f9d32f7ec4686ca5f39df92816f018d01cd281620cc5d369de6d8cf053"
