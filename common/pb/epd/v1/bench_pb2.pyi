from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class MeasureLinkRequest(_message.Message):
    __slots__ = ("tokens", "repeats", "concurrency", "write_wait")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    REPEATS_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    WRITE_WAIT_FIELD_NUMBER: _ClassVar[int]
    tokens: int
    repeats: int
    concurrency: int
    write_wait: str
    def __init__(self, tokens: _Optional[int] = ..., repeats: _Optional[int] = ..., concurrency: _Optional[int] = ..., write_wait: _Optional[str] = ...) -> None: ...

class MeasureLinkReply(_message.Message):
    __slots__ = ("seconds", "bytes", "descriptors", "encoder")
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTORS_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    seconds: _containers.RepeatedScalarFieldContainer[float]
    bytes: int
    descriptors: int
    encoder: str
    def __init__(self, seconds: _Optional[_Iterable[float]] = ..., bytes: _Optional[int] = ..., descriptors: _Optional[int] = ..., encoder: _Optional[str] = ...) -> None: ...

class RawWriteRequest(_message.Message):
    __slots__ = ("language_id", "rank", "dst_blocks", "tokens", "repeats", "concurrency", "write_wait")
    LANGUAGE_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    DST_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    REPEATS_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    WRITE_WAIT_FIELD_NUMBER: _ClassVar[int]
    language_id: str
    rank: int
    dst_blocks: _containers.RepeatedScalarFieldContainer[int]
    tokens: int
    repeats: int
    concurrency: int
    write_wait: str
    def __init__(self, language_id: _Optional[str] = ..., rank: _Optional[int] = ..., dst_blocks: _Optional[_Iterable[int]] = ..., tokens: _Optional[int] = ..., repeats: _Optional[int] = ..., concurrency: _Optional[int] = ..., write_wait: _Optional[str] = ...) -> None: ...

class RawWriteReply(_message.Message):
    __slots__ = ("seconds", "bytes", "descriptors")
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTORS_FIELD_NUMBER: _ClassVar[int]
    seconds: _containers.RepeatedScalarFieldContainer[float]
    bytes: int
    descriptors: int
    def __init__(self, seconds: _Optional[_Iterable[float]] = ..., bytes: _Optional[int] = ..., descriptors: _Optional[int] = ...) -> None: ...
