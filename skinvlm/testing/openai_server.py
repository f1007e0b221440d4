"""A small OpenAI-protocol HTTP server for tests and benchmarks, on 127.0.0.1, with injected faults.

It answers POST /v1/chat/completions and GET /v1/models over real HTTP (keep-alive, threads),
and the Batch API: POST /v1/files (multipart), POST /v1/batches, GET /v1/batches (list),
GET /v1/batches/ID, GET /v1/files/ID/content.
`plan` is consumed one entry per chat request, then `default` applies:
ok | 429 | 500 | slow | garbage | badjson | 400 | 401 | reset | cut (status and headers, half the body, then
the connection closed) | endless (a body streamed without end) | trickle (a byte a second) | huge (a 300 MB body).
An `answer` function may return "!500" (any status) to fail that request.
The default answer is label-conditioned (it reads the diagnosis from the prompt); pass `answer`
to answer otherwise, e.g. from the image colour for eval tests.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import math
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

LABEL_IN_PROMPT = re.compile(r"진단은 '([^']+)'")


def label_conditioned(body: dict[str, Any]) -> str:
    found = LABEL_IN_PROMPT.search(user_text(body))
    label = found.group(1) if found else "진단불가"
    summary = f"{label}에 해당하는 소견이 사진에서 뚜렷하게 관찰되는 테스트 답변입니다."
    return f"<label>{label}</label>\n<summary>{summary}</summary>"


def user_text(body: dict[str, Any]) -> str:
    content = body["messages"][-1]["content"]
    return " ".join(part.get("text", "") for part in content if part.get("type") == "text")


CHARS_PER_TOKEN = 2  # about right for Korean text in Qwen's and OpenAI's tokenizers


def generated(text: str, body: dict[str, Any], obeys_max_tokens: bool) -> str:
    """What a server returns of an answer: cut at the first stop sequence (left out) and at max_tokens."""
    for stop in body.get("stop") or []:
        if stop in text:
            text = text[: text.index(stop)]
    return text[: body.get("max_tokens", 10**6) * CHARS_PER_TOKEN] if obeys_max_tokens else text


def forced_label(text: str, pattern: str, label_probabilities: Callable[[str], dict[str, float]] | None) -> str:
    """The answer as a server obeying `<label>(A|B|...)</label>...` gives it: a label outside the classes is replaced
    by the likeliest class (by `label_probabilities`, else the first), the words after it kept."""
    classes = pattern.split("(", 1)[1].split(")", 1)[0].split("|")
    head, found, rest = text.partition("<label>")
    label, closing, tail = rest.partition("</label>")
    if found and closing and label in classes:
        return text
    scores = label_probabilities(label) if label_probabilities else {}
    best = max(classes, key=lambda c: scores.get(c, 0.0))
    return f"<label>{best}</label>" + (tail if closing else "\n<summary>형식을 벗어난 답변입니다.</summary>")


def token_logprobs(text: str, label_probabilities: Callable[[str], dict[str, float]]) -> list[dict[str, Any]]:
    """The answer as three tokens (up to <label>, the label, the rest); the label token carries the distribution
    as top_logprobs, as vLLM and OpenAI report them."""
    head, found, rest = text.partition("<label>")
    label = rest.split("</label>")[0] if found else ""
    tail = rest[len(label) :]
    alternatives = sorted(label_probabilities(label).items(), key=lambda kv: -kv[1])
    top = [{"token": t, "logprob": math.log(p), "bytes": list(t.encode())} for t, p in alternatives if p > 0]
    chosen = next((math.log(p) for t, p in alternatives if t == label and p > 0), -20.0)

    def token(text: str, logprob: float, alternatives: list[dict[str, Any]]) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode()), "top_logprobs": alternatives}

    return [token(head + found, 0.0, []), token(label, chosen, top), *([token(tail, 0.0, [])] if tail else [])]


def image_of(body: dict[str, Any]) -> Any:
    from PIL import Image

    content = body["messages"][-1]["content"]
    url = next(part["image_url"]["url"] for part in content if part.get("type") == "image_url")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


def mean_colour(body: dict[str, Any]) -> tuple[float, float, float]:
    """The mean pixel colour of the request's image (the synthetic sets draw each class in its own colour)."""
    from PIL import ImageStat

    red, green, blue = ImageStat.Stat(image_of(body)).mean
    return red, green, blue


def image_key(body: dict[str, Any]) -> str:
    content = body["messages"][-1]["content"]
    url = next((p["image_url"]["url"] for p in content if p.get("type") == "image_url"), "")
    return hashlib.sha1(url.encode()).hexdigest()


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    # The servers this stands in for listen with a deep backlog (uvicorn, so vLLM: 2048). socketserver's 5 let a
    # burst of new connections (16 per endpoint, on a busy 2-core CI machine) fail as if the server were down.
    request_queue_size = 2048

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hanging up mid-answer (cancelled runs, timeouts) are part of the tests


class FakeOpenAI:
    def __init__(
        self,
        *,
        latency: float = 0.0,
        plan: list[str] | None = None,
        default: str = "ok",
        answer: Callable[[dict[str, Any]], str] = label_conditioned,
        key: str | None = None,
        slow_seconds: float = 2.0,
        retry_after: str = "0",
        token_seconds: float = 0.0,
        label_probabilities: Callable[[str], dict[str, float]] | None = None,
        obeys_max_tokens: bool = True,
        structured: str = "obeys",
        models: tuple[str, ...] = ("fake-model",),
        die_after: int | None = None,
    ) -> None:
        # models: the names GET /models lists. die_after: the server dies as its (die_after + 1)th chat request
        # arrives, as a killed process does: that request and every other open connection reset, new ones refused.
        self.models, self.die_after = models, die_after
        self.connections: set[Any] = set()
        self.dead = False
        # structured: what a request's `structured_outputs` regex meets, as vLLM documents it ("obeys": the label
        # is forced to one of the pattern's classes, the likeliest), or a server that "refuses" it (400) or
        # "ignores" it.
        self.structured = structured
        # token_seconds: time per answer token (CHARS_PER_TOKEN characters), as a real server spends
        # generating, so a shorter answer (stop sequence, max_tokens) comes back sooner.
        # label_probabilities: the distribution over labels behind an answer's <label> for requests asking
        # for logprobs; None answers without logprobs, as endpoints that do not offer them.
        self.token_seconds, self.label_probabilities = token_seconds, label_probabilities
        self.obeys_max_tokens = obeys_max_tokens  # False: a server that ignores max_tokens, as some do
        self.latency, self.plan, self.default, self.answer = latency, list(plan or []), default, answer
        self.key, self.slow_seconds, self.retry_after = key, slow_seconds, retry_after
        self.lock = threading.Lock()
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.images: list[str] = []
        self.bodies: list[dict[str, Any]] = []
        self.times: list[float] = []  # time.monotonic() of each chat request
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.batch_polls = 1  # retrieves that answer "in_progress" before a batch completes
        self.batch_outcome = "completed"  # or "expired": then every request comes back in the error file
        self.result_files = "ok"  # or endless | trickle | huge: how GET /files/ID/content answers
        self.server = QuietServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def kill(self) -> None:
        """Die as a process does: the port closed, every connection reset (answers in the making never sent)."""
        import socket

        with self.lock:
            self.dead = True
            connections = list(self.connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

        def close_port() -> None:  # within serve_forever's poll interval; a connection accepted meanwhile is reset
            self.server.shutdown()
            self.server.server_close()

        threading.Thread(target=close_port, daemon=True).start()

    def next_action(self, body: dict[str, Any]) -> str:
        if self.die_after is not None and self.requests >= self.die_after and not self.dead:
            self.kill()
        with self.lock:
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.images.append(image_key(body))
            self.bodies.append(body)
            self.times.append(time.monotonic())
            return self.plan.pop(0) if self.plan else self.default

    def done(self) -> None:
        with self.lock:
            self.in_flight -= 1

    # -- the Batch API ------------------------------------------------------------------------
    def store_file(self, content_type: str, raw: bytes) -> dict[str, Any]:
        from email.message import Message
        from email.parser import BytesParser

        message: Message = BytesParser().parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
        parts = {
            part.get_param("name", header="content-disposition"): part
            for part in message.get_payload()
            if isinstance(part, Message)
        }
        data = parts["file"].get_payload(decode=True)
        assert isinstance(data, bytes)
        with self.lock:
            file_id = f"file-{len(self.files)}"
            self.files[file_id] = data
        return {
            "id": file_id,
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": "input.jsonl",
            "purpose": "batch",
            "status": "processed",
        }

    def create_batch(self, request: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            batch_id = f"batch-{len(self.batches)}"
            self.batches[batch_id] = {
                "input": request["input_file_id"],
                "polls": 0,
                "output": None,
                "metadata": request.get("metadata"),
            }
        return self.batch_object(batch_id, "validating")

    def poll_batch(self, batch_id: str) -> dict[str, Any]:
        entry = self.batches[batch_id]
        entry["polls"] += 1
        if entry["polls"] <= self.batch_polls:
            return self.batch_object(batch_id, "in_progress")
        if self.batch_outcome == "expired":
            return self.expire_batch(batch_id)
        if entry["output"] is None:
            lines = []
            for line in self.files[entry["input"]].decode().splitlines():
                request = json.loads(line)
                self.next_action(request["body"])
                self.done()
                answer = {
                    "id": "chatcmpl-batch",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": request["body"]["model"],
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": self.answer(request["body"])},
                        }
                    ],
                    "usage": {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150},
                }
                lines.append(
                    json.dumps(
                        {
                            "id": "r",
                            "custom_id": request["custom_id"],
                            "error": None,
                            "response": {"status_code": 200, "request_id": "r", "body": answer},
                        },
                        ensure_ascii=False,
                    )
                )
            entry["output"] = output = f"file-out-{batch_id}"
            self.files[output] = ("\n".join(lines) + "\n").encode()
        return self.batch_object(batch_id, "completed", entry["output"])

    def expire_batch(self, batch_id: str) -> dict[str, Any]:
        """The 24 h window ran out: nothing answered, every request listed in the error file."""
        entry = self.batches[batch_id]
        lines = [
            json.dumps(
                {
                    "id": "r",
                    "custom_id": json.loads(line)["custom_id"],
                    "response": None,
                    "error": {"code": "batch_expired", "message": "This request could not be executed before the "
                              "completion window expired."},
                }
            )
            for line in self.files[entry["input"]].decode().splitlines()
        ]  # fmt: skip
        entry["errors"] = f"file-err-{batch_id}"
        self.files[entry["errors"]] = ("\n".join(lines) + "\n").encode()
        return self.batch_object(batch_id, "expired", None, entry["errors"])

    def batch_object(
        self, batch_id: str, status: str, output: str | None = None, errors: str | None = None
    ) -> dict[str, Any]:
        return {
            "id": batch_id,
            "object": "batch",
            "endpoint": "/v1/chat/completions",
            "status": status,
            "input_file_id": self.batches[batch_id]["input"],
            "completion_window": "24h",
            "created_at": int(time.time()),
            "output_file_id": output,
            "error_file_id": errors,
            "metadata": self.batches[batch_id]["metadata"],
        }

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out in two writes

            def log_message(self, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with fake.lock:
                    fake.connections.add(self.connection)

            def reset_if_dead(self) -> bool:
                if fake.dead:
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(2)
                return fake.dead

            def finish(self) -> None:
                with fake.lock:
                    fake.connections.discard(self.connection)
                with contextlib.suppress(OSError):
                    super().finish()

            def send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
                data = payload if isinstance(payload, bytes) else json.dumps(payload, ensure_ascii=False).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def stream_forever(self, how: str) -> None:
                """Bodies no answer has: endless (chunked, no end), a byte a second, or 300 MB; until the client
                hangs up."""
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                if how == "endless":
                    self.send_header("Transfer-Encoding", "chunked")
                else:
                    self.send_header("Content-Length", str(300 * 2**20 if how == "huge" else 10_000))
                self.end_headers()
                block = b" " * (2**16 if how != "trickle" else 1)
                sent = 0
                try:
                    while how == "endless" or sent < (300 * 2**20 if how == "huge" else 10_000):
                        if how == "endless":
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
                        else:
                            self.wfile.write(block)
                        sent += len(block)
                        if how == "trickle":
                            time.sleep(1)
                except OSError:
                    self.close_connection = True

            def do_GET(self) -> None:
                if self.reset_if_dead():
                    return None
                parts = self.path.split("/")
                if self.path.split("?")[0].endswith("/batches"):
                    listed = [fake.batch_object(b, "in_progress") for b in reversed(fake.batches)]
                    return self.send(200, {"object": "list", "data": listed, "has_more": False})
                if "/batches/" in self.path:
                    return self.send(200, fake.poll_batch(parts[-1]))
                if self.path.endswith("/content"):
                    if fake.result_files != "ok":  # a Batch API result file without end
                        return self.stream_forever(fake.result_files)
                    data = fake.files[parts[-2]]
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return None
                listed = [{"id": name, "object": "model"} for name in fake.models]
                self.send(200, {"object": "list", "data": listed})

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path.endswith("/files"):
                    return self.send(200, fake.store_file(self.headers["Content-Type"], raw))
                if self.path.endswith("/batches"):
                    return self.send(200, fake.create_batch(json.loads(raw)))
                body = json.loads(raw)
                if not self.path.endswith("/chat/completions"):
                    return self.send(404, {"error": {"message": f"no route {self.path}"}})
                auth = self.headers.get("Authorization", "")
                action = fake.next_action(body)
                if self.reset_if_dead():
                    return None
                if fake.key is not None and auth != f"Bearer {fake.key}":
                    action = "401"
                time.sleep(fake.latency)
                if self.reset_if_dead():
                    return None
                # Counted out before the answer is written: once it is on the wire the client may
                # rightly send its next request, before this thread gets the GIL back.
                fake.done()
                self.act(action, body, auth)

            def act(self, action: str, body: dict[str, Any], auth: str) -> None:
                if action == "reset":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if action == "cut":
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", "400")
                    self.end_headers()
                    self.wfile.write(b'{"id": "chatcmpl-test", "choices": [')
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if action == "slow":
                    time.sleep(fake.slow_seconds)
                    action = "ok"
                errors = {
                    "429": (429, "Rate limit reached"),
                    "500": (500, "The server had an error"),
                    "400": (400, "Invalid image"),
                    "401": (401, f"Incorrect API key provided: {auth.removeprefix('Bearer ')}"),
                }
                if action in errors:
                    status, message = errors[action]
                    headers = {"Retry-After": fake.retry_after} if status == 429 else {}
                    return self.send(status, {"error": {"message": message, "type": "test"}}, headers)
                if action == "badjson":
                    return self.send(200, b"{not json")
                if action in ("endless", "trickle", "huge"):
                    return self.stream_forever(action)
                text = "I am unable to describe this image." if action == "garbage" else fake.answer(body)
                if text.startswith("!"):  # an answer function may ask for an HTTP error: "!500"
                    return self.send(int(text[1:]), {"error": {"message": "injected", "type": "test"}})
                if body.get("structured_outputs") and fake.structured == "refuses":
                    return self.send(400, {"error": {"message": "structured_outputs is not supported", "type": "test"}})
                if body.get("structured_outputs") and fake.structured == "obeys":
                    text = forced_label(text, body["structured_outputs"]["regex"], fake.label_probabilities)
                text = generated(text, body, fake.obeys_max_tokens)
                time.sleep(fake.token_seconds * (len(text) // CHARS_PER_TOKEN + 1))
                choice: dict[str, Any] = {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": text},
                }
                if body.get("logprobs") and fake.label_probabilities is not None:
                    choice["logprobs"] = {"content": token_logprobs(text, fake.label_probabilities)}
                self.send(
                    200,
                    {
                        "id": "chatcmpl-test",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": body.get("model", "fake-model"),
                        "choices": [choice],
                        "usage": {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150},
                    },
                )

        return Handler
