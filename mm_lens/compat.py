"""Work-arounds for known bugs of the pinned dependencies, each one named, guarded and tested.

mm-lens touches the internals of TransformerLens and transformers (the bridge's attention, HF cache objects), so a
release of either can change a number without raising. Every fix for such a change lives here, says which releases
need it, applies itself only where the bug is present, and has a test that shows the bug it fixes
(``tests/test_compat.py``). `boot_bridge` is the one place mm-lens boots a TransformerLens bridge, and it installs
them.

Global state: `install_kv_cache_fix` replaces one method of TransformerLens's ``AttentionBridge`` class for the
process (idempotently; `kv_cache_fix_installed` tells whether it is in place); `register_tl_adapter` adds an
architecture to TransformerLens's three adapter tables for the process (a family TL ships no adapter for, served by
the adapter of one with the same module layout, or by a subclass of it with the mapping changed, such as
`qwen2_vl_adapter`'s), and `without_required_libraries` lets an adapter boot without a library its language-model
path does not use, for the duration of a boot. Nothing else here outlives a call.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
from collections.abc import Callable, Iterator
from typing import Any

from mm_lens.errors import MMLensError

_FIX_MARK = "_mm_lens_cache_kwarg_fix"


def transformers_names_cache_kwarg() -> bool:
    """Whether this transformers' decoder layers hand the KV cache to attention as ``cache=`` (5.24 and later)."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    return "cache" in inspect.signature(LlamaAttention.forward).parameters


def kv_cache_fix_installed() -> bool:
    """Whether `install_kv_cache_fix` has wrapped TransformerLens's ``AttentionBridge._update_kv_cache``."""
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    return getattr(AttentionBridge._update_kv_cache, _FIX_MARK, False)


def install_kv_cache_fix() -> bool:
    """Let TransformerLens's attention bridges write the KV cache transformers passes as ``cache=``.

    Needed with TransformerLens 4.3 on transformers >= 5.24: transformers 5.24 renamed the cache argument
    ``past_key_values`` to ``cache`` (decoder layers call ``self_attn(..., cache=cache)``), and TL 4.3's
    ``AttentionBridge._update_kv_cache`` reads only ``past_key_values`` / ``layer_past``. On every adapter whose
    attention TL computes itself (LLaVA and LLaVA-NeXT among them) the cache then stays empty after a prefill and a
    cached step attends to its own tokens only, silently. The wrapper hands ``cache`` to TL under its old name.

    Installed only where transformers uses the new name (a no-op on 5.18-5.23) and once per process. Returns
    whether the fix is in place.
    """
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    if kv_cache_fix_installed():
        return True
    if not transformers_names_cache_kwarg():
        return False
    original = AttentionBridge._update_kv_cache

    @functools.wraps(original)
    def _update_kv_cache(self, k, v, **kwargs):
        if kwargs.get("past_key_values") is None and kwargs.get("layer_past") is None:
            cache = kwargs.pop("cache", None)
            if cache is not None:
                kwargs["past_key_values"] = cache
        return original(self, k, v, **kwargs)

    setattr(_update_kv_cache, _FIX_MARK, True)
    AttentionBridge._update_kv_cache = _update_kv_cache
    return True


@contextlib.contextmanager
def no_torchvision_install() -> Iterator[None]:
    """TransformerLens's boot may not ``pip install torchvision`` (TL 4.3, ``_ensure_torchvision``).

    TL 4.3's ``boot_transformers`` installs torchvision when ``AutoProcessor`` fails; on a CPU install that replaces
    the pinned CPU torch with a CUDA build of several GB. mm-lens loads its own processor, so the boot's processor is
    best effort: within this context TL sees torchvision only when it is already importable, and never installs it.
    """
    try:
        from transformer_lens.model_bridge.sources.transformers import helpers
    except ImportError:  # a TL without the helper: nothing to guard
        yield
        return
    if not hasattr(helpers, "_ensure_torchvision"):
        yield
        return
    saved = helpers._ensure_torchvision
    helpers._ensure_torchvision = lambda: importlib.util.find_spec("torchvision") is not None
    try:
        yield
    finally:
        helpers._ensure_torchvision = saved


def register_tl_adapter(architecture: str, like: str | type | Callable[[], type]) -> None:
    """Let TransformerLens boot `architecture` with the adapter it ships for `like` (TL 4.3 has none for it).

    `like` is a TL architecture name (its adapter serves `architecture` as is), an adapter class, or a function
    returning one (such as `qwen2_vl_adapter`: a TL adapter with its component mapping changed to the architecture's
    modules, built when first needed so that importing a family does not import TransformerLens).
    TL looks an architecture up in three tables, and all three must know it: the factory's registry
    (``ArchitectureAdapterFactory.register_adapter``), ``SUPPORTED_ARCHITECTURES`` (which the boot checks first) and
    ``utilities.architectures.MULTIMODAL_ARCHITECTURES`` (without it the boot loads a causal LM, not the
    ``*ForConditionalGeneration`` model): `architecture` is multimodal when `like` is, or, for a class, when it
    derives from the adapter of a multimodal TL architecture. Idempotent; a no-op where TL already knows
    `architecture`.
    """
    from transformer_lens.factories import architecture_adapter_factory as factory
    from transformer_lens.utilities import architectures

    if isinstance(like, str):
        adapter = factory.SUPPORTED_ARCHITECTURES.get(like) or factory.ArchitectureAdapterFactory._adapters.get(like)
        if adapter is None:
            raise MMLensError(f"TransformerLens has no adapter for {like!r} to serve {architecture!r}")
        multimodal = like in architectures.MULTIMODAL_ARCHITECTURES
    else:
        adapter = like if isinstance(like, type) else like()
        multimodal = any(factory.SUPPORTED_ARCHITECTURES.get(arch) in adapter.__mro__
                         for arch in architectures.MULTIMODAL_ARCHITECTURES)
    if architecture not in factory.SUPPORTED_ARCHITECTURES:
        factory.SUPPORTED_ARCHITECTURES[architecture] = adapter
    if architecture not in factory.ArchitectureAdapterFactory._adapters:
        factory.ArchitectureAdapterFactory.register_adapter(architecture, adapter)
    if multimodal:
        architectures.MULTIMODAL_ARCHITECTURES.add(architecture)


@functools.cache
def qwen2_vl_adapter() -> type:
    """``Qwen2VLArchitectureAdapter``: TL 4.3's Qwen2.5-VL adapter with the vision tower mapped as Qwen2-VL's.

    TL 4.3 ships no adapter for ``Qwen2VLForConditionalGeneration``. Its language model, merger
    (``model.visual.merger``), rotary embeddings and vision attention (``qkv`` / ``proj``) are laid out as
    Qwen2.5-VL's, and the vision blocks' norms (LayerNorm here, RMSNorm there) are black boxes in TL's vision-block
    bridge, so the Qwen2.5-VL adapter serves it but for two things:

    * the vision MLP is ``fc1`` / ``fc2`` (``VisionMlp``), not gated ``gate_proj`` / ``up_proj`` / ``down_proj``
      (booting with the Qwen2.5-VL mapping fails: "'VisionMlp' object has no attribute 'gate_proj'");
    * the tower's width is ``vision_config.embed_dim``; its ``hidden_size`` is the merger's output (the language
      model's width), which TL's ``_extract_vision_dims`` would record as ``vision_hidden_size``.

    Built on first call (TransformerLens is imported then, not when mm-lens is) and the same class after.
    """
    from transformer_lens.model_bridge.generalized_components import LinearBridge
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
    from transformer_lens.model_bridge.generalized_components.qwen3_5_vision_encoder import (
        Qwen3_5VisionBlockBridge,
        Qwen3_5VisionEncoderBridge,
    )
    from transformer_lens.model_bridge.supported_architectures.qwen2_5_vl import Qwen2_5_VLArchitectureAdapter

    class Qwen2VLArchitectureAdapter(Qwen2_5_VLArchitectureAdapter):
        """Architecture adapter for Qwen2VLForConditionalGeneration models (mm-lens; TL 4.3 ships none)."""

        def __init__(self, cfg: Any) -> None:
            super().__init__(cfg)
            vision = getattr(cfg, "vision_config", None)
            if getattr(vision, "embed_dim", None) is not None:
                self.cfg.vision_hidden_size = vision.embed_dim
            self.component_mapping["vision_encoder"] = Qwen3_5VisionEncoderBridge(
                name="model.visual",
                config=self.cfg,
                submodules={
                    "pos_embed": GeneralizedComponent(name="rotary_pos_emb"),
                    "blocks": Qwen3_5VisionBlockBridge(
                        name="blocks",
                        submodules={
                            "mlp": GeneralizedComponent(
                                name="mlp",
                                submodules={"in": LinearBridge(name="fc1"), "out": LinearBridge(name="fc2")},
                            ),
                        },
                    ),
                },
            )

    return Qwen2VLArchitectureAdapter


@contextlib.contextmanager
def without_required_libraries(architecture: str, libraries: tuple[str, ...]) -> Iterator[None]:
    """Boot `architecture`'s TL adapter without `libraries` it declares but the language-model path never imports.

    TL 4.3's Qwen2.5-VL, Qwen3-VL and GLM-4V adapters declare ``required_libraries = ["torchvision"]`` and raise
    ImportError on a CPU install, though only the video processor uses torchvision. Within this context the adapter
    class lists the libraries minus `libraries`; the class attribute is restored afterwards (removed again where the
    class inherits it).
    """
    from transformer_lens.factories import architecture_adapter_factory as factory

    adapter = factory.ArchitectureAdapterFactory._adapters.get(architecture) or factory.SUPPORTED_ARCHITECTURES.get(
        architecture)
    saved = None if adapter is None else getattr(adapter, "required_libraries", None)
    if not saved:
        yield
        return
    own = "required_libraries" in adapter.__dict__  # else inherited (a subclass such as Qwen2VLArchitectureAdapter)
    adapter.required_libraries = [lib for lib in saved if lib not in libraries]
    try:
        yield
    finally:
        if own:
            adapter.required_libraries = saved
        else:
            del adapter.required_libraries


def boot_bridge(name: str, architecture: str | None = None, unused_libraries: tuple[str, ...] = (),
                **kwargs: Any) -> Any:
    """``TransformerBridge.boot_transformers(name, **kwargs)`` with this module's fixes in place.

    `architecture` / `unused_libraries`: the checkpoint's architecture and the libraries its adapter may go without
    (`without_required_libraries`).
    """
    from transformer_lens.model_bridge import TransformerBridge

    install_kv_cache_fix()
    libraries = without_required_libraries(architecture, unused_libraries) if architecture and unused_libraries \
        else contextlib.nullcontext()
    with no_torchvision_install(), libraries:
        return TransformerBridge.boot_transformers(name, **kwargs)
