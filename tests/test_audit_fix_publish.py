"""audit, fix and publish on described datasets built directly, with known defects and known counts."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict, load_from_disk

from skinvlm.rules import default_rules_path

LONG = "병변 주변의 피부결과 색조 변화가 사진 전체에서 관찰되며 분포 양상이 진단과 일치합니다"


def answer(tag: str, summary: str) -> str:
    return f"<label>{tag}</label>\n<summary>{summary}</summary>"


def write_described(workspace: Path) -> None:
    """Every ingested record gets an output; the defects below are placed on known records."""
    ingested = load_from_disk(str(workspace / "datasets" / "ingested"))
    seen: dict[str, int] = {}
    splits = {}
    for split, ds in ingested.items():
        rows: dict[str, list] = {
            c: []
            for c in ("id", "output", "status", "model", "attempts", "prompt_tokens", "completion_tokens", "error")
        }
        for rid, label in zip(ds["id"], ds["label"], strict=True):
            n = seen[label] = seen.get(label, 0) + 1
            uid = f"{'가' if split == 'train' else '나'} {label} {n}"  # keeps summaries unique without Latin letters
            output, status = answer(label, f"{LONG} ({uid})"), "ok"
            if label == "건선" and n <= 5:
                output = answer(label, f"Erythema가 보이고 {LONG} ({uid})")  # 5 x erythema
            elif label == "건선" and n <= 7:
                output = answer("아토피", f"{LONG} ({uid})")  # 2 true disagreements
            elif label == "아토피" and n <= 3:
                output = answer(label, f"작은 papules이 흩어져 있고 {LONG} ({uid})")  # 3 x papules
            elif label == "아토피" and n <= 5:
                output = answer("아토피 피부염", f"severe 염증이 있고 {LONG} ({uid})")  # 2 x severe, alias
            elif label == "지루" and n <= 4:
                output = answer("지루성 피부염", f"{LONG} ({uid})")  # shipped alias
            elif label == "주사" and n <= 3:
                output = answer("주사성 피부염", f"{LONG} ({uid})")  # alias the shipped file lacks
            elif label == "주사" and n <= 5:
                output = answer(label, f"紅斑이 보이고 {LONG} ({uid})")  # 2 x Han
            elif label == "정상" and n == 1:
                output = answer("진단불가", f"사진이 흐려서 판단할 수 없습니다 {LONG} ({uid})")
            elif label == "정상" and n == 2:
                output, status = "I cannot help with that.", "invalid"
            elif label == "정상" and n == 3:
                output, status = "", "failed"
            rows["id"].append(rid)
            rows["output"].append(output)
            rows["status"].append(status)
            rows["model"].append("gpt-4o-mini")
            for column in ("attempts", "prompt_tokens", "completion_tokens"):
                rows[column].append(1)
            rows["error"].append(None)
        splits[split] = Dataset.from_dict(rows)
    DatasetDict(splits).save_to_disk(str(workspace / "datasets" / "described"))
    (workspace / "datasets" / "described" / "manifest.json").write_text(
        json.dumps({"stage": "describe", "prompt_hash": "abc123", "settings": {"model": "gpt-4o-mini"}})
    )


@pytest.fixture
def described(cli, clean_tree: Path, workspace: Path) -> Path:
    cli("ingest", clean_tree)
    write_described(workspace)
    return workspace


def pairs(report: dict) -> set[tuple[str, str, int]]:
    return {(p["label"], p["tag"], p["count"]) for p in report["mismatch_pairs"]}


def test_audit_counts_every_defect(cli, described: Path) -> None:
    report = cli.json("audit")
    assert report["stage"] == "described" and report["records"] == 48
    malformed = {"cannot": 1, "help": 1, "with": 1, "that": 1}  # the invalid record's words count too
    assert report["english_words"] == {"erythema": 5, "papules": 3, "severe": 2, **malformed}
    assert report["foreign_scripts"] == {"Han": 2}
    assert report["tag_labels"]["지루성 피부염"] == 4 and report["tag_labels"]["아토피 피부염"] == 2
    assert pairs(report) == {("건선", "아토피", 2), ("주사", "주사성 피부염", 3), ("정상", "진단불가", 1)}
    assert report["mismatches"] == 6 and report["disagreements"] == {"건선": 2, "주사": 3, "정상": 1}
    assert report["invalid"] == 1 and report["empty"] == 1 and report["too_short"] == 0
    assert report["problems"] == 5 + 3 + 2 + 2 + 2 + 3 + 1 + 1 + 1
    table = cli("audit").stdout
    assert "erythema" in table and "Han" in table and "주사성 피부염" in table


def test_suggest_is_toml_that_appends_to_the_rule_file(cli, described: Path) -> None:
    text = cli("audit", "--suggest").stdout
    stanzas = tomllib.loads(text)
    # erythema and papules have [terms]; severe has the shipped [[rewrite]]: none is suggested again.
    assert [t["english"] for t in stanzas["term"]] == ["cannot", "help", "with", "that"]
    assert stanzas["alias"] == [{"tag": "주사성 피부염", "class": ""}]
    assert stanzas["rewrite"] == [{"pattern": "紅斑", "replace": "", "note": "Han 紅斑"}], "Han gets a rule too"
    for command in ("describe --redo mismatch", "fix --drop-mismatches", "describe --redo failed,invalid"):
        assert command in text, "what no rule mends is named as the command that does"
    filled = text.replace('korean = ""', 'korean = "번역"').replace('class = ""', 'class = "주사"')
    filled = filled.replace('replace = ""', 'replace = "홍반"')
    rules = described / "postprocess.toml"
    rules.write_text(default_rules_path().read_text(encoding="utf-8") + "\n" + filled + "\n" + filled, "utf-8")
    fixed = cli.json("fix")  # appended twice as the header says: the file still loads, and the rules apply
    assert fixed["hits"]["label: 주사성 피부염 -> 주사"] == 3 and fixed["hits"]["term: cannot"] == 1


def test_suggest_gives_modifiers_a_phrase_rule_and_the_summary_adds_up(cli, described: Path) -> None:
    from skinvlm.audit import audit_rows, suggest
    from skinvlm.rules import load_rules

    rules = load_rules(default_rules_path())
    rows = [{"label": "아토피", "output": "<label>아토피</label>\n<summary>diffuse 홍반과 slightly 붉은 판</summary>"}]
    stanzas = tomllib.loads(suggest(audit_rows("described", rows, rules), rules))
    assert [r["note"] for r in stanzas["rewrite"]] == ["diffuse", "slightly"] and "term" not in stanzas
    report = cli.json("audit")
    assert report["script_records"] == 2 and 0 < report["english_records"] <= report["problems"]
    table = cli("audit").stdout
    assert "English words" in table and "other scripts" in table and "once in the last" in table


def test_audit_of_a_stage_without_text_is_a_usage_error(cli, described: Path) -> None:
    result = cli("audit", "--stage", "ingested", ok=False)
    assert result.exit_code == 2 and "'ingested' is not one of" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_fix_with_matching_rules_leaves_only_true_disagreements(cli, described: Path, workspace: Path) -> None:
    rules = default_rules_path().read_text(encoding="utf-8")
    rules = rules.replace('"딸기코" = "주사"', '"딸기코" = "주사"\n"주사성 피부염" = "주사"')
    rules += '\n[[rewrite]]\npattern = "紅斑"\nreplace = "홍반"\nnote = "Han 紅斑"\n'
    (workspace / "postprocess.toml").write_text(rules, encoding="utf-8")
    result = cli.json("fix")
    assert result["hits"]["term: erythema"] == 5 and result["hits"]["term: papules"] == 3
    assert result["hits"]["rewrite: severe 염증 -> 심한 염증"] == 2
    assert result["hits"]["label: 주사성 피부염 -> 주사"] == 3
    after = cli.json("audit", "--stage", "fixed")
    assert after["english_words"] == {"cannot": 1, "help": 1, "with": 1, "that": 1}, "only the malformed answer"
    assert after["foreign_scripts"] == {}
    assert pairs(after) == {("건선", "아토피", 2), ("정상", "진단불가", 1)}
    assert set(after["tag_labels"]) <= {"건선", "아토피", "여드름", "주사", "지루", "정상", "진단불가"}
    fixed = load_from_disk(str(workspace / "datasets" / "fixed"))
    outputs = [o for split in fixed.values() for o in split["output"]]
    assert any("홍반이 보이고" in o for o in outputs), "the particle agrees with the Korean word: 가 -> 이"
    assert any("심한 염증" in o for o in outputs)
    assert any("구진이 흩어져" in o for o in outputs), "a Hangul particle after the word must not block the term"
    cli("fix")
    again = load_from_disk(str(workspace / "datasets" / "fixed"))
    assert [o for split in again.values() for o in split["output"]] == outputs, "fix twice = fix once"
    assert list(again["train"]["id"]) == list(load_from_disk(str(workspace / "datasets" / "ingested"))["train"]["id"])


def test_fix_dry_run_writes_nothing_and_drop_invalid_drops(cli, described: Path, workspace: Path) -> None:
    preview = cli.json("fix", "--dry-run")
    assert preview["written"] is False and not (workspace / "datasets" / "fixed").exists()
    assert preview["examples"] and "erythema" in preview["examples"][0]["before"].lower()
    assert "erythema" not in preview["examples"][0]["after"].lower()
    dropped = cli.json("fix", "--drop-invalid")
    assert dropped["dropped"] == 2
    from skinvlm.workspace import Workspace

    joined = Workspace.open(workspace).load("fixed")
    assert sum(d.num_rows for d in joined.values()) == 46
    row = joined["train"][0]
    assert row["image"].size == (32, 32) and row["output"].startswith("<label>")


def test_strict_audit_exit_codes(cli, described: Path, workspace: Path) -> None:
    assert cli("audit", "--strict", ok=False).exit_code == 1
    cli("describe", "--template", "--redo", "all")
    assert cli("audit", "--stage", "described", "--strict").exit_code == 0


@pytest.fixture
def clean_fixed(cli, clean_tree: Path) -> None:
    cli("ingest", clean_tree, "--about", "AI Hub 안면부 피부질환 이미지 (test copy)")
    cli("describe", "--template")
    cli("fix")


def test_publish_dry_run_builds_card_and_shards(cli, clean_fixed: None, workspace: Path) -> None:
    result = cli.json("publish", "me/skin-vlm-ko", "--dry-run")
    assert result["uploaded"] is False and result["private"] is True
    folder = workspace / "publish" / "dataset"
    card = (folder / "README.md").read_text(encoding="utf-8")
    for needed in (
        "language:\n- ko",
        "image-text-to-text",
        "size_categories:\n- n<1K",
        "license",
        "| train | 건선 |",
        "Built with skinvlm from: AI Hub 안면부 피부질환 이미지 (test copy).",
        "AI Hub's terms of use",
        "describe --template",
        "path: data/train-*",
    ):
        assert needed in card
    shards = sorted((folder / "data").glob("*.parquet"))
    assert [p.name for p in shards] == ["test-00000-of-00001.parquet", "train-00000-of-00001.parquet"]
    train = Dataset.from_parquet(str(shards[1]))
    assert train.num_rows == 36 and train[0]["image"].size == (32, 32) and "<label>" in train[0]["output"]


def test_publish_uploads_through_the_hub_api(
    cli, clean_fixed: None, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Hub cannot be reached here: HfApi is replaced by a recording double at that boundary."""
    import huggingface_hub

    calls: list[tuple[str, dict]] = []
    monkeypatch.setattr(huggingface_hub.HfApi, "whoami", lambda self: {"name": "me", "orgs": []})
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo, **kw: calls.append((repo, kw)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw)))
    token = "hf_fake-token-for-this-test"
    refused = cli("publish", "me/skin-vlm-ko", ok=False, env={"HF_TOKEN": token})
    assert refused.exit_code == 1 and "--yes" in refused.stderr and not calls
    done = cli("publish", "me/skin-vlm-ko", "--yes", "--json", env={"HF_TOKEN": token})
    assert json.loads(done.stdout)["uploaded"] is True
    assert calls[0] == ("me/skin-vlm-ko", {"repo_type": "dataset", "private": True, "exist_ok": True})
    assert (
        calls[1][1]["folder_path"] == str(workspace / "publish" / "dataset") and calls[1][1]["repo_type"] == "dataset"
    )
    assert token not in done.stdout + done.stderr + (workspace / "publish" / "dataset" / "README.md").read_text()


def test_publish_refuses_a_dataset_that_fails_audit(cli, described: Path) -> None:
    result = cli("publish", "me/x", "--dry-run", "--stage", "described", ok=False)
    assert result.exit_code == 1 and "--ignore-audit" in result.stderr
    assert cli("publish", "me/x", "--dry-run", "--ignore-audit", "--stage", "described").exit_code == 0
    bad = cli("publish", "no-slash", "--dry-run", ok=False)
    assert "OWNER/NAME" in bad.stderr


class HubDouble:
    """Stands in for the Hugging Face Hub, which cannot be reached here: each repo a {path: bytes}, and
    `upload_folder` as documented: remote files matching `delete_patterns` go, then the folder's files land."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.made: dict[str, dict[str, object]] = {}  # repo -> create_repo's keywords (repo_type, private)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> HubDouble:
        import huggingface_hub

        monkeypatch.setattr(huggingface_hub.HfApi, "whoami", lambda api: self.whoami())
        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda api, repo, **kw: self.create_repo(repo, **kw))
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda api, **kw: self.upload_folder(**kw))
        return self

    def whoami(self) -> dict:
        return {"name": "me", "orgs": [{"name": "clinic"}], "auth": {"accessToken": {"role": "write"}}}

    def create_repo(self, repo: str, **kw: object) -> None:
        self.repos.setdefault(repo, {})
        self.made[repo] = kw

    def upload_folder(self, *, folder_path: str, repo_id: str, delete_patterns=None, **kw: object) -> None:
        import fnmatch

        files = self.repos[repo_id]
        for path in [p for p in files if any(fnmatch.fnmatch(p, pattern) for pattern in delete_patterns or [])]:
            del files[path]
        for path in Path(folder_path).rglob("*"):
            if path.is_file():
                files[path.relative_to(folder_path).as_posix()] = path.read_bytes()


def test_a_republish_leaves_exactly_what_it_made(
    cli, described: Path, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = HubDouble().install(monkeypatch)
    env = {"HF_TOKEN": "hf_fake-token-for-this-test"}
    cli("fix")
    cli("publish", "me/exact", "--yes", "--ignore-audit", env=env)
    hub.repos["me/exact"]["data/train-00001-of-00002.parquet"] = b"a shard of an earlier, larger publish"
    cli("fix", "--drop-invalid", "--drop-mismatches")
    cli("publish", "me/exact", "--yes", "--ignore-audit", env=env)
    local = {
        p.relative_to(workspace / "publish" / "dataset").as_posix()
        for p in (workspace / "publish" / "dataset").rglob("*")
        if p.is_file()
    }
    assert set(hub.repos["me/exact"]) == local, "no stale shard stays on the Hub"
    rows = Dataset.from_parquet(
        str(workspace / "publish" / "dataset" / "data" / "train-00000-of-00001.parquet")
    ).num_rows
    assert rows < 36


def test_a_forced_card_says_what_failed_and_links_nothing_fake(cli, described: Path, workspace: Path) -> None:
    cli("publish", "me/forced", "--dry-run", "--ignore-audit", "--stage", "described")
    card = (workspace / "publish" / "dataset" / "README.md").read_text(encoding="utf-8")
    assert "Published with `--ignore-audit` although `skinvlm audit` finds 20 of 48 records with problems" in card
    for line in ("English words (occurrences): 14", "other scripts (records): 2", "another class than the folder: 6"):
        assert line in card
    assert "no record has a problem" not in card and "github.com/)" not in card


def test_particles_agree_with_the_korean_word_after_a_term_swap() -> None:
    from collections import Counter

    from skinvlm.fix import fix_text, term_pattern
    from skinvlm.rules import load_rules

    rules = load_rules(default_rules_path())
    terms = term_pattern(rules)
    cases = {
        # 홍반 ends in a consonant, 면포 in a vowel, 인설 in ㄹ (which takes 로, not 으로)
        "erythema가 보임": "홍반이 보임",
        "erythema는 없음": "홍반은 없음",
        "erythema를 보임": "홍반을 보임",
        "erythema와 구진": "홍반과 구진",
        "erythema로 덮임": "홍반으로 덮임",
        "comedone이 많음": "면포가 많음",
        "comedone은 없음": "면포는 없음",
        "comedone을 짬": "면포를 짬",
        "comedone과 구진": "면포와 구진",
        "comedone으로 막힘": "면포로 막힘",
        "scale으로 덮임": "인설로 덮임",
        "scale과 홍반": "인설과 홍반",
        "erythema 와 구진": "홍반과 구진",  # one space away, as mixed-script text often has it
        "erythema 이 부위": "홍반 이 부위",  # a lone 이 after a space is "this", not a particle
        "scale 이 보입니다": "인설이 보입니다",  # ... unless a predicate follows: then it is the subject's particle
        "comedone 이 있고": "면포가 있고",
        "erythema, 구진": "홍반, 구진",
    }
    for before, after in cases.items():
        assert fix_text(before, rules, terms, Counter()) == after, before


def test_suggest_never_says_no_problem_when_the_audit_counts_some() -> None:
    from skinvlm.audit import audit_rows, suggest
    from skinvlm.rules import load_rules

    rules = load_rules(default_rules_path())
    translated = "<label>아토피</label>\n<summary>erythema 가 보이는 건조한 판이 양 볼에 있습니다.</summary>"
    reused = [{"label": "아토피", "output": translated, "status": "ok"}] * 3
    text = suggest(audit_rows("described", reused, rules), rules)
    assert "no problem" not in text and "already have a rule in your rule file: `skinvlm fix`" in text, text
    cut = [{"label": "아토피", "output": "<label>아토피</label>\n<summary>건조한 판이 보입니다.</summary>",
            "status": "length"}]  # fmt: skip
    text = suggest(audit_rows("described", cut, rules), rules)
    assert "no problem" not in text and "1 failed records" in text, text
