"""Prompt texts, the chat layout and the answer format, shared by describe, train, merge, eval and serve.

Answers look like ``<label>질병명</label>\n<summary>...</summary>``; parsing is lenient about
whitespace and strict about the two tags. Every chat sent to a model, in training or at inference,
is built by `conversation`: the image first, then the instruction, so parity holds by construction.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skinvlm.errors import SkinvlmError, read_user_text
from skinvlm.rules import Rules

LABEL_START, LABEL_END = "<label>", "</label>"  # eval stops at LABEL_END and scores labels after LABEL_START
LABEL_TAG = re.compile(rf"{LABEL_START}\s*(.*?)\s*{LABEL_END}", re.DOTALL)
SUMMARY_TAG = re.compile(r"<summary>\s*(.*?)\s*</summary>", re.DOTALL)

VIEW_HINTS = {
    "정면": (
        "정면 사진입니다. 얼굴 전체에서 병변이 어디에 어떻게 분포하는지"
        "(이마, 뺨, 코, 턱, 눈·입 주위)를 중심으로 설명하세요."
    ),
    "측면": "측면 근접 사진입니다. 병변 하나하나의 모양, 크기, 색, 경계, 표면(인설, 딱지, 고름)을 중심으로 설명하세요.",
}
DEFAULT_VIEW_HINT = "보이는 병변의 모양과 분포를 함께 설명하세요."


@dataclass(frozen=True)
class Answer:
    tag: str | None
    summary: str | None

    @property
    def well_formed(self) -> bool:
        return bool(self.tag) and bool(self.summary)


def parse_answer(text: str | None) -> Answer:
    text = text or ""
    label, summary = LABEL_TAG.search(text), SUMMARY_TAG.search(text)
    return Answer(label.group(1) if label else None, summary.group(1) if summary else None)


def agrees(output: str | None, label: str, rules: Rules) -> bool:
    """Whether an answer's `<label>`, through the aliases, names the folder's class (the ground truth)."""
    return rules.canonical(parse_answer(output).tag) == label


def format_answer(label: str, summary: str) -> str:
    return f"{LABEL_START}{label}{LABEL_END}\n<summary>{summary}</summary>"


def user_turn(text: str, image: dict[str, Any] | None = None) -> dict[str, Any]:
    """The user turn of every chat: the image item first, then the text, as content items.

    `image` is the item the receiver understands: `{"type": "image"}` for a local processor (the
    default), `{"type": "image_url", ...}` for an OpenAI-compatible server.
    """
    # A fresh placeholder each time: collators may edit the messages they are given.
    return {"role": "user", "content": [image or {"type": "image"}, {"type": "text", "text": text}]}


def conversation(text: str, answer: str | None = None, image: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One image, one instruction and, for training, the answer: the layout train, eval, merge and serve share."""
    messages = [user_turn(text, image)]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def class_guide(rules: Rules) -> str:
    return "\n".join(f"- {c.name} ({c.english}): {c.features}" for c in rules.classes)


def instruction(rules: Rules) -> str:
    """The user turn of training and evaluation: no label given, the model must name it."""
    names = ", ".join(rules.class_names)
    return (
        "이 얼굴 피부 사진을 보고 다음 중 어떤 상태인지 판단하세요: "
        f"{names}.\n\n{class_guide(rules)}\n\n"
        "반드시 한국어로, 아래 형식 그대로 답하세요.\n"
        f"<label>질병명</label>\n<summary>보이는 소견 2~4문장</summary>\n"
        f"얼굴 사진이 아니거나 판단할 수 없으면 <label>{rules.unreadable}</label>로 답하세요."
    )


@dataclass(frozen=True)
class DescribePrompt:
    """The describe prompt: a system text and a user template with {label}, {english}, {view_hint}."""

    system: str
    user: str
    source: str

    @property
    def hash(self) -> str:
        return hashlib.sha256(f"{self.system}\x00{self.user}".encode()).hexdigest()[:12]

    def user_text(self, rules: Rules, label: str, view: str, restate: bool = False) -> str:
        """The user turn for one image; `restate` adds a reminder when an earlier answer named another class."""
        text = self.user.format(
            label=label, english=rules.english(label), view_hint=VIEW_HINTS.get(view, DEFAULT_VIEW_HINT)
        )
        if restate:
            text += (
                f"\n\n이전 답의 <label>이 이 사진의 진단과 달랐습니다. 이 사진의 진단은 '{label}'입니다. "
                f"소견은 사진에서 보이는 대로 쓰되 <label>{label}</label>로 답하세요."
            )
        return text


def default_describe_prompt(rules: Rules) -> DescribePrompt:
    system = (
        "당신은 얼굴 피부 사진에서 보이는 소견을 기록하는 피부과 전문의입니다. "
        "분류 대상은 다음과 같습니다.\n"
        f"{class_guide(rules)}\n\n"
        "관찰할 것: 병변의 형태(반, 판, 구진, 농포, 면포, 인설), 색, 경계의 선명도, 얼굴 안에서의 분포.\n"
        "모든 설명은 한국어 의학 용어로 쓰고 영어 단어나 한자를 섞지 마세요.\n"
        "답은 정확히 아래 형식으로만 쓰세요. 다른 말은 덧붙이지 마세요.\n"
        "<label>질병명</label>\n<summary>보이는 소견 2~4문장</summary>\n"
        f"사진이 얼굴이 아니거나 흐려서 판단할 수 없으면 <label>{rules.unreadable}</label>로 답하고 "
        "summary에 그 이유를 쓰세요."
    )
    user = (
        "이 사진의 진단은 '{label}'({english})입니다. 이 진단을 뒷받침하는, 사진에서 실제로 보이는 "
        "특징을 설명하세요. {view_hint} <label>에는 '{label}'을 쓰세요."
    )
    return DescribePrompt(system, user, "built-in")


def load_describe_prompt(path: Path | None, rules: Rules) -> DescribePrompt:
    """`--prompt-file`: TOML with `system` (and optionally `user`), or plain text for the system prompt."""
    default = default_describe_prompt(rules)
    if path is None:
        return default
    text = read_user_text(path, "prompt file")
    if path.suffix.lower() != ".toml":
        return DescribePrompt(text.strip(), default.user, str(path))
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise SkinvlmError(f"prompt file {path} is not valid TOML: {err}") from None
    unknown = set(data) - {"system", "user"}
    if unknown or not isinstance(data.get("system"), str):
        raise SkinvlmError(
            f"prompt file {path} must hold a string 'system' and optionally 'user' "
            f"(unknown: {', '.join(sorted(unknown)) or 'none'})"
        )
    user = data.get("user", default.user)
    try:
        user.format(label="x", english="x", view_hint="x")
    except (KeyError, IndexError) as err:
        raise SkinvlmError(
            f"prompt file {path}: 'user' may use only {{label}}, {{english}}, {{view_hint}} (found {err})"
        ) from None
    return DescribePrompt(data["system"].strip(), user.strip(), str(path))
