"""Personal data in generated text: what `audit` counts, `fix` redacts (the shipped rule file) and `publish` refuses.

Five kinds, each one RE2 pattern (linear time, like the rule file's rewrites): Korean resident registration
numbers, phone numbers, e-mail addresses, chart/record numbers, and names introduced by 환자/성명/이름 (or
Patient/Name). A name is only taken where the text marks it as one (a colon, 님/씨, or a bracket that
opens on a number or a sex), so "환자의 피부", "환자 피부에" and "환자 얼굴(정면)" are not names. The shipped
postprocess.toml carries a [[rewrite]] per kind; a test proves that after `fix` none of these finds
anything in any planted example.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from skinvlm.rules import linear_regex

NAME_WORDS = "환자명|환자|성명|이름|수진자|보호자"
HANGUL_NAME = "[가-힣]{2,4}"
# The commonest Korean surnames: a three-syllable word written straight before 환자 is a name only when it opens
# with one (김철수환자; not 소아환자 or 여성환자, which are two syllables, nor 여드름, which NOT_NAMES holds).
SURNAMES = (
    "김이박최정강조윤장임한오서신권황안송류유전홍고문양손배백허남심노하곽성차주우"
    "구민진나지엄채원천방공현함변염여추도소석선설마길연위표명기반왕금옥육인맹제모탁국어은편용"
)
# Numbers are written with ASCII or full-width digits, and joined by any dash a keyboard or a converter makes
# (hyphen, en and em dash, minus, full-width hyphen), with or without spaces around it.
DIGIT = "[0-9０-９]"
NOT_DIGIT = "(?:^|[^0-9０-９])"
JOIN = "(?:\\s*[-‐-―−－.]\\s*|\\s+)?"
# After the 0: mobile, Seoul, the provinces, 070 and 080.
AREA = "(?:[1１][016-9０１６-９]|[2２]|[3-6３-６][1-5１-５]|[78７８][0０])"
# kind -> its patterns; where a pattern has a group `v`, that group is the datum (the name, not 환자 before it)
PATTERNS: dict[str, tuple[str, ...]] = {
    # 6 birth digits, 7 more starting 1-8 (5-8: foreign residents)
    "resident_number": (rf"{NOT_DIGIT}(?P<v>{DIGIT}{{6}}{JOIN}[1-8１-８]{DIGIT}{{6}})",),
    # mobile 010/011/016-019, area codes 02 and 031-064, 070 and 080, with or without +82
    "phone": (
        rf"{NOT_DIGIT}(?P<v>(?:[+＋]82{JOIN}{AREA}{JOIN}|[(（][0０]{AREA}[)）]\s*|[0０]{AREA}{JOIN})"
        rf"{DIGIT}{{3,4}}{JOIN}{DIGIT}{{4}})",
    ),
    "email": (r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b",),
    "chart_number": (
        r"(?:등록번호|차트번호|병록번호|진료번호|환자번호|\b(?i:mrn|(?:chart|record|patient)\s*(?:no\.?|number|#|id)))"
        r"\s*[:：#]?\s*(?P<v>[A-Za-z0-9][A-Za-z0-9-]{3,})",
    ),
    "name": (
        rf"(?:{NAME_WORDS})\s*[:：]\s*(?P<v>{HANGUL_NAME})",
        rf"(?:{NAME_WORDS})\s+(?P<v>{HANGUL_NAME})\s*(?:님|씨|[(（]\s*(?:\d|남|여|[MF]\b))",
        r"\b(?i:patient(?:'s)?\s+name|patient|name)\s*[:：]\s*(?P<v>[A-Z][a-z]+(?:[ -][A-Z][a-z]+){0,2})",
        rf"(?:^|[^가-힣])(?P<v>{HANGUL_NAME})\s*(?:환자|보호자)\s*(?:분|님)",  # 김철수 환자분
        rf"(?:^|[^가-힣])(?P<v>[{SURNAMES}][가-힣]{{2}})(?:환자|보호자)",  # 김철수환자
    ),
}
# What stands where a name would but is not one: the classes and their words, placeholders, and English words
# that open a sentence ("Patient: The lesion is red"). A false name makes publish refuse clean text.
NOT_NAMES = frozenset(
    " ".join((
        "건선 아토피 여드름 주사 지루 정상 피부염 습진 지루성 주사비 모낭염 두드러기 백반 홍반 구진 농포 면포 병변",
        "미상 불명 익명 무명 없음 모름 비공개 생략 해당 해당없음 확인불가 기재안함",
        "the a an this that these those it its there no none not unknown anonymous redacted lesion skin patient name",
        "redness erythema mild moderate severe acne psoriasis rosacea eczema atopic dermatitis seborrheic normal",
        "papules pustules plaques scale scales dry oily male female adult child front side left right face cheek",
        "소아과 피부과 입원중 외래 재진 초진 중증도",
    )).split()
)  # fmt: skip
LABELS = {
    "resident_number": "resident registration numbers",
    "phone": "phone numbers",
    "email": "e-mail addresses",
    "chart_number": "chart or record numbers",
    "name": "names",
}
EXAMPLES_PER_KIND = 3


@dataclass(frozen=True)
class Finding:
    kind: str
    start: int
    end: int
    value: str

    @property
    def masked(self) -> str:
        return mask(self.value)


@functools.cache
def compiled() -> list[tuple[str, Any]]:
    return [(kind, linear_regex(pattern)) for kind, patterns in PATTERNS.items() for pattern in patterns]


def find(text: str) -> list[Finding]:
    """Every personal datum in `text`, in order of position; overlaps (a phone inside a chart number) kept once."""
    found = sorted(
        (
            Finding(kind, m.start(group), m.end(group), m.group(group))
            for kind, regex in compiled()
            for m in regex.finditer(text)
            for group in [regex.groupindex.get("v", 0)]
            if not (kind == "name" and not_a_name(m.group(group)))
        ),
        key=lambda f: (f.start, -f.end),
    )
    kept: list[Finding] = []
    for finding in found:
        if not kept or finding.start >= kept[-1].end:
            kept.append(finding)
    return kept


def not_a_name(value: str) -> bool:
    """A class, a clinical word or a placeholder where a name would stand (judged by its first word)."""
    words = value.split()
    return bool(words) and words[0].lower() in NOT_NAMES


def mask(value: str) -> str:
    """What an example may show: separators stay, every letter and digit but the first of each run becomes '*'
    (010-2345-6789 -> 0**-2***-6***, 홍길동 -> 홍**)."""
    out, previous_kept = [], False
    for ch in value:
        if ch.isalnum():
            out.append("*" if previous_kept else ch)
            previous_kept = True
        else:
            out.append(ch)
            previous_kept = False
    return "".join(out)


def mask_all(text: str) -> str:
    """`text` with every personal datum masked: for snippets that audit shows as examples of other problems."""
    for finding in reversed(find(text)):
        text = text[: finding.start] + finding.masked + text[finding.end :]
    return text
