"""KFP components of editinfinity: thin wrappers over ``editinfinity.edit.stages`` (one per stage) and the report."""

from .fused import fused_edit
from .images import CPU_IMAGE, GPU_IMAGE
from .piebench import piebench_cases, piebench_edit, piebench_score
from .report import batch_summary, read_manifest, summarize
from .stages import attention, generate, mask, prepare, train_lora, tune_prompt

#: Components that request a GPU (and get the profile's node selector and tolerations).
GPU_COMPONENTS = ("prepare", "tune-prompt", "train-lora", "attention", "generate", "fused-edit",
                  "piebench-edit", "piebench-score")
#: Components that run on CPU nodes.
CPU_COMPONENTS = ("mask", "summarize", "read-manifest", "batch-summary", "piebench-cases")

__all__ = ["CPU_COMPONENTS", "CPU_IMAGE", "GPU_COMPONENTS", "GPU_IMAGE", "attention", "batch_summary", "fused_edit",
           "generate", "mask", "piebench_cases", "piebench_edit", "piebench_score", "prepare", "read_manifest",
           "summarize", "train_lora", "tune_prompt"]
