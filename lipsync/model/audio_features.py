"""Waveform → per-frame audio features: mel spectrogram, mel windows, encoder embeddings and their context (SPEC §2–§5).

Everything runs on the waveform's device. The whole-utterance path and the streaming path share one
implementation (`FeatureStream`), so a stream fed in any chunk sizes yields the whole-utterance features.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable

import torch
import torchaudio.functional as AF
from torch import Tensor

from lipsync.model.transfer import to_device
from lipsync.timebase import FPS, SAMPLE_RATE

N_FFT, HOP, N_MELS = 800, 200, 80
MEL_FMIN, MEL_FMAX = 55.0, 7600.0
PREEMPHASIS = 0.97
WINDOW_STEPS = 16  # mel frames per window
MIN_SAMPLES = 3000  # shortest audio that forms one mel window (16 mel frames); shorter audio is zero-padded
CONTEXT_BEFORE, CONTEXT_AFTER = 8, 8  # padded embedding rows around each output frame (§5)
LOOKAHEAD = 6  # future embeddings frame i needs (e_{i+6}): ≈450 ms of audio
Encoder = Callable[[Tensor], Tensor]  # [B,1,80,16] → [B,512]


# --------------------------------------------------------------------------- mel spectrogram (§2)
@lru_cache(maxsize=8)
def _mel_basis(device: torch.device) -> tuple[Tensor, Tensor]:
    fbank = AF.melscale_fbanks(N_FFT // 2 + 1, MEL_FMIN, MEL_FMAX, N_MELS, SAMPLE_RATE, norm="slaney",
                               mel_scale="slaney").to(device)
    window = torch.hann_window(N_FFT, periodic=True, device=device)
    return fbank, window


def prepare(device: torch.device) -> None:
    """Fixed work at load: the mel filter bank and window on `device` (built on the host once, then cached), so
    that no request pays for it or copies from the host for it."""
    _mel_basis(torch.device(device))


def _mel_from_frames(padded: Tensor) -> Tensor:
    """Pre-emphasised, padded signal → normalised log-mel frames [M,80] for each hop-spaced 800-sample frame."""
    fbank, window = _mel_basis(padded.device)
    frames = padded.unfold(0, N_FFT, HOP) * window
    magnitude = torch.fft.rfft(frames, dim=1).abs()
    mel = magnitude @ fbank
    db = 20.0 * torch.log10(mel.clamp_min(1e-5)) - 20.0
    return (0.08 * db + 4.0).clamp(-4.0, 4.0)


def preemphasis(wave: Tensor, previous: Tensor | None = None) -> Tensor:
    """y[n] = x[n] − 0.97·x[n−1], with x[−1] = `previous` (0 at the start of audio)."""
    before = wave[:-1] if previous is None else torch.cat([previous.reshape(1), wave[:-1]])
    if previous is None:
        return torch.cat([wave[:1], wave[1:] - PREEMPHASIS * before])
    return wave - PREEMPHASIS * before


def melspectrogram(wave: Tensor) -> Tensor:
    """16 kHz mono float waveform [N] → normalised log-mel [1 + N//200, 80], on its device."""
    half = N_FFT // 2
    padded = torch.nn.functional.pad(preemphasis(wave.float()), (half, half))
    return _mel_from_frames(padded)


# --------------------------------------------------------------------------- windows and features (§3, §5)
def window_count(mel_frames: int) -> int:
    """D: the number of mel windows (and encoder embeddings) of an utterance with M mel frames."""
    return (mel_frames - WINDOW_STEPS) * FPS // 80 + 2


def window_start(video_frame: int) -> int:
    return 80 * video_frame // FPS


def features_from_rows(rows: Tensor) -> Tensor:
    """Consecutive padded embedding rows [n+15, 512] → features [n,32,16,16] (frame k sees rows k..k+15)."""
    blocks = rows.unfold(0, CONTEXT_BEFORE + CONTEXT_AFTER, 1)  # [n, 512, 16]
    return blocks.transpose(1, 2).reshape(-1, 32, 16, 16)


def rows_from_features(features: Tensor) -> Tensor:
    """The inverse of features_from_rows: features [n,32,16,16] of consecutive frames → their rows [n+15, 512]
    (16× smaller: what a live session keeps of frames it will render later)."""
    rows = features.reshape(features.shape[0], CONTEXT_BEFORE + CONTEXT_AFTER, 512)
    return torch.cat([rows[0], rows[1:, -1]])


def context_embeddings(frame: int, windows: int) -> list[int]:
    """§5 steps 2–3 for output frame `frame` of an utterance of D = `windows` embeddings: for each of its 16 rows
    P[frame−8 … frame+7], the embedding it holds (P[r] = e[clamp(r − 1, 0, D − 1)]), or −1 for a zero row."""
    return [min(max(r - 1, 0), windows - 1) if 0 <= r < windows + 2 else -1
            for r in range(frame - CONTEXT_BEFORE, frame + CONTEXT_AFTER)]


def final_windows(mel_frames: int) -> int:
    """How many windows v have all 16 mel frames among the first `mel_frames` (no end clamp can move them)."""
    spare = mel_frames - WINDOW_STEPS
    return 0 if spare < 0 else -(-5 * (spare + 1) // 16)


def frame_count(samples: int) -> int:
    """Output frames (D + 2) for an utterance of `samples` 16 kHz samples."""
    return window_count(1 + max(samples, MIN_SAMPLES) // HOP) + 2


class FeatureStream:
    """Incremental §2–§5: push 16 kHz audio chunks, get each output frame's features once they are final.

    `push` returns (first_frame_index, features[n,32,16,16]) for frames that no later audio can change;
    `finish` applies the end-of-audio rules and returns the rest. Frame indices are global for the stream.
    """

    def __init__(self, encoder: Encoder | None, device: str | torch.device = "cpu", lookahead: int = LOOKAHEAD):
        """No tensor is made here: a stream is opened on the event loop and its buffers are made on first use, on
        the device's thread (the loop never runs a tensor operation)."""
        if not 0 <= lookahead <= LOOKAHEAD:
            raise ValueError(f"look-ahead must be 0..{LOOKAHEAD} frames, got {lookahead}")
        self.encoder, self.lookahead = encoder, lookahead
        self.device = torch.device(device)
        self.signal: Tensor | None = None  # pre-emphasised, zero-padded signal tail (made by _begin)
        self.signal_start = 0  # global index (in padded coordinates) of signal[0]
        self.samples = 0  # real samples received
        self.last_sample: Tensor | None = None
        self.mel: Tensor | None = None  # mel rows from `mel_start` on
        self.mel_start = 0
        self.mel_done = 0  # final mel frames computed
        self.rows: Tensor | None = None  # padded embedding rows P, from `rows_start` on
        self.rows_start = 0
        self.windows_done = 0
        self.frames_done = 0
        self.finished = False
        self.awaiting = False  # windows handed out whose embeddings have not come back yet

    def _begin(self) -> None:
        """The stream's buffers, on the first step (on the thread that runs the steps)."""
        if self.signal is None:
            self.signal = torch.zeros(N_FFT // 2, device=self.device)
            self.mel = torch.zeros(0, N_MELS, device=self.device)
            self.rows = torch.zeros(0, 512, device=self.device)

    # -- stages
    def _append_audio(self, wave: Tensor) -> None:
        if wave.numel() == 0:
            return
        wave = to_device(wave, self.device).float()  # from pinned memory, not blocking this thread
        self.signal = torch.cat([self.signal, preemphasis(wave, self.last_sample)])
        self.last_sample = wave[-1:]
        self.samples += wave.numel()

    def _compute_mel(self, stop: int) -> None:
        """Compute mel frames [mel_done, stop) from the padded signal."""
        if stop <= self.mel_done:
            return
        lo = self.mel_done * HOP - self.signal_start
        hi = (stop - 1) * HOP + N_FFT - self.signal_start
        new = _mel_from_frames(self.signal[lo:hi])
        self.mel = torch.cat([self.mel, new])
        self.mel_done = stop
        keep = self.mel_done * HOP - self.signal_start  # next frame starts here
        self.signal, self.signal_start = self.signal[keep:], self.signal_start + keep

    def _take_windows(self, stop: int, mel_frames: int | None) -> Tensor:
        """Mel windows [windows_done, stop) as [n,1,80,16]; `mel_frames` (end of audio only) enables the end
        clamp of §3."""
        if stop <= self.windows_done:
            return torch.zeros(0, 1, N_MELS, WINDOW_STEPS, device=self.device)
        limit = (mel_frames if mel_frames is not None else 1 << 62) - WINDOW_STEPS
        # window_start(v) = 80v // 25 for each window, made on the device (no index list copied from the host)
        starts = (torch.arange(self.windows_done, stop, device=self.device) * 80 // FPS).clamp_(max=limit)
        idx = (starts - self.mel_start)[:, None] + torch.arange(WINDOW_STEPS, device=self.device)
        windows = self.mel[idx].transpose(1, 2).unsqueeze(1)
        self.windows_done = stop
        # A later window starts at or after the last one taken (the end clamp never goes further back).
        drop = window_start(stop - 1) - self.mel_start
        self.mel, self.mel_start = self.mel[drop:], self.mel_start + drop
        return windows

    def _emit(self, stop: int) -> tuple[int, Tensor]:
        """Features for frames [frames_done, stop); P rows before 0 or past the last row are zeros."""
        first = self.frames_done
        if stop <= first:
            return first, torch.zeros(0, 32, 16, 16, device=self.device)
        lo, hi = first - CONTEXT_BEFORE, stop - 1 + CONTEXT_AFTER  # P rows [lo, hi) feed these frames
        rows_end = self.rows_start + self.rows.shape[0]
        take = self.rows[max(lo, 0) - self.rows_start:min(hi, rows_end) - self.rows_start]
        block = torch.cat([self.rows.new_zeros(max(0, -lo), 512), take,
                           self.rows.new_zeros(max(0, hi - rows_end), 512)])
        self.frames_done = stop
        drop = max(0, stop - CONTEXT_BEFORE - self.rows_start)
        self.rows, self.rows_start = self.rows[drop:], self.rows_start + drop
        return first, features_from_rows(block)

    def _begin_step(self, after_end: str) -> None:
        if self.finished:
            raise RuntimeError(after_end)
        if self.awaiting:
            raise RuntimeError("accept() the embeddings of the previous windows first")
        self._begin()

    # -- public: two phases, so that a scheduler can batch the encoder across streams
    def windows(self, wave: Tensor) -> Tensor:
        """Add 16 kHz mono samples; return the mel windows [n,1,80,16] that became final (encode them, then
        pass the embeddings to `accept`)."""
        self._begin_step("audio pushed after end of audio")
        self._append_audio(wave)
        padded_len = self.signal_start + self.signal.shape[0]
        self._compute_mel(max(0, (padded_len - N_FFT) // HOP + 1))
        # Window v is final (no end clamp possible) once mel frames s_v..s_v+15 are final.
        self.awaiting = True
        return self._take_windows(final_windows(self.mel_done), None)

    def end_windows(self, wave: Tensor | None = None) -> Tensor:
        """End of audio (after the optional last samples `wave`): pad short audio to 3000 samples, apply the end
        rules, return every window not yet returned."""
        self._begin_step("end of audio signalled twice")
        self.finished = self.awaiting = True
        if wave is not None:
            self._append_audio(wave)
        if self.samples < MIN_SAMPLES:
            self._append_audio(torch.zeros(MIN_SAMPLES - self.samples, device=self.device))
        self.signal = torch.cat([self.signal, self.signal.new_zeros(N_FFT // 2)])
        mel_frames = 1 + self.samples // HOP
        self._compute_mel(mel_frames)
        return self._take_windows(window_count(mel_frames), mel_frames)

    def accept(self, embeddings: Tensor) -> tuple[int, Tensor]:
        """Embeddings [n,512] of the windows just returned → (first frame index, features [k,32,16,16] of the
        frames that became final)."""
        if not self.awaiting:
            raise RuntimeError("accept() without windows to encode")
        self.awaiting = False
        embeddings = embeddings.to(self.device, torch.float32)
        if self.rows_start == 0 and self.rows.shape[0] == 0 and embeddings.shape[0]:
            embeddings = torch.cat([embeddings[:1], embeddings])  # P[0] = e0 (front padding row)
        self.rows = torch.cat([self.rows, embeddings])
        if self.finished:
            self.rows = torch.cat([self.rows, self.rows[-1:]])  # P[D+1] = e_{D-1}
            return self._emit(self.windows_done + 2)
        # Frame i needs P[i+7] = e_{i+6}: final once window i+6 is encoded. A smaller look-ahead emits earlier
        # and treats the embeddings not yet heard as zeros (lower latency, no longer equal to the whole utterance).
        return self._emit(max(0, self.windows_done - self.lookahead))

    def _encode(self, windows: Tensor) -> Tensor:
        if windows.shape[0] == 0:
            return torch.zeros(0, 512, device=self.device)
        if self.encoder is None:
            raise RuntimeError("this FeatureStream has no encoder: use windows()/accept()")
        return self.encoder(windows)

    @torch.no_grad()
    def push(self, wave: Tensor) -> tuple[int, Tensor]:
        """Add 16 kHz mono samples; return (first frame index, features of the newly final frames)."""
        return self.accept(self._encode(self.windows(wave)))

    @torch.no_grad()
    def finish(self, wave: Tensor | None = None) -> tuple[int, Tensor]:
        """End of audio (after the optional last samples): (first frame index, features of all remaining frames)."""
        return self.accept(self._encode(self.end_windows(wave)))

    @property
    def frames_emitted(self) -> int:
        return self.frames_done


def frame_features(wave: Tensor, encoder: Encoder) -> Tensor:
    """16 kHz mono waveform → per-frame generator audio input [D+2,32,16,16] (SPEC §3–§5), on its device."""
    return FeatureStream(encoder, wave.device).finish(wave)[1]
