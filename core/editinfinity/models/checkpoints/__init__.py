"""Foreign checkpoint formats, in one place: reading ``.pth``/``.safetensors`` files, the official Infinity key map
(``infinity``: chunked blocks, legacy buffers, ``cfg_uncond`` rows), the BSQ VAE key map (``vae``), the reference's
LoRA files (``lora``), conversion to our ``save_pretrained`` layout (``convert``). A checkpoint that does not fit raises ``CheckpointError`` with the one
message of ``errors.format_key_problems``.
"""

from .convert import convert_official, read_checkpoint, write_model_index
from .infinity import LoadReport, load_infinity_state_dict, to_official_state_dict
from .lora import reference_lora_to_peft
from .vae import load_vae_state_dict

__all__ = ["LoadReport", "convert_official", "load_infinity_state_dict", "load_vae_state_dict", "read_checkpoint",
           "reference_lora_to_peft", "to_official_state_dict", "write_model_index"]
