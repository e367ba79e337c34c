"""The OpenAI-compatible HTTP server over dsjax.LLM: FastAPI on uvicorn (maintained, ASGI,
pydantic validation, server-sent events through StreamingResponse, graceful SIGTERM drain).

    POST /v1/completions, /v1/chat/completions   (stream: true -> server-sent events, [DONE])
    GET  /v1/models, /health (alive), /ready (warm and not draining), /metrics (Prometheus)

Every error is OpenAI's body {"error": {...}} with 400 (bad request), 401 (API key), 404, 429
(queue full, Retry-After) or 503 (warming up). A client that disconnects mid-stream aborts its
request (its KV blocks freed at the next step).
"""

from __future__ import annotations

import logging
import os
import threading
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from dsjax.serving import openai_api as api
from dsjax.serving.responses import chat_completion, completion
from dsjax.serving.server_metrics import ServerMetrics

log = logging.getLogger("dsjax")


class Server:
    """What the routes share: the LLM, the served name, limits, readiness and metrics."""

    def __init__(self, llm, name: str, *, api_key: str | None, max_waiting: int,
                 chat_template: str | None, fatal_warmup: bool = False):
        self.llm, self.name, self.api_key, self.max_waiting = llm, name, api_key, max_waiting
        self.chat_template, self.ready = chat_template, threading.Event()
        self.metrics = ServerMetrics(llm.serving)
        self.created = int(time.time())
        self.admitting = 0  # choices accepted that have not had their first token yet
        self.failed: str | None = None  # the warm-up's error
        self.fatal_warmup = fatal_warmup

    def warm(self) -> None:
        """Loads the tokenizer and compiles every step shape before reporting ready. A failure
        is logged and reported by /ready (500); with `fatal_warmup` the process exits (1)."""
        try:
            self.llm.tokenizer.encode("warm up")
            self.llm.serving.warmup()
        except Exception as e:  # noqa: BLE001 (reported, never left as a server that never warms)
            self.failed = f"{type(e).__name__}: {e}"
            log.exception("dsjax serve: the warm-up failed; the server cannot serve")
            if self.fatal_warmup:
                logging.shutdown()
                os._exit(1)
            return
        self.ready.set()

    def check_capacity(self, n: int) -> None:
        if self.failed:
            raise api.ApiError(500, f"the server's warm-up failed ({self.failed})",
                               type="server_error")
        if not self.ready.is_set():
            raise api.ApiError(503, "the server is warming up", type="service_unavailable",
                               headers={"Retry-After": "5"})
        if n > self.max_waiting:
            raise api.ApiError(400, f"this request needs {n} requests (prompts x n); the server "
                               f"queues at most {self.max_waiting}", "n")
        waiting = self.admitting
        if waiting + n > self.max_waiting:
            raise api.ApiError(429, f"{waiting} requests are waiting for their first token (at "
                               f"most {self.max_waiting})",
                               type="rate_limit_exceeded", headers={"Retry-After": "1"})

    def chat_prompt(self, req: api.ChatRequest) -> list[int]:
        from dsjax.serving.chat import render

        return render(self.llm.tokenizer, [m.model_dump(exclude_none=True) | {"content": m.text()}
                                           for m in req.messages], self.chat_template)


def create_app(llm, name: str, *, api_key: str | None = None, max_waiting: int = 256,
               chat_template: str | None = None, warm: bool = True,
               fatal_warmup: bool = False) -> FastAPI:
    srv = Server(llm, name, api_key=api_key, max_waiting=max_waiting, chat_template=chat_template,
                 fatal_warmup=fatal_warmup)

    async def lifespan(app):
        if warm:
            threading.Thread(target=srv.warm, daemon=True, name="dsjax-warmup").start()
        else:
            srv.ready.set()
        yield

    app = FastAPI(title="dsjax", lifespan=lifespan)
    app.state.server = srv
    _errors(app, srv)
    _routes(app, srv)
    return app


def _errors(app: FastAPI, srv: Server) -> None:
    @app.exception_handler(api.ApiError)
    async def api_error(request, e: api.ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        message = first.get("msg", "invalid request")
        if first.get("type") == "extra_forbidden":
            message = "unknown or unsupported field"
        elif first.get("type") == "json_invalid":
            param, message = None, f"the body is not valid JSON ({message})"
        return JSONResponse(api.error_body(f"{param}: {message}" if param else message,
                                           param=param, code=400), status_code=400)

    @app.middleware("http")
    async def api_key(request: Request, call_next):
        if srv.api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization") != f"Bearer {srv.api_key}":
                return JSONResponse(api.error_body("invalid or missing API key", "authentication_error",
                                                   code=401), status_code=401)
        return await call_next(request)


def _routes(app: FastAPI, srv: Server) -> None:
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if srv.failed:
            return JSONResponse({"status": "failed", "error": srv.failed}, status_code=500)
        if not srv.ready.is_set():
            return JSONResponse({"status": "warming up"}, status_code=503)
        return {"status": "ready"}

    @app.get("/metrics")
    async def metrics():
        return Response(srv.metrics.render(), media_type=srv.metrics.content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": srv.name, "object": "model", "created": srv.created, "owned_by": "dsjax",
            "max_model_len": srv.llm.serving.max_len}]}

    @app.post("/v1/completions")
    async def completions(req: api.CompletionRequest):
        return await completion(srv, req)

    @app.post("/v1/chat/completions")
    async def chat(req: api.ChatRequest):
        return await chat_completion(srv, req)
