"""GPU proof kit: every GPU path of skinvlm, offline, on any CUDA machine with the GPU extras.

    python benchmarks/gpu_smoke.py                 # both parts, results also in gpu_smoke.json
    python benchmarks/gpu_smoke.py --part tiny     # or --part 7b; --cpu runs the tiny part on a CPU (hf only)

(tiny) the tiny Qwen2.5-VL on 112 px images, for each installed backend (hf; unsloth) and precision
       (bf16; 4-bit where bitsandbytes is present): `train --dry-run` (the batch summary),
       `train --gpu 0` for --steps steps (s/step, peak VRAM), `merge`, `eval --model-dir`.
(7b)   the default recipe (batch 2 x grad-accum 4, LoRA r 128 on vision and language, 1,024 vision
       tokens per 1024 px photo) on a random-weight model with Qwen2.5-VL-7B's exact shapes,
       built from its config: s/step, images/s and peak VRAM per backend, 4-bit and bf16.
       Speed and memory do not depend on weight values, and nothing is downloaded.
Each case runs the real CLI in its own process; a failing case is reported with its last error
line and the others go on. The baseline of the ratio is the hf backend in bf16, measured in the same run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from skinvlm.demo.pipeline import TINY_RECIPE  # noqa: E402


def skinvlm(*args: Any) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "skinvlm", *map(str, args)], capture_output=True, text=True)


def json_of(done: subprocess.CompletedProcess) -> dict[str, Any]:
    if done.returncode:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise RuntimeError(lines[-1] if lines else f"exit {done.returncode}")
    return json.loads(done.stdout)


def prepare(root: Path, size: int, per_folder: dict[str, int]) -> Path:
    from skinvlm.demo.pipeline import demo_rules
    from skinvlm.demo.synthetic import write_tree

    ws = root / "ws"
    ws.mkdir(parents=True)
    demo_rules(ws / "postprocess.toml")
    write_tree(root / "src", per_folder, size=size)
    for command in (("ingest", root / "src"), ("describe", "--template"), ("fix",)):
        json_of(skinvlm(*command, "-w", ws, "--json"))
    return ws


def cases(cpu: bool) -> list[tuple[str, bool]]:
    """(backend, 4-bit) pairs this machine can run."""
    if cpu:
        return [("hf", False)]
    backends = ["hf"] + (["unsloth"] if importlib.util.find_spec("unsloth") else [])
    four_bit = [False] + ([True] if importlib.util.find_spec("bitsandbytes") else [])
    return [(b, q) for b in backends for q in four_bit]


def flags(recipe: dict[str, Any]) -> list[str]:
    return [part for key, value in recipe.items() for part in (f"--{key.replace('_', '-')}", str(value))]


def train_case(ws: Path, model: Path, backend: str, four_bit: bool, steps: int, recipe: dict[str, Any], cpu: bool):
    name = f"{backend}-{'4bit' if four_bit else 'bf16'}"
    output = ws / "models" / name
    common = ["-w", ws, "--model", model, *flags({**recipe, "backend": backend}), "--output", output]
    common += ["--load-in-4bit" if four_bit else "--no-load-in-4bit"] + ([] if cpu else ["--gpu", "0"])
    summary = json_of(skinvlm("train", *common, "--dry-run", "--json"))
    result = json_of(skinvlm("train", *common, "--max-steps", steps, "--eval-rows", 0, "--json"))
    log = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    runtime = next(e["train_runtime"] for e in log if "train_runtime" in e)
    return name, output, summary, result, runtime / steps


def measured(part: str, backend: str, four_bit: bool, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One case as a printed row; a failure is the row's `error` and the run goes on."""
    row: dict[str, Any] = {"part": part, "backend": backend, "4bit": four_bit}
    try:
        row |= measure()
    except (RuntimeError, StopIteration, OSError) as problem:
        row["error"] = str(problem)
    print(json.dumps(row, ensure_ascii=False), flush=True)
    return row


def tiny_part(root: Path, steps: int, cpu: bool) -> list[dict[str, Any]]:
    from skinvlm.demo.tiny import build

    ws = prepare(root / "tiny", 112, {"train": 5, "test": 2})
    model = build(root / "tiny-model")
    gpu = [] if cpu else ["--gpu", "0"]

    def case(backend: str, four_bit: bool) -> dict[str, Any]:
        name, adapter, summary, result, step = train_case(ws, model, backend, four_bit, steps, TINY_RECIPE, cpu)
        merged = ws / "models" / f"{name}-merged"
        merge = json_of(skinvlm("merge", "-w", ws, "--adapter", adapter, "--output", merged, *gpu, "--json"))
        evaluated = json_of(
            skinvlm("eval", "-w", ws, "--model-dir", merged, "--name", name, "--max-tokens", 32, *gpu, "--json")
        )
        return {
            "image_tokens": summary["image_tokens_per_row"][0],
            "supervised": summary["supervised_tokens_per_row"][0],
            "s_per_step": round(step, 3),
            "peak_vram_mb": result["peak_vram_mb"],
            "final_loss": result["final_loss"],
            "merge_error": merge["merge_error"],
            "accuracy": evaluated["accuracy"],
        }

    return [measured("tiny", b, q, lambda b=b, q=q: case(b, q)) for b, q in cases(cpu)]


def big_part(root: Path, steps: int) -> list[dict[str, Any]]:
    from skinvlm.demo.tiny import build

    ws = prepare(root / "7b", 1024, {"train": 2, "test": 1})
    clock = time.perf_counter()
    model = build(root / "qwen2.5-vl-7b-shaped", shape="7b")
    print(f"7B-shaped model built and saved in {time.perf_counter() - clock:.0f}s", flush=True)
    recipe = {"eval_rows": 0, "save_steps": 10_000}  # everything else: the defaults

    def case(backend: str, four_bit: bool) -> dict[str, Any]:
        _, _, summary, result, step = train_case(ws, model, backend, four_bit, steps, recipe, cpu=False)
        return {
            "image_tokens": summary["image_tokens_per_row"][0],
            "s_per_step": round(step, 2),
            "images_per_s": round(summary["effective_batch_size"] / step, 2),
            "peak_vram_mb": result["peak_vram_mb"],
        }

    return [measured("7b", b, q, lambda b=b, q=q: case(b, q)) for b, q in cases(cpu=False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("tiny", "7b", "all"), default="all")
    parser.add_argument("--steps", type=int, default=40, help="training steps of the tiny model")
    parser.add_argument("--big-steps", type=int, default=6, help="training steps of the 7B-shaped model")
    parser.add_argument("--cpu", action="store_true", help="run the tiny part on a CPU (checks this script)")
    parser.add_argument("--out", type=Path, default=Path("gpu_smoke.json"))
    args = parser.parse_args()
    import torch

    if not (args.cpu or torch.cuda.is_available()):
        sys.exit("gpu_smoke needs a CUDA GPU (or --cpu for the tiny part on this CPU)")
    device = "CPU" if args.cpu else torch.cuda.get_device_name(0)
    root = Path(tempfile.mkdtemp(prefix="skinvlm-gpu-smoke-"))
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    rows = []
    if args.part in ("tiny", "all"):
        rows += tiny_part(root, args.steps, args.cpu)
    if args.part in ("7b", "all") and not args.cpu:
        rows += big_part(root, args.big_steps)
    report = {"device": device, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "rows": rows}
    args.out.write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
    baseline = {r["part"]: r.get("s_per_step") for r in rows if r["backend"] == "hf" and not r["4bit"]}
    print(f"\n{device}, {report['date']}")
    for r in rows:
        ratio = baseline.get(r["part"]) and r.get("s_per_step") and baseline[r["part"]] / r["s_per_step"]
        extra = f"  {ratio:.2f}x the hf bf16 speed" if ratio else ""
        shown = {k: v for k, v in r.items() if k not in ("part", "backend", "4bit")}
        print(f"{r['part']:>4} {r['backend']:>7} {'4-bit' if r['4bit'] else 'bf16':>5}  {shown}{extra}")
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
