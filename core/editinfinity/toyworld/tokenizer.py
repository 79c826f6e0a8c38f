"""The text side of the toy model: a SentencePiece T5 tokenizer trained on the world's words, and a tiny T5
configuration for its randomly initialised text encoder."""

from __future__ import annotations

import io
import logging
import random
import string
from pathlib import Path
from typing import Any

from .captions import STYLE_SUFFIX, vocabulary
from .scene import COLOURS, KINDS

logger = logging.getLogger(__name__)


def _tokenizer_corpus(seed: int = 0) -> list[str]:
    """Training sentences: every one-object caption (with and without the style suffix), random word strings
    (so every word is seen in many contexts and becomes one piece), and ASCII characters (so typos and
    capitals tokenise to characters rather than <unk>)."""
    lines = []
    for bg in COLOURS:
        for c in COLOURS:
            for k in KINDS:
                lines.append(f"a {c} {k} on a {bg} background")
    lines += [line + STYLE_SUFFIX for line in lines]
    words = vocabulary()
    rnd = random.Random(seed)
    lines += [" ".join(rnd.choice(words) for _ in range(8)) for _ in range(3000)]
    chars = string.ascii_letters + string.digits + ".,;:!?'\"-()/&"
    lines += [" ".join(chars)] * 20
    return lines


def _proto_fields(data: bytes) -> list[tuple[int, int, bytes | int]]:
    """Top-level (field number, wire type, value) of a protobuf message; enough to read a SentencePiece model
    without the protobuf package (an optional dependency whose version must match sentencepiece's)."""
    fields: list[tuple[int, int, bytes | int]] = []
    pos = 0

    def varint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while pos < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            fields.append((number, wire, varint()))
        elif wire == 1 or wire == 5:
            size = 8 if wire == 1 else 4
            fields.append((number, wire, data[pos : pos + size]))
            pos += size
        elif wire == 2:
            size = varint()
            fields.append((number, wire, data[pos : pos + size]))
            pos += size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} in a SentencePiece model")
    return fields


def _precompiled_charsmap(model_bytes: bytes) -> bytes | None:
    """``ModelProto.normalizer_spec.precompiled_charsmap`` (fields 3 and 2) of a serialised SentencePiece model."""
    for number, wire, value in _proto_fields(model_bytes):
        if number == 3 and wire == 2:
            for sub_number, sub_wire, sub_value in _proto_fields(bytes(value)):  # type: ignore[arg-type]
                if sub_number == 2 and sub_wire == 2:
                    return bytes(sub_value)  # type: ignore[arg-type]
    return None


def build_tokenizer(out_dir: str | Path, vocab_size: int = 128) -> Path:
    """Train a SentencePiece unigram model on the world's words and save a T5 tokenizer directory.

    Writes ``spiece.model``, ``tokenizer.json`` and ``tokenizer_config.json`` so that
    ``AutoTokenizer.from_pretrained(out_dir, legacy=True)`` works offline. Ids: <pad>=0, </s>=1, <unk>=2;
    every encoding ends with </s>; no sentinel (extra_id) tokens. Single-threaded with a fixed seed, so the
    files are byte-identical across runs. ``vocab_size`` is a soft limit (the tiny corpus yields ~115 pieces).
    """
    import sentencepiece as spm
    from transformers import T5Tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.set_random_generator_seed(0)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_tokenizer_corpus()),
        model_writer=buf,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    model_bytes = buf.getvalue()
    model_path = out / "spiece.model"
    model_path.write_bytes(model_bytes)
    processor = spm.SentencePieceProcessor(model_proto=model_bytes)
    vocab = [
        (processor.id_to_piece(i), float(processor.get_score(i))) for i in range(processor.get_piece_size())
    ]
    tokenizer = T5Tokenizer(
        vocab=vocab,
        extra_ids=0,
        _spm_precompiled_charsmap=_precompiled_charsmap(model_bytes),
        legacy=True,
        model_max_length=512,
        vocab_file=str(model_path),
    )
    tokenizer.save_pretrained(str(out))
    logger.info("toy tokenizer with %d pieces written to %s", len(tokenizer), out)
    return out


def tiny_t5_config(vocab_size: int, d_model: int = 128, num_layers: int = 2, num_heads: int = 4) -> Any:
    """A small ``transformers.T5Config`` (T5 v1.1 style, gated-gelu) for a randomly initialised text encoder."""
    from transformers import T5Config

    return T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=2 * d_model,
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tie_word_embeddings=False,
    )
