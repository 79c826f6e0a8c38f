"""KFP components of editinfinity: thin wrappers over ``editinfinity.edit.stages`` (one per stage) and the report."""

from .batch import batch_plan, batch_summary, batch_worker
from .fused import fused_edit
from .images import CPU_IMAGE, GPU_IMAGE
from .piebench import piebench_cases, piebench_score, piebench_worker
from .report import summarize
from .stages import attention, check_case, generate, mask, prepare, train_lora, tune_prompt

#: Components that request a GPU (and get the profile's node selector and tolerations).
GPU_COMPONENTS = ("prepare", "tune-prompt", "train-lora", "attention", "generate", "fused-edit",
                  "batch-worker", "piebench-worker", "piebench-score")
#: Components that run on CPU nodes.
CPU_COMPONENTS = ("check-case", "mask", "summarize", "batch-plan", "batch-summary", "piebench-cases")

__all__ = ["CPU_COMPONENTS", "CPU_IMAGE", "GPU_COMPONENTS", "GPU_IMAGE", "attention", "batch_plan", "batch_summary",
           "batch_worker", "check_case", "fused_edit", "generate", "mask", "piebench_cases", "piebench_score", "piebench_worker",
           "prepare", "summarize", "train_lora", "tune_prompt"]
