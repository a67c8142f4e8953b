"""`minicustom serve`: an OpenAI-compatible HTTP server on the standard library's http.server.

Endpoints, in the shapes the `openai` client reads:
- GET  /v1/models                -> {"object": "list", "data": [{"id": NAME, "object": "model", ...}]}
- POST /v1/chat/completions      messages through the chat template; "stream": true answers with
                                 server-sent events (chat.completion.chunk deltas, then `data: [DONE]`)
- POST /v1/completions           a plain-text prompt, no template
Both POSTs take temperature (OpenAI's default 1; 0 is greedy), top_p, max_tokens (max_completion_tokens),
stop (a string or up to 4), seed, n = 1, stream and stream_options.include_usage, and report usage
(prompt, completion and total tokens). A completion ends at the model's end-of-turn tokens
("finish_reason": "stop"), at a stop string (cut before it, "stop"), or at max_tokens ("length").

One worker thread runs the model, one request at a time, in arrival order; connections are served by
their own threads and wait on a queue of bounded length: a request that finds it full gets 503 at once.
A bad request gets a 4xx with OpenAI's error object, {"error": {"message", "type", "param", "code"}},
never a traceback; an unexpected failure is a 500 with the same shape, the traceback on the server's
stderr. A client that disconnects mid-stream stops its generation at the next token.
"""

from __future__ import annotations

import json
import queue
import secrets
import threading
import time
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from .prompting import default_stop_ids

MAX_BODY = 1 << 20  # bytes: a larger request body is refused (413) before it is read
_DONE = object()


class RequestError(Exception):
    """A request the server refuses: the HTTP status and OpenAI's error fields."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.kind, self.code = status, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


class _Cancelled(Exception):
    """Raised inside generation when its client went away or a stop string was reached."""


# -- reading a request ----------------------------------------------------------------------------

def _number(body: dict, key: str, default, low: float, high: float, integer: bool = False):
    value = body.get(key, default)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        what = "an integer" if integer else "a number"
        raise RequestError(f"'{key}' must be {what} from {low} to {high}, got {value!r}", key)
    return value


def _text_content(content, i: int) -> str:
    """A message's content: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                         isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise RequestError(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise RequestError(f"messages[{i}] must be an object whose role is system, user or assistant",
                               f"messages[{i}].role")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _text_content(m.get("content"), i)})
    return out


@dataclass
class Job:
    """One request for the worker: prompt ids and sampling settings in; events out through `events`."""
    ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    events: queue.Queue = field(default_factory=queue.Queue)  # ("text", delta)..., ("end", finish, prompt, new)
    cancelled: threading.Event = field(default_factory=threading.Event)


class Engine:
    """The model, its tokenizer and the worker thread that runs one Job at a time."""

    def __init__(self, model, tokenizer, name: str, queue_size: int = 16, max_tokens: int = 512):
        self.model, self.tokenizer, self.name, self.limit = model.eval(), tokenizer, name, max_tokens
        self.stops = default_stop_ids(model, tokenizer)
        self.stop_tokens = {s for s in self.stops if isinstance(s, int)}
        self.jobs: queue.Queue = queue.Queue(maxsize=queue_size)
        self.created = int(time.time())
        threading.Thread(target=self._work, daemon=True, name="minicustom-serve-worker").start()

    def job(self, body: dict, chat: bool) -> Job:
        """Check a request body and turn it into a Job (RequestError for anything wrong)."""
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        if body.get("model") not in (None, self.name):
            raise RequestError(f"the model {body['model']!r} does not exist; this server has {self.name!r}", "model",
                               404, code="model_not_found")
        if _number(body, "n", 1, 1, 1, integer=True) != 1:
            raise RequestError("only n = 1 is supported", "n")
        if chat:
            messages = _messages(body)
            try:
                ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            except ValueError as e:
                raise RequestError(f"the chat template refused these messages: {e}", "messages") from None
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise RequestError("'prompt' must be a non-empty string", "prompt")
            ids = self.tokenizer.encode(prompt)
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else ([] if stop is None else stop)
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise RequestError("'stop' must be a string or a list of up to 4 non-empty strings", "stop")
        room = self.model.config.max_position_embeddings - len(ids)
        if room < 1:
            raise RequestError(f"the prompt is {len(ids)} tokens; the model's context is "
                               f"{self.model.config.max_position_embeddings}", "messages" if chat else "prompt")
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _number(body, key, None if chat else 16, 1, self.limit, integer=True)
        return Job(ids=ids, max_tokens=min(max_tokens or self.limit, room),
                   temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                   top_p=_number(body, "top_p", 1.0, 1e-9, 1.0), stop=stop,
                   seed=_number(body, "seed", None, -(2 ** 63), 2 ** 63 - 1, integer=True))

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise RequestError(f"the server is busy ({self.jobs.maxsize} requests waiting); retry later", None, 503,
                               "server_error", "busy") from None

    def _work(self):
        while True:
            job = self.jobs.get()
            if job.cancelled.is_set():
                continue
            try:
                self._run(job)
            except Exception as e:  # a bug: the client gets a 500, the server keeps serving
                traceback.print_exc()
                job.events.put(("error", f"{type(e).__name__} while generating"))

    def _run(self, job: Job):
        tok, new, finish, count, sent = self.tokenizer, [], "length", 0, 0

        def visible(final: bool) -> tuple[str, bool]:
            """The text so far, cut before a stop string (True when one was met); unless final, less a tail
            that may still become a stop string or is half a UTF-8 character."""
            text = tok.decode(new, skip_special_tokens=True)
            cut = min((i for s in job.stop if (i := text.find(s)) >= 0), default=None)
            if cut is not None:
                return text[:cut], True
            if not final:
                hold = max((k for s in job.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
                text = text[:len(text) - hold].rstrip("\ufffd")
            return text, False

        def emit(text: str):
            nonlocal sent
            if len(text) > sent:
                job.events.put(("text", text[sent:]))
                sent = len(text)

        def on_token(column: torch.Tensor):
            nonlocal finish, count
            if job.cancelled.is_set():
                raise _Cancelled
            count += 1
            if int(column[0]) in self.stop_tokens:
                finish = "stop"
                raise _Cancelled
            new.append(int(column[0]))
            text, hit = visible(final=False)
            emit(text)
            if hit:
                finish = "stop"
                raise _Cancelled

        generator = torch.Generator().manual_seed(job.seed if job.seed is not None else secrets.randbits(63))
        try:
            with torch.inference_mode():
                self.model.generate(torch.tensor([job.ids]), max_new_tokens=job.max_tokens,
                                    temperature=job.temperature, top_p=job.top_p if job.top_p < 1 else None,
                                    stop=self.stops, generator=generator, on_token=on_token)
        except _Cancelled:
            pass
        emit(visible(final=True)[0])
        job.events.put(("end", finish, len(job.ids), count))


# -- the HTTP side ----------------------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    engine: Engine  # set on the subclass serve() makes
    protocol_version = "HTTP/1.1"
    server_version = "minicustom"

    def log_message(self, format, *args):  # one line per request on stderr, as http.server does, minus the noise
        if self.engine.verbose:
            super().log_message(format, *args)

    def _send_json(self, status: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: RequestError):
        self._send_json(e.status, e.body())

    def do_GET(self):
        card = {"id": self.engine.name, "object": "model", "created": self.engine.created, "owned_by": "minicustom"}
        if self.path.rstrip("/") == "/v1/models":
            self._send_json(200, {"object": "list", "data": [card]})
        elif self.path.rstrip("/") == f"/v1/models/{self.engine.name}":
            self._send_json(200, card)
        else:
            self._error(RequestError(f"no such endpoint: GET {self.path}", status=404, code="not_found"))

    def do_POST(self):
        path = self.path.rstrip("/")
        if path not in ("/v1/chat/completions", "/v1/completions"):
            self._discard_body()
            return self._error(RequestError(f"no such endpoint: POST {self.path}", status=404, code="not_found"))
        try:
            body = self._read_body()
            chat = path == "/v1/chat/completions"
            job = self.engine.job(body, chat)
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise RequestError("'stream' must be true or false", "stream")
            options = body.get("stream_options") or {}
            if not isinstance(options, dict):
                raise RequestError("'stream_options' must be an object", "stream_options")
            self.engine.submit(job)
        except RequestError as e:
            return self._error(e)
        try:
            (self._stream if stream else self._whole)(job, chat, bool(options.get("include_usage")))
        except (BrokenPipeError, ConnectionResetError):
            job.cancelled.set()

    def _discard_body(self):
        length = self.headers.get("Content-Length")
        if length and length.isdigit() and int(length) <= MAX_BODY:
            self.rfile.read(int(length))

    def _read_body(self):
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError("the request needs a Content-Length header", status=411)
        if int(length) > MAX_BODY:  # read what a client may still be sending (up to 16x), so the 413 reaches it
            self.close_connection = True
            left = int(length) if int(length) <= 16 * MAX_BODY else 0
            while left > 0 and (chunk := self.rfile.read(min(left, 1 << 16))):
                left -= len(chunk)
            raise RequestError(f"the request body is {length} bytes; at most {MAX_BODY}", status=413)
        raw = self.rfile.read(int(length))
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(f"the request body is not JSON ({e})") from None

    def _events(self, job: Job):
        while True:
            event = job.events.get()
            if event[0] == "error":
                raise RuntimeError(event[1])
            yield event
            if event[0] == "end":
                return

    def _head(self, chat: bool) -> dict:
        kind = "chat.completion" if chat else "text_completion"
        return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}", "object": kind,
                "created": int(time.time()), "model": self.engine.name}

    @staticmethod
    def _usage(prompt: int, completion: int) -> dict:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _whole(self, job: Job, chat: bool, _):
        parts = []
        try:
            for event in self._events(job):
                if event[0] == "text":
                    parts.append(event[1])
        except RuntimeError as e:
            return self._error(RequestError(str(e), status=500, kind="server_error"))
        _, finish, n_prompt, n_new = event
        text = "".join(parts)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None} if chat
                  else {"index": 0, "text": text, "logprobs": None})
        self._send_json(200, {**self._head(chat), "choices": [{**choice, "finish_reason": finish}],
                              "usage": self._usage(n_prompt, n_new)})

    def _stream(self, job: Job, chat: bool, include_usage: bool):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        head = self._head(chat)
        head["object"] = "chat.completion.chunk" if chat else "text_completion"

        def send(choice_fields: dict | None, finish=None, usage=None):
            chunk = {**head, "choices": [] if choice_fields is None else [
                {"index": 0, **choice_fields, "logprobs": None, "finish_reason": finish}]}
            if usage is not None:
                chunk["usage"] = usage
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        piece = (lambda text: {"delta": {"content": text}}) if chat else (lambda text: {"text": text})
        if chat:
            send({"delta": {"role": "assistant", "content": ""}})
        try:
            for event in self._events(job):
                if event[0] == "text":
                    send(piece(event[1]))
        except RuntimeError as e:
            self.wfile.write(f"data: {json.dumps(RequestError(str(e), kind='server_error').body())}\n\n".encode())
            return
        _, finish, n_prompt, n_new = event
        send({"delta": {}} if chat else {"text": ""}, finish)
        if include_usage:
            send(None, usage=self._usage(n_prompt, n_new))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def make_server(engine: Engine, host: str = "127.0.0.1", port: int = 8000, verbose: bool = False) -> ThreadingHTTPServer:
    """A server bound to host:port (port 0: any free port; server.server_address says which)."""
    engine.verbose = verbose
    handler = type("BoundHandler", (Handler,), {"engine": engine})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server
