"""OpenAI's BPE encodings (o200k_base, cl100k_base), shipped inside Keel in `keel/llm/bpe/`.

tiktoken fetches these files from the network on first use; Keel never does. Each file is read from the
package, checked against the sha256 that tiktoken itself expects (`tiktoken_ext/openai_public.py`), parsed
here and handed to `tiktoken.Encoding` directly: no URL, no cache directory. Loaded lazily, once per
process (about 0.3 s for o200k_base), and thread-safe.
"""

from __future__ import annotations

import base64
import hashlib
import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import tiktoken

ENDOFTEXT = "<|endoftext|>"
ENDOFPROMPT = "<|endofprompt|>"


@dataclass(frozen=True)
class BpeSpec:
    sha256: str
    pat_str: str
    special_tokens: dict[str, int]


# As tiktoken 0.14 defines them (tests/llm/test_tokens.py checks them against the installed tiktoken).
SPECS: dict[str, BpeSpec] = {
    "o200k_base": BpeSpec(
        sha256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        pat_str="|".join(
            [
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""\p{N}{1,3}""",
                r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
                r"""\s*[\r\n]+""",
                r"""\s+(?!\S)""",
                r"""\s+""",
            ]
        ),
        special_tokens={ENDOFTEXT: 199999, ENDOFPROMPT: 200018},
    ),
    "cl100k_base": BpeSpec(
        sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        pat_str=r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",  # noqa: E501
        special_tokens={
            ENDOFTEXT: 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            ENDOFPROMPT: 100276,
        },
    ),
}


class BpeFileError(RuntimeError):
    """A shipped BPE file is missing or not the file OpenAI published (its sha256 differs)."""


def bpe_path(name: str) -> Path:
    """Where the package keeps the BPE file of encoding `name`."""
    return Path(str(resources.files("keel.llm") / "bpe" / f"{name}.tiktoken"))


def build_encoding(name: str, path: Path) -> tiktoken.Encoding:
    """The encoding `name` from the BPE file at `path`, whose sha256 must be the published one."""
    spec = SPECS.get(name)
    if spec is None:
        raise BpeFileError(f"no shipped BPE encoding {name!r}; Keel ships {sorted(SPECS)}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BpeFileError(f"cannot read the BPE file of {name} at {path}: {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != spec.sha256:
        raise BpeFileError(
            f"the BPE file of {name} at {path} has sha256 {digest}, expected {spec.sha256}: "
            "the file is damaged or not OpenAI's; reinstall Keel"
        )
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(
        name, pat_str=spec.pat_str, mergeable_ranks=ranks, special_tokens=dict(spec.special_tokens)
    )


_lock = threading.Lock()
_loaded: dict[str, tiktoken.Encoding] = {}


def encoding(name: str) -> tiktoken.Encoding:
    """The shipped encoding `name`, loaded on first use and then shared by the whole process."""
    found = _loaded.get(name)
    if found is not None:
        return found
    with _lock:
        found = _loaded.get(name)
        if found is None:
            found = _loaded[name] = build_encoding(name, bpe_path(name))
        return found
