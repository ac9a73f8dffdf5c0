from common.pb.epd.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "images", "text", "synthetic_tokens", "synthetic_seed", "expected_tokens", "want_digest")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SYNTHETIC_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SYNTHETIC_SEED_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WANT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    images: _containers.RepeatedCompositeFieldContainer[_common_pb2.Image]
    text: str
    synthetic_tokens: int
    synthetic_seed: int
    expected_tokens: int
    want_digest: bool
    def __init__(self, request_id: _Optional[str] = ..., images: _Optional[_Iterable[_Union[_common_pb2.Image, _Mapping]]] = ..., text: _Optional[str] = ..., synthetic_tokens: _Optional[int] = ..., synthetic_seed: _Optional[int] = ..., expected_tokens: _Optional[int] = ..., want_digest: _Optional[bool] = ...) -> None: ...

class GenerateReply(_message.Message):
    __slots__ = ("request_id", "total_tokens", "rounds", "bytes", "transfer_seconds", "total_seconds", "integrity_verified", "encoder", "payload_sha256", "first_token_id", "initial_allocated_tokens", "ranks", "agreement_seconds", "logits", "consumer", "attempts", "failed_over_from", "transfer_id", "early_init", "overlapped_rounds", "cached_tokens", "transferred_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INTEGRITY_VERIFIED_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    INITIAL_ALLOCATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    FAILED_OVER_FROM_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    EARLY_INIT_FIELD_NUMBER: _ClassVar[int]
    OVERLAPPED_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRANSFERRED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    total_tokens: int
    rounds: int
    bytes: int
    transfer_seconds: float
    total_seconds: float
    integrity_verified: bool
    encoder: str
    payload_sha256: str
    first_token_id: int
    initial_allocated_tokens: int
    ranks: _containers.RepeatedCompositeFieldContainer[RankReport]
    agreement_seconds: float
    logits: LogitsSummary
    consumer: str
    attempts: int
    failed_over_from: str
    transfer_id: str
    early_init: bool
    overlapped_rounds: int
    cached_tokens: int
    transferred_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., total_tokens: _Optional[int] = ..., rounds: _Optional[int] = ..., bytes: _Optional[int] = ..., transfer_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ..., integrity_verified: _Optional[bool] = ..., encoder: _Optional[str] = ..., payload_sha256: _Optional[str] = ..., first_token_id: _Optional[int] = ..., initial_allocated_tokens: _Optional[int] = ..., ranks: _Optional[_Iterable[_Union[RankReport, _Mapping]]] = ..., agreement_seconds: _Optional[float] = ..., logits: _Optional[_Union[LogitsSummary, _Mapping]] = ..., consumer: _Optional[str] = ..., attempts: _Optional[int] = ..., failed_over_from: _Optional[str] = ..., transfer_id: _Optional[str] = ..., early_init: _Optional[bool] = ..., overlapped_rounds: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., transferred_tokens: _Optional[int] = ...) -> None: ...

class LogitsSummary(_message.Message):
    __slots__ = ("top_token_ids", "top_logits", "norm", "sum", "vocab_size", "mrope_position_delta", "prefill_tokens", "prefill_seconds", "skipped")
    TOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGITS_FIELD_NUMBER: _ClassVar[int]
    NORM_FIELD_NUMBER: _ClassVar[int]
    SUM_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MROPE_POSITION_DELTA_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    top_token_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logits: _containers.RepeatedScalarFieldContainer[float]
    norm: float
    sum: float
    vocab_size: int
    mrope_position_delta: int
    prefill_tokens: int
    prefill_seconds: float
    skipped: str
    def __init__(self, top_token_ids: _Optional[_Iterable[int]] = ..., top_logits: _Optional[_Iterable[float]] = ..., norm: _Optional[float] = ..., sum: _Optional[float] = ..., vocab_size: _Optional[int] = ..., mrope_position_delta: _Optional[int] = ..., prefill_tokens: _Optional[int] = ..., prefill_seconds: _Optional[float] = ..., skipped: _Optional[str] = ...) -> None: ...

class RankReport(_message.Message):
    __slots__ = ("rank", "data_rank", "payload_sha256", "received_tokens", "rounds", "transferred_tokens", "reused_tokens")
    RANK_FIELD_NUMBER: _ClassVar[int]
    DATA_RANK_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    TRANSFERRED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REUSED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    rank: int
    data_rank: bool
    payload_sha256: str
    received_tokens: int
    rounds: int
    transferred_tokens: int
    reused_tokens: int
    def __init__(self, rank: _Optional[int] = ..., data_rank: _Optional[bool] = ..., payload_sha256: _Optional[str] = ..., received_tokens: _Optional[int] = ..., rounds: _Optional[int] = ..., transferred_tokens: _Optional[int] = ..., reused_tokens: _Optional[int] = ...) -> None: ...
