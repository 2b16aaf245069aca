"""The engine checks itself: once per loaded model, the shortcuts are compared with the plain computation.

The fast engine re-implements parts of the forward pass, and greedy decoding continues from a KV cache; both rest
on internals of TransformerLens and transformers that a release can change without raising (transformers 5.24 left
TL 4.3's cache empty, and every cached step then attended to its own tokens only). So before a model's first
layer sweep (every ``flow`` / ``study`` run, and `layer_sweep`) mm-lens compares, on that first input,

- ``cache``: one cached decoding step from the clean pass's keys/values against an uncached forward of the prompt
  plus that token (log-probabilities over the vocabulary: the cache's keys must be present and right);
- ``engine``: the fast engine against the reference engine at one (edge, window) of the sweep.

A mismatch beyond float tolerance stops the run with one `SetupError` line (an `MMLensError`) naming the installed
transformers and transformer_lens and ``--engine reference`` (which decodes without the cache too). Each check runs
once per loaded model: its result is kept on the model (``HookedLlava.self_checks``), not in a global. The cost is one
reference forward, one fast-engine row and one cached step per model (see the README's performance section).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from mm_lens.engines import fast_engine, reference_engine
from mm_lens.errors import SetupError
from mm_lens.knockout import edge_positions

if TYPE_CHECKING:
    from mm_lens.engines import CleanPass
    from mm_lens.inputs import MultimodalInput
    from mm_lens.knockout import Edge
    from mm_lens.model import HookedLlava

#: Largest difference accepted: log-probabilities (cache) and relative probability (engine), by precision.
TOLERANCE = {"full": {"cache": 1e-3, "engine": 1e-4}, "half": {"cache": 0.1, "engine": 0.02}}


def _tolerance(model: HookedLlava, kind: str) -> float:
    dtype = next(model.hf_model.parameters()).dtype
    return TOLERANCE["full" if dtype in (torch.float32, torch.float64) else "half"][kind]


def versions() -> str:
    """The installed transformers and transformer_lens, as the error names them."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("transformers", "transformer_lens"):
        try:
            out.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            out.append(f"{name} (unknown version)")
    return ", ".join(out)


def _fail(what: str, detail: str) -> SetupError:
    return SetupError(
        f"self-check failed: {what} ({detail}) with {versions()}; this combination is not one mm-lens was tested "
        "with (see the declared ranges in pyproject.toml). Run with --engine reference (engine='reference', which "
        "also decodes without the KV cache) or install the tested versions (requirements/lock.txt)"
    )


def check_cache(model: HookedLlava, inp: MultimodalInput, clean: CleanPass, token: int) -> float:
    """One cached step from `clean`'s keys/values against an uncached forward; the largest log-prob difference.

    Raises `SetupError` when the clean pass kept no keys or the difference is beyond the tolerance.
    """
    if any(k is None or v is None for k, v in clean.keys_values) or not clean.keys_values:
        raise _fail("the clean pass kept no keys/values in its KV cache", "cache.layers[i].keys is None")
    full_ids, kwargs = inp.forward_args(extra=[token])
    n_vocab = inp.vocab_size(model)
    cache = DynamicCache()
    for layer, (k, v) in enumerate(clean.keys_values):
        cache.update(k, v, layer)
    with torch.inference_mode():
        cached = model.bridge(full_ids[:, -1:], past_key_values=cache)[0, -1, :n_vocab]
        full = model.bridge(full_ids, **kwargs)[0, -1, :n_vocab]
    diff = float((cached.float().log_softmax(-1) - full.float().log_softmax(-1)).abs().max())
    if not diff <= _tolerance(model, "cache"):
        raise _fail("a cached decoding step differs from an uncached forward", f"max |d log p| {diff:.3g}")
    return diff


def check_engine(model: HookedLlava, inp: MultimodalInput, edges: Sequence[Edge], windows: Sequence[range],
                 token: int, clean: CleanPass | None) -> float:
    """The fast engine against the reference at one (edge, window) of a sweep; the relative difference.

    The window is the one around the middle layer, the edge the first whose regions are not empty.
    """

    usable = [e for e in edges if all(len(p) for p in edge_positions(inp.regions, e))]
    if not usable or not windows:
        return 0.0
    edge, window = usable[0], windows[len(windows) // 2]
    fast = float(fast_engine(model, inp, [edge], [window], token, clean=clean)[0, 0])
    ref = float(reference_engine(model, inp, [edge], [window], token)[0, 0])
    diff = abs(fast - ref) / max(abs(ref), 1e-30)
    if not diff <= _tolerance(model, "engine"):
        raise _fail(f"the fast engine differs from the reference engine on {edge} at layers "
                    f"{window.start}-{window.stop - 1}", f"{fast:.6g} vs {ref:.6g}")
    return diff


def once(model: HookedLlava, kind: str, check, *args) -> None:
    """Run `check(model, *args)` if the check `kind` has not yet passed on `model`."""
    if kind in model.self_checks:
        return
    model.self_checks[kind] = check(model, *args)
