"""eval's result is a type mypy checks (skinvlm/eval_result.py): what eval writes has exactly its keys, and a
misspelt key in code that reads it is a type error."""

from __future__ import annotations

import json
import subprocess
import sys
import typing
from pathlib import Path

from test_eval_serve import run_eval, scripted_answers

from skinvlm.eval_result import EvalResult, Metrics
from skinvlm.testing.openai_server import FakeOpenAI


def test_metrics_json_has_the_keys_of_its_type(cli, ingested: Path) -> None:
    with FakeOpenAI(answer=scripted_answers()) as api:
        printed = run_eval(cli, api, "--name", "typed")
    written = json.loads((ingested / "eval" / "typed" / "metrics.json").read_text(encoding="utf-8"))
    declared = typing.get_type_hints(EvalResult)
    assert set(written) <= set(declared), set(written) - set(declared)
    assert EvalResult.__required_keys__ <= set(written), EvalResult.__required_keys__ - set(written)
    assert set(Metrics.__annotations__) <= set(written) and set(printed) == set(written), "--json is the same object"


def test_a_misspelt_key_of_the_result_is_a_type_error(tmp_path: Path) -> None:
    reader = tmp_path / "reader.py"
    reader.write_text(
        "from skinvlm.eval_result import EvalResult\n\n\n"
        "def headline(result: EvalResult) -> str:\n"
        "    return f\"{result['acuracy']:.3f} of {result['n']}\"\n"
    )
    checked = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", str(reader)], capture_output=True,
                             text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert checked.returncode == 1 and '"EvalResult" has no key "acuracy"' in checked.stdout, checked.stdout
