"""The OpenAI-compatible HTTP API (FastAPI over the engine). `headwise serve` runs it.

Routes
    POST /v1/completions, POST /v1/chat/completions   stream (SSE) or not
    GET  /v1/models                                    the served model (id, max_model_len)
    POST /tokenize   {"prompt"} or {"messages"} -> {"count", "max_model_len", "tokens"[, "token_strs"]}
    POST /detokenize {"tokens"} -> {"prompt"}
    GET  /health     liveness: 200 while the engine loop is alive, and while the model loads
    GET  /ready      readiness: 503 until the model is loaded and warmed up, and while draining
    GET  /metrics    Prometheus text: latency histograms, load, counters and per-head attention
                     statistics (every family in docs/metrics.md)
    GET  /dashboard  the live operations page (public; its data calls need the key when one is set)
    GET  /v1/telemetry?window=1m|5m|all&recent=N   per-head means over a window, latency
                     percentiles, throughput, load, recent requests (docs/telemetry-api.md)
    GET  /v1/telemetry/requests/{id}   one recent request's per-head means
    GET  /openapi.json, /docs

Request fields: OpenAI's (model, prompt / messages, max_tokens, max_completion_tokens (chat),
temperature, top_p, n, stop, seed, presence_penalty, frequency_penalty, logit_bias,
response_format, logprobs, top_logprobs (chat), echo (completions), stream,
stream_options.include_usage, user) and the common extensions (top_k, min_p,
repetition_penalty, min_tokens, ignore_eos, stop_token_ids, include_stop_str_in_output,
skip_special_tokens, return_token_ids, chat_template_kwargs, add_generation_prompt, guided_json,
guided_regex, guided_choice, guided_grammar, structured_outputs), plus "head_telemetry": true
(DESIGN.md "Contracts"). "model" may be
omitted; otherwise it must name the served model (its id, its name without a quantization
suffix, its path, or a --served-model-name), case-insensitively, else 404. With n > 1 and a
seed, choice i uses seed + i (choice 0 equals the n = 1 answer). max_tokens: /v1/completions
generates at most 16 tokens unless told otherwise, also when max_tokens is null (OpenAI's
default); chat generates up to the end of the context window when neither max_completion_tokens
nor max_tokens is given (or both are null), as OpenAI's chat does.

Structured output (completions and chat alike; at most one constraint per request, two are a
400 naming both):
    response_format   {"type": "text"} (no constraint), {"type": "json_object"} (any JSON
                      object), or {"type": "json_schema", "json_schema": {"name", "schema",
                      "strict", "description"}}: the output is JSON matching schema (an object;
                      name: 1 to 64 of a-z A-Z 0-9 _ -, as OpenAI), whatever strict says
    guided_json       vLLM's: a JSON schema, as an object or as its JSON text
    guided_regex      the output matches this regular expression
    guided_choice     the output is one of these strings (an array of at least one)
    guided_grammar    the output is a sentence of this Lark grammar
    structured_outputs  vLLM's newer form: one of {"json", "regex", "choice", "grammar",
                      "json_object": true} (structural_tag is refused as unsupported)
The grammar is compiled by llguidance off the event loop before the request is added. A schema
that is not valid JSON or uses a feature llguidance does not support, a regex or grammar that
does not compile, and a constraint that no output of the model's vocabulary can satisfy are
refused with a 400 whose param is the field it came from, before anything is scheduled. A
request ends with finish_reason "stop" when its grammar is complete, and with "stop" and
stop_reason "grammar_dead_end" if it ever reaches a dead end; output cut by max_tokens
("length") is cut JSON. Admitted constrained requests count in
headwise_structured_requests_total{type} (docs/metrics.md).
logit_bias (as OpenAI): {"token id": bias}, at most 300 entries; ids in decimal digits and below
the vocabulary size, biases finite numbers in [-100, 100], added to the token's logit before
sampling (-100 bans it, +100 all but forces it); it composes with every other field, a grammar
included.

Extra response fields
    "timings" (final response object, or the last chunk before [DONE]), in seconds:
        queue_time, time_to_first_token, prefill_time, decode_time, e2e_latency (all measured
        from the engine's arrival of the request), decode_tokens_per_s ((tokens - 1) / decode).
        With several choices: the earliest queue exit and first token, the last finish, and the
        aggregate decode rate.
    "head_telemetry" (same place) when asked; "stop_reason" per choice (the stop string or
    token id that ended it); "token_ids" per choice with return_token_ids.

Response headers of non-streaming completions (seconds, six decimals):
    x-headwise-queue-time, x-headwise-ttft, x-headwise-prefill-time, x-headwise-decode-time,
    x-headwise-e2e-time, x-headwise-decode-tokens-per-s (tokens/s), and a standard
    Server-Timing header (queue, ttft, prefill, decode, e2e; milliseconds) that browser
    developer tools display. With --cors-origin they are exposed to scripts.

Errors: always {"error": {"message", "type", "param", "code"}}. 400 invalid_request_error for
any invalid input (codes: invalid_json, invalid_encoding, invalid_value, missing_field,
unsupported_parameter, unsupported_media_type, context_length_exceeded), 401 invalid_api_key,
404 model_not_found / not_found, 405 method_not_allowed, 413 request_too_large, 503
service_unavailable_error with Retry-After (server_is_overloaded, server_shutting_down,
not_ready, model_loading). An error after a stream started is an SSE event
`data: {"error": {...}}` followed by `data: [DONE]` (code slow_consumer when the client stopped
reading, see below). Messages are short and never carry paths or tracebacks.

Streaming: `data: {chunk}` per token, or per few tokens when the client or the loop fell behind
(events already queued are coalesced into one chunk per choice); chat streams start with a
{"role": "assistant"} delta; the finishing chunk of each choice has finish_reason; with
stream_options.include_usage a last chunk with empty choices carries usage; then [DONE].

Reliability: a client that disconnects (stream or not) aborts its engine requests, which frees
their KV blocks; one request may ask for at most --max-request-seqs sequences (n x prompts;
default half of --max-num-seqs), past that 400 naming the limit; at most max_num_seqs +
--max-queue engine requests are admitted, past that 503 at once without touching the engine; a
text prompt (or conversation) longer than max_model_len times the tokenizer's longest token, in
characters, is refused with context_length_exceeded before it is tokenized (the exact check on
tokens follows; /tokenize refuses such a text too); tokenization and chat templating run in a
thread pool, and large bodies and responses are parsed and built in another, so the event loop
never works on a client-sized amount of data; a streaming client that leaves more than
--stream-buffer-events events unread gets its request aborted (KV blocks freed, counted in
headwise_requests_rejected_total{reason="slow_consumer"}) and its stream ends with a
slow_consumer error event. Start-up: the port answers at once; while the model loads /health
is 200, /ready and every other route 503 (model_loading) with Retry-After. SIGTERM turns /ready
to 503, refuses new requests, lets admitted ones (even those still being tokenized) finish for
up to --drain-timeout seconds, aborts the rest, exits 0.
--api-key guards every route except /health, /ready, the /dashboard page and its assets (and
/metrics unless --metrics-require-key), compared in constant time on SHA-256 digests; CORS is off unless
--cors-origin is given; bodies over --max-body-bytes get 413 while being read.
"""
