"""The one clock every layer counts in: 16 kHz audio, 25 video frames per second (SPEC §1)."""
SAMPLE_RATE = 16_000  # Hz: every waveform after decoding
FPS = 25  # video frames per second of audio
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
FRAME_S = 1.0 / FPS  # one frame's share of real time (0.04 s)
FRAME_MS = 1000.0 / FPS  # the same in milliseconds (presentation timestamps)
