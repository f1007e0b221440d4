"""Keeping secrets out of everything skinvlm writes or prints: manifests, journals, predictions, errors.

Two nets, both needed: by key name (a manifest field called `api_key` or `hf_token`, but not
`max_tokens`), and by value (OpenAI and Hugging Face key shapes, bearer values, a password inside
a URL), plus the literal values a run knows it holds.
"""

from __future__ import annotations

import re
from typing import Any

# Whole key names only: `token`, `hf_token`, `api_key` are secrets; `max_tokens`, `prompt_tokens` are not.
SECRET_KEY = re.compile(r"^(?:.*[_-])?(?:api[_-]?key|token|secret|password|passwd|authorization|credentials?)$", re.I)
SECRET_VALUES = (
    re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"),  # OpenAI keys, sk-proj-... included
    re.compile(r"\bhf_[A-Za-z0-9]{20,}"),  # Hugging Face tokens
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{8,}"),
)
URL_CREDENTIALS = re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+@")
# A secret-named query parameter (`?api_key=...`, `&token=...`, `key=`): its value.
QUERY_SECRET = re.compile(r"(?i)([?&](?:[\w-]*[_-])?(?:api[_-]?key|key|token|secret|password|sig|signature)=)[^&#\s]+")
HIDDEN = "***"


def redact_text(text: str, *known: str | None) -> str:
    """`text` without credentials: the known values, key-shaped values and user:password@ in URLs."""
    for secret in known:
        if secret and len(secret) >= 4:
            text = text.replace(secret, HIDDEN)
    for pattern in SECRET_VALUES:
        text = pattern.sub(HIDDEN, text)
    text = QUERY_SECRET.sub(rf"\g<1>{HIDDEN}", text)
    return URL_CREDENTIALS.sub(f"{HIDDEN}@", text)


def redact(value: Any) -> Any:
    """A JSON-like value with secret-named fields blanked and every string cleaned by `redact_text`."""
    if isinstance(value, dict):
        return {k: ("<redacted>" if SECRET_KEY.match(str(k)) and v else redact(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value
