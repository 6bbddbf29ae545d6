"""The HTTP front end: the dialects of vLLM's and SGLang's servers over the same teacher service.

Trainers that already ask a vLLM server (`POST /v1/completions` with `prompt_logprobs`) or an
SGLang server (`POST /generate` with `return_logprob`) for a teacher's log-probabilities get the
same answers from this one, with its tenants, keys, fair scheduling and flat memory. Like the
gRPC servicer it only converts: app.py (routes, keys, errors, the server), vllm_dialect.py and
sglang_dialect.py (one dialect each), scoring.py (what both ask of the service).
"""
