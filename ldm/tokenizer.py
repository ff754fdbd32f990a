"""Write a CLIP-format BPE tokenizer for a closed vocabulary, so offline models need no Hub download.

A CLIP tokenizer whose `merges.txt` lacks the merges for a word splits it into single characters: every prompt then
costs one token per letter and silently truncates at `model_max_length`. `write_clip_tokenizer` therefore writes the
merges that build each given word into one token, and checks the result with the real `CLIPTokenizer`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"


def byte_alphabet() -> list[str]:
    """The 256 printable characters that byte-level BPE (GPT-2 / CLIP) uses to stand for the 256 byte values."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = {b: chr(b) for b in printable}
    # Bytes without a printable glyph are mapped, in byte order, onto code points from 256 upwards.
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _word_symbols(word: str) -> list[str]:
    """A word as CLIP's BPE starts it: one symbol per byte-character, the last one marked end-of-word."""
    alphabet = byte_alphabet()
    chars = [alphabet[b] for b in word.encode("utf-8")]
    return chars[:-1] + [chars[-1] + END_OF_WORD]


def _merges_joining(pieces: list[str]) -> list[tuple[str, str]]:
    """Left-to-right merges that join `pieces` into one symbol."""
    merges, current = [], pieces[0]
    for piece in pieces[1:]:
        merges.append((current, piece))
        current += piece
    return merges


def _normalise_words(words: list[str]) -> list[str]:
    """Lower-case, de-duplicate and validate the words (CLIP lower-cases and splits on whitespace/punctuation)."""
    out: list[str] = []
    for word in words:
        if not isinstance(word, str) or not re.fullmatch(r"[a-z]+|[0-9]", word.lower()):
            raise ValueError(
                f"write_clip_tokenizer got word {word!r}; each word must be letters only (or a single digit), "
                "because CLIP's pre-tokenizer splits anything else into several words. Split it first."
            )
        if word.lower() not in out:
            out.append(word.lower())
    if not out:
        raise ValueError("write_clip_tokenizer needs at least one word; got an empty list.")
    return out


def _write_files(out_dir: Path, merges: list[tuple[str, str]], model_max_length: int) -> None:
    alphabet = byte_alphabet()
    tokens = alphabet + [c + END_OF_WORD for c in alphabet]
    for left, right in merges:
        if left + right not in tokens:
            tokens.append(left + right)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in merges]
    (out_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tokenizer_config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "do_lower_case": True,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


def write_clip_tokenizer(words: list[str], out_dir: str | Path, model_max_length: int = 77) -> CLIPTokenizer:
    """Write a CLIP BPE tokenizer (vocab.json + merges.txt) in which every given word is a single token.

    Args:
        words: The vocabulary to keep whole (letters only; case is folded as CLIP does).
        out_dir: Folder to write, in the layout of a pipeline's `tokenizer/` subfolder.
        model_max_length: Sequence length prompts are padded/truncated to (77 for Stable Diffusion).

    Returns:
        The tokenizer loaded back from `out_dir` with `CLIPTokenizer.from_pretrained`.

    Raises:
        ValueError: if a word is not plain letters, or cannot be made a single token.
    """
    words = _normalise_words(words)
    out_dir = Path(out_dir)
    merges: list[tuple[str, str]] = []
    for word in words:
        merges += [m for m in _merges_joining(_word_symbols(word)) if m not in merges]

    # BPE applies merges by rank across the whole word, so a merge learnt for one word can fire first inside
    # another and leave it in pieces. Each round appends merges (at the lowest priority, so words already whole
    # stay whole) joining whatever pieces the real tokenizer still produces; this converges in a few rounds.
    for _ in range(len(words) + 1):
        _write_files(out_dir, merges, model_max_length)
        tokenizer = CLIPTokenizer.from_pretrained(out_dir)
        broken = {w: tokenizer.tokenize(w) for w in words}
        broken = {w: pieces for w, pieces in broken.items() if len(pieces) != 1}
        if not broken:
            tokenizer.save_pretrained(out_dir)
            write_vocab_files(out_dir)
            return tokenizer
        for pieces in broken.values():
            merges += [m for m in _merges_joining(pieces) if m not in merges]
    raise ValueError(f"Could not make these words single tokens: {sorted(broken)}")


def write_vocab_files(tokenizer_dir: str | Path) -> None:
    """Add vocab.json + merges.txt beside tokenizer.json, as Stable Diffusion repositories ship them.

    transformers 5 saves only tokenizer.json; the two files keep a saved pipeline loadable by transformers 4's
    slow `CLIPTokenizer` too.
    """
    tokenizer_dir = Path(tokenizer_dir)
    model = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    if model.get("type") != "BPE":
        return
    (tokenizer_dir / "vocab.json").write_text(
        json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8"
    )
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (tokenizer_dir / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n", encoding="utf-8")
