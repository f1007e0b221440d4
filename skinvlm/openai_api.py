"""Talking to OpenAI or any OpenAI-compatible endpoint: credentials, images, rate limits, what is retried.

Shared by describe and eval (`endpoints.Pool` sends the requests). Retried: 429 (honouring Retry-After), 5xx,
timeouts and dropped connections. A refused key, a forbidden request or an unknown model stops the whole run at
once (`SkinvlmError`); a 400 for one image fails only that record. Error texts are cleaned of the key and of URL
passwords before they are stored or shown.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from skinvlm import devices
from skinvlm.errors import SkinvlmError, read_user_text
from skinvlm.images import as_rgb
from skinvlm.prompts import conversation
from skinvlm.redaction import redact_text
from skinvlm.workspace import Workspace

RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}
# Far above any real answer (512 tokens of Korean is ~1,500 characters): a server that ignores
# max_tokens cannot fill the journal or the predictions with megabytes per image.
MAX_ANSWER_CHARS = 20_000
MAX_RETRY_AFTER = 120.0
MAX_BODY_BYTES = 8 * 2**20  # a response with 20 log-probabilities per token of a long answer is well under 1 MiB


def setting(ws: Workspace, name: str, given: str | None = None) -> str | None:
    """A flag, else the environment, else the workspace .env file."""
    if given:
        return given
    if os.environ.get(name):
        return os.environ[name]
    if ws.env_file.is_file():
        from dotenv import dotenv_values

        text = read_user_text(ws.env_file, "the workspace's .env file")
        return dotenv_values(stream=io.StringIO(text)).get(name) or None
    return None


class Detail(StrEnum):
    """The image detail the API is asked for (describe and eval)."""

    low = "low"
    high = "high"
    auto = "auto"


@dataclass(frozen=True)
class Endpoint:
    base_url: str | None
    api_key: str
    model: str
    timeout: float = 120.0

    def client(self) -> Any:
        from openai import AsyncOpenAI

        return AsyncOpenAI(api_key=self.api_key, base_url=self.base_url, timeout=self.timeout, max_retries=0)

    @property
    def where(self) -> str:
        """The endpoint as it may be shown: without a password in its URL."""
        return redact_text(self.base_url or "https://api.openai.com/v1")


def endpoints(
    ws: Workspace,
    base_urls: tuple[str, ...],
    api_key: str | None,
    model: str,
    timeout: float,
    default: str | None = None,
) -> list[Endpoint]:
    """The endpoints asked: each --base-url (a value may hold several, comma-separated), else OPENAI_BASE_URL's
    comma-separated list (environment or .env), else `default` (None: api.openai.com). One key for all."""
    urls = [u.strip() for value in base_urls for u in value.split(",") if u.strip()]
    if not urls:
        urls = [u.strip() for u in (setting(ws, "OPENAI_BASE_URL") or "").split(",") if u.strip()]
    refuse_one_server_twice(urls)
    key = setting(ws, "OPENAI_API_KEY", api_key)
    if not key:
        if urls or default:  # local servers (vLLM) accept any key
            key = "EMPTY"
        else:
            raise SkinvlmError(
                "no API key: set OPENAI_API_KEY in the environment or <workspace>/.env, or pass --api-key"
            )
    chosen: list[str | None] = [*urls] or [default]
    return [Endpoint(url, key, model, timeout) for url in chosen]


def refuse_one_server_twice(urls: list[str]) -> None:
    """Two URLs that reach one server (`/v1` and `/v1/`, localhost and 127.0.0.1, a host's case, a default port
    written out) would double its load while the pool counts it as two: refused as an exact repeat is."""
    seen: dict[tuple[str, str, int | None, str], str] = {}
    for url in urls:
        key = server_key(url)
        if key in seen:
            first, again = redact_text(seen[key]), redact_text(url)
            same = f"{first} is given twice" if first == again else f"{first} and {again} name one server"
            raise SkinvlmError(f"--base-url {same}: name each endpoint once")
        seen[key] = url


def server_key(url: str) -> tuple[str, str, int | None, str]:
    from urllib.parse import urlsplit

    parts = urlsplit(url.strip())
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower().rstrip(".")
    try:
        port = parts.port or {"http": 80, "https": 443}.get(scheme)
    except ValueError:  # a port that is not a number: the client refuses it later, in its own words
        port = None
    loopback = host in ("localhost", "127.0.0.1", "::1")
    return scheme, "loopback" if loopback else host, port, parts.path.rstrip("/")


Encoded = tuple[str, int, int]  # a data URL, and the width and height it carries


def image_data_url(image: Any, max_side: int) -> Encoded:
    """describe's cost-aware encoding: JPEG (quality 90) of the RGB image scaled to fit max_side."""
    image = as_rgb(image)
    if max(image.size) > max_side:
        image = image.copy()  # as_rgb may hand back the stored image itself
        image.thumbnail((max_side, max_side))
    return data_url(image, "JPEG", quality=90)


def describe_encoding(max_side: int, detail: str) -> Callable[[Any], Encoded]:
    """describe's encoder: JPEG within --max-side, and within 512 px at --detail low (all the API looks at)."""
    side = min(max_side, 512) if detail == "low" else max_side
    return lambda image: image_data_url(image, side)


def lossless_data_url(image: Any, max_pixels: int | None) -> Encoded:
    """eval's encoding: PNG, at the resolution the model was trained at (`vlm.as_model_input`), so the server's
    processor has nothing left to resize; at the original size where none is known (an API model)."""
    from skinvlm.vlm import as_model_input

    image = as_rgb(image)
    return data_url(as_model_input(image, max_pixels) if max_pixels else image, "PNG")


def data_url(image: Any, fmt: str, **options: Any) -> Encoded:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    encoded = base64.b64encode(buffer.getvalue()).decode()
    return f"data:image/{fmt.lower()};base64,{encoded}", image.width, image.height


# Decoding is the memory peak of describe and eval (a 49 MP photo is ~150 MB of pixels): however many
# requests are in flight, the photos being decoded hold at most this many pixels (one big photo, or dozens
# of the AI Hub's 1 MP ones), so memory stays flat in --concurrency.
DECODING = devices.PixelBudget(64 * 2**20)


async def row_image_url(ds: Any, index: int, encode: Callable[[Any], Encoded]) -> Encoded:
    """Decode row `index`'s image and `encode` it as a data URL, off the event loop."""

    def decode_and_encode() -> Encoded:
        size = ds.select_columns(["width", "height"])[index]
        with DECODING.hold(size["width"] * size["height"]):
            return encode(ds[index]["image"])

    return await asyncio.to_thread(decode_and_encode)


def chat_messages(system: str | None, user_text: str, data_url: str, detail: str) -> list[dict[str, Any]]:
    """An OpenAI chat request in skinvlm's one layout (see `prompts.conversation`), optionally with a system turn."""
    image = {"type": "image_url", "image_url": {"url": data_url, "detail": detail}}
    system_turn: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    return system_turn + conversation(user_text, image=image)


class RateLimiter:
    """A token bucket refilled continuously at `per_minute`; acquire(n) waits until n are free."""

    def __init__(self, per_minute: float | None) -> None:
        self.rate = (per_minute or 0) / 60.0
        self.capacity = float(per_minute or 0)
        self.tokens = self.capacity
        self.stamp = time.monotonic()
        self.lock = asyncio.Lock()

    async def acquire(self, amount: float = 1.0) -> None:
        if not self.rate:
            return
        amount = min(amount, self.capacity)
        async with self.lock:
            while True:
                now = time.monotonic()
                self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
                self.stamp = now
                if self.tokens >= amount:
                    self.tokens -= amount
                    return
                await asyncio.sleep((amount - self.tokens) / self.rate)


@dataclass
class Reply:
    text: str | None
    prompt_tokens: int
    completion_tokens: int
    attempts: int
    error: str | None = None  # set when this record failed for good
    cut: bool = False  # the answer was longer than MAX_ANSWER_CHARS and was cut there
    # With extra={"logprobs": True, "top_logprobs": N}: per answer token, its bytes and the N likeliest
    # alternatives as (bytes, logprob); None when the endpoint gave none.
    tokens: list[tuple[bytes, list[tuple[bytes, float]]]] | None = None
    endpoint: str = ""  # who answered (or last failed), as it may be shown


def status_of(exc: BaseException) -> int | None:
    return getattr(exc, "status_code", None)


def is_retryable(exc: BaseException) -> bool:
    import openai

    # A garbled body (bad JSON) is a server hiccup like a 5xx, not a verdict on the request.
    transient = (
        TimeoutError,  # the whole request outlived --timeout
        BodyCutShort,
        openai.APITimeoutError,
        openai.APIConnectionError,
        openai.APIResponseValidationError,
        json.JSONDecodeError,
    )
    if isinstance(exc, transient):
        return True
    return status_of(exc) in RETRYABLE_STATUS


def retry_after(exc: BaseException) -> float | None:
    response = getattr(exc, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return min(MAX_RETRY_AFTER, max(0.0, float(value))) if value is not None else None
    except ValueError:
        return None


def fatal_message(exc: BaseException, ep: Endpoint) -> str | None:
    """The one line that stops the run, for errors no other record could escape."""
    status = status_of(exc)
    if status == 401:
        return f"{ep.where} refused the API key (401): check OPENAI_API_KEY or --api-key"
    if status == 403:
        return f"{ep.where} forbids this request (403): the key lacks access to model {ep.model!r} or this endpoint"
    if status == 404:
        return f"{ep.where} does not know model {ep.model!r} or the URL is wrong (404): check --model and --base-url"
    return None


class NotAnswering(SkinvlmError):
    """No endpoint process at the address (or none answering): with others to ask, a run goes on without it."""


async def check_server(client: Any, ep: Endpoint, wait: float | None = None) -> list[str]:
    """Fail in seconds, not after every retry of every request, when nothing answers at the endpoint; returns the
    names of the models it serves (none where it lists none).

    Asks GET /models, polling for up to `wait` seconds (a server still starting; None: the command has no
    --wait and asks once); a refused key stops here too. An endpoint that answers anything else is up: some
    servers do not list models.
    """
    import openai

    deadline = time.monotonic() + (wait or 0.0)
    while True:
        try:
            listed = await client.with_options(timeout=10.0).models.list()
            return [str(getattr(m, "id", "")) for m in getattr(listed, "data", None) or []]
        except (openai.APIConnectionError, openai.APITimeoutError) as exc:
            if time.monotonic() >= deadline:
                waited = f" within {wait:.0f}s" if wait else ""
                later = "" if wait is None else ", or give it time with --wait SECONDS"
                raise NotAnswering(
                    f"nothing answers at {ep.where}{waited} ({type(exc).__name__}): start the server or check "
                    f"--base-url{later}"
                ) from None
            await asyncio.sleep(min(2.0, max(0.1, deadline - time.monotonic())))
        except openai.APIStatusError as exc:
            if exc.status_code == 401:
                raise SkinvlmError(fatal_message(exc, ep) or "the API key was refused") from None
            return []


class BodyCutShort(ConnectionError):
    """The connection broke while an answer was coming: retried, and a sign of the endpoint (endpoints.Pool)."""


class AnswerTooLarge(Exception):
    """A response body far beyond any answer: the peer is broken (or hostile); asking again would not help."""


async def bounded_completion(client: Any, timeout: float, request: dict[str, Any]) -> dict[str, Any]:
    """One chat completion's JSON body, bounded as a whole: in time (`timeout` for the whole request, where the
    client's own timeout bounds each read, so a peer sending a byte a second, or streaming without end, never
    finishes) and in bytes (MAX_BODY_BYTES, so an endless or huge body cannot fill memory). Read as raw JSON:
    the OpenAI protocol's fields are all we need, and a server that leaves some out still answers."""

    async def read() -> bytes:
        async with client.chat.completions.with_streaming_response.create(**request) as response:
            body = bytearray()
            try:
                async for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > MAX_BODY_BYTES:
                        raise AnswerTooLarge(
                            f"the response body passed {MAX_BODY_BYTES // 2**20} MiB; no answer is that long"
                        )
            except AnswerTooLarge:
                raise
            except Exception as exc:  # noqa: BLE001 - the HTTP library's own error for a body cut short
                # The status came, the body did not: the server died or the connection broke mid-answer, whatever
                # class the HTTP library in use gives it (httpx's RemoteProtocolError, ...).
                raise BodyCutShort(f"the answer was cut short after {len(body)} bytes: {exc}") from exc
            return bytes(body)

    try:
        raw = await asyncio.wait_for(read(), timeout)
    except TimeoutError:
        raise TimeoutError(f"no whole answer within {timeout:g}s") from None
    payload = json.loads(raw)
    if not isinstance(payload, dict):
        raise json.JSONDecodeError("not a JSON object", raw.decode(errors="replace")[:40], 0)
    return payload


RESULT_LINE_BYTES = 64 * 2**10  # a Batch API result line: one answer (at most 20,000 characters) and its envelope


async def bounded_file(client: Any, file_id: str, requests: int, timeout: float) -> str:
    """A Batch API result file, bounded as an answer is: in bytes by the requests it answers (RESULT_LINE_BYTES
    each, plus 1 MiB) and in time (`timeout` for each of them, an hour at most), so a broken endpoint cannot stream
    without end or fill memory."""
    limit = requests * RESULT_LINE_BYTES + 2**20

    async def read() -> bytes:
        async with client.files.with_streaming_response.content(file_id) as response:
            body = bytearray()
            async for chunk in response.iter_bytes():
                body += chunk
                if len(body) > limit:
                    raise SkinvlmError(
                        f"batch result file {file_id} passed {limit // 2**20} MiB for {requests} requests: the "
                        "endpoint is broken; nothing of it was kept, run again to retry"
                    )
            return bytes(body)

    try:
        return (await asyncio.wait_for(read(), min(3600.0, timeout * max(1, requests)))).decode(errors="replace")
    except TimeoutError:
        raise SkinvlmError(f"batch result file {file_id} did not arrive whole in time; run again to retry") from None


def reply_of(payload: dict[str, Any], attempts: int) -> Reply:
    usage = payload.get("usage") or {}
    choices = payload.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    text = (choice.get("message") or {}).get("content")
    text = text if isinstance(text, str) else None
    cut = text is not None and len(text) > MAX_ANSWER_CHARS
    return Reply(
        text[:MAX_ANSWER_CHARS] if text is not None else None,
        int(usage.get("prompt_tokens") or 0),
        int(usage.get("completion_tokens") or 0),
        attempts,
        None if text is not None else "the answer had no message content",
        cut,
        answer_tokens(choice),
    )


def answer_tokens(choice: dict[str, Any]) -> list[tuple[bytes, list[tuple[bytes, float]]]] | None:
    content = (choice.get("logprobs") or {}).get("content")
    if not content:
        return None
    return [
        (token_bytes(t), [(token_bytes(top), top["logprob"]) for top in t.get("top_logprobs") or []]) for t in content
    ]


def token_bytes(token: dict[str, Any]) -> bytes:
    """A token's bytes as the endpoint gives them (a token may end inside a UTF-8 character), else its text."""
    return bytes(token["bytes"]) if token.get("bytes") else str(token.get("token", "")).encode()
