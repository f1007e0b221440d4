"""The rule file: the shipped default loads, and every mistake names its file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from skinvlm.errors import SkinvlmError
from skinvlm.rules import default_rules_path, load_rules, resolve_rules_path


def test_shipped_rule_file_is_complete() -> None:
    rules = load_rules(default_rules_path())
    assert rules.class_names == ["건선", "아토피", "여드름", "주사", "지루", "정상"]
    assert all(c.english and c.features and c.template for c in rules.classes)
    for variant in ("아토피 피부염", "아토피성 피부염", "지루 피부염", "지루성 피부염"):
        assert rules.canonical(variant) in rules.class_names
    for word, korean in {
        "erythema": "홍반",
        "papule": "구진",
        "pustule": "농포",
        "comedone": "면포",
        "scale": "인설",
        "telangiectasia": "모세혈관 확장",
        "lichenification": "태선화",
        "plaque": "판",
        "lesion": "병변",
    }.items():
        assert rules.terms[word] == korean
    assert rules.rewrites and all(r.regex for r in rules.rewrites)
    assert rules.views == {"정면": "front", "측면": "side"}


def test_canonical_accepts_classes_aliases_and_english() -> None:
    rules = load_rules(default_rules_path())
    assert rules.canonical(" 지루성  피부염 ") == "지루"
    assert rules.canonical("Rosacea") == "주사"
    assert rules.canonical("무좀") is None and rules.canonical(None) is None


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.toml"
    path.write_text(text, encoding="utf-8")
    return path


BASE = """
[labels.classes."건선"]
english = "psoriasis"
[labels.classes."정상"]
english = "normal"
[views]
"정면" = "front"
"""


def test_alias_to_a_missing_class_names_table_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + '[labels.aliases]\n"지루성 피부염" = "지루성"\n')
    with pytest.raises(SkinvlmError) as caught:
        load_rules(path)
    assert str(path) in str(caught.value)
    assert "[labels.aliases] '지루성 피부염' maps to '지루성', which is not a class" in str(caught.value)


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    text = BASE + '[audit]\nmin_summary_chars = "long"\ncolour = 1\n[[rewrite]]\npattern = "("\nreplace = ""\n'
    with pytest.raises(SkinvlmError) as caught:
        load_rules(write(tmp_path, text + "[extra]\n"))
    message = str(caught.value)
    for part in ("unknown key 'extra'", "unknown key 'colour'", "'min_summary_chars' must be", "(line 11)"):
        assert part in message
    assert "'(' is not a linear-time (RE2) regex: missing )" in message
    assert "\n" not in message


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SkinvlmError, match="not valid TOML"):
        load_rules(write(tmp_path, "[labels\n"))
    with pytest.raises(SkinvlmError, match="does not exist"):
        load_rules(tmp_path / "missing.toml")


def test_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_rules_path(None, tmp_path) == default_rules_path()
    (tmp_path / "postprocess.toml").write_text(BASE)
    assert resolve_rules_path(None, tmp_path) == tmp_path / "postprocess.toml"
    monkeypatch.setenv("SKINVLM_RULES", "/env/rules.toml")
    assert resolve_rules_path(None, tmp_path) == Path("/env/rules.toml")
    assert resolve_rules_path(Path("/flag.toml"), tmp_path) == Path("/flag.toml")


def test_cli_reports_a_bad_workspace_rule_file(cli, workspace: Path, clean_tree: Path) -> None:
    (workspace / "postprocess.toml").write_text(BASE + '[labels.aliases]\n"x" = "y"\n', encoding="utf-8")
    result = cli("ingest", clean_tree, ok=False)
    assert result.exit_code == 1 and "'x' maps to 'y', which is not a class" in result.stderr


def test_a_rewrite_that_would_backtrack_forever_runs_in_linear_time_or_is_refused(tmp_path: Path) -> None:
    """Python's re takes minutes on (a+)+$ against 35 a's and a b; RE2 takes microseconds."""
    from collections import Counter

    from skinvlm.fix import fix_text

    rules = load_rules(write(tmp_path, BASE + '[[rewrite]]\npattern = "(a+)+$"\nreplace = "에이"\n'))
    assert fix_text("a" * 35 + "b", rules, None, Counter()) == "a" * 35 + "b"
    assert fix_text("a" * 35, rules, None, Counter()) == "에이", "Korean replacements come back intact"
    lookaround = write(tmp_path, BASE + '[[rewrite]]\npattern = "(?<=홍)반"\nreplace = ""\n')
    with pytest.raises(SkinvlmError, match=r"\[rewrite #1\] \(line 8\) .* invalid perl operator"):
        load_rules(lookaround)
