"""The wire's clock: the server's model hears 16 kHz audio and draws 25 frames a second, 640 samples each."""
SAMPLE_RATE = 16_000
FPS = 25
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS
FRAME_MS = 1000 // FPS
LOOKAHEAD_SAMPLES = 7240  # audio past a frame's start the server needs before it can draw that frame (~450 ms)
