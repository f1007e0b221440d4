"""`skinvlm serve`: vLLM's OpenAI-compatible server on models/merged, on the GPU.

The command always carries --max-model-len and --limit-mm-per-prompt, and passes the image
resolution recorded at training time as --mm-processor-kwargs (from `vlm.pixel_bounds`, as the
processors of train and eval), so serving sees images as training did.

GPUs are laid out for throughput with vLLM's own engine: `--gpu 0,1,2,3` runs one replica per GPU
(--data-parallel-size 4, one endpoint whose API server spreads requests over them); a replica is
split over several GPUs (--tensor-parallel-size) only when asked, or when the model's weights and
KV cache for --max-model-len cannot fit one GPU (estimated here, the estimate shown). `--nodes N
--node-rank R --master HOST:PORT` gives each node its part of one data-parallel deployment (the API
server on node 0, headless engines elsewhere). `--print-command` prints the command and exits (no
GPU needed). SKINVLM_VLLM_BIN replaces the `vllm` executable (a stand-in server in tests, or a vllm
in another virtual environment).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
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
from skinvlm.errors import SkinvlmError, install_hint, read_json_object
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
    tensor_parallel_size: int | None = None  # default: 1 where a replica fits one GPU (see `layout`)
    gpu_memory: float | None = None  # GiB per GPU; default: nvidia-smi's, where there is one
    nodes: int = 1
    node_rank: int = 0
    master: str | None = None  # HOST:PORT of node 0's data-parallel RPC (--nodes > 1)
    served_model_name: str = "skinvlm"
    limit_mm_per_prompt: str = '{"image":1}'
    generation_config_vllm: bool = False
    startup_timeout: float = 900.0


def executable() -> list[str]:
    return shlex.split(os.environ.get("SKINVLM_VLLM_BIN", "vllm"))


def check_settings(s: ServeSettings) -> None:
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
    if s.gpu_memory is not None and s.gpu_memory <= 0:
        raise SkinvlmError(f"--gpu-memory is GiB per GPU, above 0, not {s.gpu_memory}")
    if s.nodes < 1 or not 0 <= s.node_rank < s.nodes:
        raise SkinvlmError(f"--node-rank must be 0 to {s.nodes - 1} with --nodes {s.nodes}, not {s.node_rank}")
    if s.nodes > 1:
        master_address(s)


def master_address(s: ServeSettings) -> tuple[str, int]:
    host, _, port = (s.master or "").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SkinvlmError(
            f"--nodes {s.nodes} needs --master HOST:PORT (node 0's address and a free port for vLLM's data-parallel "
            f"RPC), not {s.master!r}"
        )
    return host, int(port)


def build_command(model: Path, s: ServeSettings, plan: Layout | None = None, node_rank: int | None = None) -> list[str]:
    """The `vllm serve` command of one node (`node_rank`, default --node-rank) of the layout."""
    check_settings(s)
    plan = plan or layout(model, s)
    rank = s.node_rank if node_rank is None else node_rank
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
        str(plan.tensor),
        *data_parallel_arguments(s, plan, rank),
        "--limit-mm-per-prompt",
        json.dumps(limits, separators=(",", ":")),
    ]
    max_pixels = read_settings(model).get("max_pixels")
    if max_pixels:
        command += ["--mm-processor-kwargs", json.dumps(pixel_bounds(max_pixels), separators=(",", ":"))]
    if s.generation_config_vllm:
        command += ["--generation-config", "vllm"]
    return command


def data_parallel_arguments(s: ServeSettings, plan: Layout, rank: int) -> list[str]:
    """vLLM's data-parallel flags: one node's replicas, or this node's share of a deployment over several, whose
    API server runs on node 0 and whose other nodes run engines only (--headless)."""
    if s.nodes == 1:
        return ["--data-parallel-size", str(plan.data)] if plan.data > 1 else []
    host, port = master_address(s)
    arguments = ["--headless"] if rank else []
    arguments += ["--data-parallel-size", str(plan.data * s.nodes), "--data-parallel-size-local", str(plan.data)]
    if rank:
        arguments += ["--data-parallel-start-rank", str(rank * plan.data)]
    return arguments + ["--data-parallel-address", host, "--data-parallel-rpc-port", str(port)]


# -- laying GPUs out -------------------------------------------------------------------------
RUNTIME_GIB = 2.0  # what vLLM takes besides weights and KV cache (CUDA context, activations, graphs): a rough guess
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float": 4, "half": 2}


@dataclass
class Layout:
    tensor: int  # GPUs per replica
    data: int  # replicas on this node
    gpus: int  # GPUs on this node
    weights_gib: float | None
    kv_cache_gib: float | None
    gpu_gib: float | None  # memory of the smallest GPU named, where known
    reason: str

    @property
    def replica_gib(self) -> float | None:
        if self.weights_gib is None or self.kv_cache_gib is None:
            return None
        return self.weights_gib + self.kv_cache_gib + RUNTIME_GIB

    def describe(self, s: ServeSettings) -> str:
        nodes = f" on each of {s.nodes} nodes" if s.nodes > 1 else ""
        line = f"{self.gpus} GPU(s){nodes}: tensor {self.tensor} x data {self.data}"
        if self.replica_gib is not None:
            line += (
                f"; one replica needs ~{self.replica_gib:.1f} GiB (weights {self.weights_gib:.1f} + KV cache for "
                f"{s.max_model_len} tokens {self.kv_cache_gib:.2f} + runtime {RUNTIME_GIB:.1f})"
            )
        if self.gpu_gib is not None:
            line += f", a GPU offers {self.gpu_gib:.1f} GiB x {s.gpu_memory_utilization}"
        return f"{line}: {self.reason}"

    def as_json(self, s: ServeSettings) -> dict[str, Any]:
        return {
            "tensor_parallel": self.tensor,
            "data_parallel": self.data * s.nodes,
            "data_parallel_local": self.data,
            "gpus_per_node": self.gpus,
            "nodes": s.nodes,
            "weights_gib": self.weights_gib,
            "kv_cache_gib": self.kv_cache_gib,
            "replica_gib": self.replica_gib,
            "gpu_gib": self.gpu_gib,
            "summary": self.describe(s),
        }


def layout(model: Path, s: ServeSettings) -> Layout:
    """Replicas for throughput: a replica spans several GPUs only when asked (--tensor-parallel-size) or when it
    cannot fit one (weights + KV cache for --max-model-len + runtime above the GPU's share)."""
    ids = devices.gpu_ids(s.gpu)
    weights, kv_cache = estimate(model, s)
    gpu_gib = s.gpu_memory or gpu_memory(ids)
    if s.tensor_parallel_size:
        tensor, reason = s.tensor_parallel_size, "--tensor-parallel-size as given"
    else:
        tensor, reason = fitting_tensor(weights, kv_cache, gpu_gib, len(ids) or 1, s)
    gpus = len(ids) or tensor
    if gpus % tensor:
        raise SkinvlmError(
            f"--tensor-parallel-size {tensor} does not divide the {gpus} GPU(s) of --gpu {s.gpu}: each replica takes "
            f"{tensor} GPUs"
        )
    return Layout(tensor, gpus // tensor, gpus, weights, kv_cache, gpu_gib, reason)


def fitting_tensor(
    weights: float | None, kv_cache: float | None, gpu_gib: float | None, gpus: int, s: ServeSettings
) -> tuple[int, str]:
    if weights is None or kv_cache is None:
        return 1, "no size estimate for this model: one GPU per replica assumed (--tensor-parallel-size N splits it)"
    if gpu_gib is None:
        return 1, "GPU memory unknown here (no nvidia-smi; --gpu-memory GIB tells it): one GPU per replica assumed"
    room = gpu_gib * s.gpu_memory_utilization
    for tensor in (n for n in range(1, gpus + 1) if gpus % n == 0):
        if (weights + kv_cache) / tensor + RUNTIME_GIB <= room:
            return tensor, "fits one GPU" if tensor == 1 else f"does not fit one GPU: split over {tensor}"
    raise SkinvlmError(
        f"the model needs ~{weights + kv_cache + RUNTIME_GIB:.1f} GiB (weights {weights:.1f}, KV cache {kv_cache:.2f}, "
        f"runtime {RUNTIME_GIB:.1f}) and does not fit even split over all {gpus} GPU(s) of {room:.1f} GiB usable each: "
        "name more GPUs, lower --max-model-len or quantise the model"
    )


def estimate(model: Path, s: ServeSettings) -> tuple[float | None, float | None]:
    """GiB of the weights (as served: --dtype, else as saved) and of the KV cache of one --max-model-len sequence, from
    the safetensors headers (exact parameter counts) or else the config's sizes; None where the config lacks them."""
    config = read_json_object(model / "config.json", "the model's") if (model / "config.json").is_file() else {}
    text = config.get("text_config") or config
    saved = str(text.get("torch_dtype") or text.get("dtype") or config.get("torch_dtype") or "bfloat16")
    served = DTYPE_BYTES.get(saved if s.dtype == "auto" else s.dtype, 2)
    parameters = safetensors_parameters(model) or config_parameters(config)
    layers = text.get("num_hidden_layers")
    if not (parameters and layers and text.get("num_attention_heads") and text.get("hidden_size")):
        return None, None
    kv_heads, head_dim = kv_shape(text)
    kv_cache = 2 * layers * kv_heads * head_dim * served * s.max_model_len
    return round(parameters * served / 2**30, 3), round(kv_cache / 2**30, 3)


def kv_shape(text: dict[str, Any]) -> tuple[int, int]:
    """(key-value heads, head dimension) of a decoder config that has its hidden size and attention heads."""
    heads = text["num_attention_heads"]
    return text.get("num_key_value_heads") or heads, text.get("head_dim") or text["hidden_size"] // heads


def safetensors_parameters(model: Path) -> int:
    """The parameter count the safetensors headers declare (the files' data is not read)."""
    total = 0
    for path in sorted(model.glob("*.safetensors")):
        with path.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 0 < size <= 100 * 2**20:
                raise SkinvlmError(f"{path} is no safetensors file (header of {size} bytes)")
            header = json.loads(handle.read(size))
        for name, tensor in header.items():
            if name != "__metadata__":
                total += math.prod(tensor["shape"])
    return total


def config_parameters(config: dict[str, Any]) -> int:
    """A decoder's parameters from its config (attention with grouped KV heads, gated MLP, embeddings) plus a vision
    tower's where the config has one: within a few percent for Qwen2-VL-like models."""
    text = config.get("text_config") or config
    hidden, layers, heads = text.get("hidden_size"), text.get("num_hidden_layers"), text.get("num_attention_heads")
    inner, vocab = text.get("intermediate_size"), text.get("vocab_size")
    if not (hidden and layers and heads and inner and vocab):
        return 0
    kv_heads, head_dim = kv_shape(text)
    kv = kv_heads * head_dim
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv
    embeddings = vocab * hidden * (1 if text.get("tie_word_embeddings", config.get("tie_word_embeddings")) else 2)
    vision = config.get("vision_config") or {}
    width = vision.get("hidden_size") or vision.get("embed_dim") or 0
    depth = vision.get("depth") or vision.get("num_hidden_layers") or 0
    tower = depth * (4 * width * width + 3 * width * (vision.get("intermediate_size") or 4 * width))
    return layers * (attention + 3 * hidden * inner) + embeddings + tower


def gpu_memory(ids: list[str]) -> float | None:
    """GiB of the smallest GPU named (all where none is), by nvidia-smi; None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    query = ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"]
    try:
        found = subprocess.run(
            query + (["-i", ",".join(ids)] if ids else []), capture_output=True, text=True, timeout=20
        )
        sizes = [float(line) for line in found.stdout.split() if line.strip()]
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None
    return round(min(sizes) / 1024, 1) if found.returncode == 0 and sizes else None


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
            f"vllm is not installed: on a CUDA machine run `{install_hint('serve', pinned=True)}`; on this machine "
            "`skinvlm eval --model-dir models/merged` evaluates on the CPU"
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


def start(model: Path, s: ServeSettings, plan: Layout | None = None) -> tuple[subprocess.Popen[bytes], str | None]:
    """vLLM started and answering /health (node 0, or a single node); a headless node's engines are only started.
    Returns the process and the endpoint its API server answers at (None on a headless node)."""
    check_model(model)
    check_runtime()
    command = build_command(model, s, plan)
    # Its own session and process group: a terminal's Ctrl-C or a signal to serve alone reaches serve, which
    # stops the whole group; vLLM never outlives serve holding the GPU and the port.
    process = subprocess.Popen(command, env=os.environ | launch_env(s), start_new_session=True)
    if s.node_rank:
        return process, None  # its engines join node 0's API server, which has the only /health
    try:
        wait_healthy(process, local_endpoint(s).removesuffix("/v1") + "/health", s.startup_timeout)
    except BaseException:
        stop(process)
        raise
    return process, endpoint(s)


def launch_env(s: ServeSettings) -> dict[str, str]:
    """What the server's environment adds: --gpu pins the GPUs it sees."""
    return {} if s.gpu is None else {"CUDA_VISIBLE_DEVICES": ",".join(devices.gpu_ids(s.gpu))}


def local_endpoint(s: ServeSettings) -> str:
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host  # noqa: S104 - read, not bound
    return f"http://{host}:{s.port}/v1"


def endpoint(s: ServeSettings) -> str:
    """Where clients ask: this machine's address, or node 0's (--master) for a deployment over several nodes."""
    host = master_address(s)[0] if s.nodes > 1 else s.host
    return f"http://{host}:{s.port}/v1"


def printed_command(model: Path, s: ServeSettings) -> dict[str, Any]:
    """`serve --print-command --json`: what `serve` would run (this node's command, and every node's), for a
    launcher of one's own."""
    plan = layout(model, s)
    env = launch_env(s)

    def node(rank: int) -> dict[str, Any]:
        command = build_command(model, s, plan, rank)
        shell = " ".join([*(f"{k}={v}" for k, v in env.items()), shlex.join(command)])
        return {"node_rank": rank, "command": command, "env": env, "shell": shell}

    nodes = [node(rank) for rank in range(s.nodes)]
    this = nodes[s.node_rank]
    return {
        "command": this["command"],
        "env": env,
        "shell": this["shell"],
        "endpoint": endpoint(s),
        "model": s.served_model_name,
        "layout": plan.as_json(s),
        "nodes": nodes,
    }


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
