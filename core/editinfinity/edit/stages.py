"""The stage functions over directories, in pipeline order (what the CLI and the KFP components call)."""

from .attention import attention
from .generate import generate
from .lora import train_lora
from .masking import make_mask
from .prepare import prepare
from .prompt_tuning import tune_prompt
from .run import run_edit, summarize

__all__ = ["prepare", "tune_prompt", "train_lora", "attention", "make_mask", "generate", "summarize", "run_edit"]
