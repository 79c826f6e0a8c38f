"""PIE-Bench metrics: hand-computed values on tiny arrays, PnP-Inversion's "unedit part" protocol, and the weight-
backed scorers built from tiny randomly initialised models (no download): CLIP score against its formula, the DINO
structure distance against an independent DINO-layout ViT with PnP-Inversion's key extraction, LPIPS plumbing.
Without weights the columns are *not computed* (None), never 0. When the reference packages are installed
(``lpips``, ``torchmetrics``, ``torchvision``) the optional tests compare LPIPS with them.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from editinfinity.errors import CheckpointError, InvalidCaseError
from editinfinity.evaluation.piebench_metrics import (
    METRIC_KEYS,
    ClipScorer,
    DinoStructure,
    Lpips,
    MetricModels,
    score_case,
    vit_from_dino_checkpoint,
)


def pic(value, size=(16, 16)) -> Image.Image:
    arr = np.zeros((*size, 3), np.uint8)
    arr[:] = value
    return Image.fromarray(arr)


# ------------------------------------------------------------------------------------------------ pixel metrics


def test_background_metrics_hand_computed():
    # Source 100/255 everywhere, edit 110/255 everywhere; the left 4 of 16 columns are the edit region (zeroed in
    # both): the squared error (10/255)^2 remains on 12/16 of the pixels.
    mask = np.zeros((16, 16), bool)
    mask[:, :4] = True
    out = score_case(pic(100), pic(110), mask, "a cat")
    mse = (10 / 255) ** 2 * 12 / 16
    assert out["mse"] == pytest.approx(mse, rel=1e-12)
    assert out["psnr"] == pytest.approx(10 * math.log10(1 / mse), rel=1e-12)
    # No edit region, constant pictures: every SSIM window gives (2ab + c1) / (a^2 + b^2 + c1) (variances are 0).
    a, b, c1 = 100 / 255, 110 / 255, 0.01 ** 2
    full = score_case(pic(100), pic(110), np.zeros((16, 16), bool), "a cat")
    assert full["ssim"] == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-12)
    assert full["mse"] == pytest.approx((10 / 255) ** 2, rel=1e-12)
    # Identical backgrounds: MSE 0, PSNR infinite, SSIM 1, whatever happens inside the mask.
    src = np.full((16, 16, 3), 50, np.uint8)
    dst = src.copy()
    dst[:, :4] = 255
    same = score_case(Image.fromarray(src), Image.fromarray(dst), mask, "x")
    assert same["mse"] == 0 and same["psnr"] == math.inf and same["ssim"] == pytest.approx(1.0)


def test_mask_covering_everything_leaves_no_background():
    out = score_case(pic(10), pic(200), np.ones((16, 16), bool), "x")
    assert all(math.isnan(out[k]) for k in ("psnr", "mse", "ssim"))


def test_without_weights_columns_are_not_computed_never_zero():
    out = score_case(pic(10), pic(20), np.zeros((16, 16), bool), "x", MetricModels())
    assert set(out) == set(METRIC_KEYS)
    for key in ("structure_distance", "lpips", "clip_whole", "clip_edited"):
        assert out[key] is None
    assert MetricModels.load().describe() == {"clip": None, "dino": None, "lpips": None}
    assert not MetricModels().available("clip_whole") and MetricModels().available("psnr")


def test_sizes_must_agree():
    with pytest.raises(InvalidCaseError, match="resize the edit"):
        score_case(pic(1, (16, 16)), pic(1, (32, 32)), np.zeros((16, 16), bool), "x")
    with pytest.raises(InvalidCaseError, match="annotation mask"):
        score_case(pic(1), pic(1), np.zeros((8, 8), bool), "x")


# ------------------------------------------------------------------------------------------------ CLIP


def tiny_clip_dir(tmp_path, flip: bool = False):
    """A randomly initialised CLIP with a 54-token character BPE tokenizer and the PIL image processor, saved the
    way a real checkpoint folder is (config, weights, tokenizer, preprocessor)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from editinfinity.evaluation.piebench_metrics import _clip_image_processor  # noqa: F401  (import check)

    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {ch: i for i, ch in enumerate(letters)}
    vocab.update({ch + "</w>": 26 + i for i, ch in enumerate(letters)})
    vocab.update({"<|startoftext|>": 52, "<|endoftext|>": 53})
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(vocab_file=str(tmp_path / "vocab.json"), merges_file=str(tmp_path / "merges.txt"))
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config={"vocab_size": 54, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 16, "bos_token_id": 52,
                     "eos_token_id": 53, "pad_token_id": 53},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 224, "patch_size": 32}, projection_dim=16)
    model = CLIPModel(cfg).eval()
    if flip:
        with torch.no_grad():
            model.text_projection.weight.mul_(-1)
    out = tmp_path / ("clip_flip" if flip else "clip")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    Processor().save_pretrained(out)
    return out


def _feat(x):
    return x if isinstance(x, torch.Tensor) else x.pooler_output


@pytest.mark.parametrize("flip", [False, True], ids=["as-initialised", "text-projection-negated"])
def test_clip_score_is_the_torchmetrics_formula(tmp_path, flip):
    scorer = ClipScorer.from_pretrained(str(tiny_clip_dir(tmp_path, flip)), device="cpu")
    rng = np.random.default_rng(0)
    img = (rng.random((128, 128, 3)) * 255).astype(np.uint8)
    text = "a red cat on a mat"
    pixels = scorer.image_processor(images=[img], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224)
    enc = scorer.tokenizer([text], return_tensors="pt", padding=True)
    with torch.no_grad():
        fi = _feat(scorer.model.get_image_features(pixel_values=pixels))
        ft = _feat(scorer.model.get_text_features(input_ids=enc["input_ids"][:, :16],
                                                  attention_mask=enc["attention_mask"][:, :16]))
    cos = float(F.cosine_similarity(fi, ft)[0])
    assert scorer.score(img, text) == pytest.approx(max(100 * cos, 0.0), abs=1e-4)
    assert scorer.score(Image.fromarray(img), text) == pytest.approx(scorer.score(img, text), abs=1e-6)
    # Masked ("edited part") scoring multiplies the picture by the mask, as PnP-Inversion's uint8(img * mask).
    mask = np.zeros((128, 128), bool)
    mask[20:80, 10:100] = True
    models = MetricModels(clip=scorer)
    out = score_case(Image.fromarray(img), Image.fromarray(img), mask, text, models)
    assert out["clip_whole"] == pytest.approx(scorer.score(img, text), abs=1e-6)
    assert out["clip_edited"] == pytest.approx(scorer.score(img * mask[:, :, None], text), abs=1e-6)
    assert out["clip_edited"] != pytest.approx(out["clip_whole"]) or out["clip_whole"] == 0
    assert models.describe()["clip"].endswith("clip_flip" if flip else "clip")


def test_clip_long_caption_is_cut_not_refused(tmp_path):
    scorer = ClipScorer.from_pretrained(str(tiny_clip_dir(tmp_path)), device="cpu")
    img = np.zeros((64, 64, 3), np.uint8)
    assert 0.0 <= scorer.score(img, "a very long caption " * 20) <= 100.0


def test_missing_weights_are_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="--clip"):
        ClipScorer.from_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="--dino"):
        DinoStructure.from_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="--lpips"):
        Lpips.from_path(tmp_path / "nowhere")
    (tmp_path / "lp").mkdir()
    with pytest.raises(CheckpointError, match="squeezenet1_1"):
        Lpips.from_path(tmp_path / "lp")


# ------------------------------------------------------------------------------------------------ DINO


class DinoBlock(nn.Module):
    """DINO's vision_transformer Block (fused qkv, pre-norm, eps 1e-6), written independently of transformers."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, 4 * dim)
        self.mlp.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.attn.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(dim=-1)
        x = x + self.attn.proj((att @ v).transpose(1, 2).reshape(b, n, c))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class DinoViT(nn.Module):
    def __init__(self, dim=128, depth=3, patch=8, img=224):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, (img // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(DinoBlock(dim, dim // 64) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        for name, p in self.named_parameters():
            if "norm" in name:
                nn.init.normal_(p, mean=1.0 if name.endswith("weight") else 0.0, std=0.1)

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]


def pnp_structure_distance(dino: DinoViT, img_pred: np.ndarray, img_gt: np.ndarray) -> float:
    """PnP-Inversion's calculate_structure_distance: float 0..255, Resize(224) (tensor: bilinear, no antialias),
    ImageNet Normalize, qkv of the last block -> keys (CLS included) -> cosine self-similarity -> MSE."""

    def transform(t):
        t = F.interpolate(t[None], size=(224, 224), mode="bilinear", align_corners=False)[0]
        mean = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1)
        std = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)
        return (t - mean) / std

    def keys_self_sim(x):
        out = []
        hook = dino.blocks[-1].attn.qkv.register_forward_hook(lambda m, i, o: out.append(o))
        with torch.no_grad():
            dino(x)
        hook.remove()
        dim, heads = 128, 2
        k = out[0].reshape(x.shape[-1] // 8 * x.shape[-2] // 8 + 1, 3, heads, dim // heads).permute(1, 2, 0, 3)[1]
        h, t, d = k.shape
        keys = k.transpose(0, 1).reshape(t, h * d)[None]
        norm = keys.norm(dim=2, keepdim=True)
        return (keys @ keys.permute(0, 2, 1)) / torch.clamp(norm @ norm.permute(0, 2, 1), min=1e-8)

    pred = torch.from_numpy(img_pred.astype(np.float32)).permute(2, 0, 1)
    gt = torch.from_numpy(img_gt.astype(np.float32)).permute(2, 0, 1)
    return float(F.mse_loss(keys_self_sim(transform(pred)[None]), keys_self_sim(transform(gt)[None])))


def test_dino_structure_distance_matches_pnp_inversion(tmp_path):
    torch.manual_seed(0)
    dino = DinoViT().eval()
    ckpt = tmp_path / "dino_tiny.pth"
    torch.save(dino.state_dict(), ckpt)
    rng = np.random.default_rng(0)
    src = (rng.random((512, 512, 3)) * 255).astype(np.uint8)
    dst = src.copy()
    dst[100:300, 100:300] = [20, 200, 30]
    scorer = DinoStructure.from_pretrained(str(ckpt), device="cpu")
    ours = scorer.distance(Image.fromarray(src), Image.fromarray(dst))
    ref = pnp_structure_distance(dino, dst, src)
    assert ref > 0 and ours == pytest.approx(ref, rel=1e-4)
    assert scorer.distance(src, src) == pytest.approx(0.0, abs=1e-12)
    # The same weights as a transformers folder (facebook/dino-vitb8's format) give the same number.
    vit = vit_from_dino_checkpoint(torch.load(ckpt, weights_only=True))
    vit.save_pretrained(tmp_path / "hf")
    hf = DinoStructure.from_pretrained(str(tmp_path / "hf"), device="cpu")
    assert hf.distance(src, dst) == pytest.approx(ours, rel=1e-5)
    models = MetricModels(dino=hf)
    out = score_case(Image.fromarray(src), Image.fromarray(dst), np.zeros((512, 512), bool), "x", models)
    assert out["structure_distance"] == pytest.approx(ours, rel=1e-5)


def test_not_a_dino_checkpoint(tmp_path):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="DINO"):
        DinoStructure.from_pretrained(str(tmp_path / "x.pth"))


# ------------------------------------------------------------------------------------------------ LPIPS


def random_lpips_files(tmp_path) -> tuple[dict, dict]:
    """torchvision-named SqueezeNet 1.1 weights and lpips-named linear weights, random, saved as the real files."""
    torch.manual_seed(0)
    ref = Lpips()
    trunk = {f"features.{k}": torch.randn_like(v) * 0.1 for k, v in ref.features.state_dict().items()}
    trunk["classifier.1.weight"] = torch.zeros(1000, 512, 1, 1)  # ignored, as in torchvision's file
    linear = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(Lpips.CHANNELS)}
    torch.save(trunk, tmp_path / "squeezenet1_1-b8a52dc0.pth")
    torch.save(linear, tmp_path / "squeeze.pth")
    return trunk, linear


def test_lpips_loads_the_real_file_layout_and_behaves(tmp_path):
    trunk, linear = random_lpips_files(tmp_path)
    lp = Lpips.from_path(tmp_path, device="cpu")
    assert torch.equal(lp.features[0].weight, trunk["features.0.weight"])
    assert torch.equal(lp.features[12].expand3x3.bias, trunk["features.12.expand3x3.bias"])
    assert torch.equal(lp.lins[6].weight, linear["lin6.model.1.weight"])
    rng = np.random.default_rng(0)
    a, b = rng.random((64, 64, 3)), rng.random((64, 64, 3))
    assert lp.distance(a, a) == 0.0
    d = lp.distance(a, b)
    assert d > 0 and d == pytest.approx(lp.distance(b, a), rel=1e-6)
    # By hand: spatial mean of the weighted squared differences of unit-normalised taps, summed over taps.
    x = torch.from_numpy(a.astype(np.float32)).permute(2, 0, 1)[None] * 2 - 1
    y = torch.from_numpy(b.astype(np.float32)).permute(2, 0, 1)[None] * 2 - 1
    shift, scale = torch.tensor(Lpips.SHIFT).view(1, 3, 1, 1), torch.tensor(Lpips.SCALE).view(1, 3, 1, 1)
    fx, fy, total = (x - shift) / scale, (y - shift) / scale, 0.0
    for i, layer in enumerate(lp.features):
        fx, fy = layer(fx), layer(fy)
        if i in Lpips.TAPS:
            k = Lpips.TAPS.index(i)
            nx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            ny = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total += float(((nx - ny) ** 2 * linear[f"lin{k}.model.1.weight"]).sum(1).mean())
    assert d == pytest.approx(total, rel=1e-5)
    # In score_case: the zeroed backgrounds are compared.
    mask = np.zeros((64, 64), bool)
    mask[:, :32] = True
    src, dst = (Image.fromarray((v * 255).astype(np.uint8)) for v in (a, b))
    out = score_case(src, dst, mask, "x", MetricModels(lpips=lp))
    from editinfinity.metrics import zero_edited

    assert out["lpips"] == pytest.approx(lp.distance(zero_edited(src, mask), zero_edited(dst, mask)), rel=1e-6)


def test_lpips_rejects_wrong_files(tmp_path):
    trunk, linear = random_lpips_files(tmp_path)
    with pytest.raises(CheckpointError, match="missing"):
        Lpips().load_weights({k: v for k, v in trunk.items() if "features.3." not in k}, linear)
    with pytest.raises(CheckpointError, match="unexpected key"):
        Lpips().load_weights(trunk, {"lin0.weight": torch.zeros(1, 64, 1, 1)})


def test_lpips_matches_the_lpips_package(tmp_path):
    lpips = pytest.importorskip("lpips")
    pytest.importorskip("torchvision")
    trunk, _ = random_lpips_files(tmp_path)
    ref = lpips.LPIPS(net="squeeze", pnet_rand=True, verbose=False).eval()  # linear layers: the package's v0.1
    ref.net.load_state_dict({n: trunk["features." + n.split(".", 1)[1]] for n, _ in ref.net.named_parameters()})
    lin = {f"lin{i}.model.1.weight": ref.lins[i].model[1].weight.detach() for i in range(7)}
    ours = Lpips().load_weights(trunk, lin)
    rng = np.random.default_rng(3)
    a, b = (torch.from_numpy(rng.random((1, 3, 64, 64)).astype(np.float32)) * 2 - 1 for _ in range(2))
    assert float(ours(a, b)[0]) == pytest.approx(float(ref(a, b)), rel=1e-5)
