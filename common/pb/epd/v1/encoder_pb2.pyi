from common.pb.epd.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EncodeRequest(_message.Message):
    __slots__ = ("request_id", "images", "text", "synthetic_tokens", "synthetic_seed", "rank_count", "language_id", "init", "cache_scope", "announce_size")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SYNTHETIC_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SYNTHETIC_SEED_FIELD_NUMBER: _ClassVar[int]
    RANK_COUNT_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_ID_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    CACHE_SCOPE_FIELD_NUMBER: _ClassVar[int]
    ANNOUNCE_SIZE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    images: _containers.RepeatedCompositeFieldContainer[_common_pb2.Image]
    text: str
    synthetic_tokens: int
    synthetic_seed: int
    rank_count: int
    language_id: str
    init: InitRequest
    cache_scope: str
    announce_size: bool
    def __init__(self, request_id: _Optional[str] = ..., images: _Optional[_Iterable[_Union[_common_pb2.Image, _Mapping]]] = ..., text: _Optional[str] = ..., synthetic_tokens: _Optional[int] = ..., synthetic_seed: _Optional[int] = ..., rank_count: _Optional[int] = ..., language_id: _Optional[str] = ..., init: _Optional[_Union[InitRequest, _Mapping]] = ..., cache_scope: _Optional[str] = ..., announce_size: _Optional[bool] = ...) -> None: ...

class EncodeReply(_message.Message):
    __slots__ = ("request_id", "total_tokens", "encode_seconds", "init_applied", "init_error", "cached_tokens", "cached_images")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INIT_APPLIED_FIELD_NUMBER: _ClassVar[int]
    INIT_ERROR_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_IMAGES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    total_tokens: int
    encode_seconds: float
    init_applied: bool
    init_error: str
    cached_tokens: int
    cached_images: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., total_tokens: _Optional[int] = ..., encode_seconds: _Optional[float] = ..., init_applied: _Optional[bool] = ..., init_error: _Optional[str] = ..., cached_tokens: _Optional[int] = ..., cached_images: _Optional[_Iterable[int]] = ...) -> None: ...

class EncodeUpdate(_message.Message):
    __slots__ = ("encoded", "status")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    encoded: EncodeReply
    status: _common_pb2.TransferStatus
    def __init__(self, encoded: _Optional[_Union[EncodeReply, _Mapping]] = ..., status: _Optional[_Union[_common_pb2.TransferStatus, _Mapping]] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("language_id", "rank", "session", "layout", "proof_nonce")
    LANGUAGE_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    PROOF_NONCE_FIELD_NUMBER: _ClassVar[int]
    language_id: str
    rank: int
    session: str
    layout: _common_pb2.PoolLayout
    proof_nonce: bytes
    def __init__(self, language_id: _Optional[str] = ..., rank: _Optional[int] = ..., session: _Optional[str] = ..., layout: _Optional[_Union[_common_pb2.PoolLayout, _Mapping]] = ..., proof_nonce: _Optional[bytes] = ...) -> None: ...

class ChallengeRequest(_message.Message):
    __slots__ = ("language_id", "rank")
    LANGUAGE_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    language_id: str
    rank: int
    def __init__(self, language_id: _Optional[str] = ..., rank: _Optional[int] = ...) -> None: ...

class ChallengeReply(_message.Message):
    __slots__ = ("nonce", "expires_in_s")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_S_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    expires_in_s: float
    def __init__(self, nonce: _Optional[bytes] = ..., expires_in_s: _Optional[float] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("encoder_id", "layout", "model_fingerprint")
    ENCODER_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    encoder_id: str
    layout: _common_pb2.PoolLayout
    model_fingerprint: str
    def __init__(self, encoder_id: _Optional[str] = ..., layout: _Optional[_Union[_common_pb2.PoolLayout, _Mapping]] = ..., model_fingerprint: _Optional[str] = ...) -> None: ...

class InitRequest(_message.Message):
    __slots__ = ("request_id", "language_id", "rank", "rank_count", "dst_blocks", "allocated_tokens", "progress_tokens", "held_images")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    RANK_COUNT_FIELD_NUMBER: _ClassVar[int]
    DST_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HELD_IMAGES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    language_id: str
    rank: int
    rank_count: int
    dst_blocks: _containers.RepeatedScalarFieldContainer[int]
    allocated_tokens: int
    progress_tokens: int
    held_images: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_id: _Optional[str] = ..., language_id: _Optional[str] = ..., rank: _Optional[int] = ..., rank_count: _Optional[int] = ..., dst_blocks: _Optional[_Iterable[int]] = ..., allocated_tokens: _Optional[int] = ..., progress_tokens: _Optional[int] = ..., held_images: _Optional[_Iterable[str]] = ...) -> None: ...

class InitReply(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: _common_pb2.TransferState
    def __init__(self, state: _Optional[_Union[_common_pb2.TransferState, str]] = ...) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ("request_id", "language_id", "rank", "sent_tokens", "dst_blocks", "allocated_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SENT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DST_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    language_id: str
    rank: int
    sent_tokens: int
    dst_blocks: _containers.RepeatedScalarFieldContainer[int]
    allocated_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., language_id: _Optional[str] = ..., rank: _Optional[int] = ..., sent_tokens: _Optional[int] = ..., dst_blocks: _Optional[_Iterable[int]] = ..., allocated_tokens: _Optional[int] = ...) -> None: ...

class ResumeReply(_message.Message):
    __slots__ = ("duplicate",)
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    duplicate: bool
    def __init__(self, duplicate: _Optional[bool] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("request_id", "rank", "language_id", "await_transfer")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_ID_FIELD_NUMBER: _ClassVar[int]
    AWAIT_TRANSFER_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    rank: int
    language_id: str
    await_transfer: bool
    def __init__(self, request_id: _Optional[str] = ..., rank: _Optional[int] = ..., language_id: _Optional[str] = ..., await_transfer: _Optional[bool] = ...) -> None: ...
