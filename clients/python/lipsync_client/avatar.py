"""SQUARE output on the client's side: the avatar's frames fetched once (GetAvatar), and each frame the server sends
as the square it generated, pasted back onto its avatar frame. The server then encodes and sends about a tenth of
the pixels of a full 1280x720 frame; the client decodes two JPEGs instead of one."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lipsync_client._proto import lipsync_pb2 as pb
from lipsync_client._proto import lipsync_pb2_grpc as pb_grpc
from lipsync_client.connection import routing
from lipsync_client.jpeg import decode_rgb

if TYPE_CHECKING:
    import numpy as np


OUTPUTS = {"full": pb.FULL_FRAME, "square": pb.SQUARE}  # the integrations' `output=` names


def output_value(output: str) -> int:
    """An integration's `output=` name as the FrameOutput it asks the server for."""
    if output not in OUTPUTS:
        raise ValueError(f"output {output!r}: use one of {', '.join(OUTPUTS)}")
    return OUTPUTS[output]


@dataclass
class Avatar:
    """A model's avatar as GetAvatar sends it: each frame's JPEG and crop rectangle (x, y, width, height)."""
    width: int
    height: int
    jpegs: list[bytes] = field(default_factory=list)
    squares: list[tuple[int, int, int, int]] = field(default_factory=list)

    @property
    def frame_count(self) -> int:
        return len(self.jpegs)


async def get_avatar(stub: pb_grpc.LipSyncStub, model: str, quality: int = 0, timeout: float | None = None,
                     metadata=None) -> Avatar:
    """Fetch a model's avatar (frames and rectangles), once per model and JPEG quality."""
    avatar: Avatar | None = None
    async for frame in stub.GetAvatar(pb.GetAvatarRequest(model_id=model, jpeg_quality=quality), timeout=timeout,
                                      metadata=metadata or routing(model)):
        if avatar is None:
            avatar = Avatar(frame.width, frame.height)
        if frame.index != avatar.frame_count:
            raise ValueError(f"GetAvatar sent frame {frame.index} where {avatar.frame_count} was due")
        avatar.jpegs.append(frame.jpeg)
        avatar.squares.append((frame.square.x, frame.square.y, frame.square.width, frame.square.height))
    if avatar is None:
        raise ValueError(f"GetAvatar sent no frame for model {model!r}")
    return avatar


class Compositor:
    """Turns frames of either output into whole RGB pictures [H, W, 3]: a full frame is decoded; a SQUARE frame's
    JPEG is decoded and pasted onto its avatar frame (decoded frames kept for the `keep` used last); a frame without
    a JPEG (SQUARE output's idle frames) is its avatar frame as it is."""

    def __init__(self, avatar: Avatar, keep: int = 64):
        self.avatar, self.keep = avatar, keep
        self._decoded: OrderedDict[int, np.ndarray] = OrderedDict()

    def _avatar_frame(self, index: int) -> np.ndarray:
        if not 0 <= index < self.avatar.frame_count:
            raise ValueError(f"avatar frame {index} is outside 0..{self.avatar.frame_count - 1}")
        found = self._decoded.get(index)
        if found is None:
            found = self._decoded[index] = decode_rgb(self.avatar.jpegs[index])
            while len(self._decoded) > self.keep:
                self._decoded.popitem(last=False)
        else:
            self._decoded.move_to_end(index)
        return found

    def rgb(self, frame: pb.Frame | pb.LiveFrame) -> np.ndarray:
        """The whole picture of a Frame or LiveFrame, contiguous uint8 RGB [H, W, 3] (a new array)."""
        if frame.jpeg and not frame.HasField("square"):
            return decode_rgb(frame.jpeg)  # FULL_FRAME output
        picture = self._avatar_frame(frame.avatar_frame).copy()
        if frame.jpeg:
            r = frame.square
            patch = decode_rgb(frame.jpeg)
            if patch.shape[:2] != (r.height, r.width) or r.x < 0 or r.y < 0 or \
                    r.x + r.width > picture.shape[1] or r.y + r.height > picture.shape[0]:
                raise ValueError(f"frame {frame.index}: a {patch.shape[1]}x{patch.shape[0]} square does not fit "
                                 f"{r.width}x{r.height} at ({r.x}, {r.y}) in a {picture.shape[1]}x{picture.shape[0]} "
                                 "frame")
            picture[r.y:r.y + r.height, r.x:r.x + r.width] = patch
        return picture


async def compositor_for(stub: pb_grpc.LipSyncStub, model: str, output: str, quality: int = 0,
                         timeout: float | None = None, keep: int = 64) -> Compositor | None:
    """The Compositor a session of `output` needs: the avatar fetched once for "square", none for "full"."""
    if output_value(output) != pb.SQUARE:
        return None
    return Compositor(await get_avatar(stub, model, quality, timeout), keep)


def frame_rgb(frame: pb.Frame | pb.LiveFrame, compositor: Compositor | None) -> np.ndarray:
    """A frame's whole picture, uint8 RGB [H, W, 3]: pasted by `compositor` (SQUARE output) or decoded."""
    return compositor.rgb(frame) if compositor is not None else decode_rgb(frame.jpeg)
