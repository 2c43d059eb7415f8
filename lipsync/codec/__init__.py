"""Bytes ↔ tensors: PCM/WAV decoding and resampling, JPEG, MP4. Imports nothing of lipsync above the foundation
(config, errors, timebase)."""
