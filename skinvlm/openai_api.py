"""Talking to OpenAI or any OpenAI-compatible endpoint: credentials, images, rate limits, retries.

Shared by describe and eval. Retries (tenacity) cover 429 (honouring Retry-After), 5xx, timeouts
and dropped connections, with exponential backoff and jitter. A refused key, a forbidden request
or an unknown model stops the whole run at once (`SkinvlmError`); a 400 for one image fails only
that record. Error texts are cleaned of the key and of URL passwords before they are stored or shown.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from skinvlm import devices
from skinvlm.errors import SkinvlmError
from skinvlm.images import as_rgb
from skinvlm.prompts import conversation
from skinvlm.redaction import redact_text
from skinvlm.workspace import Workspace

RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}
# Far above any real answer (512 tokens of Korean is ~1,500 characters): a server that ignores
# max_tokens cannot fill the journal or the predictions with megabytes per image.
MAX_ANSWER_CHARS = 20_000
MAX_RETRY_AFTER = 120.0


def setting(ws: Workspace, name: str, given: str | None = None) -> str | None:
    """A flag, else the environment, else the workspace .env file."""
    if given:
        return given
    if os.environ.get(name):
        return os.environ[name]
    if ws.env_file.is_file():
        from dotenv import dotenv_values

        return dotenv_values(ws.env_file).get(name) or None
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


def endpoint(ws: Workspace, base_url: str | None, api_key: str | None, model: str, timeout: float) -> Endpoint:
    url = setting(ws, "OPENAI_BASE_URL", base_url)
    key = setting(ws, "OPENAI_API_KEY", api_key)
    if not key:
        if url:  # local servers (vLLM) accept any key
            key = "EMPTY"
        else:
            raise SkinvlmError(
                "no API key: set OPENAI_API_KEY in the environment or <workspace>/.env, or pass --api-key"
            )
    return Endpoint(url, key, model, timeout)


def image_data_url(image: Any, max_side: int) -> tuple[str, int, int]:
    """JPEG (quality 90) data URL of an RGB image scaled to fit max_side; also its sent size."""
    image = as_rgb(image)
    if max(image.size) > max_side:
        image = image.copy()  # as_rgb may hand back the stored image itself
        image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode(), image.width, image.height


# Decoding is the memory peak of describe and eval (a 49 MP photo is ~150 MB of pixels): however many
# requests are in flight, the photos being decoded hold at most this many pixels (one big photo, or dozens
# of the AI Hub's 1 MP ones), so memory stays flat in --concurrency.
DECODING = devices.PixelBudget(64 * 2**20)


async def row_image_url(ds: Any, index: int, max_side: int) -> tuple[str, int, int]:
    """Decode row `index`'s image and encode it as a data URL, off the event loop."""

    def encode() -> tuple[str, int, int]:
        size = ds.select_columns(["width", "height"])[index]
        with DECODING.hold(size["width"] * size["height"]):
            return image_data_url(ds[index]["image"], max_side)

    return await asyncio.to_thread(encode)


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


def _status(exc: BaseException) -> int | None:
    return getattr(exc, "status_code", None)


def _is_retryable(exc: BaseException) -> bool:
    import json

    import openai

    # A garbled body (bad JSON) is a server hiccup like a 5xx, not a verdict on the request.
    transient = (
        openai.APITimeoutError,
        openai.APIConnectionError,
        openai.APIResponseValidationError,
        json.JSONDecodeError,
    )
    if isinstance(exc, transient):
        return True
    return _status(exc) in RETRYABLE_STATUS


def _retry_after(exc: BaseException) -> float | None:
    response = getattr(exc, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return min(MAX_RETRY_AFTER, max(0.0, float(value))) if value is not None else None
    except ValueError:
        return None


def fatal_message(exc: BaseException, ep: Endpoint) -> str | None:
    """The one line that stops the run, for errors no other record could escape."""
    status = _status(exc)
    if status == 401:
        return f"{ep.where} refused the API key (401): check OPENAI_API_KEY or --api-key"
    if status == 403:
        return f"{ep.where} forbids this request (403): the key lacks access to model {ep.model!r} or this endpoint"
    if status == 404:
        return f"{ep.where} does not know model {ep.model!r} or the URL is wrong (404): check --model and --base-url"
    return None


async def check_server(client: Any, ep: Endpoint, wait: float = 0.0) -> None:
    """Fail in seconds, not after every retry of every request, when nothing answers at the endpoint.

    Asks GET /models, polling for up to `wait` seconds (a server still starting); a refused key stops
    here too. An endpoint that answers anything else is up: some servers do not list models.
    """
    import openai

    deadline = time.monotonic() + wait
    while True:
        try:
            await client.with_options(timeout=10.0).models.list()
            return
        except (openai.APIConnectionError, openai.APITimeoutError) as exc:
            if time.monotonic() >= deadline:
                waited = f" within {wait:.0f}s" if wait else ""
                raise SkinvlmError(
                    f"nothing answers at {ep.where}{waited} ({type(exc).__name__}): start the server, check "
                    "--base-url, or give it time with --wait SECONDS"
                ) from None
            await asyncio.sleep(min(2.0, max(0.1, deadline - time.monotonic())))
        except openai.APIStatusError as exc:
            if exc.status_code == 401:
                raise SkinvlmError(fatal_message(exc, ep) or "the API key was refused") from None
            return


async def complete(
    client: Any,
    ep: Endpoint,
    messages: list[dict[str, Any]],
    *,
    max_tokens: int,
    temperature: float,
    max_attempts: int,
    backoff: float = 1.0,
    extra: dict[str, Any] | None = None,
) -> Reply:
    """One chat completion with retries. Raises SkinvlmError for fatal errors; else returns a Reply."""
    from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

    jitter = wait_random_exponential(multiplier=backoff, max=60)

    def wait(state: Any) -> float:
        exc = state.outcome.exception() if state.outcome else None
        after = _retry_after(exc) if exc else None
        return after if after is not None else jitter(state)

    attempts = 0
    try:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(_is_retryable), wait=wait, stop=stop_after_attempt(max_attempts), reraise=True
        ):
            with attempt:
                attempts += 1
                response = await client.chat.completions.create(
                    model=ep.model, messages=messages, max_tokens=max_tokens, temperature=temperature, **(extra or {})
                )
    except Exception as exc:  # noqa: BLE001 - every failure becomes a record or a fatal line
        fatal = fatal_message(exc, ep)
        if fatal:
            raise SkinvlmError(fatal) from None
        return Reply(None, 0, 0, attempts, redact_text(f"{type(exc).__name__}: {exc}", ep.api_key)[:500])
    usage = getattr(response, "usage", None)
    choices = getattr(response, "choices", None) or []
    text = choices[0].message.content if choices and choices[0].message else None
    cut = text is not None and len(text) > MAX_ANSWER_CHARS
    return Reply(
        text[:MAX_ANSWER_CHARS] if text is not None else None,
        getattr(usage, "prompt_tokens", 0) or 0,
        getattr(usage, "completion_tokens", 0) or 0,
        attempts,
        None if text is not None else "the answer had no message content",
        cut,
        answer_tokens(choices[0]) if choices else None,
    )


def answer_tokens(choice: Any) -> list[tuple[bytes, list[tuple[bytes, float]]]] | None:
    content = getattr(getattr(choice, "logprobs", None), "content", None)
    if not content:
        return None
    return [(token_bytes(t), [(token_bytes(top), top.logprob) for top in (t.top_logprobs or [])]) for t in content]


def token_bytes(token: Any) -> bytes:
    """A token's bytes as the endpoint gives them (a token may end inside a UTF-8 character), else its text."""
    return bytes(token.bytes) if getattr(token, "bytes", None) else token.token.encode()
