"""Subgroups: `ingest --metadata CSV` keeps who each photo is (by path or by patient), eval breaks its figures
down by them with intervals and the worst group, and bad CSVs are refused in one line with nothing written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from conftest import error_line
from datasets import load_from_disk
from test_eval_serve import run_eval
from test_leakage import PATTERN, every_byte, leaky_tree

from skinvlm import publish
from skinvlm.demo.synthetic import colour_label, write_tree
from skinvlm.testing.openai_server import FakeOpenAI, mean_colour

DARK = ("건선", "아토피")  # the classes this test's CSV calls Fitzpatrick V-VI


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as out:
        csv.writer(out).writerows([header, *rows])
    return path


def skin_types(src: Path) -> Path:
    """Every photo's skin type by its class; three held-out photos with a sex the CSV gives (too few to say
    anything)."""
    photos = sorted(p.relative_to(src).as_posix() for p in src.rglob("*.png"))
    held = [p for p in photos if p.startswith("Validation/")][:3]
    rows = [[p, "V-VI" if any(f"_{c}_" in p for c in DARK) else "I-IV", "X" if p in held else ""] for p in photos]
    return write_csv(src.parent / "who.csv", ["path", "fitzpatrick", "sex"], rows)


def wrong_on_psoriasis(body: dict) -> str:
    label = colour_label(mean_colour(body))
    said = "지루" if label == "건선" else label
    return f"<label>{said}</label>\n<summary>테스트 소견입니다.</summary>"


def test_eval_reports_each_subgroup_with_its_interval_and_the_worst_against_the_rest(cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, {"train": 1, "test": 5}, size=32)  # 60 held-out photos: 20 of V-VI, 40 of I-IV
    ingested = cli.json("ingest", src, "--metadata", skin_types(src))
    assert ingested["subgroups"] == {"attributes": ["fitzpatrick", "sex"], "keyed_by": "path", "photos_with": 72,
                                     "photos_without": 0, "rows": 72}  # fmt: skip
    with FakeOpenAI(answer=wrong_on_psoriasis) as server:
        result = run_eval(cli, server, "--name", "by-skin")
    skin = result["subgroups"]["fitzpatrick"]
    dark, light = skin["groups"]["V-VI"], skin["groups"]["I-IV"]
    assert (dark["n"], dark["accuracy"], light["n"], light["accuracy"]) == (20, 0.5, 40, 1.0)
    assert dark["interval"][0] < 0.5 < dark["interval"][1] and light["interval"][1] == 1.0
    assert skin["worst"] == "V-VI" and skin["rest"]["accuracy"] == 1.0 and skin["unknown"] == 0
    sex = result["subgroups"]["sex"]
    x = sex["groups"]["X"]
    assert x["too_small"] and x["accuracy"] is None and sex["worst"] is None and sex["unknown"] == 60 - x["n"]
    run = tmp_path / "ws" / "eval" / "by-skin"
    report = (run / "report.md").read_text(encoding="utf-8")
    assert "fitzpatrick: I-IV 1.000" in report and "V-VI 0.500" in report and "worst V-VI" in report
    assert "too few to say anything" in report
    html = (run / "report.html").read_text(encoding="utf-8")
    assert 'id="subgroups"' in html and "V-VI (worst)" in html
    rows = {row["item"]: row for row in result["checklist"]}
    assert "fitzpatrick: I-IV" in rows["Subgroups"]["detail"]
    assert "subgroups" not in publish.PUBLISHED_COLUMNS, "who the photos are never leaves with the dataset"


def test_a_patient_keyed_csv_is_matched_by_the_ids_hash_and_no_raw_id_is_kept(cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    leaky_tree(src)
    ids = sorted({p.name.split("_")[0] for p in src.rglob("PT*")})
    table = write_csv(tmp_path / "who.csv", ["patient", "age_band"], [[i, "60+" if n % 2 else "20-39"]
                                                                      for n, i in enumerate(ids)])  # fmt: skip
    ingested = cli.json("ingest", src, "--patient-pattern", PATTERN, "--metadata", table)
    assert ingested["subgroups"]["keyed_by"] == "patient" and ingested["subgroups"]["photos_without"] == 0
    data = load_from_disk(str(tmp_path / "ws" / "datasets" / "ingested"))
    bands = {json.loads(s)["age_band"] for split in data.values() for s in split["subgroups"]}
    assert bands == {"60+", "20-39"}
    stored = every_byte(tmp_path / "ws")
    assert not [i for i in ids if i.encode() in stored], "a patient id in the CSV is kept only as its hash"


def test_bad_metadata_is_refused_in_one_line_and_nothing_is_written(cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, {"train": 1, "test": 1}, size=32)
    first = sorted(p.relative_to(src).as_posix() for p in src.rglob("*.png"))[0]
    cases = {
        "no key": (["file", "sex"], [[first, "F"]], "one key column, path or patient"),
        "doubled": (["path", "sex"], [[first, "F"], [first, "M"]], "row 3 names the same path as an earlier row"),
        "bad name": (["path", "Skin Type"], [[first, "IV"]], "attribute names are lower-case"),
        "long value": (["path", "sex"], [[first, "x" * 41]], "row 2: sex must be a short category"),
        "no photo": (["path", "sex"], [["elsewhere/a.png", "F"]], "names none of the 24 photos"),
        "patient without pattern": (["patient", "sex"], [["PT1", "F"]], "give --patient-pattern too"),
    }
    for name, (header, rows, said) in cases.items():
        table = write_csv(tmp_path / f"{name}.csv", header, rows)
        refused = cli("ingest", src, "--metadata", table, ok=False)
        line = error_line(refused.stderr)
        assert refused.exit_code == 1 and said in line, (name, line)
        assert "x" * 41 not in line, "a row's values are never quoted"
        assert not (tmp_path / "ws" / "datasets" / "ingested").exists(), name
    missing = cli("ingest", src, "--metadata", tmp_path / "nope.csv", ok=False)
    assert missing.exit_code == 1 and "cannot be read" in error_line(missing.stderr)
