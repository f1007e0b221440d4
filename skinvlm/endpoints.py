"""Several OpenAI-compatible endpoints serving one model, asked as one: describe's and eval's requests.

Each endpoint has its own concurrency slots, its own client-side rate limits (--rpm/--tpm) and its own 429
backoff, so a busy endpoint slows only itself. One that stops answering (refused or reset connections, timeouts,
502-504 from a proxy in front of it) DOWN_AFTER times in a row is taken out and probed with GET /models after 1 s,
2 s, 4 s ... (at most PROBE_MAX); it is taken back when a probe answers. A request whose endpoint failed goes to
another at once, so a run finishes on the endpoints left and pays again only for what was in flight. When every
endpoint is out (each probed twice in vain, and out for --timeout at least) the run stops, keeping what it finished.
One endpoint is the same machinery with nothing to spread.

Retries and their backoff are tenacity's; the choice of endpoint per attempt is ours: no client library spreads
one request stream over several servers with per-server state.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from skinvlm import openai_api
from skinvlm.errors import SkinvlmError
from skinvlm.redaction import redact_text

DOWN_AFTER = 3  # connection failures in a row that take an endpoint out
PROBE_FIRST = 1.0  # seconds before the first probe of an endpoint taken out; doubled after each failed probe
PROBE_MAX = 30.0
PROBES_BEFORE_GIVING_UP = 2
HARD_STOP = 4  # however many endpoints failed it, a request is tried at most this many times --max-attempts
ENDPOINT_FAILURE_STATUS = {502, 503, 504}  # a proxy or load balancer saying the server behind it is gone


@dataclass
class Member:
    """One endpoint and what the pool knows of it."""

    ep: openai_api.Endpoint
    client: Any
    slots: int
    rpm: openai_api.RateLimiter
    tpm: openai_api.RateLimiter
    in_flight: int = 0
    not_before: float = 0.0  # a 429's pause: no request to it before this time.monotonic()
    throttled: int = 0  # 429s in a row
    failures: int = 0  # connection failures in a row
    down_since: float | None = None
    next_probe: float = 0.0
    probe_wait: float = PROBE_FIRST
    out_since: str = ""  # the clock time it was taken out, as shown
    failed_probes: int = 0
    probing: bool = False
    sent: int = 0  # requests sent (what a paid endpoint may bill, answered or not)
    answered: int = 0
    events: list[str] = field(default_factory=list)

    @property
    def up(self) -> bool:
        return self.down_since is None


def is_endpoint_failure(exc: BaseException) -> bool:
    """Nothing (or only a proxy) answered: a sign of the endpoint, not of the request."""
    import openai

    if isinstance(exc, TimeoutError | openai_api.BodyCutShort | openai.APIConnectionError):  # APITimeoutError too
        return True
    return openai_api.status_of(exc) in ENDPOINT_FAILURE_STATUS


def clock() -> str:
    return datetime.now().strftime("%H:%M:%S")


class Pool:
    def __init__(
        self,
        endpoints: list[openai_api.Endpoint],
        concurrency: int,
        rpm: int | None = None,
        tpm: int | None = None,
        backoff: float = 1.0,
    ) -> None:
        self.members = [
            Member(ep, ep.client(), concurrency, openai_api.RateLimiter(rpm), openai_api.RateLimiter(tpm))
            for ep in endpoints
        ]
        self.backoff = backoff
        self.give_up_after = max(ep.timeout for ep in endpoints)
        self.wake = asyncio.Event()
        self.probes: set[asyncio.Task[None]] = set()
        self.started = time.monotonic()

    @property
    def slots(self) -> int:
        return sum(m.slots for m in self.members)

    # -- starting and stopping -------------------------------------------------------------------
    async def check(self, wait: float | None = None) -> None:
        """Every endpoint that answers (within `wait` seconds where given) serves the model asked for; one that does
        not answer starts out (probed like one dropped), unless none answers."""
        found = await asyncio.gather(
            *(openai_api.check_server(m.client, m.ep, wait) for m in self.members), return_exceptions=True
        )
        for outcome in found:
            if isinstance(outcome, BaseException) and not isinstance(outcome, openai_api.NotAnswering):
                raise outcome
        if all(isinstance(outcome, openai_api.NotAnswering) for outcome in found):
            raise found[0]  # type: ignore[misc]
        model = self.members[0].ep.model
        others = []
        for member, outcome in zip(self.members, found, strict=True):
            if isinstance(outcome, openai_api.NotAnswering):
                self.take_out(member, "not answering at the start")
            elif len(self.members) > 1 and isinstance(outcome, list) and outcome and model not in outcome:
                others.append(f"{member.ep.where} serves {', '.join(map(repr, outcome[:3]))}")
        if others:
            raise SkinvlmError(
                f"the endpoints do not all serve model {model!r} ({'; '.join(others)}): give every --base-url the same "
                "model, or pass --model with the name they share"
            )

    async def work(self, worker: Callable[[], Coroutine[Any, Any, None]], jobs: int, wait: float | None = None) -> None:
        """Check the endpoints, then run as many `worker`s as there are slots (no more than `jobs`) until each
        returns; the first SkinvlmError stops them all and is raised alone. The pool is closed either way."""
        try:
            await self.check(wait)
            async with asyncio.TaskGroup() as group:
                for _ in range(min(self.slots, jobs)):
                    group.create_task(worker())
        except* SkinvlmError as errors:
            raise errors.exceptions[0] from None
        finally:
            await self.close()

    async def close(self) -> None:
        for probe in self.probes:
            probe.cancel()
        await asyncio.gather(*self.probes, return_exceptions=True)
        await asyncio.gather(*(m.client.close() for m in self.members), return_exceptions=True)

    # -- one request -----------------------------------------------------------------------------
    async def complete(
        self,
        messages: list[dict[str, Any]],
        *,
        max_tokens: int,
        temperature: float,
        max_attempts: int,
        extra: dict[str, Any] | None = None,
        tokens: float = 0.0,
    ) -> openai_api.Reply:
        """One chat completion, each attempt on the endpoint free first. Raises SkinvlmError for what stops the
        run (a refused key, an unknown model, every endpoint out); else returns a Reply naming who answered."""
        from tenacity import AsyncRetrying, retry_if_exception, wait_random_exponential

        jitter = wait_random_exponential(multiplier=self.backoff, max=60)

        def wait(state: Any) -> float:
            exc = state.outcome.exception() if state.outcome else None
            if exc is not None and (is_endpoint_failure(exc) or openai_api.status_of(exc) == 429):
                return 0.0  # the endpoint's own state holds it back; another may take the request now
            after = openai_api.retry_after(exc) if exc else None
            return after if after is not None else float(jitter(state))

        attempts, member = 0, self.members[0]
        excused = 0  # attempts that failed on an endpoint while another was up: they cost the request nothing

        def stop(state: Any) -> bool:
            return state.attempt_number - excused >= max_attempts or state.attempt_number >= HARD_STOP * max_attempts

        request = {"model": member.ep.model, "messages": messages, "max_tokens": max_tokens}
        request |= {"temperature": temperature} | (extra or {})
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(openai_api.is_retryable), wait=wait, stop=stop, reraise=True
            ):
                with attempt:
                    attempts += 1
                    member = await self.acquire(tokens, avoid=member if attempts > 1 else None)
                    try:
                        payload = await self.ask(member, request)
                    except Exception as exc:
                        excused += self.another_could(member, exc)
                        raise
        except SkinvlmError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes a record or a fatal line
            fatal = openai_api.fatal_message(exc, member.ep)
            if fatal:
                raise SkinvlmError(fatal) from None
            error = redact_text(f"{type(exc).__name__}: {exc}", member.ep.api_key)[:500]
            return openai_api.Reply(None, 0, 0, attempts, error, endpoint=member.ep.where)
        reply = openai_api.reply_of(payload, attempts)
        reply.endpoint = member.ep.where
        return reply

    def another_could(self, member: Member, exc: BaseException) -> bool:
        """The endpoint failed (or throttled) and another is up to take the request."""
        endpoint_fault = is_endpoint_failure(exc) or openai_api.status_of(exc) == 429
        return endpoint_fault and any(m.up for m in self.members if m is not member)

    async def ask(self, member: Member, request: dict[str, Any]) -> dict[str, Any]:
        try:
            payload = await openai_api.bounded_completion(member.client, member.ep.timeout, request)
        except BaseException as exc:
            self.release(member, exc)
            raise
        self.release(member, None)
        return payload

    async def acquire(self, tokens: float, avoid: Member | None = None) -> Member:
        """A slot on the endpoint least busy among those up and not paused, other than `avoid` (the one a retried
        request failed on) while another is up; waits while there is none."""
        while True:
            now = time.monotonic()
            self.start_due_probes(now)
            others = [m for m in self.members if m is not avoid and m.up]
            ready = [m for m in others or self.members if m.up and m.in_flight < m.slots and m.not_before <= now]
            if ready:
                # One that failed or throttled lately is asked only while the others are full; then the least busy.
                member = min(ready, key=lambda m: (m.throttled + m.failures, m.in_flight / m.slots, m.sent))
                member.in_flight += 1
                break
            self.stop_if_all_out(now)
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.next_change(now))
        try:
            await member.rpm.acquire(1)
            await member.tpm.acquire(tokens)
        except BaseException:
            member.in_flight -= 1
            self.wake.set()
            raise
        return member

    def next_change(self, now: float) -> float:
        """Seconds until a paused endpoint may be asked or a probe is due (a finished request wakes earlier)."""
        times = [m.not_before for m in self.members if m.up and m.not_before > now]
        times += [m.next_probe for m in self.members if not m.up and not m.probing]
        return min(1.0, max(0.01, min(times, default=now + 1.0) - now))

    def release(self, member: Member, exc: BaseException | None) -> None:
        member.in_flight -= 1
        member.sent += 1
        if exc is None:
            member.answered += 1
            self.alive(member)
        elif openai_api.status_of(exc) == 429:
            member.throttled += 1
            member.failures = 0
            pause = openai_api.retry_after(exc)
            if pause is None:
                pause = random.uniform(0, min(60.0, self.backoff * 2**member.throttled))
            member.not_before = max(member.not_before, time.monotonic() + pause)
        elif is_endpoint_failure(exc):
            member.failures += 1
            if member.failures >= DOWN_AFTER and member.up:
                self.take_out(member, f"after {member.failures} failures in a row ({type(exc).__name__})")
        elif isinstance(exc, Exception):  # it answered, if not well: it is up (a cancelled request says nothing)
            member.failures = 0
        self.wake.set()

    # -- endpoints out and back ------------------------------------------------------------------
    def alive(self, member: Member) -> None:
        member.failures = member.throttled = 0
        if not member.up:
            member.down_since, member.failed_probes, member.probe_wait = None, 0, PROBE_FIRST
            member.events.append(f"back at {clock()}")

    def take_out(self, member: Member, why: str) -> None:
        now = time.monotonic()
        member.down_since, member.next_probe, member.out_since = now, now + member.probe_wait, clock()
        member.events.append(f"dropped at {member.out_since} {why}")

    def start_due_probes(self, now: float) -> None:
        for member in self.members:
            if not member.up and not member.probing and member.next_probe <= now:
                member.probing = True
                probe = asyncio.create_task(self.probe(member))
                self.probes.add(probe)
                probe.add_done_callback(self.probes.discard)

    async def probe(self, member: Member) -> None:
        try:
            await member.client.with_options(timeout=min(10.0, member.ep.timeout)).models.list()
        except Exception:  # noqa: BLE001 - any failure to answer leaves it out
            member.failed_probes += 1
            member.probe_wait = min(PROBE_MAX, member.probe_wait * 2)
            member.next_probe = time.monotonic() + member.probe_wait
        else:
            self.alive(member)
        finally:
            member.probing = False
            self.wake.set()

    def stop_if_all_out(self, now: float) -> None:
        out = [m for m in self.members if not m.up]
        if len(out) < len(self.members):
            return
        if all(m.failed_probes >= PROBES_BEFORE_GIVING_UP and now - (m.down_since or now) >= self.give_up_after
               for m in out):  # fmt: skip
            dropped = "; ".join(f"{m.ep.where} {m.events[-1]}" for m in out)
            raise SkinvlmError(
                f"every endpoint stopped answering ({dropped}): what finished is saved; run the same command again "
                "once one answers"
            )

    # -- what is shown ---------------------------------------------------------------------------
    def summary(self) -> list[dict[str, Any]]:
        """Per endpoint: requests sent, answers, answers per second since the start, and when it was dropped."""
        elapsed = max(1e-9, time.monotonic() - self.started)
        return [
            {
                "endpoint": m.ep.where,
                "sent": m.sent,
                "answered": m.answered,
                "per_second": round(m.answered / elapsed, 3),
                "up": m.up,
                "out_since": "" if m.up else m.out_since,
                "events": list(m.events),
            }
            for m in self.members
        ]


def note(summary: list[dict[str, Any]]) -> str:
    """The progress line's part for several endpoints: each one's answers per second, or since when it is out."""
    if len(summary) < 2:
        return ""
    return "  ".join(
        f"{short(e['endpoint'])} {e['per_second']:.1f}/s"
        if e["up"]
        else f"{short(e['endpoint'])} out since {e['out_since']}"
        for e in summary
    )


def short(where: str) -> str:
    """An endpoint as progress lines show it: host and port."""
    return where.split("://", 1)[-1].removesuffix("/").removesuffix("/v1")
