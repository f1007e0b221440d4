"""A small OpenAI-protocol HTTP server for tests and benchmarks, on 127.0.0.1, with injected faults.

It answers POST /v1/chat/completions and GET /v1/models over real HTTP (keep-alive, threads).
`plan` is consumed one entry per chat request, then `default` applies:
ok | 429 | 500 | slow | garbage | badjson | 400 | 401 | reset.
An `answer` function may return "!500" (any status) to fail that request.
The default answer is label-conditioned (it reads the diagnosis from the prompt); pass `answer`
to answer otherwise, e.g. from the image colour for eval tests.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
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


def image_of(body: dict[str, Any]) -> Any:
    from PIL import Image

    content = body["messages"][-1]["content"]
    url = next(part["image_url"]["url"] for part in content if part.get("type") == "image_url")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


def image_key(body: dict[str, Any]) -> str:
    content = body["messages"][-1]["content"]
    url = next((p["image_url"]["url"] for p in content if p.get("type") == "image_url"), "")
    return hashlib.sha1(url.encode()).hexdigest()


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

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
    ) -> None:
        self.latency, self.plan, self.default, self.answer = latency, list(plan or []), default, answer
        self.key, self.slow_seconds, self.retry_after = key, slow_seconds, retry_after
        self.lock = threading.Lock()
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.images: list[str] = []
        self.bodies: list[dict[str, Any]] = []
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

    def next_action(self, body: dict[str, Any]) -> str:
        with self.lock:
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.images.append(image_key(body))
            self.bodies.append(body)
            return self.plan.pop(0) if self.plan else self.default

    def done(self) -> None:
        with self.lock:
            self.in_flight -= 1

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out in two writes

            def log_message(self, *args: Any) -> None:
                pass

            def send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
                data = payload if isinstance(payload, bytes) else json.dumps(payload, ensure_ascii=False).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self.send(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if not self.path.endswith("/chat/completions"):
                    return self.send(404, {"error": {"message": f"no route {self.path}"}})
                auth = self.headers.get("Authorization", "")
                action = fake.next_action(body)
                if fake.key is not None and auth != f"Bearer {fake.key}":
                    action = "401"
                time.sleep(fake.latency)
                # Counted out before the answer is written: once it is on the wire the client may
                # rightly send its next request, before this thread gets the GIL back.
                fake.done()
                self.act(action, body, auth)

            def act(self, action: str, body: dict[str, Any], auth: str) -> None:
                if action == "reset":
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
                text = "I am unable to describe this image." if action == "garbage" else fake.answer(body)
                if text.startswith("!"):  # an answer function may ask for an HTTP error: "!500"
                    return self.send(int(text[1:]), {"error": {"message": "injected", "type": "test"}})
                self.send(
                    200,
                    {
                        "id": "chatcmpl-test",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": body.get("model", "fake-model"),
                        "choices": [
                            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
                        ],
                        "usage": {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150},
                    },
                )

        return Handler
