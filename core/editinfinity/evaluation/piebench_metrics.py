"""PIE-Bench metrics, computed as PnP-Inversion's ``evaluation/matrics_calculator.py`` computes them.

Every image is 512x512 RGB; ``edit_mask`` is the decoded annotation with its one-pixel frame set (True = edited).

* **Background** (``psnr``, ``mse``, ``ssim``, ``lpips``): both images in [0, 1] are multiplied by ``1 - mask`` and
  the whole-image metric is taken (:func:`editinfinity.metrics.background_metrics`, ``method="zero"``). PSNR and
  SSIM use ``data_range=1``; SSIM is the torchmetrics Gaussian SSIM. LPIPS is version 0.1 with the SqueezeNet
  trunk (``net_type="squeeze"``, as PnP-Inversion's torchmetrics call), inputs mapped to [-1, 1].
  A mask that covers every pixel leaves no background: those columns are NaN ("nan" in PnP-Inversion's CSV).
* **CLIP** (``clip_whole``, ``clip_edited``): torchmetrics' ``CLIPScore`` formula, ``max(100 * cos(image, text),
  0)`` with CLIP ViT-L/14, against the edit prompt without brackets; ``clip_edited`` scores ``uint8(image * mask)``.
  Captions longer than the text model's positions are cut as torchmetrics cuts them.
* **Structure distance** (``structure_distance``): DINO ViT-B/8, last layer's attention keys (CLS included), the
  cosine self-similarity matrix of source and edit, MSE between the two. As in PnP-Inversion the pictures enter
  as float 0-255 values, are resized to 224 (bilinear, no antialias: torchvision 0.13 on tensors) and normalised
  with the ImageNet mean/std meant for 0-1 values; that quirk is kept so that the numbers compare.

PSNR/MSE/SSIM need no weights. LPIPS, CLIP and DINO load weights from paths or hub ids the user gives
(:meth:`MetricModels.load`); a scorer that was not given is ``None`` and its columns are *not computed* (``None``),
never zero. Nothing here downloads anything by itself unless a hub id is given and the hub is reachable.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from ..errors import CheckpointError, InvalidCaseError
from ..metrics import as_float_image, background_metrics, zero_edited

log = logging.getLogger(__name__)

#: Metric keys in table order: (key, column title, scale in the table, better).
COLUMNS: tuple[tuple[str, str, float, str], ...] = (
    ("structure_distance", "Structure distance ×10³", 1e3, "lower"),
    ("psnr", "PSNR", 1.0, "higher"),
    ("lpips", "LPIPS ×10³", 1e3, "lower"),
    ("mse", "MSE ×10⁴", 1e4, "lower"),
    ("ssim", "SSIM ×10²", 1e2, "higher"),
    ("clip_whole", "CLIP whole", 1.0, "higher"),
    ("clip_edited", "CLIP edited", 1.0, "higher"),
)
METRIC_KEYS: tuple[str, ...] = tuple(c[0] for c in COLUMNS)
#: Which scorer each metric needs (None: computed from the pixels alone).
NEEDS: dict[str, str | None] = {"structure_distance": "dino", "psnr": None, "lpips": "lpips", "mse": None,
                                "ssim": None, "clip_whole": "clip", "clip_edited": "clip"}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _uint8(image: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 array of an RGB picture."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 picture, got {arr.dtype} {arr.shape}")
    return arr


# ---------------------------------------------------------------------------------------------------------------
# LPIPS (v0.1, SqueezeNet 1.1 trunk), pure torch


class _Fire(nn.Module):
    def __init__(self, inplanes: int, squeeze: int, expand1x1: int, expand3x3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(inplanes, squeeze, kernel_size=1)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, kernel_size=1)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1x1(x)), F.relu(self.expand3x3(x))], 1)


def _squeezenet_features() -> nn.Sequential:
    """torchvision's ``squeezenet1_1().features`` (same indices, so its state dict loads as is)."""
    pool = {"kernel_size": 3, "stride": 2, "ceil_mode": True}
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=3, stride=2), nn.ReLU(), nn.MaxPool2d(**pool),
        _Fire(64, 16, 64, 64), _Fire(128, 16, 64, 64), nn.MaxPool2d(**pool),
        _Fire(128, 32, 128, 128), _Fire(256, 32, 128, 128), nn.MaxPool2d(**pool),
        _Fire(256, 48, 192, 192), _Fire(384, 48, 192, 192), _Fire(384, 64, 256, 256), _Fire(512, 64, 256, 256),
    )


class Lpips(nn.Module):
    """LPIPS v0.1 with the SqueezeNet 1.1 trunk (``lpips.LPIPS(net="squeeze")`` / torchmetrics ``net_type="squeeze"``).

    The trunk's seven taps are the outputs after features 1, 4, 7, 9, 10, 11 and 12 (lpips' slices); each is
    unit-normalised over channels, the squared difference is weighted by a 1x1 convolution (``lin0..lin6``),
    averaged over space and summed over taps. Inputs are in [-1, 1] and go through lpips' scaling layer.
    """

    TAPS = (1, 4, 7, 9, 10, 11, 12)
    CHANNELS = (64, 128, 256, 384, 384, 512, 512)
    SHIFT = (-0.030, -0.088, -0.188)
    SCALE = (0.458, 0.448, 0.450)

    def __init__(self) -> None:
        super().__init__()
        self.features = _squeezenet_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in self.CHANNELS)
        self.register_buffer("shift", torch.tensor(self.SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(self.SCALE).view(1, 3, 1, 1))
        self.source = "random"
        self.eval().requires_grad_(False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.TAPS:
                out.append(x / (torch.sqrt((x ** 2).sum(dim=1, keepdim=True)) + 1e-10))
        return out

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-image LPIPS distance of two ``(B, 3, H, W)`` batches in [-1, 1]; shape ``(B,)``."""
        fa = self._taps((a - self.shift) / self.scale)
        fb = self._taps((b - self.shift) / self.scale)
        return sum(lin((x - y) ** 2).mean(dim=(2, 3)) for lin, x, y in zip(self.lins, fa, fb, strict=True))[:, 0]

    def load_weights(self, trunk: Mapping[str, torch.Tensor], linear: Mapping[str, torch.Tensor]) -> Lpips:
        """Load torchvision's ``squeezenet1_1`` state dict (``features.*``; ``classifier.*`` is ignored) and the
        LPIPS v0.1 ``squeeze.pth`` (``lin{k}.model.1.weight``); strict, CheckpointError listing what is wrong."""
        feats = {k[len("features."):]: v for k, v in trunk.items() if k.startswith("features.")}
        lins = {}
        for k, v in linear.items():
            m = re.fullmatch(r"lin(\d+)\.model\.1\.weight|lins\.(\d+)\.model\.1\.weight", k)
            if m is None:
                raise CheckpointError(f"LPIPS linear weights: unexpected key {k!r} (expected lin0.model.1.weight ..)")
            lins[f"{m.group(1) or m.group(2)}.weight"] = v
        for name, module, sd in (("SqueezeNet trunk", self.features, feats), ("LPIPS linear layers", self.lins, lins)):
            own = module.state_dict()
            missing = sorted(set(own) - set(sd))
            unexpected = sorted(set(sd) - set(own))
            shapes = [k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape)]
            if missing or unexpected or shapes:
                raise CheckpointError(f"{name}: missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape "
                                      f"{sorted(shapes)[:5]}; give torchvision's squeezenet1_1 weights and LPIPS "
                                      "v0.1 squeeze.pth")
            module.load_state_dict({k: v.float() for k, v in sd.items()})
        return self

    @classmethod
    def from_path(cls, path: str | Path, device: str | torch.device | None = None) -> Lpips:
        """Load from a folder holding torchvision's ``squeezenet1_1-*.pth`` and LPIPS v0.1 ``squeeze.pth``.

        The files are found by name: the trunk is the ``*.pth`` whose name starts with ``squeezenet1_1``, the linear
        layers ``squeeze.pth`` (as shipped in the ``lpips`` package's ``weights/v0.1/`` and in torchmetrics).
        """
        root = Path(path)
        if not root.is_dir():
            raise CheckpointError(f"--lpips {root} is not a folder; give the folder holding squeezenet1_1-*.pth "
                                  "(torchvision) and squeeze.pth (LPIPS v0.1 linear layers)")
        trunks = sorted(root.glob("squeezenet1_1*.pth"))
        linear = root / "squeeze.pth"
        if not trunks or not linear.is_file():
            raise CheckpointError(f"--lpips {root}: needs squeezenet1_1-*.pth (torchvision's SqueezeNet 1.1) and "
                                  f"squeeze.pth (LPIPS v0.1); found {sorted(p.name for p in root.iterdir())}")
        load = {"map_location": "cpu", "weights_only": True}
        model = cls().load_weights(torch.load(trunks[0], **load), torch.load(linear, **load))
        model.source = str(root)
        return model.to(_device(device))

    def distance(self, a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> float:
        """LPIPS of two pictures given as PIL images or float arrays in [0, 1] (``(H, W, 3)``)."""
        dev = self.shift.device
        x, y = (torch.from_numpy(as_float_image(v).astype(np.float32)).permute(2, 0, 1)[None].to(dev) * 2 - 1
                for v in (a, b))
        return float(self(x, y)[0])


# ---------------------------------------------------------------------------------------------------------------
# CLIP score


def _clip_image_processor(path: str):
    """The PIL (not torchvision) CLIP image processor, as torchmetrics' ``CLIPProcessor`` used."""
    try:
        from transformers import CLIPImageProcessorPil as Processor  # transformers >= 5
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    return Processor.from_pretrained(path)


def _features(out: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or an output whose pooler holds it (transformers 5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipScorer:
    """torchmetrics' ``CLIPScore`` for one image and one caption: ``max(100 * cos(image, text), 0)``."""

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any, source: str = "") -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.source = source
        self._text_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_pretrained(cls, path: str, device: str | torch.device | None = None) -> ClipScorer:
        """Load a ``transformers`` CLIP (folder or hub id, e.g. ``openai/clip-vit-large-patch14``)."""
        from transformers import AutoTokenizer, CLIPModel

        try:
            model = CLIPModel.from_pretrained(path, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(path)
            processor = _clip_image_processor(path)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"--clip {path}: cannot load a CLIP model, tokenizer and image processor "
                                  f"({exc})") from None
        return cls(model.to(_device(device)), tokenizer, processor, source=str(path))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def text_features(self, text: str) -> torch.Tensor:
        if text not in self._text_cache:
            enc = self.tokenizer([text], return_tensors="pt", padding=True)
            limit = self.model.config.text_config.max_position_embeddings
            ids, att = enc["input_ids"][..., :limit], enc["attention_mask"][..., :limit]
            if enc["input_ids"].shape[-1] > limit:
                log.warning("caption longer than %d CLIP tokens is cut (as torchmetrics does): %r", limit, text)
            f = _features(self.model.get_text_features(input_ids=ids.to(self.device), attention_mask=att.to(self.device)))
            self._text_cache[text] = (f / f.norm(p=2, dim=-1, keepdim=True))[0].float()
        return self._text_cache[text]

    @torch.no_grad()
    def image_features(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        pixels = self.image_processor(images=[_uint8(image)], return_tensors="pt")["pixel_values"]
        f = _features(self.model.get_image_features(pixel_values=pixels.to(self.device, torch.float32)))
        return (f / f.norm(p=2, dim=-1, keepdim=True))[0].float()

    def score(self, image: Image.Image | np.ndarray, text: str) -> float:
        """CLIP score of ``image`` (PIL or uint8 array) against ``text``, in [0, 100]."""
        cos = float((self.image_features(image) * self.text_features(text)).sum())
        return max(100.0 * cos, 0.0)


# ---------------------------------------------------------------------------------------------------------------
# DINO structure distance

_KEY_PROJ = re.compile(r"(?:^|\.)(?:layers|layer)\.(\d+)\.attention\.(?:attention\.)?(?:k_proj|key)$")


def _key_projections(model: nn.Module) -> dict[int, nn.Module]:
    """Layer index -> the attention key projection of a transformers ViT (v4 and v5 module names)."""
    found = {}
    for name, module in model.named_modules():
        m = _KEY_PROJ.search(name)
        if m and isinstance(module, nn.Linear):
            found[int(m.group(1))] = module
    if not found:
        raise CheckpointError("the DINO model has no ViT attention key projections "
                              "(expected a transformers ViTModel, e.g. facebook/dino-vitb8)")
    return found


_VIT_ROLES = (("q", r"\.(?:q_proj|query)\."), ("k", r"\.(?:k_proj|key)\."), ("v", r"\.(?:v_proj|value)\."),
              ("o", r"\.(?:o_proj|attention\.output\.dense)\."), ("ln1", r"\.layernorm_before\."),
              ("ln2", r"\.layernorm_after\."), ("fc1", r"\.(?:fc1|intermediate\.dense)\."),
              ("fc2", r"\.(?:fc2|output\.dense)\."))
_VIT_LAYER = re.compile(r"(?:^|\.)layers?\.(\d+)\.")


def vit_from_dino_checkpoint(sd: Mapping[str, torch.Tensor]) -> nn.Module:
    """A transformers ``ViTModel`` holding an official DINO checkpoint (``dino_vitbase8_pretrain.pth``, what
    torch.hub's ``dino_vitb8`` loads): qkv split into query/key/value, LayerNorm eps 1e-6, 64-dim heads (every
    DINO ViT). Parameter names follow the installed transformers version."""
    from transformers import ViTConfig, ViTModel

    sd = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in sd.items()}
    if "cls_token" not in sd or "patch_embed.proj.weight" not in sd or "pos_embed" not in sd:
        raise CheckpointError("not a DINO ViT checkpoint: no cls_token / pos_embed / patch_embed.proj.weight")
    width = int(sd["cls_token"].shape[-1])
    patch = int(sd["patch_embed.proj.weight"].shape[-1])
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    grid = round(math.sqrt(sd["pos_embed"].shape[1] - 1))
    model = ViTModel(ViTConfig(hidden_size=width, num_hidden_layers=depth, num_attention_heads=width // 64,
                               intermediate_size=int(sd["blocks.0.mlp.fc1.weight"].shape[0]), patch_size=patch,
                               image_size=grid * patch, layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu"),
                     add_pooling_layer=False)
    top = {"embeddings.cls_token": sd["cls_token"], "embeddings.position_embeddings": sd["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]}
    out = {}
    for name in model.state_dict():
        if name in top:
            out[name] = top[name]
            continue
        layer = _VIT_LAYER.search(name)
        role = next((r for r, pat in _VIT_ROLES if re.search(pat, name)), None)
        if layer is None or role is None:
            raise CheckpointError(f"cannot map ViT parameter {name!r} of this transformers version to DINO's")
        b, kind = f"blocks.{layer.group(1)}.", name.rsplit(".", 1)[1]
        if role in "qkv":
            part = "qkv".index(role)
            out[name] = sd[f"{b}attn.qkv.{kind}"][part * width:(part + 1) * width]
        else:
            src = {"o": "attn.proj", "ln1": "norm1", "ln2": "norm2", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}[role]
            out[name] = sd[f"{b}{src}.{kind}"]
    model.load_state_dict(out, strict=True)
    return model


class DinoStructure:
    """PnP-Inversion's structure distance with a DINO ViT (``transformers`` ``ViTModel``)."""

    def __init__(self, model: nn.Module, source: str = "", *, layer: int = -1, size: int = 224) -> None:
        self.model = model.eval().requires_grad_(False)
        self.source = source
        self.size = size
        keys = _key_projections(model)
        self.layer = max(keys) if layer == -1 else layer
        if self.layer not in keys:
            raise CheckpointError(f"the DINO model has no layer {layer}; it has {len(keys)}")
        self._key_proj = keys[self.layer]

    @classmethod
    def from_pretrained(cls, path: str, device: str | torch.device | None = None) -> DinoStructure:
        """A transformers ViT folder / hub id (``facebook/dino-vitb8``) or an official DINO ``.pth`` checkpoint."""
        from transformers import ViTModel

        p = Path(path)
        try:
            if p.is_file():
                model = vit_from_dino_checkpoint(torch.load(p, map_location="cpu", weights_only=True))
            else:
                model = ViTModel.from_pretrained(path, add_pooling_layer=False, dtype=torch.float32)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"--dino {path}: cannot load a DINO ViT ({exc})") from None
        return cls(model.to(_device(device)), source=str(path))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _prepare(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        # PnP-Inversion: float 0..255 (no /255), Resize(224) on a tensor (bilinear, no antialias), ImageNet norm.
        x = torch.from_numpy(_uint8(image).astype(np.float32)).permute(2, 0, 1)[None].to(self.device)
        h, w = x.shape[-2:]
        short, long = min(h, w), max(h, w)
        new_short, new_long = self.size, int(self.size * long / short)
        if new_long > 480:  # torchvision's max_size=480
            new_short, new_long = int(480 * new_short / new_long), 480
        size = (new_short, new_long) if h <= w else (new_long, new_short)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def self_similarity(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        """``(T, T)`` cosine similarity of the chosen layer's keys (CLS + patches)."""
        captured: list[torch.Tensor] = []
        handle = self._key_proj.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            x = self._prepare(image)
            self.model(pixel_values=x, interpolate_pos_encoding=True)
        finally:
            handle.remove()
        keys = captured[0][0].float()
        norm = keys.norm(dim=-1, keepdim=True)
        return (keys @ keys.T) / torch.clamp(norm @ norm.T, min=1e-8)

    def distance(self, source: Image.Image | np.ndarray, edited: Image.Image | np.ndarray) -> float:
        """MSE between the key self-similarity matrices of ``source`` and ``edited``."""
        return float(F.mse_loss(self.self_similarity(edited), self.self_similarity(source)))


# ---------------------------------------------------------------------------------------------------------------
# All metrics of one case


@dataclass
class MetricModels:
    """The weight-backed scorers; a missing one leaves its columns not computed."""

    clip: ClipScorer | None = None
    dino: DinoStructure | None = None
    lpips: Lpips | None = None
    notes: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, *, clip: str | None = None, dino: str | None = None, lpips: str | None = None,
             device: str | torch.device | None = None) -> MetricModels:
        """Load the scorers whose weights are given (paths or hub ids); None/"" leaves one out."""
        return cls(clip=ClipScorer.from_pretrained(clip, device) if clip else None,
                   dino=DinoStructure.from_pretrained(dino, device) if dino else None,
                   lpips=Lpips.from_path(lpips, device) if lpips else None)

    def describe(self) -> dict[str, str | None]:
        """Where each scorer's weights came from (None: not computed)."""
        return {name: (getattr(self, name).source if getattr(self, name) is not None else None)
                for name in ("clip", "dino", "lpips")}

    def available(self, metric: str) -> bool:
        need = NEEDS[metric]
        return need is None or getattr(self, need) is not None


def check_pair(source: Image.Image, edited: Image.Image, edit_mask: np.ndarray) -> None:
    """Same size for both pictures and the mask; InvalidCaseError names what differs."""
    if source.size != edited.size:
        raise InvalidCaseError(f"source is {source.size[0]}x{source.size[1]} px but the edit is "
                               f"{edited.size[0]}x{edited.size[1]} px; resize the edit first")
    if tuple(edit_mask.shape) != (source.height, source.width):
        raise InvalidCaseError(f"the annotation mask is {edit_mask.shape[1]}x{edit_mask.shape[0]} px but the source "
                               f"is {source.size[0]}x{source.size[1]} px")


def score_case(source: Image.Image, edited: Image.Image, edit_mask: np.ndarray, edit_prompt: str,
               models: MetricModels | None = None) -> dict[str, float | None]:
    """Every PIE-Bench metric of one edit (raw values, unscaled); ``None`` = not computed (no weights given),
    NaN = undefined (the mask leaves no background)."""
    models = models or MetricModels()
    source, edited = source.convert("RGB"), edited.convert("RGB")
    mask = np.asarray(edit_mask, dtype=bool)
    check_pair(source, edited, mask)
    out: dict[str, float | None] = dict.fromkeys(METRIC_KEYS)
    has_background = not bool(mask.all())
    if has_background:
        out.update(background_metrics(source, edited, mask, method="zero"))
        if models.lpips is not None:
            out["lpips"] = models.lpips.distance(zero_edited(source, mask), zero_edited(edited, mask))
    else:
        out.update(dict.fromkeys(("psnr", "mse", "ssim"), math.nan))
        if models.lpips is not None:
            out["lpips"] = math.nan
    if models.clip is not None:
        pixels = _uint8(edited)
        out["clip_whole"] = models.clip.score(pixels, edit_prompt)
        out["clip_edited"] = models.clip.score((pixels * mask[:, :, None]).astype(np.uint8), edit_prompt)
    if models.dino is not None:
        out["structure_distance"] = models.dino.distance(source, edited)
    return out
