"""describe's settings and the context of one run: shared by `describe` (which makes them) and `batch` (which
runs the same requests through the Batch API), in a module of their own so neither imports the other."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from skinvlm import openai_api
from skinvlm.config import check_choice, check_seconds
from skinvlm.errors import SkinvlmError
from skinvlm.prompts import DescribePrompt
from skinvlm.rules import Rules

STATUSES = ("ok", "invalid", "failed")
# --redo also takes: all; changed (made by another model or prompt); mismatch (<label> is not the folder's class)
REDO_CHOICES = (*STATUSES, "all", "changed", "mismatch")


@dataclass
class DescribeSettings:
    model: str = "gpt-4o-mini"
    base_url: tuple[str, ...] = ()  # several: requests spread over them (see endpoints.Pool)
    concurrency: int = 16  # per endpoint
    rpm: int | None = None
    tpm: int | None = None
    timeout: float = 120.0
    max_tokens: int = 512
    temperature: float = 0.2
    max_side: int = 1024
    detail: str = "auto"
    format_retries: int = 1
    max_attempts: int = 6
    limit: int | None = None
    seed: int = 42
    redo: tuple[str, ...] = ()
    splits: tuple[str, ...] = ("train", "test")
    template: bool = False
    backoff: float = 1.0
    batch: bool = False
    submit_only: bool = False  # with --batch: submit and return; a re-run collects
    poll_seconds: float = 30.0

    def __post_init__(self) -> None:
        self.redo, self.splits = tuple(self.redo), tuple(self.splits)  # lists from the CLI or a config file
        self.base_url = (self.base_url,) if isinstance(self.base_url, str) else tuple(self.base_url or ())

    def check(self) -> None:
        if self.concurrency < 1:
            raise SkinvlmError("--concurrency must be at least 1")
        check_choice("--detail", self.detail, openai_api.Detail)
        bad = set(self.redo) - set(REDO_CHOICES)
        if bad:
            raise SkinvlmError(f"--redo takes {', '.join(REDO_CHOICES)}; not {', '.join(sorted(bad))}")
        if self.limit is not None and self.limit < 1:
            raise SkinvlmError(f"--limit must be at least 1, not {self.limit}")
        if self.max_side < 64:
            raise SkinvlmError("--max-side must be at least 64")
        check_seconds("--timeout", self.timeout)


@dataclass
class RunContext:
    settings: DescribeSettings
    rules: Rules
    prompt: DescribePrompt
    endpoints: list[openai_api.Endpoint]

    @property
    def endpoint(self) -> openai_api.Endpoint:
        """The Batch API's one endpoint (a batch lives at one provider)."""
        return self.endpoints[0]

    @functools.cached_property
    def client(self) -> Any:
        return self.endpoint.client()
