"""The model commands: train, merge, serve, eval."""

from __future__ import annotations

import shlex
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from skinvlm import render, stdout
from skinvlm.cli.common import (
    ConcurrencyOpt,
    ConfigOpt,
    DetailOpt,
    GpuOpt,
    JsonOpt,
    RulesOpt,
    WorkspaceOpt,
    base_url_option,
    command,
    counting,
    err,
    existing_workspace,
    flag,
    global_option,
    interrupted,
    open_workspace,
    out,
    phases,
    print_json,
    settings_of,
    stopped_code,
)
from skinvlm.errors import SkinvlmError
from skinvlm.evaluate import EvalSettings
from skinvlm.merge import Dtype as MergeDtype
from skinvlm.openai_api import Detail
from skinvlm.serve import Dtype as ServeDtype
from skinvlm.serve import ServeSettings
from skinvlm.train_settings import Backend, Method, ReportTo, TrainSettings
from skinvlm.workspace import Workspace

T = TrainSettings  # the defaults below are its fields'


@command()
def train(
    ctx: typer.Context,
    workspace: WorkspaceOpt = None,
    rules: RulesOpt = None,
    config_file: ConfigOpt = None,
    model: Annotated[str, typer.Option(help="Base model: Hub name or local folder.")] = T.model,
    method: Annotated[
        Method,
        typer.Option(
            help="sft: learn the described answers; grpo: from the SFT adapter in --from, sample answers and reward "
            "the right class and a well-formed Korean answer."
        ),
    ] = Method(T.method),
    from_adapter: Annotated[
        Path | None,
        typer.Option("--from", metavar="ADAPTER", help="The SFT adapter GRPO starts from (e.g. models/adapter)."),
    ] = None,
    per_class: Annotated[
        int | None, typer.Option(help="Few-shot: a seeded sample of N training photos per class (both methods).")
    ] = None,
    backend: Annotated[
        Backend, typer.Option(help="auto: unsloth on CUDA when installed, else hf (transformers + PEFT).")
    ] = Backend(T.backend),
    max_steps: Annotated[int, typer.Option(help="Optimizer steps (ignored with --epochs).")] = T.max_steps,
    epochs: Annotated[float | None, typer.Option(help="Train for this many epochs instead of --max-steps.")] = None,
    learning_rate: Annotated[
        float, typer.Option(help="Peak learning rate (cosine schedule after --warmup-steps).")
    ] = T.learning_rate,
    lora_r: Annotated[int, typer.Option(help="LoRA rank: the size of the adapter.")] = T.lora_r,
    lora_alpha: Annotated[
        int, typer.Option(help="LoRA scale (alpha / r multiplies the adapter's update).")
    ] = T.lora_alpha,
    lora_dropout: Annotated[float, typer.Option(help="Dropout on the LoRA layers' input, in [0, 1).")] = T.lora_dropout,
    finetune_vision: Annotated[
        bool, typer.Option("--finetune-vision/--no-finetune-vision", metavar="", help="LoRA on the vision tower.")
    ] = T.finetune_vision,
    finetune_language: Annotated[
        bool, typer.Option("--finetune-language/--no-finetune-language", metavar="", help="LoRA on the language model.")
    ] = T.finetune_language,
    batch_size: Annotated[int, typer.Option(help="Per-device batch size.")] = T.batch_size,
    grad_accum: Annotated[int, typer.Option(help="Gradient accumulation steps.")] = T.grad_accum,
    warmup_steps: Annotated[int, typer.Option(help="Steps of linear learning-rate warm-up.")] = T.warmup_steps,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = T.weight_decay,
    optim: Annotated[str, typer.Option(help="Optimizer (adamw_torch where bitsandbytes is missing).")] = T.optim,
    max_grad_norm: Annotated[float, typer.Option(help="Gradients are clipped to this norm.")] = T.max_grad_norm,
    max_pixels: Annotated[
        int,
        typer.Option(
            help="Image resolution cap in pixels (max_pixels/784 vision tokens); recorded for merge, serve and eval."
        ),
    ] = T.max_pixels,
    max_length: Annotated[
        int, typer.Option(help="Tokens per sample at most (image included); longer ones are cut.")
    ] = T.max_length,
    seed: Annotated[int, typer.Option(help="Seed of the sample, the shuffling and the LoRA initialisation.")] = T.seed,
    eval_steps: Annotated[
        int, typer.Option(help="Evaluate on --eval-rows development rows every N steps.")
    ] = T.eval_steps,
    eval_rows: Annotated[
        int, typer.Option(help="Development rows scored at each evaluation, for the eval loss and selection (0: none).")
    ] = T.eval_rows,
    dev_fraction: Annotated[
        float,
        typer.Option(
            help="Share of the training photos (stratified by class, whole patients, seeded) held out of training "
            "as the development rows: the best step is chosen there, never on the photos eval reports."
        ),
    ] = T.dev_fraction,
    save_steps: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = T.save_steps,
    save_total_limit: Annotated[int, typer.Option(help="Checkpoints kept.")] = T.save_total_limit,
    dataloader_workers: Annotated[
        int, typer.Option(help="Processes that decode and resize the next batches' photos while a step runs.")
    ] = T.dataloader_workers,
    load_in_4bit: Annotated[
        bool, typer.Option("--load-in-4bit/--no-load-in-4bit", metavar="", help="QLoRA: the base in 4 bits on CUDA.")
    ] = T.load_in_4bit,
    gpu: GpuOpt = None,
    processes: Annotated[
        int | None,
        typer.Option(help="DDP processes under torchrun (default: one per --gpu id; on a CPU they use gloo)."),
    ] = None,
    resume: Annotated[bool, flag("--resume", help="Continue from the newest checkpoint.")] = False,
    select_by: Annotated[
        str,
        typer.Option(
            metavar="<macro_f1|loss|last>",
            help="Keep the adapter of the best evaluation (held-out rows scored by class, or eval loss) or the last.",
        ),
    ] = T.select_by,
    patience: Annotated[
        int | None, typer.Option(help="Stop after this many evaluations without improvement.")
    ] = T.patience,
    keep_checkpoints: Annotated[
        bool, flag("--keep-checkpoints", help="Keep the best evaluation's adapter folder (models/adapter/best).")
    ] = False,
    reviewed_only: Annotated[
        bool,
        flag("--reviewed-only", help="Train only on records clinicians accepted or edited (skinvlm review, then fix)."),
    ] = False,
    keep_mismatches: Annotated[
        bool, flag("--keep-mismatches", help="Also train on answers whose <label> names another class than the folder.")
    ] = False,
    report_to: Annotated[ReportTo, typer.Option(help="Where else to log the run.")] = ReportTo(T.report_to),
    output: Annotated[
        Path | None, typer.Option(help="Adapter folder (default: models/adapter; GRPO: models/adapter-grpo).")
    ] = None,
    num_generations: Annotated[
        int, typer.Option(help="GRPO: answers sampled per photo; --batch-size x --grad-accum must be a multiple.")
    ] = T.num_generations,
    max_completion_tokens: Annotated[int, typer.Option(help="GRPO: tokens per sampled answer at most.")] = (
        T.max_completion_tokens
    ),
    temperature: Annotated[
        float, typer.Option(help="GRPO: sampling temperature (too high and the answers stop parsing).")
    ] = T.temperature,
    min_p: Annotated[
        float, typer.Option(help="GRPO: sampling drops tokens below this share of the likeliest one's probability.")
    ] = T.min_p,
    beta: Annotated[float, typer.Option(help="GRPO: weight of the KL to the SFT start (0: none).")] = T.beta,
    format_weight: Annotated[
        float, typer.Option(help="GRPO: weight of the format reward (parses, Korean summary); label weighs 1.")
    ] = T.format_weight,
    length_weight: Annotated[
        float, typer.Option(help="GRPO: weight of the length reward (ends after </summary>, within the budget).")
    ] = T.length_weight,
    group_credit: Annotated[
        float, typer.Option(help="GRPO: label reward for a class of the same [labels.groups] group as the right one.")
    ] = T.group_credit,
    dry_run: Annotated[
        bool,
        flag(
            "--dry-run",
            help="Collate one batch with the real collator and show what training would see (GRPO: and the rewards "
            "of a few sampled answers).",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune with LoRA on datasets/fixed: Unsloth QLoRA on a GPU, transformers + PEFT anywhere."""
    from skinvlm import devices
    from skinvlm import train as stage

    ws, loaded = open_workspace(workspace, rules)
    settings = settings_of(ctx, TrainSettings, "train", config_file)
    if dry_run:
        summary = stage.dry_run(ws, loaded, settings)
        if as_json:
            print_json(summary.as_json() | {"settings": asdict(settings)})
        else:
            render.train_summary(out, summary, asdict(settings))
        if problem := summary.problem():
            raise SkinvlmError(problem)
        return
    wanted = devices.processes_wanted(processes, gpu)
    if wanted > 1 and not devices.launched():
        stage.preflight(ws, loaded, settings, dry_run=False)  # one clear line here rather than one per process
        with ws.writing("train"):  # held here for the workers, who inherit it
            try:
                code = devices.relaunch(wanted, sys.argv[1:], stdout.real_stdout())
            except KeyboardInterrupt:
                raise typer.Exit(stopped_code()) from None  # rank 0 has said what was kept
            raise typer.Exit(code)
    live = render.TrainProgress(err, quiet=global_option("quiet"))
    try:
        result = stage.train(ws, loaded, settings, on_summary=lambda s, plan: live.start(s, plan), on_step=live.step)
    except stage.TrainingInterrupted as stop:
        live.close()
        if devices.is_main_process():  # one line, not one per DDP rank
            again = [*sys.argv[1:], *([] if "--resume" in sys.argv else ["--resume"])]
            line = render.training_interrupted(stop.checkpoint, stop.saved_now, shlex.join(["skinvlm", *again]))
            err.print(line.replace("[yellow]interrupted[/]", interrupted()))
        raise typer.Exit(stopped_code()) from None
    live.close()
    if devices.is_main_process():
        print_json(result.as_json()) if as_json else render.train_result(out, result)


@command()
def merge(
    workspace: WorkspaceOpt = None,
    base: Annotated[
        str | None,
        typer.Option(help="16-bit base model (default: the one recorded in the adapter, or its 16-bit twin)."),
    ] = None,
    dtype: Annotated[MergeDtype, typer.Option(help="Weights of the merged model.")] = MergeDtype.bfloat16,
    adapter: Annotated[Path | None, typer.Option(help="Adapter folder (default: models/adapter).")] = None,
    output: Annotated[Path | None, typer.Option(help="Merged folder (default: models/merged).")] = None,
    gpu: GpuOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Merge the LoRA adapter into a 16-bit model folder that transformers and vLLM load, and verify it."""
    from skinvlm.merge import merge as run_merge

    ws = existing_workspace(workspace)
    with phases("merge") as phase:
        result = run_merge(ws, adapter=adapter, output=output, base=base, dtype=dtype.value, gpu=gpu, phase=phase)
    print_json(result.as_json()) if as_json else render.merge_result(out, result)


S = ServeSettings  # the defaults below are its fields'


@command()
def serve(
    ctx: typer.Context,
    workspace: WorkspaceOpt = None,
    config_file: ConfigOpt = None,
    model_dir: Annotated[Path | None, typer.Option(help="Model folder (default: models/merged).")] = None,
    host: Annotated[
        str,
        typer.Option(help="Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every network it is on)."),
    ] = S.host,
    port: Annotated[int, typer.Option(help="Port of the OpenAI-compatible server.")] = S.port,
    gpu: GpuOpt = None,
    dtype: Annotated[ServeDtype, typer.Option(help="Weights as vLLM loads them (auto: as saved).")] = ServeDtype(
        S.dtype
    ),
    max_model_len: Annotated[
        int, typer.Option(help="Tokens per request at most (image, prompt and answer).")
    ] = S.max_model_len,
    gpu_memory_utilization: Annotated[
        float, typer.Option(help="Share of each GPU's memory vLLM may take, in (0, 1].")
    ] = S.gpu_memory_utilization,
    tensor_parallel_size: Annotated[
        int | None,
        typer.Option(
            help="GPUs each replica is split over; the other --gpu ids hold more replicas (data parallel). Default: 1 "
            "where the model's weights and KV cache fit one GPU."
        ),
    ] = None,
    gpu_memory: Annotated[
        float | None, typer.Option(help="GiB per GPU for the layout estimate (default: nvidia-smi's).")
    ] = None,
    nodes: Annotated[int, typer.Option(min=1, help="Machines serving as one data-parallel deployment.")] = S.nodes,
    node_rank: Annotated[int, typer.Option(min=0, help="This machine's number among --nodes (0: the API server).")] = 0,
    master: Annotated[
        str | None, typer.Option(help="HOST:PORT of node 0 for vLLM's data-parallel RPC (with --nodes).")
    ] = None,
    served_model_name: Annotated[
        str, typer.Option(help="The model name clients ask for (eval's --model).")
    ] = S.served_model_name,
    limit_mm_per_prompt: Annotated[str, typer.Option(help="JSON, e.g. '{\"image\":1}'.")] = S.limit_mm_per_prompt,
    generation_config_vllm: Annotated[
        bool,
        flag("--generation-config-vllm", help="Pass --generation-config vllm (ignore the model's generation_config)."),
    ] = False,
    startup_timeout: Annotated[float, typer.Option(help="Seconds to wait for /health.")] = S.startup_timeout,
    print_command: Annotated[bool, flag("--print-command", help="Print the vllm command and exit.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Serve models/merged with vLLM's OpenAI-compatible server (CUDA); Ctrl-C stops it."""
    from skinvlm import serve as stage

    ws = Workspace.open(workspace) if model_dir else existing_workspace(workspace)
    folder = model_dir or ws.merged
    settings = settings_of(ctx, ServeSettings, "serve", config_file)
    if print_command:
        stage.check_model(folder)
        printed = stage.printed_command(folder, settings)
        if as_json:
            return print_json(printed)
        err.print(f"layout: {printed['layout']['summary']}", highlight=False, markup=False)
        if settings.nodes == 1:
            sys.stdout.write(printed["shell"] + "\n")
        for node in printed["nodes"] if settings.nodes > 1 else []:
            sys.stdout.write(f"# node {node['node_rank']}\n{node['shell']}\n")
        return
    process = None
    try:
        stage.check_model(folder)
        plan = stage.layout(folder, settings)
        err.print(f"layout: {plan.describe(settings)}", highlight=False, markup=False)
        process, endpoint = stage.start(folder, settings, plan)  # one interrupted while starting is stopped there
        if endpoint is None:
            out.print(
                f"[green]started[/]: node {settings.node_rank}'s engines (headless) serve through "
                f"{stage.endpoint(settings)}, node 0's API server; Ctrl-C stops them",
                highlight=False,
            )
        else:
            out.print(
                f"[green]ready[/]: {endpoint} (model name {settings.served_model_name!r}); Ctrl-C stops it\n"
                f"{stage.curl_example(endpoint, settings.served_model_name)}",
                highlight=False,
            )
        code = process.wait()
    except KeyboardInterrupt:
        if process is not None:
            stage.stop(process)
        err.print(f"{interrupted()}: the vLLM server is stopped, its processes ended and its port released")
        raise typer.Exit(stopped_code()) from None
    raise SkinvlmError(f"the vLLM server exited by itself with code {code}")


E = EvalSettings  # the defaults below are its fields'


@command(name="eval")
def eval_(
    ctx: typer.Context,
    workspace: WorkspaceOpt = None,
    rules: RulesOpt = None,
    config_file: ConfigOpt = None,
    name: Annotated[str | None, typer.Option(help="Run name: eval/<name>/ (default: a timestamp).")] = None,
    split: Annotated[str, typer.Option(help="Split of datasets/ingested (or of a --dataset on the Hub).")] = E.split,
    dataset: Annotated[
        str | None,
        typer.Option(
            metavar="PATH_OR_HUB_ID",
            help="External photos instead of the workspace's: a folder of class folders, or a Hub dataset with "
            "image and label columns; classes mapped by [external.labels], the rest counted as out of scope.",
        ),
    ] = None,
    limit: Annotated[
        int | None, typer.Option(min=1, help="A seeded sample of N images, stratified by label and view.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the --limit sample.")] = E.seed,
    base_url: Annotated[list[str] | None, base_url_option("http://127.0.0.1:8000/v1, i.e. skinvlm serve")] = None,
    model: Annotated[str, typer.Option(help="Model name at the server.")] = E.model,
    api_key: Annotated[
        str | None, typer.Option(help="API key (default: $OPENAI_API_KEY or <workspace>/.env).", show_default=False)
    ] = None,
    concurrency: ConcurrencyOpt = E.concurrency,
    timeout: Annotated[float, typer.Option(help="Seconds for each whole request to the server.")] = E.timeout,
    max_tokens: Annotated[int, typer.Option(help="Answer tokens at most.")] = E.max_tokens,
    temperature: Annotated[
        float, typer.Option(help="Sampling temperature (0: greedy, as the figures assume).")
    ] = E.temperature,
    detail: DetailOpt = Detail(E.detail),
    max_pixels: Annotated[
        int | None,
        typer.Option(
            help="Photos go to a server as PNG at this resolution (default: the workspace model's trained one; "
            "none known: the original size)."
        ),
    ] = None,
    backoff: Annotated[float, typer.Option(help="Base seconds of the retry backoff.")] = E.backoff,
    max_attempts: Annotated[int, typer.Option(min=1, help="Tries per request on 429/5xx/timeouts.")] = E.max_attempts,
    wait: Annotated[
        float, typer.Option(min=0, help="Seconds to wait for the server to answer /v1/models before the first image.")
    ] = E.wait,
    labels_only: Annotated[
        bool, flag("--labels-only", help="Stop each answer at </label>: accuracy in a fraction of the time.")
    ] = E.labels_only,
    probabilities: Annotated[
        bool,
        typer.Option(
            "--probabilities/--no-probabilities",
            metavar="",
            help="Class probabilities: every label scored (--model-dir) or logprobs asked of the server.",
        ),
    ] = E.probabilities,
    constrained: Annotated[
        bool,
        flag(
            "--constrained",
            help="Decode the label from the classes only, then the summary freely (--model-dir: the best-scored "
            "class; a server: vLLM's structured outputs). Nothing is unparsed.",
        ),
    ] = E.constrained,
    target_accuracy: Annotated[
        float,
        typer.Option(
            help="Accuracy the referral threshold aims at: answer the photos this likely right, refer the rest."
        ),
    ] = E.target_accuracy,
    judge_model: Annotated[
        str | None,
        typer.Option(
            metavar="MODEL",
            help="Also have this model score every answer 1-5 (accuracy, safety, groundedness, Korean fluency), "
            "seeing the photo and the reviewed description; kept in judgements.jsonl.",
        ),
    ] = E.judge_model,
    judge_base_url: Annotated[
        list[str] | None,
        typer.Option(
            metavar="URL", help="The judge's endpoint (default: $OPENAI_BASE_URL, else OpenAI); key: $OPENAI_API_KEY."
        ),
    ] = None,
    judge_max_cost: Annotated[
        float | None, typer.Option(metavar="USD", help="Refuse to judge when the estimated cost is above this.")
    ] = E.judge_max_cost,
    model_dir: Annotated[
        Path | None,
        typer.Option(help="Run this model folder in-process with transformers instead of asking a server (CPU ok)."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per generate() call with --model-dir.")] = E.batch_size,
    gpu: GpuOpt = None,
    confusion_matrix: Annotated[
        bool, flag("--confusion-matrix", help="Also write confusion_matrix.png and print the matrix.")
    ] = False,
    compare: Annotated[
        list[str] | None,
        typer.Option(
            metavar="RUN", help="Runs side by side, each later one paired with the first (`--compare A B` or repeated)."
        ),
    ] = None,
    more_runs: Annotated[
        list[str] | None, typer.Argument(metavar="RUN", help="More runs for --compare.", show_default=False)
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate against a server or a model folder: accuracy, macro F1, per class and view, confusion matrix."""
    from skinvlm import evaluate as stage

    ws, loaded = open_workspace(workspace, rules)
    if more_runs and not compare:
        raise SkinvlmError(f"eval takes run names only after --compare: --compare {' '.join(more_runs)}")
    if compare:
        compared = stage.compare(ws, [*compare, *(more_runs or [])], loaded)
        return print_json(compared) if as_json else render.compare_runs(out, compared, loaded)
    settings = settings_of(ctx, EvalSettings, "eval", config_file)
    with counting("evaluating") as progress:
        result = stage.evaluate(ws, loaded, settings, api_key, progress=progress)
    print_json(result) if as_json else render.eval_report(out, result, loaded)
    stage.check_failures(result)
