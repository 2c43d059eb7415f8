from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AudioEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIO_ENCODING_UNSPECIFIED: _ClassVar[AudioEncoding]
    PCM_S16LE: _ClassVar[AudioEncoding]
    PCM_F32LE: _ClassVar[AudioEncoding]
    WAV: _ClassVar[AudioEncoding]

class FrameOutput(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FULL_FRAME: _ClassVar[FrameOutput]
    SQUARE: _ClassVar[FrameOutput]

class FrameKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FRAME_KIND_UNSPECIFIED: _ClassVar[FrameKind]
    IDLE: _ClassVar[FrameKind]
    SPEECH: _ClassVar[FrameKind]
    HELD: _ClassVar[FrameKind]
AUDIO_ENCODING_UNSPECIFIED: AudioEncoding
PCM_S16LE: AudioEncoding
PCM_F32LE: AudioEncoding
WAV: AudioEncoding
FULL_FRAME: FrameOutput
SQUARE: FrameOutput
FRAME_KIND_UNSPECIFIED: FrameKind
IDLE: FrameKind
SPEECH: FrameKind
HELD: FrameKind

class AudioFormat(_message.Message):
    __slots__ = ("encoding", "sample_rate", "channels")
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    encoding: AudioEncoding
    sample_rate: int
    channels: int
    def __init__(self, encoding: _Optional[_Union[AudioEncoding, str]] = ..., sample_rate: _Optional[int] = ..., channels: _Optional[int] = ...) -> None: ...

class Rect(_message.Message):
    __slots__ = ("x", "y", "width", "height")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    x: int
    y: int
    width: int
    height: int
    def __init__(self, x: _Optional[int] = ..., y: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("index", "avatar_frame", "jpeg", "pts_ms", "square")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    AVATAR_FRAME_FIELD_NUMBER: _ClassVar[int]
    JPEG_FIELD_NUMBER: _ClassVar[int]
    PTS_MS_FIELD_NUMBER: _ClassVar[int]
    SQUARE_FIELD_NUMBER: _ClassVar[int]
    index: int
    avatar_frame: int
    jpeg: bytes
    pts_ms: float
    square: Rect
    def __init__(self, index: _Optional[int] = ..., avatar_frame: _Optional[int] = ..., jpeg: _Optional[bytes] = ..., pts_ms: _Optional[float] = ..., square: _Optional[_Union[Rect, _Mapping]] = ...) -> None: ...

class StageTimings(_message.Message):
    __slots__ = ("audio_ms", "queue_ms", "inference_ms", "composite_ms", "encode_ms", "total_ms", "batch_size")
    AUDIO_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPOSITE_MS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    audio_ms: float
    queue_ms: float
    inference_ms: float
    composite_ms: float
    encode_ms: float
    total_ms: float
    batch_size: int
    def __init__(self, audio_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., inference_ms: _Optional[float] = ..., composite_ms: _Optional[float] = ..., encode_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., batch_size: _Optional[int] = ...) -> None: ...

class SynthesizeRequest(_message.Message):
    __slots__ = ("model_id", "audio", "format", "start_frame", "jpeg_quality", "output")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    START_FRAME_FIELD_NUMBER: _ClassVar[int]
    JPEG_QUALITY_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    audio: bytes
    format: AudioFormat
    start_frame: int
    jpeg_quality: int
    output: FrameOutput
    def __init__(self, model_id: _Optional[str] = ..., audio: _Optional[bytes] = ..., format: _Optional[_Union[AudioFormat, _Mapping]] = ..., start_frame: _Optional[int] = ..., jpeg_quality: _Optional[int] = ..., output: _Optional[_Union[FrameOutput, str]] = ...) -> None: ...

class SynthesizeResponse(_message.Message):
    __slots__ = ("frames", "timings", "model_loaded", "model_load_ms", "model_id", "device")
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_LOADED_FIELD_NUMBER: _ClassVar[int]
    MODEL_LOAD_MS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[Frame]
    timings: StageTimings
    model_loaded: bool
    model_load_ms: float
    model_id: str
    device: str
    def __init__(self, frames: _Optional[_Iterable[_Union[Frame, _Mapping]]] = ..., timings: _Optional[_Union[StageTimings, _Mapping]] = ..., model_loaded: _Optional[bool] = ..., model_load_ms: _Optional[float] = ..., model_id: _Optional[str] = ..., device: _Optional[str] = ...) -> None: ...

class StreamConfig(_message.Message):
    __slots__ = ("model_id", "format", "start_frame", "jpeg_quality", "lookahead_frames", "output")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    START_FRAME_FIELD_NUMBER: _ClassVar[int]
    JPEG_QUALITY_FIELD_NUMBER: _ClassVar[int]
    LOOKAHEAD_FRAMES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    format: AudioFormat
    start_frame: int
    jpeg_quality: int
    lookahead_frames: int
    output: FrameOutput
    def __init__(self, model_id: _Optional[str] = ..., format: _Optional[_Union[AudioFormat, _Mapping]] = ..., start_frame: _Optional[int] = ..., jpeg_quality: _Optional[int] = ..., lookahead_frames: _Optional[int] = ..., output: _Optional[_Union[FrameOutput, str]] = ...) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("config", "audio", "end_of_audio")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    END_OF_AUDIO_FIELD_NUMBER: _ClassVar[int]
    config: StreamConfig
    audio: bytes
    end_of_audio: bool
    def __init__(self, config: _Optional[_Union[StreamConfig, _Mapping]] = ..., audio: _Optional[bytes] = ..., end_of_audio: _Optional[bool] = ...) -> None: ...

class StreamResponse(_message.Message):
    __slots__ = ("frames", "timings", "end_of_stream", "model_loaded", "model_load_ms")
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    END_OF_STREAM_FIELD_NUMBER: _ClassVar[int]
    MODEL_LOADED_FIELD_NUMBER: _ClassVar[int]
    MODEL_LOAD_MS_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[Frame]
    timings: StageTimings
    end_of_stream: bool
    model_loaded: bool
    model_load_ms: float
    def __init__(self, frames: _Optional[_Iterable[_Union[Frame, _Mapping]]] = ..., timings: _Optional[_Union[StageTimings, _Mapping]] = ..., end_of_stream: _Optional[bool] = ..., model_loaded: _Optional[bool] = ..., model_load_ms: _Optional[float] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_id", "loaded", "device", "memory_bytes", "requests", "frames", "load_ms", "last_used_unix_ms", "pinned", "backend", "variant", "avatar_frames", "in_flight")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    LOAD_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    AVATAR_FRAMES_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    loaded: bool
    device: str
    memory_bytes: int
    requests: int
    frames: int
    load_ms: float
    last_used_unix_ms: int
    pinned: bool
    backend: str
    variant: str
    avatar_frames: int
    in_flight: int
    def __init__(self, model_id: _Optional[str] = ..., loaded: _Optional[bool] = ..., device: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., requests: _Optional[int] = ..., frames: _Optional[int] = ..., load_ms: _Optional[float] = ..., last_used_unix_ms: _Optional[int] = ..., pinned: _Optional[bool] = ..., backend: _Optional[str] = ..., variant: _Optional[str] = ..., avatar_frames: _Optional[int] = ..., in_flight: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("model_id", "device")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    device: str
    def __init__(self, model_id: _Optional[str] = ..., device: _Optional[str] = ...) -> None: ...

class LoadModelResponse(_message.Message):
    __slots__ = ("model", "already_loaded", "load_ms")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ALREADY_LOADED_FIELD_NUMBER: _ClassVar[int]
    LOAD_MS_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    already_loaded: bool
    load_ms: float
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ..., already_loaded: _Optional[bool] = ..., load_ms: _Optional[float] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class UnloadModelResponse(_message.Message):
    __slots__ = ("was_loaded",)
    WAS_LOADED_FIELD_NUMBER: _ClassVar[int]
    was_loaded: bool
    def __init__(self, was_loaded: _Optional[bool] = ...) -> None: ...

class LatencySummary(_message.Message):
    __slots__ = ("mean_ms", "p50_ms", "p95_ms", "count")
    MEAN_MS_FIELD_NUMBER: _ClassVar[int]
    P50_MS_FIELD_NUMBER: _ClassVar[int]
    P95_MS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    mean_ms: float
    p50_ms: float
    p95_ms: float
    count: int
    def __init__(self, mean_ms: _Optional[float] = ..., p50_ms: _Optional[float] = ..., p95_ms: _Optional[float] = ..., count: _Optional[int] = ...) -> None: ...

class ModelStats(_message.Message):
    __slots__ = ("info", "stages")
    class StagesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: LatencySummary
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[LatencySummary, _Mapping]] = ...) -> None: ...
    INFO_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    info: ModelInfo
    stages: _containers.MessageMap[str, LatencySummary]
    def __init__(self, info: _Optional[_Union[ModelInfo, _Mapping]] = ..., stages: _Optional[_Mapping[str, LatencySummary]] = ...) -> None: ...

class GetModelStatsRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class GetModelStatsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelStats]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelStats, _Mapping]]] = ...) -> None: ...

class DeviceInfo(_message.Message):
    __slots__ = ("device", "name", "memory_used_bytes", "memory_budget_bytes", "memory_total_bytes", "loaded_models")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOADED_MODELS_FIELD_NUMBER: _ClassVar[int]
    device: str
    name: str
    memory_used_bytes: int
    memory_budget_bytes: int
    memory_total_bytes: int
    loaded_models: int
    def __init__(self, device: _Optional[str] = ..., name: _Optional[str] = ..., memory_used_bytes: _Optional[int] = ..., memory_budget_bytes: _Optional[int] = ..., memory_total_bytes: _Optional[int] = ..., loaded_models: _Optional[int] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("healthy", "loaded_models", "max_models", "devices", "version", "active_streams", "queued_frames")
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    LOADED_MODELS_FIELD_NUMBER: _ClassVar[int]
    MAX_MODELS_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_STREAMS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FRAMES_FIELD_NUMBER: _ClassVar[int]
    healthy: bool
    loaded_models: int
    max_models: int
    devices: _containers.RepeatedCompositeFieldContainer[DeviceInfo]
    version: str
    active_streams: int
    queued_frames: int
    def __init__(self, healthy: _Optional[bool] = ..., loaded_models: _Optional[int] = ..., max_models: _Optional[int] = ..., devices: _Optional[_Iterable[_Union[DeviceInfo, _Mapping]]] = ..., version: _Optional[str] = ..., active_streams: _Optional[int] = ..., queued_frames: _Optional[int] = ...) -> None: ...

class ConverseConfig(_message.Message):
    __slots__ = ("model_id", "format", "start_frame", "jpeg_quality", "output_sample_rate", "output")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    START_FRAME_FIELD_NUMBER: _ClassVar[int]
    JPEG_QUALITY_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    format: AudioFormat
    start_frame: int
    jpeg_quality: int
    output_sample_rate: int
    output: FrameOutput
    def __init__(self, model_id: _Optional[str] = ..., format: _Optional[_Union[AudioFormat, _Mapping]] = ..., start_frame: _Optional[int] = ..., jpeg_quality: _Optional[int] = ..., output_sample_rate: _Optional[int] = ..., output: _Optional[_Union[FrameOutput, str]] = ...) -> None: ...

class UtteranceStart(_message.Message):
    __slots__ = ("utterance_id", "interrupt")
    UTTERANCE_ID_FIELD_NUMBER: _ClassVar[int]
    INTERRUPT_FIELD_NUMBER: _ClassVar[int]
    utterance_id: str
    interrupt: bool
    def __init__(self, utterance_id: _Optional[str] = ..., interrupt: _Optional[bool] = ...) -> None: ...

class ConverseRequest(_message.Message):
    __slots__ = ("config", "start_utterance", "audio", "end_utterance", "interrupt")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    START_UTTERANCE_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    END_UTTERANCE_FIELD_NUMBER: _ClassVar[int]
    INTERRUPT_FIELD_NUMBER: _ClassVar[int]
    config: ConverseConfig
    start_utterance: UtteranceStart
    audio: bytes
    end_utterance: bool
    interrupt: bool
    def __init__(self, config: _Optional[_Union[ConverseConfig, _Mapping]] = ..., start_utterance: _Optional[_Union[UtteranceStart, _Mapping]] = ..., audio: _Optional[bytes] = ..., end_utterance: _Optional[bool] = ..., interrupt: _Optional[bool] = ...) -> None: ...

class LiveFrame(_message.Message):
    __slots__ = ("index", "pts_ms", "avatar_position", "avatar_frame", "jpeg", "audio", "kind", "utterance_id", "utterance_frame", "square")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PTS_MS_FIELD_NUMBER: _ClassVar[int]
    AVATAR_POSITION_FIELD_NUMBER: _ClassVar[int]
    AVATAR_FRAME_FIELD_NUMBER: _ClassVar[int]
    JPEG_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    UTTERANCE_ID_FIELD_NUMBER: _ClassVar[int]
    UTTERANCE_FRAME_FIELD_NUMBER: _ClassVar[int]
    SQUARE_FIELD_NUMBER: _ClassVar[int]
    index: int
    pts_ms: float
    avatar_position: int
    avatar_frame: int
    jpeg: bytes
    audio: bytes
    kind: FrameKind
    utterance_id: str
    utterance_frame: int
    square: Rect
    def __init__(self, index: _Optional[int] = ..., pts_ms: _Optional[float] = ..., avatar_position: _Optional[int] = ..., avatar_frame: _Optional[int] = ..., jpeg: _Optional[bytes] = ..., audio: _Optional[bytes] = ..., kind: _Optional[_Union[FrameKind, str]] = ..., utterance_id: _Optional[str] = ..., utterance_frame: _Optional[int] = ..., square: _Optional[_Union[Rect, _Mapping]] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("session_id", "fps", "frame_interval_ms", "output_sample_rate", "samples_per_frame", "avatar_frames", "device", "model_loaded", "model_load_ms")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    FRAME_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_FRAME_FIELD_NUMBER: _ClassVar[int]
    AVATAR_FRAMES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MODEL_LOADED_FIELD_NUMBER: _ClassVar[int]
    MODEL_LOAD_MS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    fps: float
    frame_interval_ms: float
    output_sample_rate: int
    samples_per_frame: int
    avatar_frames: int
    device: str
    model_loaded: bool
    model_load_ms: float
    def __init__(self, session_id: _Optional[str] = ..., fps: _Optional[float] = ..., frame_interval_ms: _Optional[float] = ..., output_sample_rate: _Optional[int] = ..., samples_per_frame: _Optional[int] = ..., avatar_frames: _Optional[int] = ..., device: _Optional[str] = ..., model_loaded: _Optional[bool] = ..., model_load_ms: _Optional[float] = ...) -> None: ...

class UtteranceStarted(_message.Message):
    __slots__ = ("utterance_id", "first_frame", "avatar_position", "latency_ms", "frame_stride")
    UTTERANCE_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_FRAME_FIELD_NUMBER: _ClassVar[int]
    AVATAR_POSITION_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    FRAME_STRIDE_FIELD_NUMBER: _ClassVar[int]
    utterance_id: str
    first_frame: int
    avatar_position: int
    latency_ms: float
    frame_stride: int
    def __init__(self, utterance_id: _Optional[str] = ..., first_frame: _Optional[int] = ..., avatar_position: _Optional[int] = ..., latency_ms: _Optional[float] = ..., frame_stride: _Optional[int] = ...) -> None: ...

class UtteranceFinished(_message.Message):
    __slots__ = ("utterance_id", "last_frame", "interrupted", "frames_played", "frames_total", "played_ms", "late_frames", "error", "frames_repeated", "dropped")
    UTTERANCE_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_FRAME_FIELD_NUMBER: _ClassVar[int]
    INTERRUPTED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_PLAYED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PLAYED_MS_FIELD_NUMBER: _ClassVar[int]
    LATE_FRAMES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FRAMES_REPEATED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    utterance_id: str
    last_frame: int
    interrupted: bool
    frames_played: int
    frames_total: int
    played_ms: float
    late_frames: int
    error: str
    frames_repeated: int
    dropped: bool
    def __init__(self, utterance_id: _Optional[str] = ..., last_frame: _Optional[int] = ..., interrupted: _Optional[bool] = ..., frames_played: _Optional[int] = ..., frames_total: _Optional[int] = ..., played_ms: _Optional[float] = ..., late_frames: _Optional[int] = ..., error: _Optional[str] = ..., frames_repeated: _Optional[int] = ..., dropped: _Optional[bool] = ...) -> None: ...

class LateFrame(_message.Message):
    __slots__ = ("frame", "utterance_id")
    FRAME_FIELD_NUMBER: _ClassVar[int]
    UTTERANCE_ID_FIELD_NUMBER: _ClassVar[int]
    frame: int
    utterance_id: str
    def __init__(self, frame: _Optional[int] = ..., utterance_id: _Optional[str] = ...) -> None: ...

class ConverseEvent(_message.Message):
    __slots__ = ("started", "finished", "late")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    LATE_FIELD_NUMBER: _ClassVar[int]
    started: UtteranceStarted
    finished: UtteranceFinished
    late: LateFrame
    def __init__(self, started: _Optional[_Union[UtteranceStarted, _Mapping]] = ..., finished: _Optional[_Union[UtteranceFinished, _Mapping]] = ..., late: _Optional[_Union[LateFrame, _Mapping]] = ...) -> None: ...

class ConverseResponse(_message.Message):
    __slots__ = ("session", "frame", "events")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    session: SessionInfo
    frame: LiveFrame
    events: _containers.RepeatedCompositeFieldContainer[ConverseEvent]
    def __init__(self, session: _Optional[_Union[SessionInfo, _Mapping]] = ..., frame: _Optional[_Union[LiveFrame, _Mapping]] = ..., events: _Optional[_Iterable[_Union[ConverseEvent, _Mapping]]] = ...) -> None: ...

class GetAvatarRequest(_message.Message):
    __slots__ = ("model_id", "jpeg_quality")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    JPEG_QUALITY_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    jpeg_quality: int
    def __init__(self, model_id: _Optional[str] = ..., jpeg_quality: _Optional[int] = ...) -> None: ...

class AvatarFrame(_message.Message):
    __slots__ = ("index", "frame_count", "jpeg", "square", "width", "height")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FRAME_COUNT_FIELD_NUMBER: _ClassVar[int]
    JPEG_FIELD_NUMBER: _ClassVar[int]
    SQUARE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    index: int
    frame_count: int
    jpeg: bytes
    square: Rect
    width: int
    height: int
    def __init__(self, index: _Optional[int] = ..., frame_count: _Optional[int] = ..., jpeg: _Optional[bytes] = ..., square: _Optional[_Union[Rect, _Mapping]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...
