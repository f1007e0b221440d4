"""The GPU paths as far as a CPU shows them, and what the first runs on an H200 found: `--json` that stays JSON
while libraries print, the resolution cap on every image processor, served eval that sends the pixels training
used, the 4-bit recipe of the hf backend, short adapters that merge, and serve/train stopped by any signal."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST, alive, error_line, free_port, run_cli

from skinvlm.demo.synthetic import image_bytes, write_tree
from skinvlm.testing.openai_server import FakeOpenAI

# Imported before transformers by every Python started with it on PYTHONPATH: at the import of transformers it
# writes to file descriptor 1 from below Python and prints, as Unsloth does at import and at load.
NOISY_IMPORT = """
import importlib.abc, importlib.machinery, os, sys

class Noisy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            os.write(1, b"BANNER written to fd 1\\n")
            print("a library's print at import")

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, Noisy())
"""


@pytest.mark.slow
def test_json_stays_json_when_libraries_write_to_stdout(described: Path, tiny: Path, tmp_path: Path) -> None:
    plant = tmp_path / "plant"
    plant.mkdir()
    (plant / "sitecustomize.py").write_text(NOISY_IMPORT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plant), os.environ.get("PYTHONPATH", "")])}

    def json_of(*args: object) -> dict:
        done = subprocess.run(
            [sys.executable, "-m", "skinvlm", *map(str, args), "-w", str(described), "--json"],
            env=env,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        assert "BANNER written to fd 1" in done.stderr and "a library's print" in done.stderr, "the plant fired"
        return json.loads(done.stdout)

    assert json_of("train", "--dry-run", "--model", tiny, *FAST)["rows"] == 60
    trained = json_of("train", "--model", tiny, *FAST, "--max-steps", "2", "--dataloader-workers", "0")
    assert trained["steps"] == 2 and trained["vision_forward_calls"] == 2, "the vision tower ran at every step"
    evaluated = json_of("eval", "--model-dir", tiny, "--name", "noisy", "--limit", "6", "--max-tokens", "4")
    assert evaluated["n"] == 6


def test_hf_4bit_keeps_the_vision_tower_and_merger_in_16_bits() -> None:
    from skinvlm.train.backends import quantization_config

    config = quantization_config()
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    # transformers leaves a module unquantized when a part of its name is listed: model.visual.blocks.*,
    # model.visual.merger.mlp.* and lm_head, as Unsloth's 4-bit loading does.
    assert set(config.llm_int8_skip_modules) == {"visual", "lm_head"}


def test_the_resolution_cap_holds_where_min_and_max_pixels_are_read_only(tiny: Path) -> None:
    """The H200 run met a Qwen2VLImageProcessor whose min_pixels/max_pixels cannot be set (the torchvision-backed
    processor there; no CPU build of torchvision exists here): the same processor class with the two as read-only
    views of `size` stands in for it."""
    from skinvlm.vlm import load_processor, set_image_resolution, vision_tokens

    processor = load_processor(tiny)
    base = type(processor.image_processor)
    read_only = type(
        "ReadOnlyPixels",
        (base,),
        {
            "min_pixels": property(lambda self: self.size.shortest_edge),
            "max_pixels": property(lambda self: self.size.longest_edge),
        },
    )
    processor.image_processor.__class__ = read_only
    set_image_resolution(processor, 12544)
    assert vision_tokens(processor, 1024, 1024) == 16 and vision_tokens(processor, 1920, 1080) == 15


SIZES = [(1920, 1080), (1280, 960), (1024, 1024), (3000, 4000), (640, 480), (60, 50), (5000, 40), (896, 896)]


@pytest.mark.parametrize("max_pixels", [12544, 200704, 1024 * 28 * 28])
def test_the_model_input_size_is_the_processors_own(tiny: Path, max_pixels: int) -> None:
    from PIL import Image

    from skinvlm.vlm import load_processor, model_input_size, set_image_resolution

    processor = load_processor(tiny)
    set_image_resolution(processor, max_pixels)
    for width, height in SIZES:
        grid = processor.image_processor(images=[Image.new("RGB", (width, height))], return_tensors="pt")
        _, rows, columns = grid["image_grid_thw"][0].tolist()
        assert model_input_size(width, height, max_pixels) == (columns * 14, rows * 14), (width, height)


def sent_image(body: dict):
    from PIL import Image

    url = body["messages"][0]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,"), "lossless"
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


def test_served_eval_sends_the_pixels_training_used(cli, workspace: Path, tmp_path: Path, tiny: Path) -> None:
    """A 1920x1080 photo: the request's PNG is what training's processor makes of the photo, so the server's
    processor (vLLM runs the same one with serve's --mm-processor-kwargs) has nothing left to resize."""
    from PIL import Image

    from skinvlm.vlm import load_processor, set_image_resolution, vision_tokens, write_settings

    src = tmp_path / "src"
    write_tree(src, {"train": 1, "test": 1}, size=32)
    wide = src / "Validation" / "images" / "VS_건선_정면"
    for old in wide.iterdir():
        old.unlink()
    photo = Image.open(io.BytesIO(image_bytes("건선", 7, 1080, "RGB"))).resize((1920, 1080))
    photo.save(wide / "wide.png")
    cli("ingest", src)
    with FakeOpenAI() as server:
        cli("eval", "--base-url", server.url, "--api-key", "sk-x", "--name", "original", "--limit", "12")
        original = next(sent_image(b) for b in server.bodies if sent_image(b).size == (1920, 1080))
    assert original.tobytes() == photo.tobytes(), "no trained resolution known: the photo as it is, losslessly"

    max_pixels = 50176
    shutil.copytree(tiny, workspace / "models" / "merged")
    write_settings(workspace / "models" / "merged", {"max_pixels": max_pixels})
    with FakeOpenAI() as server:
        cli("eval", "--base-url", server.url, "--api-key", "sk-x", "--name", "served", "--limit", "12")
        sent = next(sent_image(b) for b in server.bodies if sent_image(b).width > sent_image(b).height)
    processor = load_processor(tiny)
    set_image_resolution(processor, max_pixels)
    training = processor.image_processor(images=[photo], return_tensors="pt")
    serving = processor.image_processor(images=[sent], return_tensors="pt")
    assert sent.size == (280, 168) and vision_tokens(processor, *sent.size) == vision_tokens(processor, 1920, 1080)
    assert training["image_grid_thw"].tolist() == serving["image_grid_thw"].tolist()
    assert (training["pixel_values"] - serving["pixel_values"]).abs().max() < 1e-6, "the same pixels"


@pytest.mark.slow
def test_an_adapter_of_two_steps_merges(cli, described: Path, tiny: Path) -> None:
    """Its effect on the logits is about the size of bf16 rounding: judged against the dtype's own floor."""
    cli("train", "--model", tiny, *FAST, "--max-steps", "2", "--learning-rate", "1e-4")
    merged = cli.json("merge")
    assert merged["merge_error"] <= merged["tolerance"] and merged["changed_weights"] == merged["lora_targets"] > 0
    folder = described / "models" / "merged"  # a link to the stage's current version folder
    shown = cli.json("eval", "--model-dir", folder, "--name", "short", "--limit", "6", "--max-tokens", "4")
    assert shown["backend"] == f"model dir {folder}", "headers name the folder given, not .merged.v1"


def test_no_load_in_4bit_takes_the_16bit_twin_or_stops(cli, described: Path, tiny: Path, tmp_path: Path) -> None:
    hub = run_cli("train", "-w", described, "--dry-run", "--no-load-in-4bit")  # the default base: Unsloth's 4-bit
    assert hub.stderr.splitlines()[0] == (
        "warning: --no-load-in-4bit: training the 16-bit unsloth/Qwen2.5-VL-7B-Instruct instead of the 4-bit "
        "unsloth/Qwen2.5-VL-7B-Instruct-unsloth-bnb-4bit"
    )
    assert "unsloth/Qwen2.5-VL-7B-Instruct is not in the Hugging Face cache" in hub.stderr, "the twin is looked for"
    quantized = tmp_path / "quantized"
    shutil.copytree(tiny, quantized)
    config = json.loads((quantized / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps(config | {"quantization_config": {"load_in_4bit": True}}))
    local = cli("train", "--model", quantized, "--no-load-in-4bit", *FAST, ok=False)
    assert local.exit_code == 1 and "holds 4-bit weights" in error_line(local.stderr)


# A stand-in for vllm (no GPU here) that answers /health and, like vLLM's engine core, starts a process of its own.
STAND_IN = """
import http.server, os, subprocess, sys
port = int(sys.argv[sys.argv.index("--port") + 1])
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(os.environ["STAND_IN_CHILD"], "w").write(str(child.pid))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_serve_takes_vllm_and_its_children_down_on_any_stop_signal(
    workspace: Path, tmp_path: Path, stop: signal.Signals
) -> None:
    """The signal reaches serve's PID alone (`kill PID`, docker stop, a scheduler); SIGINT arrives ignored, as a
    shell without job control leaves it for a background job: every one stops the server and its children."""
    folder = workspace / "models" / "merged"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    script, pid_file, port = tmp_path / "standin.py", tmp_path / "child.pid", free_port()
    script.write_text(STAND_IN)
    env = {**os.environ, "SKINVLM_VLLM_BIN": f"{sys.executable} {script}", "STAND_IN_CHILD": str(pid_file)}
    command = [sys.executable, "-m", "skinvlm", "serve", "-w", str(workspace), "--port", str(port)]
    ignore_sigint = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if stop == signal.SIGINT else None
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=ignore_sigint)  # fmt: skip
    server = None
    try:
        assert "ready" in proc.stdout.readline()
        server = int(subprocess.run(["pgrep", "-f", str(script)], capture_output=True, text=True).stdout.split()[0])
        grandchild = int(pid_file.read_text())
        proc.send_signal(stop)
        assert proc.wait(timeout=60) == 128 + stop
        stderr = proc.stderr.read()
        assert "the vLLM server is stopped" in stderr and "run the same command again" not in stderr
        deadline = time.time() + 10
        while alive(server) or alive(grandchild):
            assert time.time() < deadline, "a process of the server outlived skinvlm serve"
            time.sleep(0.1)
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0, "the port is released"
    finally:
        proc.kill()
        for pid in (server, int(pid_file.read_text()) if pid_file.exists() else None):
            if pid and alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_sigterm_in_training_saves_a_checkpoint_to_resume_from(described: Path, tiny: Path) -> None:
    command = [sys.executable, "-m", "skinvlm", "train", "-w", str(described), "--model", str(tiny), *FAST]
    command += ["--max-steps", "2000", "--save-steps", "1000", "--dataloader-workers", "0"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = described / "models" / "adapter" / "train_log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 3):
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    stderr = proc.stderr.read()
    assert "interrupted by SIGTERM" in stderr and "a checkpoint was saved at step" in stderr and "--resume" in stderr
    assert list((described / "models" / "adapter" / "checkpoints").glob("checkpoint-*"))
    resumed = run_cli("train", "-w", described, "--model", tiny, *FAST, "--max-steps", "4", "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr


@pytest.mark.slow
def test_ctrl_c_under_ddp_is_one_true_line(described: Path, tiny: Path) -> None:
    """Ctrl-C reaches the whole process group (torchrun and both ranks): rank 0 alone says what was kept, and under
    DDP that is the newest periodic checkpoint, not one saved now."""
    command = [sys.executable, "-m", "skinvlm", "train", "-w", str(described), "--model", str(tiny), *FAST]
    command += ["--processes", "2", "--max-steps", "2000", "--save-steps", "2", "--dataloader-workers", "0"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    checkpoints = described / "models" / "adapter" / "checkpoints"
    deadline = time.time() + 180
    while not list(checkpoints.glob("checkpoint-*")):
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.2)
    time.sleep(1)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    stderr = proc.stderr.read()
    said = [line for line in stderr.splitlines() if "interrupted" in line]
    assert len(said) == 1 and "the newest checkpoint (steps after it are redone) at step" in said[0], stderr
    assert "a checkpoint was saved" not in stderr
