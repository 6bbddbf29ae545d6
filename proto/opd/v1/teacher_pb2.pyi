from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MaskReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MASK_REASON_OK: _ClassVar[MaskReason]
    MASK_REASON_SPECIAL: _ClassVar[MaskReason]
    MASK_REASON_UNALIGNED: _ClassVar[MaskReason]
    MASK_REASON_LOW_MASS: _ClassVar[MaskReason]
    MASK_REASON_BEYOND_CONTEXT: _ClassVar[MaskReason]
MASK_REASON_OK: MaskReason
MASK_REASON_SPECIAL: MaskReason
MASK_REASON_UNALIGNED: MaskReason
MASK_REASON_LOW_MASS: MaskReason
MASK_REASON_BEYOND_CONTEXT: MaskReason

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("model", "engine", "vocab_size", "max_k", "max_sequence_length", "dtype", "special_token_ids", "eos_token_ids", "server_version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SPECIAL_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    engine: str
    vocab_size: int
    max_k: int
    max_sequence_length: int
    dtype: str
    special_token_ids: _containers.RepeatedScalarFieldContainer[int]
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    server_version: str
    def __init__(self, model: _Optional[str] = ..., engine: _Optional[str] = ..., vocab_size: _Optional[int] = ..., max_k: _Optional[int] = ..., max_sequence_length: _Optional[int] = ..., dtype: _Optional[str] = ..., special_token_ids: _Optional[_Iterable[int]] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., server_version: _Optional[str] = ...) -> None: ...

class StudentTokenizer(_message.Message):
    __slots__ = ("same_as_teacher", "hf")
    SAME_AS_TEACHER_FIELD_NUMBER: _ClassVar[int]
    HF_FIELD_NUMBER: _ClassVar[int]
    same_as_teacher: bool
    hf: HFTokenizer
    def __init__(self, same_as_teacher: _Optional[bool] = ..., hf: _Optional[_Union[HFTokenizer, _Mapping]] = ...) -> None: ...

class HFTokenizer(_message.Message):
    __slots__ = ("tokenizer_json", "special_tokens", "eos_tokens", "chat_template")
    TOKENIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    tokenizer_json: str
    special_tokens: _containers.RepeatedScalarFieldContainer[str]
    eos_tokens: _containers.RepeatedScalarFieldContainer[str]
    chat_template: str
    def __init__(self, tokenizer_json: _Optional[str] = ..., special_tokens: _Optional[_Iterable[str]] = ..., eos_tokens: _Optional[_Iterable[str]] = ..., chat_template: _Optional[str] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("tokenizer", "temperature")
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    tokenizer: StudentTokenizer
    temperature: float
    def __init__(self, tokenizer: _Optional[_Union[StudentTokenizer, _Mapping]] = ..., temperature: _Optional[float] = ...) -> None: ...

class OpenSessionResponse(_message.Message):
    __slots__ = ("session_id", "same_as_teacher", "student_vocab_size")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SAME_AS_TEACHER_FIELD_NUMBER: _ClassVar[int]
    STUDENT_VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    same_as_teacher: bool
    student_vocab_size: int
    def __init__(self, session_id: _Optional[str] = ..., same_as_teacher: _Optional[bool] = ..., student_vocab_size: _Optional[int] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("request_id", "session_id", "tokens", "score_from", "top_k")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FROM_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    session_id: str
    tokens: Tensor
    score_from: int
    top_k: int
    def __init__(self, request_id: _Optional[int] = ..., session_id: _Optional[str] = ..., tokens: _Optional[_Union[Tensor, _Mapping]] = ..., score_from: _Optional[int] = ..., top_k: _Optional[int] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("request_id", "ids", "logprobs", "token_logprobs", "mask", "reason", "coverage", "mean_support_mass")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_FIELD_NUMBER: _ClassVar[int]
    MEAN_SUPPORT_MASS_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    ids: Tensor
    logprobs: Tensor
    token_logprobs: Tensor
    mask: Tensor
    reason: Tensor
    coverage: float
    mean_support_mass: float
    def __init__(self, request_id: _Optional[int] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., token_logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., mask: _Optional[_Union[Tensor, _Mapping]] = ..., reason: _Optional[_Union[Tensor, _Mapping]] = ..., coverage: _Optional[float] = ..., mean_support_mass: _Optional[float] = ...) -> None: ...

class ScoreStreamResponse(_message.Message):
    __slots__ = ("request_id", "response", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    response: ScoreResponse
    error: Error
    def __init__(self, request_id: _Optional[int] = ..., response: _Optional[_Union[ScoreResponse, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
