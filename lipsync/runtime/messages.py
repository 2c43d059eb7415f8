"""What a client says during a Stream or a live session, as the protocol layer parsed it (api.convert): the
session objects take these, so they know nothing of gRPC. The config message is not here: it opens the session."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Audio:
    """The next chunk of the client's audio, in the format its config declared."""
    data: bytes


@dataclass(frozen=True)
class EndOfAudio:
    """Stream: no more audio; the last frames follow, then the end of the stream."""


@dataclass(frozen=True)
class StartUtterance:
    """Live: the audio that follows is a new utterance (queued, or with `interrupt` replacing what plays)."""
    utterance_id: str = ""
    interrupt: bool = False


@dataclass(frozen=True)
class EndUtterance:
    """Live: the current utterance's audio is complete."""


@dataclass(frozen=True)
class Interrupt:
    """Live: barge-in: drop what plays and what is queued; the avatar goes back to idle."""


StreamMessage = Audio | EndOfAudio
LiveMessage = Audio | StartUtterance | EndUtterance | Interrupt
