"""GPU proof kit: every GPU path of skinvlm, offline, in one run that always finishes with figures.

    python benchmarks/gpu_smoke.py                       # every part this machine can run -> gpu_smoke.json
    python benchmarks/gpu_smoke.py --cpu --out FILE      # the same kit on a CPU: the hf backend, GPU parts skipped
    python benchmarks/gpu_smoke.py --only tiny-hf-bf16,7b-unsloth-4bit --budget 300

Parts, in order, each in its own child process (its own process group) under a time limit; a part
that fails or times out is recorded (`status: failed`, `error`) and the next one runs; a part whose
needs are missing is `skipped` with its `reason`. The JSON file is rewritten after every part, so a
run cut short still leaves every finished figure.

  prepare                 synthetic 112 px workspace (ingest, describe --template, fix) and the tiny model
  tiny-<backend>-<prec>   each installed backend (hf; unsloth) x precision (bf16, or fp32 on a CPU; 4-bit with
                          bitsandbytes on CUDA): `train --json` (real CLI), `merge`, `eval --model-dir`, and the
                          image ablation: eval loss of the trained model on held-out rows, with their photos
                          and with blank ones (the image must matter)
  serve                   `skinvlm serve` (the real vLLM it starts), health, eval of the same photos through it,
                          label agreement with `eval --model-dir`, usage.prompt_tokens against the processor's
                          count, and no child left after SIGTERM
  ddp                     `train --gpu 0,1` on the tiny model (needs 2 GPUs)
  7b-model                a random-weight model of Qwen2.5-VL-7B's exact shapes, and 1024 px photos
  7b-<backend>-<prec>     the default recipe (batch 2 x grad-accum 4, LoRA r 128 on vision and language, 1,024
                          vision tokens per photo): steady-state s/step, images/s, peak VRAM allocated/reserved

Training figures come from the real run: image tokens from the batch the loaded model's collator built,
`vision_forward_calls` from a hook on the vision tower, s/step from the steps after warm-up. The baseline
of each ratio is the hf backend in 16 bits of the same part, measured in the same run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from skinvlm.demo.pipeline import TINY_RECIPE  # noqa: E402

TINY_EVAL_ROWS = 24  # held-out rows of the tiny workspace (2 per class and view)
WARMUP_SHARE = 0.25  # steps left out of s/step: compile, autotune and allocator warm-up


# -- running the CLI ----------------------------------------------------------------------------
def skinvlm(*args: Any, timeout: float | None = None) -> dict[str, Any]:
    """`skinvlm ARGS --json` in its own process; its one JSON document, or a RuntimeError with the last error line."""
    command = [sys.executable, "-m", "skinvlm", "--debug", *map(str, args), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        sys.stderr.write(done.stderr[-20_000:])  # the traceback, into the part's log
        raise RuntimeError(last_line(done.stderr) or f"{' '.join(command[3:6])}: exit {done.returncode}")
    try:
        return json.loads(done.stdout)
    except ValueError:
        raise RuntimeError(f"{' '.join(command[3:5])} --json printed no JSON: {done.stdout.strip()[:200]!r}") from None


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:400] if lines else ""


def flags(recipe: dict[str, Any]) -> list[str]:
    """Settings as `train` flags; True is a bare switch (`--no-load-in-4bit`)."""
    named = [(f"--{key.replace('_', '-')}", value) for key, value in recipe.items()]
    return [part for name, value in named for part in ([name] if value is True else [name, str(value)])]


# -- what the machine has -------------------------------------------------------------------------
@dataclass
class Machine:
    cpu: bool
    gpus: int
    name: str
    has_unsloth: bool
    has_bitsandbytes: bool
    has_vllm: bool

    @classmethod
    def here(cls, cpu: bool) -> Machine:
        import torch

        gpus = 0 if cpu or not torch.cuda.is_available() else torch.cuda.device_count()
        found = importlib.util.find_spec
        return cls(
            cpu,
            gpus,
            "CPU" if cpu else torch.cuda.get_device_name(0),
            found("unsloth") is not None,
            found("bitsandbytes") is not None,
            found("vllm") is not None or bool(os.environ.get("SKINVLM_VLLM_BIN")),
        )

    def precision(self, four_bit: bool) -> str:
        return "4bit" if four_bit else ("fp32" if self.cpu else "bf16")

    def training_reason(self, backend: str, four_bit: bool) -> str | None:
        """Why this machine cannot train with (backend, 4-bit); None when it can."""
        if self.cpu and backend == "unsloth":
            return "Unsloth trains only on CUDA (its collator is tested on the CPU by the test suite)"
        if self.cpu and four_bit:
            return "bitsandbytes 4-bit trains only on CUDA"
        if backend == "unsloth" and not self.has_unsloth:
            return "unsloth is not installed (pip install -e .[gpu])"
        if four_bit and not self.has_bitsandbytes:
            return "bitsandbytes is not installed (pip install -e .[gpu])"
        return None


@dataclass
class Part:
    name: str
    limit_s: float
    run: Callable[[argparse.Namespace, Machine], dict[str, Any]]
    reason: Callable[[Machine], str | None] = lambda machine: None
    needs: tuple[str, ...] = ()


# -- the parts, each run in a child process ---------------------------------------------------------
def paths(root: Path) -> dict[str, Path]:
    return {
        "tiny_ws": root / "tiny" / "ws",
        "tiny_model": root / "tiny-model",
        "big_ws": root / "7b" / "ws",
        "big_model": root / "qwen2.5-vl-7b-shaped",
    }


def workspace(root: Path, size: int, per_folder: dict[str, int]) -> Path:
    from skinvlm.demo.pipeline import demo_rules
    from skinvlm.demo.synthetic import write_tree

    ws = root / "ws"
    ws.mkdir(parents=True, exist_ok=True)
    demo_rules(ws / "postprocess.toml")
    write_tree(root / "src", per_folder, size=size)
    for command in (("ingest", root / "src", "--force"), ("describe", "--template"), ("fix",)):
        skinvlm(*command, "-w", ws)
    return ws


def prepare(args: argparse.Namespace, machine: Machine) -> dict[str, Any]:
    from skinvlm.demo.tiny import build

    where = paths(args.root)
    workspace(where["tiny_ws"].parent, 112, {"train": 5, "test": 2})
    build(where["tiny_model"])
    return {"workspace": str(where["tiny_ws"]), "model": str(where["tiny_model"])}


def steady_seconds_per_step(log: list[dict[str, Any]]) -> float | None:
    """Seconds per step after the warm-up steps, from the training log's clock."""
    timed = [(e["step"], e["seconds"]) for e in log if "loss" in e and "seconds" in e]
    if len(timed) < 2:
        return None
    skip = min(len(timed) - 2, max(1, round(len(timed) * WARMUP_SHARE)))
    (first_step, first_s), (last_step, last_s) = timed[skip], timed[-1]
    return round((last_s - first_s) / (last_step - first_step), 4) if last_step > first_step else None


def train_figures(
    ws: Path, model: Path | None, output: Path, recipe: dict[str, Any], machine: Machine
) -> dict[str, Any]:
    gpu = [] if machine.cpu else ["--gpu", "0"]
    training_log(output).parent.mkdir(parents=True, exist_ok=True)
    PROGRESS.write_text(str(training_log(output)))  # where the parent finds figures if the part times out
    base = ["--model", model] if model else []
    result = skinvlm("train", "-w", ws, *base, *flags(recipe), "--output", output, *gpu)
    log = [json.loads(line) for line in training_log(output).read_text().splitlines() if line.strip()]
    step = steady_seconds_per_step(log)
    return {
        "steps": result["steps"],
        "image_tokens_per_row": result["summary"]["image_tokens_per_row"][0],
        "supervised_tokens_per_row": result["summary"]["supervised_tokens_per_row"][0],
        "vision_forward_calls": result["vision_forward_calls"],
        "s_per_step": step,
        "images_per_s": round(result["effective_batch_size"] / step, 2) if step else None,
        "peak_vram_mb": result["peak_vram_mb"],
        "peak_vram_reserved_mb": result["peak_vram_reserved_mb"],
        "peak_rss_mb": result["peak_rss_mb"],
        "first_loss": next((e["loss"] for e in log if "loss" in e), None),
        "final_loss": result["final_loss"],
        # --select-by: held-out rows scored by class at each evaluation (no macro_f1: this backend gave no logits)
        "evals": result.get("evals", []),
        "best_step": result.get("best_step"),
        "rewards": result.get("rewards", []),
    }


PROGRESS = Path(os.environ.get("SKINVLM_SMOKE_PROGRESS", os.devnull))  # set by the parent for each child


def training_log(output: Path) -> Path:
    return output / "train_log.jsonl"


def figures_so_far(log_path: Path) -> dict[str, Any]:
    """What a training cut short at its time limit had measured: steps done, s/step, the latest peak VRAM."""
    try:
        log = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return {}
    steps = [e for e in log if "loss" in e]
    if not steps:
        return {}
    peaks = [e["peak_vram_mb"] for e in log if e.get("peak_vram_mb") is not None]
    rewards = [e["reward"] for e in log if "reward" in e]
    return {
        "steps_done": steps[-1]["step"],
        "s_per_step": steady_seconds_per_step(log),
        "peak_vram_mb": max(peaks) if peaks else None,
        "first_loss": steps[0]["loss"],
        "last_loss": steps[-1]["loss"],
    } | ({"reward_first": rewards[0], "reward_last": rewards[-1]} if rewards else {})


def image_ablation(ws: Path, merged: Path, cuda: bool) -> dict[str, float]:
    """Eval loss of the merged model on held-out rows: with their photos, and with each photo replaced by a grey
    one of the same size. A model that learnt from the images does clearly worse without them."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from skinvlm.samples import AnswerOnlyCollator, chat_rows
    from skinvlm.vlm import load_processor, read_settings, set_image_resolution
    from skinvlm.workspace import Workspace

    recorded = read_settings(merged)
    processor = load_processor(merged)
    set_image_resolution(processor, recorded.get("max_pixels"))
    held_out = Workspace.open(ws).load("fixed")["test"]
    held_out = held_out.select(range(min(TINY_EVAL_ROWS, held_out.num_rows)))
    rows = [chat_rows(held_out, recorded["instruction"])[i] for i in range(held_out.num_rows)]
    collator = AnswerOnlyCollator(processor, 4096)
    model = AutoModelForImageTextToText.from_pretrained(
        str(merged), dtype=torch.bfloat16 if cuda else torch.float32, device_map="cuda" if cuda else None
    ).eval()

    def mean_loss(blank: bool) -> float:
        total = count = 0.0
        for start in range(0, len(rows), 8):
            chunk = rows[start : start + 8]
            if blank:
                chunk = [r | {"images": [Image.new("RGB", r["images"][0].size, (128, 128, 128))]} for r in chunk]
            batch = collator(chunk).to(model.device)
            supervised = float((batch["labels"][:, 1:] != -100).sum())
            with torch.no_grad():
                total += float(model(**batch).loss) * supervised
            count += supervised
        return round(total / count, 4)

    return {"with_images": mean_loss(False), "blank_images": mean_loss(True)}


def tiny_case(backend: str, four_bit: bool) -> Callable[[argparse.Namespace, Machine], dict[str, Any]]:
    def run(args: argparse.Namespace, machine: Machine) -> dict[str, Any]:
        where = paths(args.root)
        ws, name = where["tiny_ws"], f"tiny-{backend}-{machine.precision(four_bit)}"
        adapter, merged = ws / "models" / name, ws / "models" / f"{name}-merged"
        every = max(1, args.steps // 4)  # four evaluations, each scoring 12 held-out rows by class (--select-by)
        recipe = TINY_RECIPE | {"backend": backend, "max_steps": args.steps, "eval_rows": 12, "eval_steps": every}
        recipe["load_in_4bit" if four_bit else "no_load_in_4bit"] = True
        figures = train_figures(ws, where["tiny_model"], adapter, recipe, machine)
        gpu = [] if machine.cpu else ["--gpu", "0"]
        merge = skinvlm("merge", "-w", ws, "--adapter", adapter, "--output", merged, *gpu)
        evaluated = skinvlm("eval", "-w", ws, "--model-dir", merged, "--name", name, "--max-tokens", 32, *gpu)
        return figures | {
            "merge_error": merge["merge_error"],
            "merge_tolerance": merge["tolerance"],
            "accuracy": evaluated["accuracy"],
            "macro_f1": evaluated["macro_f1"],
            "image_ablation": image_ablation(ws, merged, not machine.cpu),
        }

    return run


GRPO_RECIPE = {  # the tiny model's GRPO: 4 answers sampled per photo, 2 photos per step
    "method": "grpo", "num_generations": 4, "batch_size": 8, "grad_accum": 1, "learning_rate": 5e-4,
    "max_completion_tokens": 48, "eval_rows": 12, "dataloader_workers": 0,
}  # fmt: skip


def grpo_case(size: str) -> Callable[[argparse.Namespace, Machine], dict[str, Any]]:
    """GRPO from the SFT adapter of the hf 16-bit part of the same size: mean reward over the steps, s/step,
    peak VRAM; on the tiny model also merge and eval of the result (free generation)."""

    def run(args: argparse.Namespace, machine: Machine) -> dict[str, Any]:
        where = paths(args.root)
        ws = where["tiny_ws"] if size == "tiny" else where["big_ws"]
        start = ws / "models" / f"{size}-hf-{machine.precision(False)}"
        output = ws / "models" / f"{size}-grpo"
        steps = args.steps // 2 if size == "tiny" else args.big_steps
        recipe = GRPO_RECIPE | {"max_steps": steps, "eval_steps": max(1, steps // 2)}
        if size == "7b":  # random weights never stop on their own: a short answer budget keeps the steps short
            recipe |= {"max_completion_tokens": 32, "eval_rows": 0, "no_load_in_4bit": True}
        figures = train_figures(ws, None, output, recipe | {"from": start}, machine)
        rewards = figures.pop("rewards")
        figures |= {"reward_first": rewards[0]["mean"] if rewards else None}
        figures |= {"reward_last": rewards[-1]["mean"] if rewards else None}
        if size == "7b":
            return figures
        gpu = [] if machine.cpu else ["--gpu", "0"]
        merged = ws / "models" / f"{size}-grpo-merged"
        skinvlm("merge", "-w", ws, "--adapter", output, "--output", merged, *gpu)
        evaluated = skinvlm("eval", "-w", ws, "--model-dir", merged, "--name", f"{size}-grpo", "--max-tokens", 48, *gpu)
        return figures | {k: evaluated[k] for k in ("accuracy", "macro_f1", "unparsed")}

    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_part(args: argparse.Namespace, machine: Machine) -> dict[str, Any]:
    """The real `skinvlm serve` (vLLM) on the tiny hf model, asked about the same photos as `eval --model-dir`."""
    import psutil

    where = paths(args.root)
    ws = where["tiny_ws"]
    local_run = f"tiny-hf-{machine.precision(False)}"  # the tiny hf model this part serves, trained 16-bit
    merged = ws / "models" / f"{local_run}-merged"
    port = free_port()
    printed = skinvlm("serve", "-w", ws, "--model-dir", merged, "--gpu", "0", "--port", port, "--print-command")
    command = [sys.executable, "-m", "skinvlm", "serve", "-w", str(ws), "--model-dir", str(merged)]
    command += ["--gpu", "0", "--port", str(port), "--startup-timeout", "240"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    clock = time.perf_counter()
    try:
        ready = wait_for_line(server, "ready", 250)
        started_s = round(time.perf_counter() - clock, 1)
        children = [c.pid for c in psutil.Process(server.pid).children(recursive=True)]
        base_url = f"http://127.0.0.1:{port}/v1"
        served = skinvlm("eval", "-w", ws, "--base-url", base_url, "--name", "tiny-served", "--max-tokens", 32)
        constrained = constrained_figures(ws, base_url)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    time.sleep(2)
    survivors = [pid for pid in children if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    with socket.socket() as probe:
        port_released = probe.connect_ex(("127.0.0.1", port)) != 0
    agreement, tokens = served_against_local(ws, "tiny-served", local_run, merged)
    return {
        "vllm_command": printed["shell"][:300],
        "ready_line": ready[:200],
        "start_s": started_s,
        "accuracy": served["accuracy"],
        "label_agreement_with_model_dir": agreement,
        "prompt_tokens": tokens,
        "constrained": constrained,
        "children_left_after_sigterm": len(survivors),
        "port_released": port_released,
    }


def constrained_figures(ws: Path, base_url: str) -> dict[str, Any]:
    """`eval --constrained` through the real vLLM (its structured_outputs): unparsed must be 0; a refusal is
    recorded, not fatal to the other serve figures."""
    try:
        run = skinvlm("eval", "-w", ws, "--base-url", base_url, "--name", "tiny-constrained", "--constrained",
                      "--max-tokens", 32)  # fmt: skip
    except Exception as err:  # noqa: BLE001 - the figure is the error itself
        return {"error": str(err)[-300:]}
    return {"accuracy": run["accuracy"], "unparsed": run["unparsed"]}


def wait_for_line(process: subprocess.Popen, word: str, limit: float) -> str:
    deadline = time.monotonic() + limit
    assert process.stdout is not None
    for line in process.stdout:
        if word in line:
            return line.strip()
        if time.monotonic() > deadline:
            break
    raise RuntimeError(f"serve did not say {word!r} (exit {process.poll()})")


def served_against_local(ws: Path, served: str, local: str, merged: Path) -> tuple[float, dict[str, Any]]:
    """Share of photos where the served and the in-process model named the same label; and the server's
    usage.prompt_tokens against the processor's count for the same request."""
    from skinvlm.images import as_rgb
    from skinvlm.prompts import conversation
    from skinvlm.vlm import load_processor, read_settings, set_image_resolution
    from skinvlm.workspace import Workspace

    def answers(run: str) -> dict[str, dict[str, Any]]:
        path = ws / "eval" / run / "predictions.jsonl"
        return {r["id"]: r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}

    a, b = answers(served), answers(local)
    both = sorted(set(a) & set(b))
    agreement = round(sum(a[i]["predicted"] == b[i]["predicted"] for i in both) / max(1, len(both)), 4)
    processor = load_processor(merged)
    recorded = read_settings(merged)
    set_image_resolution(processor, recorded.get("max_pixels"))
    ds = Workspace.open(ws).load("ingested")["test"]
    by_id = {rid: i for i, rid in enumerate(ds["id"])}
    text = processor.apply_chat_template(
        conversation(recorded["instruction"]), add_generation_prompt=True, tokenize=False
    )
    differences = []
    for rid in both[:8]:
        image = as_rgb(ds[by_id[rid]]["image"])
        expected = processor(text=[text], images=[image], return_tensors="pt")["input_ids"].shape[1]
        differences.append(a[rid].get("prompt_tokens", 0) - expected)
    return agreement, {"photos": len(differences), "served_minus_processor": sorted(set(differences))}


def ddp_part(args: argparse.Namespace, machine: Machine) -> dict[str, Any]:
    where = paths(args.root)
    ws, output = where["tiny_ws"], where["tiny_ws"] / "models" / "tiny-ddp"
    recipe = TINY_RECIPE | {"max_steps": args.steps, "eval_rows": 0, "no_load_in_4bit": True}
    result = skinvlm(
        "train", "-w", ws, "--model", where["tiny_model"], *flags(recipe), "--output", output, "--gpu", "0,1"
    )
    return {"world_size": result["world_size"], "steps": result["steps"], "final_loss": result["final_loss"]}


def big_model(args: argparse.Namespace, machine: Machine) -> dict[str, Any]:
    from skinvlm.demo.tiny import build

    where = paths(args.root)
    clock = time.perf_counter()
    workspace(where["big_ws"].parent, 1024, {"train": 2, "test": 1})
    build(where["big_model"], shape="7b")
    size = sum(p.stat().st_size for p in where["big_model"].glob("*.safetensors"))
    return {"built_s": round(time.perf_counter() - clock, 1), "weights_gb": round(size / 1e9, 1)}


def big_case(backend: str, four_bit: bool) -> Callable[[argparse.Namespace, Machine], dict[str, Any]]:
    def run(args: argparse.Namespace, machine: Machine) -> dict[str, Any]:
        where = paths(args.root)
        output = where["big_ws"] / "models" / f"7b-{backend}-{machine.precision(four_bit)}"
        # The default recipe; only the length of the run and its evaluations differ.
        recipe = {"backend": backend, "max_steps": args.big_steps, "eval_rows": 0, "save_steps": 10_000}
        recipe["load_in_4bit" if four_bit else "no_load_in_4bit"] = True
        return train_figures(where["big_ws"], where["big_model"], output, recipe, machine)

    return run


def parts(machine: Machine) -> list[Part]:
    backends = [("hf", False), ("unsloth", False), ("unsloth", True), ("hf", True)]
    gpu_only: Callable[[Machine], str | None] = lambda m: "needs a CUDA GPU" if m.cpu else None  # noqa: E731
    found = [Part("prepare", 300, prepare)]
    for backend, four_bit in backends:
        found.append(
            Part(
                f"tiny-{backend}-{machine.precision(four_bit)}",
                420,
                tiny_case(backend, four_bit),
                lambda m, b=backend, q=four_bit: m.training_reason(b, q),
                ("prepare",),
            )
        )
    found += [
        Part(
            "serve",
            420,
            serve_part,
            lambda m: gpu_only(m) or (None if m.has_vllm else "vllm is not installed (pip install -e .[serve])"),
            (f"tiny-hf-{machine.precision(False)}",),
        ),
        Part(
            "ddp",
            300,
            ddp_part,
            lambda m: gpu_only(m) or (None if m.gpus >= 2 else f"needs 2 GPUs, {m.gpus} here"),
            ("prepare",),
        ),
        Part("7b-model", 420, big_model, gpu_only),
    ]
    # The default recipe first (Unsloth, 4-bit), then the 16-bit hf baseline of the ratios.
    for backend, four_bit in [("unsloth", True), ("hf", False), ("hf", True), ("unsloth", False)]:
        found.append(
            Part(
                f"7b-{backend}-{machine.precision(four_bit)}",
                420,
                big_case(backend, four_bit),
                lambda m, b=backend, q=four_bit: gpu_only(m) or m.training_reason(b, q),
                ("7b-model",),
            )
        )
    sixteen = machine.precision(False)
    found.append(Part("tiny-grpo", 420, grpo_case("tiny"), needs=(f"tiny-hf-{sixteen}",)))
    found.append(Part("7b-grpo", 420, grpo_case("7b"), gpu_only, (f"7b-hf-{sixteen}",)))
    return found


# -- the parent: one child per part, the JSON rewritten after each -----------------------------------
def run_child(part: Part, args: argparse.Namespace, limit: float) -> dict[str, Any]:
    result_file = args.root / "parts" / f"{part.name}.json"
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--child", part.name, "--root", str(args.root)]
    command += ["--steps", str(args.steps), "--big-steps", str(args.big_steps)] + (["--cpu"] if args.cpu else [])
    log = args.root / "parts" / f"{part.name}.log"
    progress = args.root / "parts" / f"{part.name}.progress"
    progress.unlink(missing_ok=True)
    clock = time.perf_counter()
    with log.open("w") as sink:
        env = {**os.environ, "SKINVLM_SMOKE_PROGRESS": str(progress)}
        child = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        try:
            child.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)  # the part and every process it started
            child.wait()
            so_far = figures_so_far(Path(progress.read_text())) if progress.exists() else {}
            return {"status": "failed", "error": f"timed out after {limit:.0f}s", "seconds": round(limit, 1)} | so_far
        finally:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
    seconds = round(time.perf_counter() - clock, 1)
    if child.returncode or not result_file.exists():
        text = log.read_text(errors="replace")
        error = last_line(text) or f"exit {child.returncode}"
        return {"status": "failed", "error": error, "seconds": seconds, "log_tail": text[-3000:]}
    return {"status": "ran", "seconds": seconds} | json.loads(result_file.read_text())


def child_main(args: argparse.Namespace) -> None:
    machine = Machine.here(args.cpu)
    part = next(p for p in parts(machine) if p.name == args.child)
    result = part.run(args, machine)
    (args.root / "parts" / f"{part.name}.json").write_text(json.dumps(result, ensure_ascii=False))


def wanted(asked: str | None, machine: Machine) -> set[str] | None:
    """The parts --only names and, transitively, the parts they need; None: all."""
    if not asked:
        return None
    needs = {p.name: p.needs for p in parts(machine)}
    unknown = set(asked.split(",")) - set(needs)
    if unknown:
        sys.exit(f"--only: no part {', '.join(sorted(unknown))} (parts: {', '.join(needs)})")
    chosen, todo = set(), list(asked.split(","))
    while todo:
        name = todo.pop()
        if name not in chosen:
            chosen.add(name)
            todo += needs[name]
    return chosen


RESULTS = Path(__file__).with_name("gpu_results.json")  # every part measured on a GPU so far, with its versions
VERSIONED = ("torch", "transformers", "trl", "peft", "unsloth", "bitsandbytes", "vllm")


def installed_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in VERSIONED:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def read_results(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text(encoding="utf-8")).get("results", []) if path.is_file() else []


def measured(results: list[dict[str, Any]], part: str, gpu: str, versions: dict[str, str]) -> bool:
    """Whether `part` ran to its end on this GPU with these versions (of the packages the record names)."""
    return any(
        r["part"] == part and r["gpu"] == gpu and r["status"] == "ran"
        and all(versions.get(name) == v for name, v in r["versions"].items())
        for r in results
    )  # fmt: skip


def ordered(found: list[Part], results: list[dict[str, Any]], gpu: str, versions: dict[str, str]) -> list[Part]:
    """A lent GPU's minutes go first to what was never measured there: the unmeasured parts and what they need,
    in the listed order (which puts every need before its part), then the rest."""
    needs = {p.name: p.needs for p in found}
    first: set[str] = set()
    todo = [p.name for p in found if not measured(results, p.name, gpu, versions)]
    while todo:
        name = todo.pop()
        if name not in first:
            first.add(name)
            todo += needs[name]
    return [p for p in found if p.name in first] + [p for p in found if p.name not in first]


def record(path: Path, rows: list[dict[str, Any]], gpu: str, versions: dict[str, str], date: str) -> None:
    """This run's parts into the results file: each replaces the record of the same part, GPU and versions."""
    kept = [r for r in read_results(path) if not any(
        r["part"] == row["part"] and r["gpu"] == gpu and r["versions"] == versions for row in rows
    )]  # fmt: skip
    new = [
        {"part": row["part"], "gpu": gpu, "date": date, "versions": versions, "status": row["status"]}
        | {k: v for k, v in row.items() if k not in ("part", "status", "log_tail")}
        for row in rows
        if row["status"] != "skipped"
    ]
    document = {"about": "every gpu_smoke part run on a GPU: `--order unmeasured` runs the others first"}
    path.write_text(json.dumps(document | {"results": kept + new}, ensure_ascii=False, indent=2) + "\n")


def skip_reason(part: Part, machine: Machine, rows: dict[str, dict[str, Any]], only: set[str] | None) -> str | None:
    if only is not None and part.name not in only:
        return "not asked for (--only)"
    if reason := part.reason(machine):
        return reason
    for need in part.needs:
        if rows.get(need, {}).get("status") != "ran":
            return f"needs {need}, which {rows.get(need, {}).get('status', 'did not run')}"
    return None


def ratios(rows: list[dict[str, Any]]) -> None:
    """Each part's speed against the hf 16-bit row of its size, measured in this run."""
    for size in ("tiny", "7b"):
        base = next(
            (r for r in rows if r["part"] in (f"{size}-hf-bf16", f"{size}-hf-fp32") and r.get("s_per_step")), None
        )
        for row in rows:
            if base and row["part"].startswith(f"{size}-") and "grpo" not in row["part"] and row.get("s_per_step"):
                row["speed_vs_hf_16bit"] = round(base["s_per_step"] / row["s_per_step"], 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU: the hf backend, GPU-only parts skipped")
    parser.add_argument("--out", type=Path, default=Path("gpu_smoke.json"))
    parser.add_argument("--only", help="comma-separated parts to run (and what they need)")
    parser.add_argument("--steps", type=int, default=100, help="training steps of the tiny model")
    parser.add_argument("--big-steps", type=int, default=8, help="training steps of the 7B-shaped model")
    parser.add_argument("--budget", type=float, default=3600, help="seconds for the whole kit; later parts skip")
    parser.add_argument("--root", type=Path, help="working folder (default: a new temporary one)")
    parser.add_argument(
        "--order",
        choices=("unmeasured", "listed"),
        default="unmeasured",
        help="unmeasured: parts never run to their end on this GPU with these versions (--results) first",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="what earlier GPU runs measured")
    parser.add_argument("--record", type=Path, help="write --results with this run's parts added to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        return child_main(args)
    import torch

    if not (args.cpu or torch.cuda.is_available()):
        sys.exit("gpu_smoke needs a CUDA GPU (or --cpu for the same kit on this CPU)")
    args.root = (args.root or Path(tempfile.mkdtemp(prefix="skinvlm-gpu-smoke-"))).resolve()
    machine = Machine.here(args.cpu)
    only = wanted(args.only, machine)
    deadline = time.monotonic() + args.budget
    report: dict[str, Any] = {
        "device": machine.name,
        "gpus": machine.gpus,
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "rows": [],
    }
    done: dict[str, dict[str, Any]] = {}
    versions = installed_versions()
    report["versions"] = versions
    found = parts(machine)
    if args.order == "unmeasured":
        found = ordered(found, read_results(args.results), machine.name, versions)
    print(f"{machine.name}, {report['date']}, torch {torch.__version__}; work in {args.root}", flush=True)
    print("order: " + ", ".join(p.name for p in found), flush=True)
    for part in found:
        left = deadline - time.monotonic()
        reason = skip_reason(part, machine, done, only) or (
            None if left > 30 else "the time budget (--budget) is spent"
        )
        row = {"part": part.name} | (
            {"status": "skipped", "reason": reason} if reason else run_child(part, args, min(part.limit_s, left))
        )
        done[part.name] = row
        report["rows"].append(row)
        ratios(report["rows"])
        args.out.write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
        if args.record and not machine.cpu:  # the earlier results and every part of this run so far
            args.record.write_text(args.results.read_text() if args.results.is_file() else "{}")
            record(args.record, report["rows"], machine.name, versions, report["date"])
        print(json.dumps(row, ensure_ascii=False), flush=True)
    failed = [r["part"] for r in report["rows"] if r["status"] == "failed"]
    print(f"\n{len(report['rows'])} parts: " + ", ".join(f"{r['part']} {r['status']}" for r in report["rows"]))
    if failed:
        sys.exit(f"failed: {', '.join(failed)} (see {args.out} and {args.root / 'parts'})")


if __name__ == "__main__":
    main()
