"""`skinvlm doctor` on this CPU machine: it reports, never leaks a key, and exits 1 only for what is needed."""

from __future__ import annotations

import json

from conftest import fake_secret

SECRET = fake_secret("sk-", "doctor-test-SECRET")


def test_doctor_reports_a_cpu_machine_without_failing(cli) -> None:
    result = cli("doctor", "--json", env={"OPENAI_API_KEY": SECRET})
    report = json.loads(result.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["ok"] is True and result.exit_code == 0
    assert checks["Python"]["ok"] and checks["backend hf"]["detail"] == "runs here on the CPU"
    assert checks["backend unsloth"]["ok"] is False and "needs CUDA" in checks["backend unsloth"]["detail"]
    assert checks["CUDA GPUs"]["detail"].startswith("0 visible") and checks["CUDA GPUs"]["needed"] is False
    for name in ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "unsloth", "vllm", "disk"):
        assert name in checks
    assert checks["OpenAI key"] == {"name": "OpenAI key", "ok": True, "detail": "set", "needed": False}
    assert SECRET not in result.stdout + result.stderr
    table = cli("doctor", env={"OPENAI_API_KEY": SECRET}).stdout
    assert "backend hf" in table and "ready" in table and SECRET not in table


def test_doctor_with_gpu_needs_cuda_and_says_so(cli) -> None:
    result = cli("doctor", "--gpu", "0", "--json", ok=False)
    report = json.loads(result.stdout)
    cuda = next(c for c in report["checks"] if c["name"] == "CUDA GPUs")
    assert result.exit_code == 1 and report["ok"] is False
    assert cuda == {"name": "CUDA GPUs", "ok": False, "detail": "0 visible, 1 asked for", "needed": True}
