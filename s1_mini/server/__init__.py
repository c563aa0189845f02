"""HTTP server for the engine: ``python -m s1_mini.server --checkpoint DIR``.

``create_app(config, options)`` builds the FastAPI app; the app owns one engine,
created in its lifespan and loaded in a worker thread (``/ready`` is 503 until the
models are loaded and warmed up). Modules: ``app`` (factory, system routes),
``api_tts`` and ``api_voices`` (routes), ``schemas`` (bodies), ``bodies`` (JSON, msgpack,
multipart), ``synthesis`` (engine calls, streaming, metrics), ``audio_formats``,
``metrics``, ``middleware`` (API key, body limit, per-route counts), ``errors``,
``options``.

Routes
  POST /v1/tts             audio file; JSON or msgpack body, a superset of fish-speech's
                           ServeTTSRequest (text, format wav|pcm|flac|mp3|opus, temperature,
                           top_p, repetition_penalty, max_new_tokens, seed, reference_id,
                           references [{audio, text}] (base64 over JSON, bytes over msgpack;
                           several allowed), streaming, chunk_length, normalize,
                           use_memory_cache). streaming=true answers headerless s16le PCM
                           as generated, which is what fish-speech's client reads.
  POST /v1/tts/stream      chunked: wav (44-byte header with sizes 0xFFFFFFFF, then s16le)
                           or pcm (raw s16le); X-Sample-Rate, X-Audio-Format headers.
  POST /v1/audio/speech    OpenAI: model (any), input, voice (registered id, or "default"
                           / an OpenAI voice name = no reference), response_format
                           wav|pcm|flac|mp3|opus (aac: 422), speed 1.0 only,
                           stream_format audio|sse; pcm is 24 kHz like OpenAI's.
  POST/GET /v1/references, GET/DELETE /v1/references/{id}   voices (multipart upload)
  POST /v1/references/add, GET /v1/references/list, DELETE /v1/references/delete,
  GET/POST /v1/health      fish-speech's routes (msgpack answers unless JSON is asked for)
  GET /health, /ready, /metrics, /docs

Every error is ``{"error": {"code", "field", "message", "type", "param"}}``; 503s carry
Retry-After. Prefer ``S1_MINI_API_KEY`` to ``--api-key`` (command lines are visible to
other local users).
"""

from s1_mini.server.app import create_app
from s1_mini.server.options import ServerOptions

__all__ = ["ServerOptions", "create_app"]
