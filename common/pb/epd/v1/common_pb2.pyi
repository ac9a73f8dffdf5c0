from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TransferState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRANSFER_STATE_UNSPECIFIED: _ClassVar[TransferState]
    TRANSFER_STATE_BOOTSTRAPPING: _ClassVar[TransferState]
    TRANSFER_STATE_WAITING_FOR_INPUT: _ClassVar[TransferState]
    TRANSFER_STATE_TRANSFERRING: _ClassVar[TransferState]
    TRANSFER_STATE_SUCCESS: _ClassVar[TransferState]
    TRANSFER_STATE_FAILED: _ClassVar[TransferState]

class FailureReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FAILURE_REASON_UNSPECIFIED: _ClassVar[FailureReason]
    FAILURE_REASON_TIMEOUT: _ClassVar[FailureReason]
    FAILURE_REASON_CANCELLED: _ClassVar[FailureReason]
    FAILURE_REASON_TRANSPORT: _ClassVar[FailureReason]
    FAILURE_REASON_INTEGRITY: _ClassVar[FailureReason]
    FAILURE_REASON_RESOURCE_EXHAUSTED: _ClassVar[FailureReason]
    FAILURE_REASON_PEER_LOST: _ClassVar[FailureReason]
    FAILURE_REASON_INVALID: _ClassVar[FailureReason]
TRANSFER_STATE_UNSPECIFIED: TransferState
TRANSFER_STATE_BOOTSTRAPPING: TransferState
TRANSFER_STATE_WAITING_FOR_INPUT: TransferState
TRANSFER_STATE_TRANSFERRING: TransferState
TRANSFER_STATE_SUCCESS: TransferState
TRANSFER_STATE_FAILED: TransferState
FAILURE_REASON_UNSPECIFIED: FailureReason
FAILURE_REASON_TIMEOUT: FailureReason
FAILURE_REASON_CANCELLED: FailureReason
FAILURE_REASON_TRANSPORT: FailureReason
FAILURE_REASON_INTEGRITY: FailureReason
FAILURE_REASON_RESOURCE_EXHAUSTED: FailureReason
FAILURE_REASON_PEER_LOST: FailureReason
FAILURE_REASON_INVALID: FailureReason

class Image(_message.Message):
    __slots__ = ("data", "mime_type")
    DATA_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    mime_type: str
    def __init__(self, data: _Optional[bytes] = ..., mime_type: _Optional[str] = ...) -> None: ...

class FieldLayout(_message.Message):
    __slots__ = ("name", "dtype", "per_token_shape", "bytes_per_token", "offset")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PER_TOKEN_SHAPE_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    per_token_shape: _containers.RepeatedScalarFieldContainer[int]
    bytes_per_token: int
    offset: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., per_token_shape: _Optional[_Iterable[int]] = ..., bytes_per_token: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class PoolLayout(_message.Message):
    __slots__ = ("block_size", "num_blocks", "fields", "record_bytes", "base_address")
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    RECORD_BYTES_FIELD_NUMBER: _ClassVar[int]
    BASE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    block_size: int
    num_blocks: int
    fields: _containers.RepeatedCompositeFieldContainer[FieldLayout]
    record_bytes: int
    base_address: int
    def __init__(self, block_size: _Optional[int] = ..., num_blocks: _Optional[int] = ..., fields: _Optional[_Iterable[_Union[FieldLayout, _Mapping]]] = ..., record_bytes: _Optional[int] = ..., base_address: _Optional[int] = ...) -> None: ...

class TransferError(_message.Message):
    __slots__ = ("reason", "message", "writes_may_land")
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    WRITES_MAY_LAND_FIELD_NUMBER: _ClassVar[int]
    reason: FailureReason
    message: str
    writes_may_land: bool
    def __init__(self, reason: _Optional[_Union[FailureReason, str]] = ..., message: _Optional[str] = ..., writes_may_land: _Optional[bool] = ...) -> None: ...

class Checksum(_message.Message):
    __slots__ = ("field", "value")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    field: str
    value: int
    def __init__(self, field: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...

class ImageSpan(_message.Message):
    __slots__ = ("image", "start_token", "tokens", "key", "first_position", "reused")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    START_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    FIRST_POSITION_FIELD_NUMBER: _ClassVar[int]
    REUSED_FIELD_NUMBER: _ClassVar[int]
    image: int
    start_token: int
    tokens: int
    key: str
    first_position: _containers.RepeatedScalarFieldContainer[int]
    reused: bool
    def __init__(self, image: _Optional[int] = ..., start_token: _Optional[int] = ..., tokens: _Optional[int] = ..., key: _Optional[str] = ..., first_position: _Optional[_Iterable[int]] = ..., reused: _Optional[bool] = ...) -> None: ...

class TransferStatus(_message.Message):
    __slots__ = ("request_id", "state", "sent_tokens", "total_tokens", "round", "round_tokens", "allocated_tokens", "checksums", "error", "landed_tokens", "landed_checksums", "images")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SENT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUND_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LANDED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LANDED_CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    state: TransferState
    sent_tokens: int
    total_tokens: int
    round: int
    round_tokens: int
    allocated_tokens: int
    checksums: _containers.RepeatedCompositeFieldContainer[Checksum]
    error: TransferError
    landed_tokens: int
    landed_checksums: _containers.RepeatedCompositeFieldContainer[Checksum]
    images: _containers.RepeatedCompositeFieldContainer[ImageSpan]
    def __init__(self, request_id: _Optional[str] = ..., state: _Optional[_Union[TransferState, str]] = ..., sent_tokens: _Optional[int] = ..., total_tokens: _Optional[int] = ..., round: _Optional[int] = ..., round_tokens: _Optional[int] = ..., allocated_tokens: _Optional[int] = ..., checksums: _Optional[_Iterable[_Union[Checksum, _Mapping]]] = ..., error: _Optional[_Union[TransferError, _Mapping]] = ..., landed_tokens: _Optional[int] = ..., landed_checksums: _Optional[_Iterable[_Union[Checksum, _Mapping]]] = ..., images: _Optional[_Iterable[_Union[ImageSpan, _Mapping]]] = ...) -> None: ...

class RankView(_message.Message):
    __slots__ = ("rank", "state", "sent_tokens", "allocated_tokens", "session")
    RANK_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SENT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    rank: int
    state: TransferState
    sent_tokens: int
    allocated_tokens: int
    session: str
    def __init__(self, rank: _Optional[int] = ..., state: _Optional[_Union[TransferState, str]] = ..., sent_tokens: _Optional[int] = ..., allocated_tokens: _Optional[int] = ..., session: _Optional[str] = ...) -> None: ...

class TransferInfo(_message.Message):
    __slots__ = ("request_id", "state", "sent_tokens", "total_tokens", "rounds", "ranks", "error", "age_seconds", "allocated_tokens", "peer", "transfer_seconds", "bytes", "bootstrap_seconds")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SENT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    BOOTSTRAP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    state: TransferState
    sent_tokens: int
    total_tokens: int
    rounds: int
    ranks: _containers.RepeatedCompositeFieldContainer[RankView]
    error: TransferError
    age_seconds: float
    allocated_tokens: int
    peer: str
    transfer_seconds: float
    bytes: int
    bootstrap_seconds: float
    def __init__(self, request_id: _Optional[str] = ..., state: _Optional[_Union[TransferState, str]] = ..., sent_tokens: _Optional[int] = ..., total_tokens: _Optional[int] = ..., rounds: _Optional[int] = ..., ranks: _Optional[_Iterable[_Union[RankView, _Mapping]]] = ..., error: _Optional[_Union[TransferError, _Mapping]] = ..., age_seconds: _Optional[float] = ..., allocated_tokens: _Optional[int] = ..., peer: _Optional[str] = ..., transfer_seconds: _Optional[float] = ..., bytes: _Optional[int] = ..., bootstrap_seconds: _Optional[float] = ...) -> None: ...

class GetTransferRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class ListTransfersRequest(_message.Message):
    __slots__ = ("states", "limit")
    STATES_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[TransferState]
    limit: int
    def __init__(self, states: _Optional[_Iterable[_Union[TransferState, str]]] = ..., limit: _Optional[int] = ...) -> None: ...

class ListTransfersReply(_message.Message):
    __slots__ = ("transfers",)
    TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    transfers: _containers.RepeatedCompositeFieldContainer[TransferInfo]
    def __init__(self, transfers: _Optional[_Iterable[_Union[TransferInfo, _Mapping]]] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("request_id", "reason", "language_id", "failure")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_ID_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    reason: str
    language_id: str
    failure: FailureReason
    def __init__(self, request_id: _Optional[str] = ..., reason: _Optional[str] = ..., language_id: _Optional[str] = ..., failure: _Optional[_Union[FailureReason, str]] = ...) -> None: ...

class CancelReply(_message.Message):
    __slots__ = ("cancelled", "state", "writes_ended")
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    WRITES_ENDED_FIELD_NUMBER: _ClassVar[int]
    cancelled: bool
    state: TransferState
    writes_ended: bool
    def __init__(self, cancelled: _Optional[bool] = ..., state: _Optional[_Union[TransferState, str]] = ..., writes_ended: _Optional[bool] = ...) -> None: ...

class GetPoolRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PoolInfo(_message.Message):
    __slots__ = ("layout", "used_blocks", "free_blocks", "waiters", "device", "session", "rank", "rank_pools", "quarantined_blocks", "embedding_cache")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    USED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    WAITERS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    RANK_POOLS_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_CACHE_FIELD_NUMBER: _ClassVar[int]
    layout: PoolLayout
    used_blocks: int
    free_blocks: int
    waiters: int
    device: str
    session: str
    rank: int
    rank_pools: _containers.RepeatedCompositeFieldContainer[RankPool]
    quarantined_blocks: int
    embedding_cache: EmbeddingCacheInfo
    def __init__(self, layout: _Optional[_Union[PoolLayout, _Mapping]] = ..., used_blocks: _Optional[int] = ..., free_blocks: _Optional[int] = ..., waiters: _Optional[int] = ..., device: _Optional[str] = ..., session: _Optional[str] = ..., rank: _Optional[int] = ..., rank_pools: _Optional[_Iterable[_Union[RankPool, _Mapping]]] = ..., quarantined_blocks: _Optional[int] = ..., embedding_cache: _Optional[_Union[EmbeddingCacheInfo, _Mapping]] = ...) -> None: ...

class EmbeddingCacheInfo(_message.Message):
    __slots__ = ("capacity_bytes", "bytes", "entries", "hits", "misses", "evictions")
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    capacity_bytes: int
    bytes: int
    entries: int
    hits: int
    misses: int
    evictions: int
    def __init__(self, capacity_bytes: _Optional[int] = ..., bytes: _Optional[int] = ..., entries: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., evictions: _Optional[int] = ...) -> None: ...

class RankPool(_message.Message):
    __slots__ = ("rank", "used_blocks", "free_blocks", "waiters", "quarantined_blocks", "embedding_cache")
    RANK_FIELD_NUMBER: _ClassVar[int]
    USED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    WAITERS_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_CACHE_FIELD_NUMBER: _ClassVar[int]
    rank: int
    used_blocks: int
    free_blocks: int
    waiters: int
    quarantined_blocks: int
    embedding_cache: EmbeddingCacheInfo
    def __init__(self, rank: _Optional[int] = ..., used_blocks: _Optional[int] = ..., free_blocks: _Optional[int] = ..., waiters: _Optional[int] = ..., quarantined_blocks: _Optional[int] = ..., embedding_cache: _Optional[_Union[EmbeddingCacheInfo, _Mapping]] = ...) -> None: ...

class GetDiagnosticsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Diagnostics(_message.Message):
    __slots__ = ("asyncio_tasks", "threads", "rss_bytes", "live_transfers", "history_transfers", "status_streams", "encoders")
    ASYNCIO_TASKS_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    LIVE_TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    STATUS_STREAMS_FIELD_NUMBER: _ClassVar[int]
    ENCODERS_FIELD_NUMBER: _ClassVar[int]
    asyncio_tasks: int
    threads: int
    rss_bytes: int
    live_transfers: int
    history_transfers: int
    status_streams: int
    encoders: _containers.RepeatedCompositeFieldContainer[EncoderState]
    def __init__(self, asyncio_tasks: _Optional[int] = ..., threads: _Optional[int] = ..., rss_bytes: _Optional[int] = ..., live_transfers: _Optional[int] = ..., history_transfers: _Optional[int] = ..., status_streams: _Optional[int] = ..., encoders: _Optional[_Iterable[_Union[EncoderState, _Mapping]]] = ...) -> None: ...

class EncoderState(_message.Message):
    __slots__ = ("address", "encoder_id", "available", "registered", "retired", "in_flight", "live_transfers", "picked", "last_error")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ENCODER_ID_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    RETIRED_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    LIVE_TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    PICKED_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    address: str
    encoder_id: str
    available: bool
    registered: bool
    retired: bool
    in_flight: int
    live_transfers: int
    picked: int
    last_error: str
    def __init__(self, address: _Optional[str] = ..., encoder_id: _Optional[str] = ..., available: _Optional[bool] = ..., registered: _Optional[bool] = ..., retired: _Optional[bool] = ..., in_flight: _Optional[int] = ..., live_transfers: _Optional[int] = ..., picked: _Optional[int] = ..., last_error: _Optional[str] = ...) -> None: ...
