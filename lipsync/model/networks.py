"""SyncTalk_2D networks (SPEC §4, §6) and strict checkpoint loading."""
from __future__ import annotations

import io
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VARIANTS = ("328", "160")
ASR_KINDS = ("ave", "hubert", "wenet")

# Model input side per variant (the ROI the generator sees) and the crop template side around it.
INPUT_SIZE = {"328": 320, "160": 160}
TEMPLATE_SIZE = {"328": 328, "160": 168}
# Audio feature shape the generator expects, per audio branch.
AUDIO_FEATURE_SHAPE = {"ave": (32, 16, 16), "hubert": (32, 32, 32), "wenet": (256, 16, 32)}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded into the requested network."""


# --------------------------------------------------------------------------- AudioEncoder (§4)
class ConvBlock(nn.Module):
    """Conv2d(bias) → BatchNorm2d → (+ input) → ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, stride, padding: int, residual: bool = False):
        super().__init__()
        self.conv_block = nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding), nn.BatchNorm2d(cout))
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv_block(x)
        return F.relu(y + x if self.residual else y)


_ENCODER_LAYERS = [  # (in, out, kernel, stride, pad, residual)
    (1, 32, 3, 1, 1, False), (32, 32, 3, 1, 1, True), (32, 32, 3, 1, 1, True),
    (32, 64, 3, (3, 1), 1, False), (64, 64, 3, 1, 1, True), (64, 64, 3, 1, 1, True),
    (64, 128, 3, 3, 1, False), (128, 128, 3, 1, 1, True), (128, 128, 3, 1, 1, True),
    (128, 256, 3, (3, 2), 1, False), (256, 256, 3, 1, 1, True),
    (256, 512, 3, 1, 0, False), (512, 512, 1, 1, 0, False),
]


class AudioEncoder(nn.Module):
    """Mel window [B,1,80,16] → embedding [B,512] (SyncTalk_2D's "ave" encoder)."""

    def __init__(self):
        super().__init__()
        self.audio_encoder = nn.Sequential(*[ConvBlock(*spec) for spec in _ENCODER_LAYERS])

    def forward(self, mel_windows: Tensor) -> Tensor:
        return self.audio_encoder(mel_windows).flatten(1)


# --------------------------------------------------------------------------- Generator (§6)
class InvertedResidual(nn.Module):
    """1×1 expand → depthwise 3×3 → 1×1 project, BN after each, optional residual."""

    def __init__(self, cin: int, cout: int, stride=1, residual: bool = False):
        super().__init__()
        hidden = 2 * cin
        self.residual = residual
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class DoubleConvDW(nn.Module):
    def __init__(self, cin: int, cout: int, stride=1):
        super().__init__()
        self.double_conv = nn.Sequential(InvertedResidual(cin, cout, stride), InvertedResidual(cout, cout, 1, True))

    def forward(self, x: Tensor) -> Tensor:
        return self.double_conv(x)


class InConv(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.inconv = nn.Sequential(InvertedResidual(cin, cout))

    def forward(self, x: Tensor) -> Tensor:
        return self.inconv(x)


class Down(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.maxpool_conv = nn.Sequential(DoubleConvDW(cin, cout, 2))

    def forward(self, x: Tensor) -> Tensor:
        return self.maxpool_conv(x)


class Up(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = DoubleConvDW(cin, cout, 1)

    def forward(self, deep: Tensor, skip: Tensor) -> Tensor:
        deep = F.interpolate(deep, scale_factor=2.0, mode="bilinear", align_corners=True)
        dy, dx = skip.shape[2] - deep.shape[2], skip.shape[3] - deep.shape[3]
        if dy or dx:
            deep = F.pad(deep, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([deep, skip], dim=1))


class OutConv(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.conv(x))


class AudioConv(nn.Module):
    """Audio branch: per-frame features → 512×10×10 (328) or the variant's bottleneck size."""

    def __init__(self, asr: str = "ave"):
        super().__init__()
        if asr == "wenet":
            self.conv1 = InvertedResidual(256, 256, 1, True)
            self.conv2 = InvertedResidual(256, 256, 1, True)
            conv3_in, conv3_stride = 256, (1, 2)
        else:
            self.conv1 = InvertedResidual(32, 64)
            self.conv2 = InvertedResidual(64, 128)
            conv3_in, conv3_stride = 128, (2 if asr == "hubert" else 1)
        self.conv3 = nn.Conv2d(conv3_in, 256, 3, conv3_stride, 1)
        self.bn3 = nn.BatchNorm2d(256)
        self.conv4 = InvertedResidual(256, 256, 1, True)
        self.conv5 = nn.Conv2d(256, 512, 3, 2, 3)
        self.bn5 = nn.BatchNorm2d(512)
        self.conv6 = InvertedResidual(512, 512, 1, True)
        self.conv7 = InvertedResidual(512, 512, 1, True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv2(self.conv1(x))
        x = self.conv4(F.relu(self.bn3(self.conv3(x))))
        x = F.relu(self.bn5(self.conv5(x)))
        return self.conv7(self.conv6(x))


class Generator(nn.Module):
    """SyncTalk_2D UNet: visual [B,6,S,S] (BGR, 0..1) + audio features → BGR prediction [B,3,S,S]."""

    def __init__(self, variant: str = "328", asr: str = "ave"):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown generator variant {variant!r}; expected one of {VARIANTS}")
        if asr not in ASR_KINDS:
            raise ValueError(f"unknown audio branch {asr!r}; expected one of {ASR_KINDS}")
        self.variant, self.asr = variant, asr
        self.audio_model = AudioConv(asr)
        self.fuse_conv = nn.Sequential(DoubleConvDW(1024, 512), DoubleConvDW(512, 256))
        self.inc = InConv(6, 32)
        if variant == "328":
            widths = [32, 32, 64, 128, 256, 512]
            ups = [(512, 128), (256, 64), (128, 32), (64, 32), (64, 16)]
        else:
            widths = [32, 64, 128, 256, 512]
            ups = [(512, 128), (256, 64), (128, 32), (64, 32)]
        for i in range(1, len(widths)):
            setattr(self, f"down{i}", Down(widths[i - 1], widths[i]))
        for i, (cin, cout) in enumerate(ups, start=1):
            setattr(self, f"up{i}", Up(cin, cout))
        self.outc = OutConv(ups[-1][1], 3)
        self.n_down, self.n_up = len(widths) - 1, len(ups)

    def forward(self, visual: Tensor, audio: Tensor) -> Tensor:
        skips = [self.inc(visual)]
        for i in range(1, self.n_down + 1):
            skips.append(getattr(self, f"down{i}")(skips[-1]))
        x = self.fuse_conv(torch.cat([skips.pop(), self.audio_model(audio)], dim=1))
        for i in range(1, self.n_up + 1):
            x = getattr(self, f"up{i}")(x, skips.pop())
        return self.outc(x)


# --------------------------------------------------------------------------- checkpoints
def read_checkpoint(path: str | Path) -> bytes:
    """A checkpoint's bytes, read once: what a model is loaded from and what its cache entries are named by are
    then the same bytes, even if the file is replaced meanwhile."""
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise CheckpointError(f"checkpoint not found: {file}")
    return file.read_bytes()


def _read_state_dict(path: str | Path, data: bytes | None = None) -> dict[str, Tensor]:
    file = Path(path).expanduser().resolve()
    if data is None and not file.is_file():
        raise CheckpointError(f"checkpoint not found: {file}")
    try:
        obj = torch.load(io.BytesIO(data) if data is not None else file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a non-checkpoint file
        raise CheckpointError(f"{file} is not a PyTorch checkpoint ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{file} holds a {type(obj).__name__}, not a state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _describe_mismatch(file: str, expected: dict[str, Tensor], found: dict[str, Tensor], what: str,
                       guess: str = "") -> str:
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    misshaped = sorted(k for k in expected.keys() & found.keys() if expected[k].shape != found[k].shape)

    def show(keys: list[str]) -> str:
        return ", ".join(keys[:5]) + (f" … (+{len(keys) - 5} more)" if len(keys) > 5 else "")

    parts = [f"{file} does not match the {what}:"]
    if missing:
        parts.append(f"{len(missing)} missing keys ({show(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({show(unexpected)})")
    if misshaped:
        parts.append(f"{len(misshaped)} mis-shaped keys (" + ", ".join(
            f"{k}: file {tuple(found[k].shape)} vs expected {tuple(expected[k].shape)}" for k in misshaped[:5]) + ")")
    if guess:
        parts.append(guess)
    return " ".join(parts)


def _guess_generator(found: dict[str, Tensor]) -> str:
    for variant in VARIANTS:
        for asr in ASR_KINDS:
            ref = Generator(variant, asr).state_dict()
            if ref.keys() == found.keys() and all(ref[k].shape == found[k].shape for k in ref):
                return f"It looks like the {variant} variant with the {asr!r} audio branch."
    if any(k.startswith("audio_encoder.") or k.startswith("0.conv_block") for k in found):
        return "It looks like an AudioEncoder checkpoint, not a generator."
    return "It does not look like any SyncTalk_2D generator variant."


def load_generator(path: str | Path, variant: str = "328", asr: str = "ave", device: str | torch.device = "cpu",
                   data: bytes | None = None) -> Generator:
    """Load a SyncTalk_2D generator checkpoint strictly; eval mode on `device`. `data`: the file's bytes, already
    read (`read_checkpoint`); `path` then only names it in errors."""
    net = Generator(variant, asr)
    found = _read_state_dict(path, data)
    expected = net.state_dict()
    if expected.keys() != found.keys() or any(expected[k].shape != found[k].shape for k in expected):
        guess = _guess_generator(found)
        detail = _describe_mismatch(str(Path(path).expanduser().resolve()), expected, found,
                                    f"{variant}/{asr} generator", guess)
        other = re.match(r"It looks like the (\d+) variant", guess)
        if other and other.group(1) != variant:  # the common mistake first, in words a user can act on
            detail = f"this looks like the {other.group(1)} variant: pass --variant {other.group(1)} " \
                     f"(variant: \"{other.group(1)}\" in a model config). {detail}"
        raise CheckpointError(detail)
    net.load_state_dict(found, strict=True)
    return net.to(device).eval()


def load_audio_encoder(path: str | Path, device: str | torch.device = "cpu", data: bytes | None = None
                       ) -> AudioEncoder:
    """Load the AudioEncoder, keys with or without the `audio_encoder.` prefix; eval mode on `device`. `data`: the
    file's bytes, already read."""
    net = AudioEncoder()
    found = _read_state_dict(path, data)
    if found and not any(k.startswith("audio_encoder.") for k in found):
        found = {f"audio_encoder.{k}": v for k, v in found.items()}
    expected = net.state_dict()
    if expected.keys() != found.keys() or any(expected[k].shape != found[k].shape for k in expected):
        guess = ("It looks like a SyncTalk_2D generator checkpoint, not an audio encoder."
                 if any("inc.inconv" in k for k in found) else "")
        raise CheckpointError(_describe_mismatch(str(Path(path).expanduser().resolve()), expected, found,
                                                 "AudioEncoder", guess))
    net.load_state_dict(found, strict=True)
    return net.to(device).eval()


def parameter_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
