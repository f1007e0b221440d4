"""The rule file (``postprocess.toml``): classes, label aliases, term and rewrite rules, audit settings.

Resolution order: ``--rules FILE``, then ``$SKINVLM_RULES``, then ``<workspace>/postprocess.toml``,
then the default shipped inside the package (the repository's top-level ``postprocess.toml``).
Every problem in a file is reported at once, each naming its table and key.
"""

from __future__ import annotations

import os
import re
import tomllib
import unicodedata
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

from skinvlm.errors import SkinvlmError, read_user_text

RULES_FILENAME = "postprocess.toml"


@dataclass(frozen=True)
class ClassInfo:
    name: str
    english: str
    features: str = ""
    template: str = ""
    template_label: str = ""  # the tag the template answer writes; default: the class name


def linear_regex(pattern: str) -> Any:
    """A [[rewrite]] pattern compiled by RE2, which runs in time linear in the text: a rule like
    `(a+)+$` cannot hang `fix`. RE2 has no lookaround or backreferences (such patterns are refused
    at load), and its \\w and \\b are ASCII: write [가-힣] for Hangul."""
    import re2

    options = re2.Options()
    options.log_errors = False  # a refused pattern is reported once, as a rule-file problem
    return re2.compile(pattern, options)


@dataclass(frozen=True)
class Rewrite:
    pattern: str
    replace: str
    note: str = ""

    @cached_property
    def regex(self) -> Any:
        return linear_regex(self.pattern)

    def apply(self, text: str) -> tuple[str, int]:
        # google-re2 expands the replacement through unicode_escape, which garbles non-ASCII text;
        # given as ASCII escapes, Korean comes back intact (backslashes and \\1 are unaffected).
        return self.regex.subn(self.replace.encode("ascii", "backslashreplace").decode("ascii"), text)


@dataclass(frozen=True)
class AuditRules:
    allow: tuple[str, ...] = ()
    min_summary_chars: int = 40
    repeated_summary_min: int = 3
    near_duplicate_distance: int = 8  # perceptual-hash bits two photos may differ by and still be one photo


@dataclass(frozen=True)
class PatientRules:
    pattern: str | None = None  # RE2 with a group `patient`, searched in each photo's path relative to SRC


@dataclass(frozen=True)
class Rules:
    path: Path
    classes: tuple[ClassInfo, ...]
    unreadable: str = "진단불가"
    aliases: dict[str, str] = field(default_factory=dict)
    views: dict[str, str] = field(default_factory=dict)
    terms: dict[str, str] = field(default_factory=dict)
    rewrites: tuple[Rewrite, ...] = ()
    audit: AuditRules = AuditRules()
    patients: PatientRules = PatientRules()
    external_labels: dict[str, str] = field(default_factory=dict)  # [external.labels]: another set's class -> ours
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)  # [labels.groups]: related classes (GRPO credit)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def english(self, name: str) -> str:
        return next((c.english for c in self.classes if c.name == name), name)

    def same_group(self, one: str, other: str) -> bool:
        return any(one in members and other in members for members in self.groups.values())

    def canonical(self, raw: str | None) -> str | None:
        """Map a written label (a class, an alias or an English name) to its class, else None."""
        if raw is None:
            return None
        text = " ".join(nfc(raw).split())
        if text in self.class_names:
            return text
        if text in self.aliases:
            return self.aliases[text]
        lowered = text.lower()
        return next((c.name for c in self.classes if c.english.lower() == lowered), None)


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def shipped_file(name: str) -> Path:
    """A top-level repository file that the wheel carries inside the package (see pyproject's force-include)."""
    shipped = resources.files("skinvlm") / name
    if shipped.is_file():
        return Path(str(shipped))
    # An editable install runs from the source tree, where the file sits beside the package.
    return Path(__file__).resolve().parent.parent / name


def default_rules_path() -> Path:
    return shipped_file(RULES_FILENAME)


def resolve_rules_path(explicit: Path | None, workspace_root: Path) -> Path:
    if explicit:
        return explicit
    if os.environ.get("SKINVLM_RULES"):
        return Path(os.environ["SKINVLM_RULES"])
    local = workspace_root / RULES_FILENAME
    return local if local.exists() else default_rules_path()


def load_rules(path: Path) -> Rules:
    text = read_user_text(path, "rule file")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise SkinvlmError(f"rule file {path} is not valid TOML: {err}") from None
    problems: list[str] = []
    rewrite_lines = [n for n, line in enumerate(text.splitlines(), start=1) if line.strip().startswith("[[rewrite]]")]
    rules = _parse(path, raw, problems, rewrite_lines)
    if problems:
        raise SkinvlmError(f"{path}: " + "; ".join(problems))
    return rules


def _unknown(table: str, data: dict[str, Any], allowed: set[str], problems: list[str]) -> None:
    for key in data:
        if key not in allowed:
            problems.append(f"[{table}] unknown key '{key}' (expected one of: {', '.join(sorted(allowed))})")


def _table(data: dict[str, Any], key: str, where: str, problems: list[str]) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        problems.append(f"[{where}] '{key}' must be a table")
        return {}
    return value


def _string_map(data: dict[str, Any], where: str, problems: list[str]) -> dict[str, str]:
    out = {}
    for key, value in data.items():
        if not isinstance(value, str) or not value.strip():
            problems.append(f"[{where}] '{key}' must map to a non-empty string")
        else:
            out[nfc(key).strip()] = nfc(value).strip()
    return out


def _pairs(items: Any, name: str, keys: tuple[str, str], problems: list[str]) -> dict[str, str]:
    """`[[term]]` (english, korean) and `[[alias]]` (tag, class) entries: the same rules as [terms] and
    [labels.aliases], in a form that may be appended to a file any number of times (a TOML table may be declared
    only once, so `audit --suggest >> postprocess.toml` writes these)."""
    if not isinstance(items, list):
        problems.append(f"[[{name}]] must be an array of tables")
        return {}
    table: dict[str, str] = {}
    for number, item in enumerate(items, start=1):
        if not isinstance(item, dict) or set(item) - {*keys, "note"}:
            problems.append(f"[[{name}]] #{number} takes {keys[0]} and {keys[1]} (and a note)")
            continue
        table |= _string_map({str(item.get(keys[0], "")): item.get(keys[1])}, f"{name} #{number}", problems)
    return table


def _parse(path: Path, raw: dict[str, Any], problems: list[str], rewrite_lines: list[int]) -> Rules:
    tables = {"labels", "views", "terms", "rewrite", "audit", "term", "alias", "patients", "external"}
    _unknown("top level", raw, tables, problems)
    labels = _table(raw, "labels", "labels", problems)
    _unknown("labels", labels, {"classes", "aliases", "unreadable", "groups"}, problems)
    classes = _parse_classes(_table(labels, "classes", "labels", problems), problems)
    names = {c.name for c in classes}
    aliases = _string_map(_table(labels, "aliases", "labels", problems), "labels.aliases", problems)
    aliases |= _pairs(raw.get("alias", []), "alias", ("tag", "class"), problems)
    for alias, target in aliases.items():
        if target not in names:
            problems.append(f"[labels.aliases] '{alias}' maps to '{target}', which is not a class")
    unreadable = labels.get("unreadable", "진단불가")
    if not isinstance(unreadable, str) or not unreadable:
        problems.append("[labels] 'unreadable' must be a non-empty string")
        unreadable = "진단불가"
    views = _string_map(_table(raw, "views", "top level", problems), "views", problems)
    if not views:
        problems.append('[views] must name at least one view, e.g. 정면 = "front"')
    terms = _string_map(_table(raw, "terms", "top level", problems), "terms", problems)
    terms |= _pairs(raw.get("term", []), "term", ("english", "korean"), problems)
    return Rules(
        path=path,
        classes=tuple(classes),
        unreadable=nfc(unreadable),
        aliases=aliases,
        views=views,
        terms={k.lower(): v for k, v in terms.items()},
        rewrites=_parse_rewrites(raw.get("rewrite", []), problems, rewrite_lines),
        audit=_parse_audit(_table(raw, "audit", "top level", problems), problems),
        patients=_parse_patients(_table(raw, "patients", "top level", problems), problems),
        external_labels=_parse_external(_table(raw, "external", "top level", problems), names, problems),
        groups=_parse_groups(_table(labels, "groups", "labels", problems), names, problems),
    )


def _parse_groups(table: dict[str, Any], names: set[str], problems: list[str]) -> dict[str, tuple[str, ...]]:
    """[labels.groups]: name = [classes], two classes at least, each a class."""
    groups = {}
    for name, members in table.items():
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members) or len(set(members)) < 2:
            problems.append(f'[labels.groups] \'{name}\' must list two classes at least, e.g. ["아토피", "지루"]')
            continue
        unknown = [m for m in members if nfc(m).strip() not in names]
        if unknown:
            problems.append(f"[labels.groups] '{name}' names {', '.join(unknown)}, which is not a class")
            continue
        groups[name] = tuple(nfc(m).strip() for m in members)
    return groups


def _parse_classes(table: dict[str, Any], problems: list[str]) -> list[ClassInfo]:
    classes = []
    for name, spec in table.items():
        where = f"labels.classes.{name}"
        if not isinstance(spec, dict):
            problems.append(f'[{where}] must be a table with at least english = "..."')
            continue
        keys = ("english", "features", "template", "template_label")
        _unknown(where, spec, set(keys), problems)
        values = {k: spec.get(k, "") for k in keys}
        bad = [k for k, v in values.items() if not isinstance(v, str)]
        problems.extend(f"[{where}] '{k}' must be a string" for k in bad)
        if not values["english"]:
            problems.append(f"[{where}] 'english' is required")
        if not bad:
            classes.append(ClassInfo(nfc(name).strip(), **{k: v.strip() for k, v in values.items()}))
    if len(table) < 2:
        problems.append("[labels.classes] must define at least two classes")
    return classes


MAX_REPLACEMENT_CHARS = 500  # a phrase, not a document: every match in every answer becomes this


def replacement_problem(replace: str, groups: int) -> str | None:
    """What is wrong with a [[rewrite]] replacement, found when the rules load rather than midway through fix."""
    if len(replace) > MAX_REPLACEMENT_CHARS:
        return f"is {len(replace):,} characters long; at most {MAX_REPLACEMENT_CHARS} are allowed"
    referenced = [int(n) for n in re.findall(r"(?<!\\)\\(\d)", replace)]
    if referenced and max(referenced) > groups:
        return f"refers to group \\{max(referenced)}, but the pattern has {groups} group(s)"
    return None


def _parse_rewrites(items: Any, problems: list[str], lines: list[int]) -> tuple[Rewrite, ...]:
    """`lines`: where each [[rewrite]] table starts in the file, for the messages."""
    if not isinstance(items, list):
        problems.append("[[rewrite]] must be an array of tables")
        return ()
    rewrites = []
    for number, item in enumerate(items, start=1):
        where = f"rewrite #{number}"
        if not isinstance(item, dict):
            problems.append(f"[{where}] must be a table")
            continue
        _unknown(where, item, {"pattern", "replace", "note"}, problems)
        pattern, replace = item.get("pattern"), item.get("replace")
        if not isinstance(pattern, str) or not pattern or not isinstance(replace, str):
            problems.append(f"[{where}] needs a non-empty 'pattern' and a string 'replace'")
            continue
        line = f" (line {lines[number - 1]})" if number <= len(lines) else ""
        try:
            groups = linear_regex(pattern).groups
        except Exception as err:  # noqa: BLE001 - re2.error, or a TypeError for odd input
            reason = err.args[0].decode() if err.args and isinstance(err.args[0], bytes) else str(err)
            problems.append(f"[{where}]{line} 'pattern' {pattern!r} is not a linear-time (RE2) regex: {reason}")
            continue
        if problem := replacement_problem(replace, groups):
            problems.append(f"[{where}]{line} 'replace' {problem}")
            continue
        rewrites.append(Rewrite(nfc(pattern), nfc(replace), str(item.get("note", ""))))
    return tuple(rewrites)


def _parse_audit(table: dict[str, Any], problems: list[str]) -> AuditRules:
    known = {"allow", "min_summary_chars", "repeated_summary_min", "near_duplicate_distance"}
    _unknown("audit", table, known, problems)
    allow = table.get("allow", [])
    if not isinstance(allow, list) or not all(isinstance(w, str) for w in allow):
        problems.append("[audit] 'allow' must be a list of words")
        allow = []
    numbers = {}
    for key, default in (("min_summary_chars", 40), ("repeated_summary_min", 3), ("near_duplicate_distance", 8)):
        value = table.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            problems.append(f"[audit] '{key}' must be a whole number >= 0")
            value = default
        numbers[key] = value
    return AuditRules(allow=tuple(w.lower() for w in allow), **numbers)


def _parse_external(table: dict[str, Any], names: set[str], problems: list[str]) -> dict[str, str]:
    _unknown("external", table, {"labels"}, problems)
    labels = _string_map(_table(table, "labels", "external", problems), "external.labels", problems)
    for theirs, ours in labels.items():
        if ours not in names:
            problems.append(f"[external.labels] '{theirs}' maps to '{ours}', which is not a class")
    return labels


def _parse_patients(table: dict[str, Any], problems: list[str]) -> PatientRules:
    _unknown("patients", table, {"pattern"}, problems)
    pattern = table.get("pattern")
    if pattern is None:
        return PatientRules()
    if problem := patient_pattern_problem(pattern):
        problems.append(f"[patients] 'pattern' {problem}")
        return PatientRules()
    return PatientRules(pattern)


def patient_pattern_problem(pattern: Any) -> str | None:
    """Why a patient pattern cannot be used, or None: RE2 (linear time), with a group named `patient`."""
    if not isinstance(pattern, str) or not pattern:
        return "must be a non-empty string"
    try:
        compiled = linear_regex(pattern)
    except Exception as err:  # noqa: BLE001 - RE2's error types differ between its Python bindings
        return f"is not a valid RE2 pattern ({str(err).splitlines()[0][:80]})"
    if "patient" not in compiled.groupindex:
        return "needs a named group (?P<patient>...) around the patient id"
    if len(re.findall(r"\(\?P?<patient>", pattern)) > 1:
        return "has more than one group named patient: name one group (?P<patient>...), the whole id"
    return None
