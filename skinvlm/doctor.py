"""`skinvlm doctor`: what this machine can run, checked in seconds, before anything heavy starts.

Python, torch and its CUDA, each GPU's free memory, the training and serving packages against
`constraints-gpu.txt`, which backends can run here and why not, free disk in the workspace, and
whether the HF token and the OpenAI key are set (never their values). A check marked `needed`
that fails makes the command exit 1: the train extra always, the GPU stack with `--gpu`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any

from skinvlm import devices
from skinvlm.errors import install_hint
from skinvlm.openai_api import setting
from skinvlm.rules import shipped_file
from skinvlm.workspace import Workspace

TRAIN_PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets")
GPU_PACKAGES = ("unsloth", "unsloth_zoo", "bitsandbytes", "vllm")
MIN_FREE_DISK_GB = 40  # a 7B merged model (~16 GB), checkpoints and the dataset


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # None: information only
    detail: str
    needed: bool = False


@dataclass
class Report:
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return not any(c.needed and c.ok is False for c in self.checks)

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [asdict(c) for c in self.checks]}


def pins() -> dict[str, str]:
    """constraints-gpu.txt as {package: specifier}."""
    from packaging.requirements import Requirement

    found = {}
    for line in shipped_file("constraints-gpu.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            found[canonical(requirement.name)] = str(requirement.specifier)
    return found


def canonical(name: str) -> str:
    return name.lower().replace("_", "-")


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def package_checks(gpu_stack: bool, need_gpu: bool) -> list[Check]:
    """Each package's version against the pins; off the GPU stack a newer one is fine and only shown."""
    from packaging.specifiers import SpecifierSet

    pinned = pins()
    checks = []
    for name in (*TRAIN_PACKAGES, *GPU_PACKAGES):
        version, spec = installed(name), pinned.get(canonical(name), "")
        needed = name in TRAIN_PACKAGES or need_gpu
        if version is None:
            extra = "train" if name in TRAIN_PACKAGES else "serve" if name == "vllm" else "gpu"
            checks.append(
                Check(
                    name,
                    False if needed else None,
                    f"not installed ({install_hint(extra, pinned=extra != 'train')})",
                    needed,
                )
            )
            continue
        fits = not spec or SpecifierSet(spec, prereleases=True).contains(version)
        detail = version + (f" (pinned {spec})" if spec else "")
        if fits:
            checks.append(Check(name, True, detail, needed))
        elif gpu_stack or need_gpu:
            checks.append(Check(name, False, f"{detail}: outside the GPU stack's pins", True))
        else:
            checks.append(Check(name, None, f"{detail}: fine on a CPU, outside the GPU stack's pins", False))
    return checks


def torch_checks(need_gpu: bool, gpu: str | None) -> tuple[list[Check], bool]:
    """(checks, CUDA usable) for torch and every visible GPU."""
    if importlib.util.find_spec("torch") is None:
        return [], False  # the package rows say it is missing
    import torch

    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    cuda = torch.cuda.is_available()
    checks = [Check("torch build", True, f"{torch.__version__}, {build}")]
    count = torch.cuda.device_count() if cuda else 0
    wanted = len(devices.gpu_ids(gpu)) if gpu else (1 if need_gpu else 0)
    checks.append(
        Check(
            "CUDA GPUs",
            count >= wanted if need_gpu else (True if cuda else None),
            f"{count} visible" + (f", {wanted} asked for" if need_gpu else ""),
            need_gpu,
        )
    )
    for index in range(count):
        free, total = torch.cuda.mem_get_info(index)
        name = torch.cuda.get_device_name(index)
        checks.append(Check(f"GPU {index}", True, f"{name}: {free / 2**30:.1f} of {total / 2**30:.1f} GiB free"))
    return checks, cuda


def backend_checks(cuda: bool) -> list[Check]:
    have = {name: importlib.util.find_spec(name) is not None for name in ("peft", "trl", "unsloth", "unsloth_zoo")}
    hf_ok = have["peft"] and have["trl"] and importlib.util.find_spec("transformers") is not None
    four_bit = cuda and importlib.util.find_spec("bitsandbytes") is not None
    on_cuda = "CUDA" + (" with 4-bit" if four_bit else ", 16-bit only (no bitsandbytes)")
    hf = "runs here on " + (on_cuda if cuda else "the CPU")
    if not cuda:
        unsloth = "needs CUDA" + (
            "; `train --dry-run --backend unsloth` works here"
            if have["unsloth_zoo"]
            else f" (and {install_hint('gpu', pinned=True)})"
        )
    else:
        unsloth = "runs here" if have["unsloth"] else install_hint("gpu", pinned=True)
    if os.environ.get("SKINVLM_VLLM_BIN"):
        serve, serve_ok = f"through SKINVLM_VLLM_BIN={os.environ['SKINVLM_VLLM_BIN']}", True
    else:
        has_vllm = importlib.util.find_spec("vllm") is not None
        serve_ok = cuda and has_vllm
        serve = (
            "runs here"
            if serve_ok
            else ("needs CUDA" if has_vllm else f"{install_hint('serve', pinned=True)} on a CUDA machine")
        )
    return [
        Check("backend hf", hf_ok, hf if hf_ok else install_hint("train")),
        Check("backend unsloth", cuda and have["unsloth"], unsloth),
        Check("serve (vLLM)", serve_ok, serve),
    ]


def disk_check(ws: Workspace, need_gpu: bool) -> Check:
    folder = ws.root
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free / 2**30
    enough = free >= MIN_FREE_DISK_GB
    detail = f"{free:.0f} GiB free under {ws.root}" + ("" if enough else f" (a 7B run wants {MIN_FREE_DISK_GB}+)")
    return Check("disk", enough if need_gpu else (True if enough else None), detail, need_gpu)


def secret_checks(ws: Workspace) -> list[Check]:
    from huggingface_hub import get_token

    hf = bool(setting(ws, "HF_TOKEN") or get_token())
    openai = bool(setting(ws, "OPENAI_API_KEY"))
    return [
        Check("HF token", hf or None, "set" if hf else "not set (publish needs HF_TOKEN)"),
        Check("OpenAI key", openai or None, "set" if openai else "not set (describe with OpenAI needs OPENAI_API_KEY)"),
    ]


def doctor(ws: Workspace, gpu: str | None = None) -> Report:
    """`gpu` (ids, as elsewhere) asks for the GPU stack: CUDA with those GPUs, the GPU extras at their pins."""
    need_gpu = gpu is not None
    devices.select_gpus(gpu)
    python = sys.version_info >= (3, 11)
    checks = [Check("Python", python, sys.version.split()[0] + ("" if python else ": 3.11 or newer needed"), True)]
    torch_found, cuda = torch_checks(need_gpu, gpu)
    gpu_stack = any(installed(name) for name in ("unsloth", "vllm"))
    checks += torch_found + package_checks(gpu_stack, need_gpu) + backend_checks(cuda)
    checks += [disk_check(ws, need_gpu), *secret_checks(ws)]
    return Report(checks)
