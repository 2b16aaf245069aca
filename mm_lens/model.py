"""Load a LLaVA-family checkpoint as a TransformerLens ``TransformerBridge`` plus its processor, and what mm-lens
knows of a model family from its files alone: the supported types, the image token, whether it is one of the
study's families (`study_conversation`), and so which protocol ``auto`` means (`resolve_protocol`,
`protocol_for_checkpoint`) and which precision `load` picks by default."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from mm_lens.compat import boot_bridge, register_tl_adapter
from mm_lens.errors import MMLensError
from mm_lens.families import Family, family_of
from mm_lens.knockout import check_live
from mm_lens.protocol import CHECKPOINT, LLAVA_LLAMA_3, PROTOCOL_NAMES, STUDY, VICUNA_V1, Conversation, Protocol

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
_IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass
class HookedLlava:
    """A hooked LLaVA model: the TL bridge (hooks, caches) and the processor that builds its inputs."""

    bridge: Any  # transformer_lens.model_bridge.TransformerBridge
    processor: Any  # transformers.ProcessorMixin: tokenizer + image processor (+ chat template)
    model_type: str  # "llava" | "llava_next" | ... (`mm_lens.families.SUPPORTED_MODEL_TYPES`)
    name: str  # path or hub id it was loaded from
    #: Self-checks passed on this model (`mm_lens.selfcheck`): kind -> the difference measured.
    self_checks: dict[str, float] = field(default_factory=dict, repr=False, compare=False)
    #: What protocol "auto" resolves to for this model (`resolve_protocol`, once per loaded model).
    auto_protocol: Protocol | None = field(default=None, repr=False, compare=False)

    @property
    def n_layers(self) -> int:
        """Number of language-model transformer blocks."""
        return int(self.bridge.cfg.n_layers)

    @property
    def tokenizer(self) -> Any:
        """The processor's tokenizer (the one that produced the model's ``input_ids``)."""
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        """Device of the input embedding (where input tensors must go)."""
        return self.hf_model.get_input_embeddings().weight.device

    @property
    def hf_model(self) -> Any:
        """The wrapped Hugging Face ``*ForConditionalGeneration`` model."""
        return self.bridge.original_model

    @property
    def config(self) -> Any:
        """The Hugging Face config of the whole multimodal model."""
        return self.hf_model.config

    @property
    def image_token_id(self) -> int | None:
        """The id of the image token in the vocabulary (`image_token_id` of the config)."""
        return image_token_id(self.config)

    @property
    def family(self) -> Family:
        """The model's family record (`mm_lens.families`)."""
        return family_of(self.model_type, self.name)


def _is_local_path(name: str) -> bool:
    """True when ``name`` is meant as a directory on disk rather than a hub id ``owner/model``."""
    if os.path.exists(name):
        return True
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or os.sep != "/" and os.sep in name
    )


def _check_local_checkpoint(path: Path) -> str:
    """Validate a local checkpoint directory and return its model type."""
    if not path.exists():
        raise MMLensError(f"model path {str(path)!r} does not exist; pass a checkpoint directory or a hub id")
    if not path.is_dir():
        raise MMLensError(f"model path {str(path)!r} is not a directory; pass the checkpoint directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise MMLensError(f"{str(config_file)!r} is missing; {str(path)!r} is not a Hugging Face checkpoint")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, OSError) as exc:
        raise MMLensError(f"cannot read {str(config_file)!r}: {exc}") from exc
    _check_model_type(model_type, str(path))
    if not (path / "tokenizer_config.json").is_file() or not any(
        (path / f).is_file() for f in _TOKENIZER_FILES
    ):
        raise MMLensError(
            f"tokenizer files missing in {str(path)!r}: need tokenizer_config.json and one of "
            f"{', '.join(_TOKENIZER_FILES)}; save the processor with processor.save_pretrained(path)"
        )
    if not any((path / f).is_file() for f in _IMAGE_PROCESSOR_FILES):
        raise MMLensError(
            f"image processor file missing in {str(path)!r}: need one of {', '.join(_IMAGE_PROCESSOR_FILES)}; "
            "save the processor with processor.save_pretrained(path)"
        )
    return model_type


def check_checkpoint(name: str) -> None:
    """The checks `load` makes on a local checkpoint directory before reading it (nothing for a hub id)."""
    if _is_local_path(name):
        _check_local_checkpoint(Path(name).expanduser())


def _check_model_type(model_type: Any, name: str) -> None:
    family_of(model_type, name)


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Hugging Face offline mode for the duration (env vars and the hub's import-time constant)."""
    import huggingface_hub.constants as hub_constants

    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    saved_const = hub_constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = saved_const
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _default_dtype(name: str, processor: Any, device: str | None) -> torch.dtype:
    """The auto protocol's precision for this checkpoint on `device`."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name)
    except Exception:  # noqa: BLE001 - the model load below reports a broken config properly
        return torch.float32
    protocol = STUDY if study_conversation(config, processor.tokenizer) else CHECKPOINT
    return protocol.dtype(device)


@contextlib.contextmanager
def offline_if_local(name: str) -> Iterator[None]:
    """Hugging Face offline mode while reading `name`, when it is a local directory (no hub probes)."""
    with _offline() if _is_local_path(os.fspath(name)) else contextlib.nullcontext():
        yield


def resolve_dtype(dtype: Any) -> torch.dtype:
    """A torch dtype from a dtype or its name (``float16``, ``bf16``, ...); an error listing the names."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise MMLensError(f"dtype {dtype!r} is not understood; use one of {', '.join(_DTYPES)} or a torch.dtype")


def load(
    path_or_hub_id: str | os.PathLike,
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict | None = None,
) -> HookedLlava:
    """Load a checkpoint of a supported family (`mm_lens.families`) as a bridge (eval mode) plus processor.

    A local directory loads fully offline (no hub probes); ``device_map`` (e.g. ``"auto"``) spreads a
    large model over several GPUs and is exclusive with ``device``. ``dtype`` None is the auto protocol's:
    float16 for the study's model families on CUDA, float32 otherwise. The family's knockout route is installed and
    proved live (`mm_lens.knockout.check_live`) before the model is returned.
    """
    from transformers import AutoConfig

    name = os.fspath(path_or_hub_id)
    torch_dtype = None if dtype is None else resolve_dtype(dtype)
    local = _is_local_path(name)
    if device is not None and device_map is not None:
        raise MMLensError("pass either device or device_map, not both")
    if local:
        name = str(Path(name).expanduser())
        model_type = _check_local_checkpoint(Path(name))
        context: contextlib.AbstractContextManager = _offline()
    else:
        context = contextlib.nullcontext()
    with context:
        if not local:
            try:
                model_type = AutoConfig.from_pretrained(name).model_type
            except Exception as exc:  # hub errors come in many types; report them in one line
                raise MMLensError(f"cannot load the config of {name!r}: {exc}") from exc
            _check_model_type(model_type, name)
        family = family_of(model_type, name)
        try:
            processor = family.processor(name)
        except MMLensError:
            raise
        except Exception as exc:
            raise MMLensError(f"cannot load the processor of {name!r}: {exc}") from exc
        if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
            raise MMLensError(
                f"{name!r} has no multimodal processor (got {type(processor).__name__}); "
                "save the LLaVA processor with processor.save_pretrained(path)"
            )
        if torch_dtype is None:
            torch_dtype = _default_dtype(name, processor, device if device_map is None else "cuda")
        boot_kwargs: dict[str, Any] = {"dtype": torch_dtype}
        if device_map is not None:
            boot_kwargs["device_map"] = device_map
        elif device is not None:
            boot_kwargs["device"] = device
        architecture = _architecture(name)
        for arch, like in (family.tl_like or {}).items():
            register_tl_adapter(arch, like)
        try:
            bridge = boot_bridge(name, architecture=architecture, unused_libraries=family.unused_libraries,
                                 **boot_kwargs)
        except MMLensError:
            raise
        except Exception as exc:
            raise MMLensError(f"cannot load model {name!r}: {type(exc).__name__}: {exc}") from exc
    bridge.processor = processor
    bridge.eval()
    model = HookedLlava(bridge=bridge, processor=processor, model_type=model_type, name=name)
    if family.route.install is not None:
        family.route.install(model)
    model.self_checks["knockout_live"] = check_live(model)
    return model


def _architecture(name: str) -> str | None:
    """The checkpoint's ``architectures[0]`` (which TL adapter boots it), None when unreadable."""
    from transformers import AutoConfig

    try:
        archs = getattr(AutoConfig.from_pretrained(name), "architectures", None) or []
    except Exception:  # noqa: BLE001 - the boot reports a broken config properly
        return None
    return archs[0] if archs else None


# ------------------------------------------------------------------------------------------ families and protocols


def image_token_id(config: Any) -> int | None:
    """The id of the image token in the model's vocabulary (None when the config names none)."""
    token = getattr(config, "image_token_id", None)
    if token is None:
        token = getattr(config, "image_token_index", None)
    return None if token is None else int(token)


def study_conversation(config: Any, tokenizer: Any) -> Conversation | None:
    """The study's conversation for a checkpoint of one of its families, else None.

    LLaVA-1.5 (``llava``) with a Vicuna (Llama-2 vocabulary) language model -> ``vicuna_v1``; LLaVA-NeXT
    (``llava_next``) with Vicuna -> ``vicuna_v1``, with Llama-3 -> ``llava_llama_3``. The vision tower must be
    CLIP at 336 px with 14 px patches, the language model a Llama.
    """
    model_type = getattr(config, "model_type", None)
    text = getattr(config, "text_config", None)
    vision = getattr(config, "vision_config", None)
    if model_type not in ("llava", "llava_next") or text is None or vision is None:
        return None
    if getattr(text, "model_type", None) != "llama" or getattr(vision, "model_type", None) not in (
        "clip_vision_model", "clip"
    ):
        return None
    if int(getattr(vision, "image_size", 0)) != 336 or int(getattr(vision, "patch_size", 0)) != 14:
        return None
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    if tokenizer.bos_token == "<|begin_of_text|>" and "<|start_header_id|>" in vocab and len(vocab) >= 128256:
        return LLAVA_LLAMA_3 if model_type == "llava_next" else None
    if tokenizer.bos_token == "<s>" and vocab.get("▁") == 29871 and len(vocab) >= 32000:
        return VICUNA_V1
    return None


def study_protocol(model: HookedLlava) -> Protocol:
    """The study protocol with the conversation of `model`'s family; an error when it is not a study model."""
    conversation = study_conversation(model.config, model.tokenizer)
    if conversation is None:
        raise MMLensError(
            f"{model.name!r} is not one of the study's model families (LLaVA-1.5 / LLaVA-NeXT with a "
            "Vicuna/Llama-2 or Llama-3 language model and a 336 px CLIP tower); use --protocol checkpoint"
        )
    return replace(STUDY, conversation=conversation)


def resolve_protocol(protocol: str | Protocol | None, model: HookedLlava) -> Protocol:
    """The `Protocol` a name means for `model` (``auto``: the study's for its families, else the checkpoint's)."""
    if isinstance(protocol, Protocol):
        return replace(protocol, conversation=study_protocol(model).conversation) if protocol.needs_conversation \
            else protocol
    name = "auto" if protocol is None else str(protocol).strip().lower()
    if name not in PROTOCOL_NAMES:
        raise MMLensError(f"protocol {protocol!r} is not known; use one of {', '.join(PROTOCOL_NAMES)}")
    if name == "auto":
        if model.auto_protocol is None:  # resolved once per loaded model
            conversation = study_conversation(model.config, model.tokenizer)
            model.auto_protocol = replace(STUDY, conversation=conversation) if conversation else CHECKPOINT
        return model.auto_protocol
    if name == "study":
        return study_protocol(model)
    return CHECKPOINT


def protocol_for_checkpoint(protocol: str | None, path: str) -> Protocol:
    """Resolve a protocol name from a checkpoint's files alone (config and tokenizer, no weights).

    Runs record the resolved protocol in their configuration before the model is loaded.
    """
    name = "auto" if protocol is None else str(protocol).strip().lower()
    if name not in PROTOCOL_NAMES:
        raise MMLensError(f"protocol {protocol!r} is not known; use one of {', '.join(PROTOCOL_NAMES)}")
    if name == "checkpoint":
        return CHECKPOINT
    from transformers import AutoConfig, AutoTokenizer

    with offline_if_local(path):
        try:
            config = AutoConfig.from_pretrained(path)
            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as exc:  # hub and file errors come in many types
            raise MMLensError(f"cannot read the config / tokenizer of {path!r}: {exc}") from exc
    conversation = study_conversation(config, tokenizer)
    if conversation is None:
        if name == "study":
            raise MMLensError(
                f"{path!r} is not one of the study's model families (LLaVA-1.5 / LLaVA-NeXT with a Vicuna/Llama-2 "
                "or Llama-3 language model and a 336 px CLIP tower); use --protocol checkpoint"
            )
        return CHECKPOINT
    return replace(STUDY, conversation=conversation)
