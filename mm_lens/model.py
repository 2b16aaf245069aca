"""Load a LLaVA-family checkpoint as a TransformerLens ``TransformerBridge`` plus its processor."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mm_lens.errors import MMLensError

SUPPORTED_MODEL_TYPES = ("llava", "llava_next")

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
    model_type: str  # "llava" | "llava_next"
    name: str  # path or hub id it was loaded from
    #: Self-checks passed on this model (`mm_lens.selfcheck`): kind -> the difference measured.
    self_checks: dict[str, float] = field(default_factory=dict, repr=False, compare=False)

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
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise MMLensError(
            f"model type {model_type!r} of {name!r} is not supported; supported types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )


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
    """The auto protocol's precision for this checkpoint on `device` (see `mm_lens.protocol`)."""
    from transformers import AutoConfig

    from mm_lens.protocol import CHECKPOINT, STUDY, study_conversation

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


def _resolve_dtype(dtype: Any) -> torch.dtype:
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
    """Load a ``llava`` / ``llava_next`` checkpoint as a bridge (eval mode) plus processor.

    A local directory loads fully offline (no hub probes); ``device_map`` (e.g. ``"auto"``) spreads a
    large model over several GPUs and is exclusive with ``device``. ``dtype`` None is the auto protocol's:
    float16 for the study's model families on CUDA, float32 otherwise.
    """
    from transformers import AutoConfig, AutoProcessor

    from mm_lens.compat import boot_bridge

    name = os.fspath(path_or_hub_id)
    torch_dtype = None if dtype is None else _resolve_dtype(dtype)
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
        try:
            processor = AutoProcessor.from_pretrained(name)
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
        try:
            bridge = boot_bridge(name, **boot_kwargs)
        except MMLensError:
            raise
        except Exception as exc:
            raise MMLensError(f"cannot load model {name!r}: {type(exc).__name__}: {exc}") from exc
    bridge.processor = processor
    bridge.eval()
    return HookedLlava(bridge=bridge, processor=processor, model_type=model_type, name=name)
