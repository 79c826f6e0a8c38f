"""T5 text conditioning: prompt encoding, the compacted feature batch, and word -> token ranges.

The transformer reads text as *compacted* rows: every sample's T5 ``last_hidden_state`` rows of its real tokens
(EOS included, padding dropped) stacked into one ``(N, Ct5)`` tensor, plus the per-sample lengths
(INFINITY.md §4.2). :class:`TextFeatures` carries that pair and the views the model needs (``cu_seqlens``,
a padded batch with its mask). EditInfinity's learned "language style" rows are appended after every sample's
EOS row (docs/method.md, section 2), never after the whole batch (the reference's batch-1 shortcut).

Two word -> token lookups live here: :func:`reference_word_token_mapping` reproduces the published code
(parity), :func:`target_token_range` is the one our pipeline uses (offset based, tolerant of case and punctuation,
errors instead of silent skips; docs/method.md "Word to token mapping").
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import CheckpointError, InvalidCaseError

if TYPE_CHECKING:
    from transformers import BatchEncoding, PreTrainedTokenizerBase, T5EncoderModel

log = logging.getLogger(__name__)

#: Appended to a prompt before T5 when a learned language-style embedding is used (reference wording, docs/method.md section 1).
STYLE_SUFFIX = ", the language style of this prompt is"

#: Token budget of the reference tokenizer call and the size of the model's unconditional text table.
TEXT_MAXLEN = 512

# Files a T5 checkpoint directory needs; restricts hub downloads so the decoder-only extras of a full T5 repo
# (TF/Flax weights, duplicate .bin files) are not fetched.
_HUB_PATTERNS = ["*.json", "*.model", "*.safetensors"]


def style_prompt(prompt: str) -> str:
    """The prompt as the reference feeds it to T5 when learned style rows follow: ``prompt + STYLE_SUFFIX``."""
    return prompt + STYLE_SUFFIX


# ---------------------------------------------------------------------------------------------------------------
# Compacted text batch
# ---------------------------------------------------------------------------------------------------------------


_PADDING_INDEX: dict = {}


def _padding_index(lens: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, max_len)`` bool mask (True = real row) and the flat padded positions of the compacted rows, built on
    the host and kept on ``device`` per length tuple: no host copy or sync when a training step pads its text."""
    key = (lens, str(device))
    found = _PADDING_INDEX.get(key)
    if found is None:
        mask = torch.arange(max(lens))[None, :] < torch.tensor(lens)[:, None]
        dest = mask.reshape(-1).nonzero().squeeze(1)
        if len(_PADDING_INDEX) > 256:  # lengths vary with prompts; keep the table small
            _PADDING_INDEX.clear()
        found = _PADDING_INDEX[key] = (mask.to(device), dest.to(device))
    return found


@dataclass
class TextFeatures:
    """A batch of prompts as compacted T5 rows.

    ``features`` is ``(N, Ct5)`` with ``N = sum(lens)``: sample ``b`` owns rows ``cu_seqlens[b]:cu_seqlens[b+1]``.
    Methods return new objects and never modify ``self``; they keep autograd links, so learned rows appended with
    :meth:`append_rows` receive gradients through :meth:`padded`.
    """

    features: torch.Tensor
    lens: list[int]

    def __post_init__(self) -> None:
        self.lens = [int(n) for n in self.lens]
        if self.features.ndim != 2:
            raise ValueError(f"TextFeatures.features must be (N, C), got shape {tuple(self.features.shape)}")
        if not self.lens or min(self.lens) <= 0:
            raise ValueError(f"TextFeatures.lens must be non-empty and positive, got {self.lens}")
        if sum(self.lens) != self.features.shape[0]:
            raise ValueError(f"TextFeatures: sum(lens)={sum(self.lens)} != rows {self.features.shape[0]}")

    @property
    def batch_size(self) -> int:
        """Number of samples ``B``."""
        return len(self.lens)

    @property
    def max_len(self) -> int:
        """Longest sample (rows), the padded length."""
        return max(self.lens)

    @property
    def channels(self) -> int:
        """Feature width ``Ct5``."""
        return int(self.features.shape[1])

    @property
    def device(self) -> torch.device:
        """Device of the features."""
        return self.features.device

    @property
    def cu_seqlens(self) -> torch.Tensor:
        """int32 prefix sums ``[0, l0, l0+l1, ...]`` (``B+1``), on the features' device."""
        lens = torch.tensor([0, *self.lens], dtype=torch.int64, device=self.features.device)
        return lens.cumsum(0).to(torch.int32)

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, max_len, C)`` features (zeros after each sample's rows) and a ``(B, max_len)`` bool mask, True = real row."""
        b, m = self.batch_size, self.max_len
        mask, dest = _padding_index(tuple(self.lens), self.features.device)
        # index_copy keeps the graph to `features` (learned rows need their gradient) without a Python loop.
        flat = self.features.new_zeros(b * m, self.channels).index_copy(0, dest, self.features)
        return flat.view(b, m, self.channels), mask

    def split(self) -> list[torch.Tensor]:
        """Per-sample row blocks (views)."""
        return list(torch.split(self.features, self.lens, dim=0))

    def append_rows(self, rows: torch.Tensor) -> TextFeatures:
        """Return a batch with the same ``(n, C)`` rows appended after every sample's last row (its EOS row).

        This is how the learned language-style rows enter (``lens += n``); gradients flow back to ``rows``.
        """
        if rows.ndim != 2 or rows.shape[1] != self.channels:
            raise ValueError(f"append_rows needs (n, {self.channels}) rows, got shape {tuple(rows.shape)}")
        rows = rows.to(device=self.features.device, dtype=self.features.dtype)
        n = int(rows.shape[0])
        if n == 0:
            return TextFeatures(self.features, list(self.lens))
        parts: list[torch.Tensor] = []
        for block in self.split():
            parts += [block, rows]
        return TextFeatures(torch.cat(parts, dim=0), [n_b + n for n_b in self.lens])

    def select(self, index: int | Sequence[int] | slice) -> TextFeatures:
        """Sub-batch by sample index (an int keeps a batch of one), list of indices, or slice."""
        if isinstance(index, int):
            idx = [range(self.batch_size)[index]]
        elif isinstance(index, slice):
            idx = list(range(self.batch_size))[index]
        else:
            idx = [range(self.batch_size)[i] for i in index]
        if not idx:
            raise ValueError("TextFeatures.select: empty selection")
        blocks = self.split()
        return TextFeatures(torch.cat([blocks[i] for i in idx], dim=0), [self.lens[i] for i in idx])

    def cat(self, other: TextFeatures) -> TextFeatures:
        """Batch concatenation: samples of ``self`` then samples of ``other`` (e.g. conditional + unconditional)."""
        if other.channels != self.channels:
            raise ValueError(f"TextFeatures.cat: channels {self.channels} != {other.channels}")
        feats = torch.cat([self.features, other.features.to(self.features.device, self.features.dtype)], dim=0)
        return TextFeatures(feats, self.lens + other.lens)

    def repeat(self, times: int) -> TextFeatures:
        """The whole batch repeated ``times`` times (sample order ``0..B-1, 0..B-1, ...``)."""
        if times < 1:
            raise ValueError(f"TextFeatures.repeat: times must be >= 1, got {times}")
        return TextFeatures(self.features.repeat(times, 1), self.lens * times)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextFeatures:
        """Copy to another device and/or dtype."""
        return TextFeatures(self.features.to(device=device, dtype=dtype), list(self.lens))

    def detach(self) -> TextFeatures:
        """Features without autograd history."""
        return TextFeatures(self.features.detach(), list(self.lens))

    # -- persistence -----------------------------------------------------------------------------------------

    def to_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """``{prefix}features`` (float32, CPU) and ``{prefix}lens`` (int64) for a safetensors file."""
        return {
            f"{prefix}features": self.features.detach().to("cpu", torch.float32).contiguous(),
            f"{prefix}lens": torch.tensor(self.lens, dtype=torch.int64),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = "") -> TextFeatures:
        """Inverse of :meth:`to_tensors`."""
        try:
            feats, lens = tensors[f"{prefix}features"], tensors[f"{prefix}lens"]
        except KeyError as e:
            raise InvalidCaseError(f"text features '{prefix}' missing tensor {e}; re-run prepare") from None
        return cls(feats.float(), [int(n) for n in lens.tolist()])

    def save(self, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
        """Write a safetensors file (features float32 on CPU, lens int64; ``metadata`` as string pairs)."""
        from safetensors.torch import save_file

        path = Path(path)
        save_file(self.to_tensors(), str(path), metadata={str(k): str(v) for k, v in (metadata or {}).items()})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> TextFeatures:
        """Read a file written by :meth:`save`."""
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise InvalidCaseError(f"text features file {path} not found; re-run prepare")
        return cls.from_tensors(load_file(str(path), device=str(device)))


# ---------------------------------------------------------------------------------------------------------------
# Loading T5
# ---------------------------------------------------------------------------------------------------------------


def _looks_like_path(s: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else that is not an existing directory is a mistyped path.
    return s.startswith(("/", ".", "~")) or s.count("/") > 1 or "\\" in s


_T5_SOURCE = ("a T5 checkpoint directory (config.json, weights, tokenizer files) or a Hugging Face hub id such as "
              "'google/flan-t5-xl'")


def resolve_pretrained(path_or_hub_id: str | os.PathLike, *, what: str = "text encoder",
                       expected: str = _T5_SOURCE) -> Path:
    """A local directory holding the T5 checkpoint: the path itself (or a ``file://`` URI), or a hub id resolved
    through huggingface_hub.

    Hub ids honour ``HF_HUB_OFFLINE`` (then only the local cache is used) and ``HF_HOME``/``HF_HUB_CACHE``.
    Raises :class:`CheckpointError` naming the source (``what``: which option gave it, ``expected``: what it should
    be) and the fix when nothing usable is found.
    """
    from ..storage.uri import file_uri_path

    src = file_uri_path(os.fspath(path_or_hub_id))
    local = Path(src).expanduser()
    if local.is_dir():
        return local
    if local.exists() or _looks_like_path(src):
        raise CheckpointError(
            f"{what} '{src}' is not a directory; pass {expected}"
        )
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        out = snapshot_download(src, allow_patterns=_HUB_PATTERNS, local_files_only=offline)
    except LocalEntryNotFoundError:
        where = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
        raise CheckpointError(
            f"{what} '{src}' is not a local directory and not in the Hugging Face cache ({where}); run "
            f"`huggingface-cli download {src}` where the hub is reachable, or pass a local directory"
        ) from None
    except (RepositoryNotFoundError, HFValidationError) as e:
        raise CheckpointError(f"{what} '{src}' is neither a local directory nor a hub repository ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{what} '{src}': download failed ({e}); pass a local directory instead") from None
    return Path(out)


def _component_dirs(root: Path) -> tuple[Path, Path]:
    """(tokenizer dir, model dir): one T5 directory, or the ``tokenizer/`` + ``text_encoder/`` converted layout."""
    if (root / "text_encoder" / "config.json").is_file():
        tok = root / "tokenizer" if (root / "tokenizer").is_dir() else root / "text_encoder"
        return tok, root / "text_encoder"
    return root, root


def load_text_encoder(
    path_or_hub_id: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedTokenizerBase, T5EncoderModel]:
    """Load ``(tokenizer, T5EncoderModel)`` as the reference does (``legacy=True``, ``model_max_length = 512``).

    ``path_or_hub_id`` is a local T5 directory (works offline), a converted model directory (``tokenizer/`` and
    ``text_encoder/`` inside), or a hub id (see :func:`resolve_pretrained`). The encoder is in eval mode with every
    parameter frozen.
    """
    from transformers import AutoTokenizer, T5EncoderModel

    root = resolve_pretrained(path_or_hub_id)
    tok_dir, model_dir = _component_dirs(root)
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"text encoder directory {model_dir} has no config.json; is it a T5 checkpoint?")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), revision=None, legacy=True)
        encoder = T5EncoderModel.from_pretrained(str(model_dir), dtype=dtype)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the T5 text encoder from {root}: {e}") from None
    if not getattr(tokenizer, "is_fast", False):
        # word_ids() and offsets (target word lookup) need the Rust tokenizer.
        raise CheckpointError(f"tokenizer in {tok_dir} has no fast (tokenizer.json) version; word lookup needs it")
    tokenizer.model_max_length = TEXT_MAXLEN
    encoder.to(device)
    encoder.eval()
    encoder.requires_grad_(False)
    log.info("loaded T5 encoder from %s (%s, %s)", root, device, dtype)
    return tokenizer, encoder


# ---------------------------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------------------------


def tokenize_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_length: int = TEXT_MAXLEN, pad_to_max_length: bool = True
) -> BatchEncoding:
    """The reference tokenizer call (``padding='max_length'``, truncation, PyTorch tensors).

    ``pad_to_max_length=False`` pads only to the longest prompt: the real-token rows T5 produces are the same
    (padded keys are masked), at a fraction of the cost.
    """
    return tokenizer(
        text=list(prompts),
        max_length=max_length,
        padding="max_length" if pad_to_max_length else "longest",
        truncation=True,
        return_tensors="pt",
    )


def validate_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_length: int = TEXT_MAXLEN, extra_rows: int = 0
) -> list[int]:
    """Token counts (EOS included) of each prompt; raise :class:`InvalidCaseError` for empty or over-long prompts.

    A prompt longer than ``max_length - extra_rows`` tokens would be truncated by the tokenizer, or overflow the
    model's 512-row unconditional text table once ``extra_rows`` learned rows are appended (docs/method.md, "Learned rows per sample").
    """
    if isinstance(prompts, str) or not prompts:
        raise InvalidCaseError("prompts must be a non-empty list of strings")
    limit = max_length - extra_rows
    counts: list[int] = []
    for p in prompts:
        if not isinstance(p, str):
            raise InvalidCaseError(f"prompt {p!r} is not text ({type(p).__name__}); quote it in a case file")
        if not p.strip():
            raise InvalidCaseError(f"prompt {p!r} is empty; give a sentence describing the image")
        # verbose=False: no transformers warning about the length; the error below says it in one line
        n = len(tokenizer(p, truncation=False, verbose=False)["input_ids"])
        if n > limit:
            extra = f" + {extra_rows} learned rows" if extra_rows else ""
            raise InvalidCaseError(
                f"prompt {p[:80]!r}{'...' if len(p) > 80 else ''} has {n} T5 tokens{extra}, over the text limit of "
                f"{max_length} rows (at most {limit} tokens); shorten the prompt"
            )
        counts.append(n)
    return counts


@torch.no_grad()
def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    encoder: T5EncoderModel,
    prompts: Sequence[str] | str,
    max_length: int = TEXT_MAXLEN,
    *,
    extra_rows: int = 0,
    pad_to_max_length: bool = False,
) -> TextFeatures:
    """T5 features of the prompts, compacted: each prompt's ``last_hidden_state`` rows of its real tokens (EOS included).

    Matches ``run_infinity.encode_prompt`` without the suffix/learned rows (apply :func:`style_prompt` and
    :meth:`TextFeatures.append_rows` for those). Features are float32 on the encoder's device.
    ``extra_rows`` reserves room for rows appended later (learned style rows), so a prompt that would not fit with
    them fails here, naming the prompt. By default T5 runs on the batch padded to its longest prompt, not to
    ``max_length`` (same rows within float32 round-off; see ``tests/test_text.py``); ``pad_to_max_length=True``
    runs exactly the reference's 512-padded call.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    validate_prompts(tokenizer, prompts, max_length=max_length, extra_rows=extra_rows)
    tokens = tokenize_prompts(tokenizer, prompts, max_length=max_length, pad_to_max_length=pad_to_max_length)
    device = next(encoder.parameters()).device
    ids = tokens["input_ids"].to(device)
    mask = tokens["attention_mask"].to(device)
    hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    lens = mask.sum(dim=1).tolist()
    # Real tokens are a prefix of each row (right padding), so the boolean mask keeps them in sample order.
    return TextFeatures(hidden[mask.bool()], lens)


# ---------------------------------------------------------------------------------------------------------------
# Word -> token ranges
# ---------------------------------------------------------------------------------------------------------------


def reference_word_token_mapping(
    tokenizer: PreTrainedTokenizerBase, prompt: str, target_words: Sequence[str] | None = None
) -> dict[str, tuple[int, int]]:
    """The reference's ``get_word_token_mapping``, behaviour for behaviour (parity only, quirks included; docs/method.md "Word to token mapping").

    Words are ``prompt.split()`` named by the tokenizer's word ids; a word's half-open range runs from its first token
    to the next word's first token, the last word's to the end (EOS included); a repeated word keeps its last range.
    No targets (``None`` or empty): the whole word table. Otherwise each phrase found as a run of words maps to
    ``(start of its first word, end of its last word)`` looked up by string, which can give ``start > end``; phrases
    not found are dropped silently.
    """
    word_ids = tokenizer(prompt).word_ids()
    words = prompt.split()
    table: dict[str, tuple[int, int]] = {}
    current: int | None = None
    start = 0
    for i, wid in enumerate(word_ids):
        if wid is None or wid == current:
            continue
        if current is not None and current < len(words):
            table[words[current]] = (start, i)
        current, start = wid, i
    if current is not None and current < len(words):
        table[words[current]] = (start, len(word_ids))
    if not target_words:
        return table

    out: dict[str, tuple[int, int]] = {}
    for phrase in target_words:
        parts = phrase.split()
        n = len(parts)
        for i in range(len(words) - n + 1):
            if words[i : i + n] != parts:
                continue
            first, last = words[i], words[i + n - 1]
            if first in table and last in table:
                out[phrase] = (table[first][0], table[last][1])
                break
    return out


_EDGE_PUNCT = re.compile(r"^\W+|\W+$")


def prompt_words(prompt: str) -> list[str]:
    """The prompt's words without surrounding punctuation (for messages and pickers)."""
    words = (_EDGE_PUNCT.sub("", w) for w in prompt.split())
    return [w for w in words if w]


_OCCURRENCE = re.compile(r"^(?P<target>.*\S)#(?P<n>\d+)$")


def split_occurrence(target: str) -> tuple[str, int | None]:
    """``"circle#2"`` -> ``("circle", 1)`` (0-based); a target without ``#N`` -> ``(target, None)``."""
    m = _OCCURRENCE.match(target.strip()) if isinstance(target, str) else None
    if m is None:
        return target, None
    n = int(m["n"])
    if n < 1:
        raise InvalidCaseError(f"target word {target!r}: occurrences count from 1 ({m['target']}#1 is the first)")
    return m["target"], n - 1


def target_occurrences(prompt: str, target: str) -> int:
    """How often ``target`` (without any ``#N``) occurs in ``prompt`` as whole words."""
    return len(_target_pattern(split_occurrence(target)[0]).findall(prompt))


def _target_pattern(target: str) -> re.Pattern:
    if not isinstance(target, str):
        raise InvalidCaseError(f"target word {target!r} is not text; quote it in a case file")
    words = prompt_words(target)
    if not words:
        what = "is empty" if not target.strip() else "has no letter or digit (only punctuation or symbols)"
        raise InvalidCaseError(f"target word {target!r} {what}; name a word of the prompt")
    # Whole words only; any run of spaces/punctuation may separate the words of a multi-word target.
    body = r"\W+".join(re.escape(w) for w in words)
    return re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE)


def target_token_range(
    tokenizer: PreTrainedTokenizerBase, prompt: str, target: str, occurrence: int | None = None
) -> tuple[int, int]:
    """Half-open token range ``(start, end)`` of ``target`` inside the tokenised ``prompt``.

    ``target`` is one word or several (``"red ball"``), matched case-insensitively as whole words, ignoring
    punctuation around them (``grass`` matches ``grass,``; ``"red ball"`` also matches ``red, ball``). The
    ``occurrence``-th match (0 = first) is used; ``target`` may also name it as ``word#N`` (1 = first), and the
    first is taken when neither says (a warning says so when there are several). The range covers exactly the tokens whose characters overlap the
    match (a bare ``▁`` word-start piece belongs to its word); the EOS token is never included. Indices count the
    prompt's own tokens from 0, so they stay valid when a suffix (:data:`STYLE_SUFFIX`) is appended after it.
    Raises :class:`InvalidCaseError` listing the prompt's words when ``target`` is absent.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidCaseError("prompt is empty; cannot look up a target word in it")
    if not getattr(tokenizer, "is_fast", False):
        raise CheckpointError("target_token_range needs a fast tokenizer (tokenizer.json) for character offsets")
    target, picked = split_occurrence(target)
    if occurrence is None:
        occurrence = picked or 0
    matches = list(_target_pattern(target).finditer(prompt))
    if not matches:
        raise InvalidCaseError(
            f"target word {target!r} not found in prompt {prompt!r}; the prompt's words are: "
            + ", ".join(prompt_words(prompt))
        )
    if not 0 <= occurrence < len(matches):
        raise InvalidCaseError(
            f"target word {target!r} occurs {len(matches)} time(s) in prompt {prompt!r}; occurrence "
            f"{occurrence + 1} does not exist (write {target}#1 .. {target}#{len(matches)})"
        )
    if len(matches) > 1 and picked is None:
        log.warning("target word %r occurs %d times in the prompt; editing the first (write %s#2 for the second)",
                    target, len(matches), target)
    c0, c1 = matches[occurrence].span()
    enc = tokenizer(prompt, return_offsets_mapping=True, return_special_tokens_mask=True)
    hits = [
        i
        for i, ((s, e), special) in enumerate(zip(enc["offset_mapping"], enc["special_tokens_mask"], strict=True))
        if not special and s < c1 and e > c0
    ]
    if not hits:
        # Only possible when the tokenizer's normaliser drops the characters entirely.
        raise InvalidCaseError(f"target word {target!r} maps to no token of prompt {prompt!r}")
    return hits[0], hits[-1] + 1
