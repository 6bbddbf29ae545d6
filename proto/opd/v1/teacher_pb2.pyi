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
    MASK_REASON_CONTEXT: _ClassVar[MaskReason]
MASK_REASON_OK: MaskReason
MASK_REASON_SPECIAL: MaskReason
MASK_REASON_UNALIGNED: MaskReason
MASK_REASON_LOW_MASS: MaskReason
MASK_REASON_BEYOND_CONTEXT: MaskReason
MASK_REASON_CONTEXT: MaskReason

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
    __slots__ = ("model", "engine", "vocab_size", "max_k", "max_sequence_length", "dtype", "special_token_ids", "eos_token_ids", "server_version", "weights_sha256", "teachers", "default_teacher")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SPECIAL_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    TEACHERS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TEACHER_FIELD_NUMBER: _ClassVar[int]
    model: str
    engine: str
    vocab_size: int
    max_k: int
    max_sequence_length: int
    dtype: str
    special_token_ids: _containers.RepeatedScalarFieldContainer[int]
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    server_version: str
    weights_sha256: str
    teachers: _containers.RepeatedCompositeFieldContainer[TeacherInfo]
    default_teacher: str
    def __init__(self, model: _Optional[str] = ..., engine: _Optional[str] = ..., vocab_size: _Optional[int] = ..., max_k: _Optional[int] = ..., max_sequence_length: _Optional[int] = ..., dtype: _Optional[str] = ..., special_token_ids: _Optional[_Iterable[int]] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., server_version: _Optional[str] = ..., weights_sha256: _Optional[str] = ..., teachers: _Optional[_Iterable[_Union[TeacherInfo, _Mapping]]] = ..., default_teacher: _Optional[str] = ...) -> None: ...

class TeacherInfo(_message.Message):
    __slots__ = ("name", "model", "engine", "vocab_size", "max_k", "max_sequence_length", "dtype", "special_token_ids", "eos_token_ids", "weights_sha256", "base")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SPECIAL_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: str
    engine: str
    vocab_size: int
    max_k: int
    max_sequence_length: int
    dtype: str
    special_token_ids: _containers.RepeatedScalarFieldContainer[int]
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    weights_sha256: str
    base: str
    def __init__(self, name: _Optional[str] = ..., model: _Optional[str] = ..., engine: _Optional[str] = ..., vocab_size: _Optional[int] = ..., max_k: _Optional[int] = ..., max_sequence_length: _Optional[int] = ..., dtype: _Optional[str] = ..., special_token_ids: _Optional[_Iterable[int]] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., weights_sha256: _Optional[str] = ..., base: _Optional[str] = ...) -> None: ...

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

class SpecialTokenPair(_message.Message):
    __slots__ = ("student_token", "teacher_token")
    STUDENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TEACHER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    student_token: str
    teacher_token: str
    def __init__(self, student_token: _Optional[str] = ..., teacher_token: _Optional[str] = ...) -> None: ...

class AlignmentOptions(_message.Message):
    __slots__ = ("candidates", "expansion_rounds", "branch_token_factor", "min_branch_prob", "inside_candidates")
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    EXPANSION_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    BRANCH_TOKEN_FACTOR_FIELD_NUMBER: _ClassVar[int]
    MIN_BRANCH_PROB_FIELD_NUMBER: _ClassVar[int]
    INSIDE_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    candidates: int
    expansion_rounds: int
    branch_token_factor: float
    min_branch_prob: float
    inside_candidates: int
    def __init__(self, candidates: _Optional[int] = ..., expansion_rounds: _Optional[int] = ..., branch_token_factor: _Optional[float] = ..., min_branch_prob: _Optional[float] = ..., inside_candidates: _Optional[int] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("tokenizer", "temperature", "special_token_pairs", "no_eos_pairing", "alignment", "no_special_token_masking", "teacher")
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SPECIAL_TOKEN_PAIRS_FIELD_NUMBER: _ClassVar[int]
    NO_EOS_PAIRING_FIELD_NUMBER: _ClassVar[int]
    ALIGNMENT_FIELD_NUMBER: _ClassVar[int]
    NO_SPECIAL_TOKEN_MASKING_FIELD_NUMBER: _ClassVar[int]
    TEACHER_FIELD_NUMBER: _ClassVar[int]
    tokenizer: StudentTokenizer
    temperature: float
    special_token_pairs: _containers.RepeatedCompositeFieldContainer[SpecialTokenPair]
    no_eos_pairing: bool
    alignment: AlignmentOptions
    no_special_token_masking: bool
    teacher: str
    def __init__(self, tokenizer: _Optional[_Union[StudentTokenizer, _Mapping]] = ..., temperature: _Optional[float] = ..., special_token_pairs: _Optional[_Iterable[_Union[SpecialTokenPair, _Mapping]]] = ..., no_eos_pairing: _Optional[bool] = ..., alignment: _Optional[_Union[AlignmentOptions, _Mapping]] = ..., no_special_token_masking: _Optional[bool] = ..., teacher: _Optional[str] = ...) -> None: ...

class OpenSessionResponse(_message.Message):
    __slots__ = ("session_id", "same_as_teacher", "student_vocab_size", "special_token_pairs", "teacher")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SAME_AS_TEACHER_FIELD_NUMBER: _ClassVar[int]
    STUDENT_VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    SPECIAL_TOKEN_PAIRS_FIELD_NUMBER: _ClassVar[int]
    TEACHER_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    same_as_teacher: bool
    student_vocab_size: int
    special_token_pairs: _containers.RepeatedCompositeFieldContainer[SpecialTokenPair]
    teacher: str
    def __init__(self, session_id: _Optional[str] = ..., same_as_teacher: _Optional[bool] = ..., student_vocab_size: _Optional[int] = ..., special_token_pairs: _Optional[_Iterable[_Union[SpecialTokenPair, _Mapping]]] = ..., teacher: _Optional[str] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("request_id", "session_id", "tokens", "score_from", "top_k", "messages", "candidate_ids", "teacher_prompt_ids", "score_mask")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FROM_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_IDS_FIELD_NUMBER: _ClassVar[int]
    TEACHER_PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORE_MASK_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    session_id: str
    tokens: Tensor
    score_from: int
    top_k: int
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    candidate_ids: Tensor
    teacher_prompt_ids: Tensor
    score_mask: Tensor
    def __init__(self, request_id: _Optional[int] = ..., session_id: _Optional[str] = ..., tokens: _Optional[_Union[Tensor, _Mapping]] = ..., score_from: _Optional[int] = ..., top_k: _Optional[int] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., candidate_ids: _Optional[_Union[Tensor, _Mapping]] = ..., teacher_prompt_ids: _Optional[_Union[Tensor, _Mapping]] = ..., score_mask: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Coverage(_message.Message):
    __slots__ = ("positions", "with_distribution", "special", "unaligned", "low_mass", "beyond_context", "retained_mass_sum", "branch_sequences", "branch_tokens", "unresolved_paths", "context")
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    WITH_DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    SPECIAL_FIELD_NUMBER: _ClassVar[int]
    UNALIGNED_FIELD_NUMBER: _ClassVar[int]
    LOW_MASS_FIELD_NUMBER: _ClassVar[int]
    BEYOND_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    RETAINED_MASS_SUM_FIELD_NUMBER: _ClassVar[int]
    BRANCH_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    BRANCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    UNRESOLVED_PATHS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    positions: int
    with_distribution: int
    special: int
    unaligned: int
    low_mass: int
    beyond_context: int
    retained_mass_sum: float
    branch_sequences: int
    branch_tokens: int
    unresolved_paths: int
    context: int
    def __init__(self, positions: _Optional[int] = ..., with_distribution: _Optional[int] = ..., special: _Optional[int] = ..., unaligned: _Optional[int] = ..., low_mass: _Optional[int] = ..., beyond_context: _Optional[int] = ..., retained_mass_sum: _Optional[float] = ..., branch_sequences: _Optional[int] = ..., branch_tokens: _Optional[int] = ..., unresolved_paths: _Optional[int] = ..., context: _Optional[int] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("request_id", "ids", "logprobs", "token_logprobs", "mask", "reason", "coverage", "mean_support_mass", "counts", "candidate_logprobs")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_FIELD_NUMBER: _ClassVar[int]
    MEAN_SUPPORT_MASS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    ids: Tensor
    logprobs: Tensor
    token_logprobs: Tensor
    mask: Tensor
    reason: Tensor
    coverage: float
    mean_support_mass: float
    counts: Coverage
    candidate_logprobs: Tensor
    def __init__(self, request_id: _Optional[int] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., token_logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., mask: _Optional[_Union[Tensor, _Mapping]] = ..., reason: _Optional[_Union[Tensor, _Mapping]] = ..., coverage: _Optional[float] = ..., mean_support_mass: _Optional[float] = ..., counts: _Optional[_Union[Coverage, _Mapping]] = ..., candidate_logprobs: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

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
    __slots__ = ("code", "message", "retry_after_ms")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    retry_after_ms: int
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class GetSessionStatsRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class SessionStats(_message.Message):
    __slots__ = ("session_id", "requests", "totals", "coverage", "mean_retained_mass")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    TOTALS_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_FIELD_NUMBER: _ClassVar[int]
    MEAN_RETAINED_MASS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    requests: int
    totals: Coverage
    coverage: float
    mean_retained_mass: float
    def __init__(self, session_id: _Optional[str] = ..., requests: _Optional[int] = ..., totals: _Optional[_Union[Coverage, _Mapping]] = ..., coverage: _Optional[float] = ..., mean_retained_mass: _Optional[float] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
