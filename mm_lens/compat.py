"""Work-arounds for known bugs of the pinned dependencies, each one named, guarded and tested.

mm-lens touches the internals of TransformerLens and transformers (the bridge's attention, HF cache objects), so a
release of either can change a number without raising. Every fix for such a change lives here, says which releases
need it, applies itself only where the bug is present, and has a test that shows the bug it fixes
(``tests/test_compat.py``). `boot_bridge` is the one place mm-lens boots a TransformerLens bridge, and it installs
them.

Global state: `install_kv_cache_fix` replaces one method of TransformerLens's ``AttentionBridge`` class for the
process (idempotently; `kv_cache_fix_installed` tells whether it is in place). Nothing else here outlives a call.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
from collections.abc import Iterator
from typing import Any

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


def boot_bridge(name: str, **kwargs: Any) -> Any:
    """``TransformerBridge.boot_transformers(name, **kwargs)`` with this module's fixes in place."""
    from transformer_lens.model_bridge import TransformerBridge

    install_kv_cache_fix()
    with no_torchvision_install():
        return TransformerBridge.boot_transformers(name, **kwargs)
