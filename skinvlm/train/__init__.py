"""`skinvlm train`: LoRA fine-tuning, by supervised learning (`--method sft`) or, from an SFT adapter, by GRPO on
rewards of sampled answers (`--method grpo`).

Rows become chat samples (`samples.chat_rows`: the image, then the instruction; the answer) or, for GRPO,
prompts (`samples.prompt_rows`: the same chat without the answer). Two backends (backends.py): `unsloth`
(FastVisionModel, 4-bit, Unsloth's vision collator) and `hf` (transformers + PEFT, 4-bit via bitsandbytes on
CUDA, our answer-only collator). Before step 1 one real batch is collated and checked (`samples.summarize`);
`--dry-run` stops there. `--gpu 0,1` or `--processes N` relaunch the command under torchrun, one DDP process
each. The modules: preflight (checks in seconds), rows (the data), backends, setup (what both methods share),
sft, grpo and rewards, run (a run of either), outputs (what a run leaves beside its adapter).
"""

from skinvlm.train.preflight import preflight
from skinvlm.train.run import TrainingInterrupted, TrainResult, dry_run, train

__all__ = ["TrainResult", "TrainingInterrupted", "dry_run", "preflight", "train"]
