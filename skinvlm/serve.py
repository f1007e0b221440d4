"""`skinvlm serve`: vLLM's OpenAI-compatible server on models/merged, on the GPU.

The command always carries --max-model-len and --limit-mm-per-prompt, and passes the image
resolution recorded at training time as --mm-processor-kwargs (from `vlm.pixel_bounds`, as the
processors of train and eval), so serving sees images as training did. `--gpu 0,1` serves with
tensor parallelism over both unless --tensor-parallel-size says otherwise. `--print-command`
prints the command and exits (no GPU needed). SKINVLM_VLLM_BIN replaces the `vllm` executable (a
stand-in server in tests, or a vllm in another virtual environment).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from skinvlm import devices
from skinvlm.config import check_choice, check_seconds
from skinvlm.errors import SkinvlmError
from skinvlm.vlm import pixel_bounds, read_settings


class Dtype(StrEnum):
    auto = "auto"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


@dataclass
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    gpu: str | None = None
    dtype: str = "auto"
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int | None = None  # default: one per --gpu id
    served_model_name: str = "skinvlm"
    limit_mm_per_prompt: str = '{"image":1}'
    generation_config_vllm: bool = False
    startup_timeout: float = 900.0


def executable() -> list[str]:
    return shlex.split(os.environ.get("SKINVLM_VLLM_BIN", "vllm"))


def build_command(model: Path, s: ServeSettings) -> list[str]:
    check_choice("--dtype", s.dtype, Dtype)
    if not 0 < s.port < 65536:
        raise SkinvlmError(f"--port must be 1-65535, not {s.port}")
    if s.max_model_len < 256:
        raise SkinvlmError(
            f"--max-model-len must be at least 256 tokens (an image alone takes up to 1,024), not {s.max_model_len}"
        )
    check_seconds("--startup-timeout", s.startup_timeout)
    if s.tensor_parallel_size is not None and s.tensor_parallel_size < 1:
        raise SkinvlmError(f"--tensor-parallel-size must be at least 1, not {s.tensor_parallel_size}")
    if not 0 < s.gpu_memory_utilization <= 1:
        raise SkinvlmError(f"--gpu-memory-utilization is a share of the GPU in (0, 1], not {s.gpu_memory_utilization}")
    try:
        limits = json.loads(s.limit_mm_per_prompt)
    except json.JSONDecodeError:
        raise SkinvlmError(
            f"--limit-mm-per-prompt must be JSON like '{{\"image\":1}}', got {s.limit_mm_per_prompt!r}"
        ) from None
    command = [
        *executable(),
        "serve",
        str(model),
        "--host",
        s.host,
        "--port",
        str(s.port),
        "--served-model-name",
        s.served_model_name,
        "--dtype",
        s.dtype,
        "--max-model-len",
        str(s.max_model_len),
        "--gpu-memory-utilization",
        str(s.gpu_memory_utilization),
        "--tensor-parallel-size",
        str(s.tensor_parallel_size or max(1, len(devices.gpu_ids(s.gpu)))),
        "--limit-mm-per-prompt",
        json.dumps(limits, separators=(",", ":")),
    ]
    max_pixels = read_settings(model).get("max_pixels")
    if max_pixels:
        command += ["--mm-processor-kwargs", json.dumps(pixel_bounds(max_pixels), separators=(",", ":"))]
    if s.generation_config_vllm:
        command += ["--generation-config", "vllm"]
    return command


def check_model(model: Path) -> None:
    if not (model / "config.json").exists():
        raise SkinvlmError(
            f"{model} holds no model (config.json missing): run `skinvlm merge` first or pass --model-dir"
        )


def check_runtime() -> None:
    """Only for the real vllm: it needs the package and a CUDA GPU."""
    if "SKINVLM_VLLM_BIN" in os.environ:
        return
    if importlib.util.find_spec("vllm") is None or shutil.which("vllm") is None:
        raise SkinvlmError(
            "vllm is not installed: on a CUDA machine run `pip install -c constraints-gpu.txt -e "
            ".[serve]`; on this machine `skinvlm eval --model-dir models/merged` evaluates on the CPU"
        )
    if shutil.which("nvidia-smi") is None:
        raise SkinvlmError(
            "vllm needs a CUDA GPU and none is visible here; `skinvlm eval --model-dir models/merged` "
            "evaluates on the CPU"
        )


def wait_healthy(process: subprocess.Popen[bytes], url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SkinvlmError(f"the server exited with code {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    stop(process)
    raise SkinvlmError(f"the server did not answer {url} within {timeout:.0f}s")


def stop(process: subprocess.Popen[bytes]) -> None:
    """vLLM and every process it started (its engine cores, workers under tensor parallelism): they share the
    process group `start` gave it. SIGINT first, as vLLM shuts down cleanly on it; SIGKILL after 30 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)
        os.killpg(process.pid, signal.SIGKILL)  # whatever of the group is left, the server's own children too
    process.wait()


def start(model: Path, s: ServeSettings) -> tuple[subprocess.Popen[bytes], str]:
    check_model(model)
    check_runtime()
    command = build_command(model, s)
    # Its own session and process group: a terminal's Ctrl-C or a signal to serve alone reaches serve, which
    # stops the whole group; vLLM never outlives serve holding the GPU and the port.
    process = subprocess.Popen(command, env=os.environ | launch_env(s), start_new_session=True)
    try:
        wait_healthy(process, endpoint(s).removesuffix("/v1") + "/health", s.startup_timeout)
    except BaseException:
        stop(process)
        raise
    return process, endpoint(s)


def launch_env(s: ServeSettings) -> dict[str, str]:
    """What the server's environment adds: --gpu pins the GPUs it sees."""
    return {} if s.gpu is None else {"CUDA_VISIBLE_DEVICES": ",".join(devices.gpu_ids(s.gpu))}


def endpoint(s: ServeSettings) -> str:
    return f"http://{s.host}:{s.port}/v1"


def printed_command(model: Path, s: ServeSettings) -> dict[str, Any]:
    """`serve --print-command --json`: what `serve` would run, for a launcher of one's own."""
    command = build_command(model, s)
    env = launch_env(s)
    shell = " ".join([*(f"{k}={v}" for k, v in env.items()), shlex.join(command)])
    return {"command": command, "env": env, "shell": shell, "endpoint": endpoint(s), "model": s.served_model_name}


def curl_example(endpoint: str, name: str) -> str:
    body = {
        "model": name,
        "max_tokens": 256,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "https://example.com/face.jpg"}},
                    {"type": "text", "text": "이 얼굴 피부 사진의 질환을 <label>과 <summary>로 답하세요."},
                ],
            }
        ],
    }
    return (
        f"curl {endpoint}/chat/completions -H 'Content-Type: application/json' "
        f"-d '{json.dumps(body, ensure_ascii=False)}'"
    )
