"""Knockout engines: how a sweep computes the knockout probabilities of every (edge, window).

An engine is any callable ``engine(model, inp, edges, windows, token, progress=False, clean=None, heads=None)``
returning ``[edge, window]`` probabilities of `token` at the last position (`Engine`). Two ship, and must agree:

``reference_engine`` runs one full forward pass with the knockout hooks per (edge, window): slow and plain,
the ground truth.

``fast_engine`` gives the same numbers from a fraction of the work. A knockout only changes the attention rows of
its target positions at the layers of its window, so
- every position before the first target computes exactly what it computes in the clean pass: the engine runs
  the clean pass once per sample (vision tower included; shared with the greedy answer) and keeps its keys and
  values and the residual stream entering every layer;
- every layer below a window's first layer is clean too: a window starting at layer ``a`` starts from the clean
  ``blocks.{a}.hook_resid_pre`` of the suffix (the positions from the first target on) and computes only layers
  ``a..L-1``, attending to the clean keys/values of the prefix;
- the blocks with the same first target run as one batch, one row per (block, window); rows join the batch at
  their window's first layer, and each layer's hook on ``blocks.{l}.attn.hook_attn_scores`` (the same
  `KnockoutHook` as everywhere, one mask per row) blocks only the rows whose window covers that layer;
- the last layer computes the last position only (its keys and values still cover the whole suffix), and logits
  come from the last position only.

Where a family's image features attend to each other both ways (Gemma 3 with ``token_type_ids``), positions before a
target inside the image see it, and where HF's forward adds features at image positions itself (Qwen3-VL's
DeepStack), a suffix run cannot replay them; the premise fails there, so blocks whose first target lies in such a
span or before its end (`RegionMap.full_forward_spans`) run as full forwards, exactly as the reference engine runs
them.

For language models whose layers have the Llama layer's arithmetic (LLaVA-1.5 and LLaVA-NeXT's Vicuna, Mistral and
Llama-3; Idefics3's Llama and Mistral 3's Mistral; the Qwen2 of OneVision, InternVL, Qwen2-VL and Qwen2.5-VL, with
their biases and 3-D mRoPE positions; Qwen3-VL's text model and Gemma 3, with per-head query/key norms, Gemma 3's
sandwich norms, and its sliding-window layers with their own rotary embedding) the suffix runs on the bridge's own
modules, layer by layer, without the bridge's per-module dispatch: the same norms, projections, rotary embeddings
and MLPs, the attention written out as the bridge writes it (scores, causal and sliding-window masks, the knockout
hook point, softmax in float32, values), the prefix's keys and values shared by all rows rather than copied per
row. Other language models (GLM-4V's) run the suffix through the bridge itself, with the prefix as a KV cache: every
layer, for every row. Rows are batched so that the batch's activations stay within a memory budget (by default half
the model's size).
"""

from __future__ import annotations

import bisect
import contextlib
import inspect
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from mm_lens import hook_points
from mm_lens.errors import MMLensError
from mm_lens.knockout import Edge, KnockoutHook, block_hooks, edge_positions, hook_name
from mm_lens.names import DEFAULT_ENGINE as DEFAULT_ENGINE  # re-exported: the lists live in names.py
from mm_lens.names import ENGINE_NAMES as ENGINE_NAMES
from mm_lens.protocol import vocab_softmax

if TYPE_CHECKING:
    from mm_lens.inputs import MultimodalInput
    from mm_lens.model import HookedLlava

EMBED_HOOK = hook_points.EMBED


@dataclass
class CleanPass:
    """The unablated pass over a prompt: what knockout runs reuse, and the cache greedy decoding continues from."""

    embeds: Float[Tensor, "1 pos d_model"]  # the language model's input (text embeddings + image features)
    keys_values: list[tuple[Tensor, Tensor]]  # per layer: keys (after RoPE), values ``[1, kv_head, pos, d_head]``
    last_logits: Float[Tensor, " vocab"]
    cache: DynamicCache  # HF cache object (greedy decoding extends it; `keys_values` keeps the prompt's)
    resid_pre: list[Tensor] = field(default_factory=list, repr=False)  # per layer ``[1, pos, d_model]``
    #: The language model's 3-D (mRoPE) position ids ``[3, 1, pos]`` where it has them (Qwen-VL), else None.
    position_ids: Tensor | None = None


def clean_pass(model: HookedLlava, inp: MultimodalInput) -> CleanPass:
    """One forward pass without hooks of ours, keeping embeddings, the KV cache and every layer's residual input.

    Logits are computed for the last position only.
    """
    input_ids, kwargs = inp.forward_args()
    resid: dict[int, Tensor] = {}

    def grabber(layer: int):
        def grab(x: Tensor, hook) -> Tensor:
            resid[layer] = x
            return x

        return grab

    hooks = [(hook_points.resid_pre(layer), grabber(layer)) for layer in range(model.n_layers)]
    positions: dict[str, Tensor] = {}

    def grab_positions(module, args, kwargs):  # mRoPE positions are not the suffix's offsets: keep them
        pos = kwargs.get("position_ids")
        if isinstance(pos, Tensor) and pos.ndim == 3:
            positions["ids"] = pos
        return None

    lm = getattr(getattr(model.hf_model, "model", None), "language_model", None)
    handle = lm.register_forward_pre_hook(grab_positions, with_kwargs=True) if lm is not None else None
    try:
        with torch.inference_mode():
            # A cache of full layers: a model's own cache keeps only the last window of a sliding-window layer
            # (Gemma 3's local layers), and every later run needs the prefix's keys and values whole.
            logits, cache = model.bridge.run_with_hooks(
                input_ids, fwd_hooks=hooks, return_type="logits_and_cache", logits_to_keep=1,
                past_key_values=DynamicCache(), **kwargs
            )
    finally:
        if handle is not None:
            handle.remove()
    kv = [(layer.keys, layer.values) for layer in cache.layers]
    stream = [resid[layer] for layer in range(model.n_layers)]
    if any(k.shape[2] != stream[0].shape[1] for k, _ in kv):
        raise MMLensError("the clean pass's cache does not hold every position's keys and values; run the sweep "
                          "with --engine reference")
    return CleanPass(stream[0], kv, logits[0, -1], cache, stream, positions.get("ids"))


# ---------------------------------------------------------------- the language model, layer by layer


class _Layer(NamedTuple):
    """One Llama-family decoder layer as the tensors and modules its forward pass uses."""

    ln1: Any  # the HF RMSNorm modules (the bridge's norms call them for their output)
    ln2: Any
    wq: Tensor
    bq: Tensor | None
    wk: Tensor
    bk: Tensor | None
    wv: Tensor
    bv: Tensor | None
    wo: Tensor
    bo: Tensor | None
    gate: Tensor
    up: Tensor
    down: Tensor
    act: Any
    hook: Any  # the bridge's HookPoint ``blocks.{l}.attn.hook_attn_scores``
    scaling: float
    scale_queries: bool  # scaling is a power of two
    q_norm: Any = None  # per-head RMSNorm of queries / keys before RoPE (Gemma 3, Qwen3-VL), else None
    k_norm: Any = None
    post_attn_norm: Any = None  # Gemma 3's sandwich norms: after the attention and after the MLP, else None
    post_mlp_norm: Any = None
    rope_type: str | None = None  # the rotary embedding's layer type (Gemma 3: sliding vs full attention)
    window: int | None = None  # sliding-window length of this layer's attention (None: full)


#: HF decoder layers with the Llama layer's arithmetic (norm, q/k/v with optional biases, RoPE, gated MLP, norm);
#: Qwen2-VL and Qwen2.5-VL's rotary embedding merges its three mRoPE sections itself, from 3-D position ids.
_LLAMA_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen2VLDecoderLayer",
                 "Qwen2_5_VLDecoderLayer", "Qwen3VLTextDecoderLayer", "Gemma3DecoderLayer")
#: Decoder layers with sandwich norms: (input, after attention, before MLP, after MLP); the others take two.
_SANDWICH = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
#: The bridge's attention components whose arithmetic the layer path writes out: TL's own (TL computes the
#: attention), and the native one under mm-lens's attention-interface route (`mm_lens.routes`: eager attention).
_ATTENTION_BRIDGES = ("PositionEmbeddingsAttentionBridge", "AttentionBridge")


def _raw(module: Any) -> Any:
    """The HF module a bridge component wraps (the module itself when it is no bridge)."""
    return getattr(module, "original_component", None) or module


class _Stack:
    """A Llama-family language model run layer by layer on the suffix of a prompt, on the bridge's own modules.

    The arithmetic is the bridge's (`PositionEmbeddingsAttentionBridge.forward` and the HF layer it wraps), op for
    op, except that the prefix's keys and values are shared by all batch rows instead of concatenated to each row;
    the knockout still runs as a TransformerLens hook on ``blocks.{l}.attn.hook_attn_scores``.
    """

    def __init__(self, model: HookedLlava):
        bridge = model.bridge
        self.rotary = _rotary(bridge)
        typed_rope = "layer_type" in inspect.signature(self.rotary.forward).parameters  # Gemma 3: one per type
        self.layers: list[_Layer] = []
        for block in bridge.blocks:
            attn, mlp, hf_layer = block.attn, _raw(block.mlp), block.original_component
            hf_attn = attn.original_component
            lin = {name: _raw(getattr(attn, name)) for name in ("q", "k", "v", "o")}
            sandwich = all(hasattr(hf_layer, name) for name in _SANDWICH)
            norms = ([_raw(getattr(hf_layer, name)) for name in _SANDWICH] if sandwich
                     else [_raw(block.ln1), None, _raw(block.ln2), None])
            qk_norm = [_raw(getattr(attn, name)) if name in attn.submodules else None for name in ("q_norm", "k_norm")]
            self.layers.append(_Layer(
                norms[0], norms[2],
                lin["q"].weight, lin["q"].bias, lin["k"].weight, lin["k"].bias,
                lin["v"].weight, lin["v"].bias, lin["o"].weight, lin["o"].bias,
                _raw(mlp.gate_proj).weight, _raw(mlp.up_proj).weight, _raw(mlp.down_proj).weight, mlp.act_fn,
                attn.hook_attn_scores, float(hf_attn.scaling), math.frexp(float(hf_attn.scaling))[0] == 0.5,
                qk_norm[0], qk_norm[1], norms[1], norms[3],
                getattr(hf_attn, "layer_type", None) if typed_rope else None,
                getattr(hf_attn, "sliding_window", None),
            ))
        hf_attn = bridge.blocks[0].attn.original_component
        self.head_dim = int(hf_attn.head_dim)
        self.n_heads = self.layers[0].wq.shape[0] // self.head_dim
        self.n_kv = self.layers[0].wk.shape[0] // self.head_dim
        self.norm = _raw(bridge.ln_final)
        self.unembed = _raw(bridge.unembed)

    @staticmethod
    def of(model: HookedLlava) -> _Stack | None:
        """The stack of `model`'s language model, or None when its layers are not plain Llama-family layers."""
        try:
            bridge = model.bridge
            if bridge.compatibility_mode or not len(bridge.blocks):
                return None
            for block in bridge.blocks:
                hf_layer, attn, mlp = block.original_component, block.attn, _raw(block.mlp)
                hf_attn = attn.original_component
                if type(hf_layer).__name__ not in _LLAMA_LAYERS or type(attn).__name__ not in _ATTENTION_BRIDGES:
                    return None
                if not {"q", "k", "v", "o"} <= set(attn.submodules) <= {"q", "k", "v", "o", "q_norm", "k_norm"}:
                    return None
                if getattr(attn, "_use_processed_weights", False):
                    return None
                if getattr(block.mlp, "_use_processed_weights", False) or not all(
                        hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
                    return None
                if any(getattr(hf_attn, name, None) is not None for name in
                       ("attn_logit_softcapping", "sinks", "key_multiplier")):
                    return None
                if getattr(hf_attn, "sliding_window", None) is not None and not hasattr(hf_attn, "layer_type"):
                    return None  # a window the layer applies by a rule other than its layer type (Mistral's)
                if not all(type(_raw(n)).__name__.endswith("RMSNorm") for n in (block.ln1, block.ln2)):
                    return None
                if any(hasattr(hf_layer, name) for name in _SANDWICH[2:]) and not all(
                        type(_raw(getattr(hf_layer, name, None))).__name__.endswith("RMSNorm") for name in _SANDWICH):
                    return None
                if any(getattr(getattr(hf_attn, "config", None), flag, None) for flag in (
                        "use_bidirectional_attention", "final_logit_softcapping")):
                    return None  # every position sees every other, or the logits are capped after the unembedding
            cfg = bridge.cfg
            if any(getattr(cfg, flag, False) for flag in ("use_split_qkv_input", "use_attn_in", "use_attn_result",
                                                          "gated_q_proj", "rotary_interleaved_cos_sin",
                                                          "rotary_adjacent_pairs")):
                return None
            rope = getattr(getattr(block.attn.original_component, "config", None), "rope_parameters", None)
            if isinstance(rope, dict) and rope.get("llama_4_scaling_beta") is not None:
                return None
            return _Stack(model)
        except AttributeError:
            return None

    def rope(self, embeds: Tensor, start: int, position_ids: Tensor | None = None) -> list[tuple[Tensor, Tensor]]:
        """Per layer, cos, sin ``[1, 1, suffix, d_head]`` for positions ``start..``, as the HF model computes them.

        `position_ids` are the prompt's 3-D mRoPE position ids ``[3, 1, pos]`` where the model has them (Qwen-VL).
        Layers of one rotary type share their tensors.
        """
        if position_ids is not None:
            positions = position_ids[:, :, start:]
        else:
            positions = torch.arange(start, embeds.shape[1], device=embeds.device)[None]
        by_type: dict[str | None, tuple[Tensor, Tensor]] = {}
        for rope_type in dict.fromkeys(lay.rope_type for lay in self.layers):
            args = () if rope_type is None else (rope_type,)
            cos, sin = self.rotary(embeds[:, start:], positions, *args)
            if cos.shape[-1] != self.head_dim:
                raise MMLensError("partial rotary embeddings are not supported by the fast path")
            by_type[rope_type] = (cos.unsqueeze(1), sin.unsqueeze(1))
        return [by_type[lay.rope_type] for lay in self.layers]

    def far(self, seq: int, start: int, device: torch.device) -> list[Tensor | None]:
        """Per layer, the (suffix query, key) pairs outside its sliding window ``[suffix, pos]``, else None.

        A query at position p sees key j only where ``p - j < window`` (transformers' sliding-window causal mask).
        """
        masks: dict[int, Tensor] = {}
        out: list[Tensor | None] = []
        for lay in self.layers:
            if lay.window is None or seq <= lay.window:  # the window covers the whole prompt
                out.append(None)
                continue
            if lay.window not in masks:
                query = torch.arange(start, seq, device=device)[:, None]
                masks[lay.window] = (query - torch.arange(seq, device=device)[None]) >= lay.window
            out.append(masks[lay.window])
        return out

    def layer(self, index: int, h: Tensor, cos: Tensor, sin: Tensor, kv: tuple[Tensor, Tensor], prefix: int,
              last_only: bool, causal: Tensor, far: Tensor | None = None) -> Tensor:
        """Layer `index` on the suffix states `h` ``[rows, suffix, d_model]`` over the clean prefix's keys/values.

        `last_only`: compute the output of the last position only (keys and values still cover the suffix);
        `far`: the (query, key) pairs outside the layer's sliding window (`_Stack.far`), None when it sees them all.
        """
        lay = self.layers[index]
        n, s, _ = h.shape
        heads, n_kv, d = self.n_heads, self.n_kv, self.head_dim
        group = heads // n_kv
        y = lay.ln1(h)
        y_q = y[:, -1:] if last_only else y
        sq = y_q.shape[1]
        q = F.linear(y_q, lay.wq, lay.bq).view(n, sq, heads, d)
        k = F.linear(y, lay.wk, lay.bk).view(n, s, n_kv, d)
        if lay.q_norm is not None:  # per head, before RoPE, as HF does
            q, k = lay.q_norm(q), lay.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = F.linear(y, lay.wv, lay.bv).view(n, s, n_kv, d).transpose(1, 2)
        q = (q * cos[:, :, -sq:]) + (_rotate_half(q) * sin[:, :, -sq:])  # HF's apply_rotary_pos_emb
        # Contiguous keys: a batched product with keys in the projection's transposed layout takes another CPU
        # kernel than the one-row product of the full forward, and rounds differently in float16 (seen on AVX2).
        k = ((k * cos) + (_rotate_half(k) * sin)).contiguous()
        if lay.scale_queries:  # a power of two: scaling the queries is exact, and spares a pass over the scores
            q = q * lay.scaling
        q = q.contiguous()
        keys = kv[0][0, :, :prefix]  # [kv_head, prefix, d_head], shared by every row
        values = kv[1][0, :, :prefix]
        total = prefix + s
        scores = torch.empty(n, heads, sq, total, dtype=q.dtype, device=q.device)
        scores[..., prefix:] = torch.matmul(q, _repeat_kv(k, group).transpose(-1, -2))
        if prefix:  # one product for all rows (folded into the query axis), then one copy into place
            folded = q.view(n, n_kv, group * sq, d).transpose(0, 1).reshape(n_kv, n * group * sq, d)
            part = torch.bmm(folded, keys.transpose(-1, -2)).view(n_kv, n, group * sq, prefix)
            scores.view(n, n_kv, group * sq, total)[..., :prefix].copy_(part.transpose(0, 1))
        if not lay.scale_queries:
            scores.mul_(lay.scaling)  # the bridge's order: (q . k) * scaling, then the mask
        scores[..., prefix:].masked_fill_(causal[-sq:] if sq < s else causal, torch.finfo(scores.dtype).min)
        if far is not None:
            scores.masked_fill_(far[-sq:], torch.finfo(scores.dtype).min)
        scores = lay.hook(scores)
        weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype).contiguous()
        if prefix and self.exact_values(q.dtype):
            # Half precision: every row's values in one piece, so that each output is one sum over all positions
            # rounded once, as in the full forward (two partial sums would round twice).
            full = torch.empty(n, n_kv, total, d, dtype=v.dtype, device=v.device)
            full[:, :, :prefix] = values
            full[:, :, prefix:] = v
            out = torch.matmul(weights, _repeat_kv(full, group))
        else:
            out = torch.matmul(weights[..., prefix:].contiguous(), _repeat_kv(v, group))  # strided input: a slow bmm
            if prefix:  # the prefix's values, shared by all rows: one product with the rows folded in
                w = weights.view(n, n_kv, group * sq, total)[..., :prefix].transpose(0, 1)
                part = torch.bmm(w.reshape(n_kv, n * group * sq, prefix), values)
                out += part.view(n_kv, n, group * sq, d).transpose(0, 1).reshape(n, heads, sq, d)
        attn = out.transpose(1, 2).reshape(n, sq, heads * d)
        out = F.linear(attn, lay.wo, lay.bo)
        if lay.post_attn_norm is not None:
            out = lay.post_attn_norm(out)
        h = (h[:, -1:] if last_only else h) + out
        y = lay.ln2(h)
        out = F.linear(lay.act(F.linear(y, lay.gate)) * F.linear(y, lay.up), lay.down)
        if lay.post_mlp_norm is not None:
            out = lay.post_mlp_norm(out)
        return h + out

    @staticmethod
    def exact_values(dtype: torch.dtype) -> bool:
        """Whether the attention's value sums run over the whole row at once (half precision), not prefix + suffix."""
        return dtype not in (torch.float32, torch.float64)

    def logits(self, last: Tensor) -> Tensor:
        """Logits of the states `last` ``[rows, d_model]`` (final norm, unembedding)."""
        return self.unembed(self.norm(last))


def _rotary(bridge: Any) -> Any:
    """The language model's rotary embedding: the bridge's component, else the HF text model's own module."""
    rotary = getattr(bridge, "rotary_emb", None)
    if rotary is not None:
        return _raw(rotary)
    for module in bridge.original_model.modules():  # the text model: holds the decoder layers and the rotary
        layers = getattr(module, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) == len(bridge.blocks) and hasattr(
                module, "rotary_emb"):
            return module.rotary_emb
    raise AttributeError("no rotary embedding found for the language model")


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _repeat_kv(x: Tensor, group: int) -> Tensor:
    """``[n, kv_head, s, d]`` -> ``[n, kv_head * group, s, d]`` (HF's repeat_kv)."""
    if group == 1:
        return x
    n, kv, s, d = x.shape
    return x[:, :, None].expand(n, kv, group, s, d).reshape(n, kv * group, s, d)


# ---------------------------------------------------------------- the fast engine


class _Row(NamedTuple):
    block: int
    window: int
    hook: KnockoutHook
    layers: range  # the window
    first: int  # its first layer


_MODEL_BYTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_HOOK_LEVEL = -20_250_612  # the context level of the engine's own hooks (removed by that level alone)


def _model_bytes(model: HookedLlava) -> int:
    """The model's parameter bytes (walking the modules costs milliseconds: once per model)."""
    hf = model.hf_model
    if hf not in _MODEL_BYTES:
        _MODEL_BYTES[hf] = sum(p.numel() * p.element_size() for p in hf.parameters())
    return _MODEL_BYTES[hf]


@contextlib.contextmanager
def _hooked(points: Sequence[tuple[Any, Any]]):
    """TransformerLens hooks ``(HookPoint, fn)`` for the duration, added to the points directly."""
    try:
        for point, fn in points:
            point.add_hook(fn, dir="fwd", level=_HOOK_LEVEL)
        yield
    finally:
        for point, _ in points:
            point.remove_hooks("fwd", level=_HOOK_LEVEL)


def _row_bytes(clean: CleanPass, stack: _Stack | None, start: int) -> int:
    """Activation bytes one batch row needs at its widest layer (or its prefix-cache copy, on the bridge path)."""
    seq, d_model = clean.embeds.shape[1], clean.embeds.shape[2]
    size = clean.embeds.element_size()
    suffix = seq - start
    if stack is None:
        return sum(k.numel() * k.element_size() * 2 for k, _ in clean.keys_values) * start // max(seq, 1) or 1
    mlp = stack.layers[0].gate.shape[0]
    values = 2 * seq * stack.n_heads * stack.head_dim * size if _Stack.exact_values(clean.embeds.dtype) else 0
    return suffix * ((8 * d_model + 3 * mlp) * size + stack.n_heads * seq * (2 * size + 5)) + values


def _run_stack(stack: _Stack, clean: CleanPass, start: int, rows: Sequence[_Row]) -> Tensor:
    """Logits ``[rows, vocab]`` at the last position of every row; rows sorted by their first layer."""
    embeds = clean.embeds
    seq, n_layers = embeds.shape[1], len(stack.layers)
    suffix = seq - start
    ropes = stack.rope(embeds, start, clean.position_ids)
    fars = stack.far(seq, start, embeds.device)
    causal = torch.ones(suffix, suffix, dtype=torch.bool, device=embeds.device).tril_().logical_not_()
    firsts = [row.first for row in rows]
    plan, hooks = [], []
    for layer in range(firsts[0], n_layers):
        m = bisect.bisect_right(firsts, layer)
        per_row = [row.hook if layer in row.layers else None for row in rows[:m]]
        if any(h is not None for h in per_row):
            # The mask is causal only, so `check_rows` covered every row; the scores are the engine's own buffer.
            knockout = KnockoutHook.per_row(per_row, check=False, inplace=True)
            q_len = 1 if layer == n_layers - 1 else suffix
            knockout.prepare((m, stack.n_heads, q_len, seq), embeds.device)
            hooks.append((stack.layers[layer].hook, knockout))  # blocks.{layer}.attn.hook_attn_scores
        plan.append((layer, m))
    h = embeds.new_empty(0, suffix, embeds.shape[2])
    with _hooked(hooks):
        for layer, m in plan:
            if m > h.shape[0]:  # rows whose window starts here join with the clean residual stream
                joining = clean.resid_pre[layer][:, start:].expand(m - h.shape[0], -1, -1)
                h = torch.cat([h, joining])
            cos, sin = ropes[layer]
            h = stack.layer(layer, h, cos, sin, clean.keys_values[layer], start, layer == n_layers - 1, causal,
                            fars[layer])
    return stack.logits(h[:, -1])


def _run_bridge(model: HookedLlava, clean: CleanPass, start: int, rows: Sequence[_Row],
                caches: dict[tuple[int, int], DynamicCache]) -> Tensor:
    """Logits ``[rows, vocab]`` through the bridge itself: the suffix from the first target over the prefix cache."""
    embeds = clean.embeds
    n, seq = len(rows), embeds.shape[1]
    hooks = []
    for layer in sorted({layer for row in rows for layer in row.layers}):
        per_row = [row.hook if layer in row.layers else None for row in rows]
        hooks.append((hook_name(layer), KnockoutHook.per_row(per_row, check=False)))
    past = None
    if start > 0:
        past = caches.get((start, n))
        if past is None:
            past = caches[(start, n)] = _prefix_cache(_prefix(clean, start), n, seq - start)
        for layer in past.layers:
            layer.rewind()
    suffix = embeds[:, start:].expand(n, -1, -1)
    extra = {}
    if clean.position_ids is not None:  # 3-D mRoPE: the suffix's own positions, not the cache offset's
        extra["position_ids"] = clean.position_ids[:, :, start:].expand(-1, n, -1)
    logits = model.bridge.run_with_hooks(suffix, fwd_hooks=hooks, past_key_values=past, logits_to_keep=1, **extra)
    return logits[:, -1]


def fast_path(model: HookedLlava) -> str:
    """The path ``fast_engine(..., path="auto")`` takes on `model`: ``"layers"`` or ``"bridge"``."""
    return "layers" if _Stack.of(model) is not None else "bridge"


def fast_engine(
    model: HookedLlava,
    inp: MultimodalInput,
    blocks: Sequence[Edge],
    windows: Sequence[range],
    token: int,
    progress: bool = False,
    clean: CleanPass | None = None,
    memory_budget: int | None = None,
    heads: Sequence[int] | None = None,
    path: str = "auto",
) -> Float[Tensor, "block layer"]:
    """Knockout probabilities of `token` at the last position, ``[block, window]``; equals the reference engine.

    `clean` is the prompt's clean pass when the caller already has it (the sweep shares the greedy answer's);
    `heads` restricts the knockout to those attention heads. `memory_budget` (bytes) bounds a batch's
    activations (default: half the model's size). `path` is ``"auto"`` (layer by layer for Llama-family language
    models, else through the bridge), ``"layers"`` or ``"bridge"``.
    """
    if path not in ("auto", "layers", "bridge"):
        raise MMLensError(f"fast engine path {path!r} is not one of 'auto', 'layers', 'bridge'")
    out = torch.empty(len(blocks), len(windows))
    n_vocab = inp.vocab_size(model)
    with torch.inference_mode():
        clean = clean or clean_pass(model, inp)
        stack = None if path == "bridge" else _Stack.of(model)
        if stack is not None and len(clean.resid_pre) != len(stack.layers):
            stack = None  # a clean pass made elsewhere, without each layer's residual stream
        if path == "layers" and stack is None:
            raise MMLensError("the fast engine's layer path needs Llama-family decoder layers and a clean pass from "
                              "mm_lens.engines.clean_pass; use path='auto'")
        clean_prob = float(vocab_softmax(clean.last_logits, n_vocab)[token])
        groups: dict[int, list[_Row]] = {}
        exact: list[int] = []  # blocks with a target inside a full-forward span: no clean prefix to reuse
        for b, block in enumerate(blocks):
            targets, sources = edge_positions(inp.regions, block)
            if not (len(targets) and len(sources)):  # an empty region blocks nothing: the clean probability
                out[b] = clean_prob
                continue
            hook = KnockoutHook([(targets, sources)], [str(block)], heads=heads, check=False)
            start = min(int(t) for t in targets)
            # A target inside such a span, or before its end (the suffix would then hold span positions a suffix run
            # cannot compute: Gemma 3's image block both ways, Qwen3-VL's DeepStack additions), has no clean prefix.
            if any(start < hi for _, hi in getattr(inp.regions, "full_forward_spans", ())):
                exact.append(b)
                continue
            for w, layers in enumerate(windows):
                if not len(layers):
                    out[b, w] = clean_prob
                    continue
                groups.setdefault(start, []).append(_Row(b, w, hook, layers, min(layers)))
        budget = memory_budget if memory_budget is not None else max(_model_bytes(model) // 2, 64 << 20)
        caches: dict[tuple[int, int], DynamicCache] = {}
        chunks = []
        for start, rows in sorted(groups.items()):
            rows.sort(key=lambda row: (row.first, row.block, row.window))
            step = max(1, min(len(rows), budget // _row_bytes(clean, stack, start)))
            chunks += [(start, rows[lo: lo + step]) for lo in range(0, len(rows), step)]
        for start, rows in tqdm(chunks, desc="knockout", leave=False, disable=not progress):
            if stack is not None:
                logits = _run_stack(stack, clean, start, rows)
            else:
                if caches and next(iter(caches))[0] != start:
                    caches.clear()  # groups come sorted by start: the previous prefix is done with
                logits = _run_bridge(model, clean, start, rows, caches)
            probs = vocab_softmax(logits, n_vocab)[:, token].cpu()
            for row, p in zip(rows, probs.tolist(), strict=True):
                out[row.block, row.window] = p
    if exact:  # positions before such a target see it (and what it changes) both ways: run the full forward
        out[exact] = reference_engine(model, inp, [blocks[b] for b in exact], windows, token, heads=heads)
    return out


# ---------------------------------------------------------------- the bridge path's prefix cache


def _prefix(clean: CleanPass, length: int) -> list[tuple[Tensor, Tensor]]:
    return [(k[:, :, :length], v[:, :, :length]) for k, v in clean.keys_values]


class _PrefixLayer(DynamicLayer):
    """A cache layer over a preallocated buffer holding the clean prefix for every batch row.

    Each run writes only its suffix's keys and values after the prefix, so runs that share a prefix (chunks with
    the same first target) share one copy of it instead of concatenating a new one per run.
    """

    def __init__(self, keys: Tensor, values: Tensor, batch: int, suffix_len: int):
        super().__init__()
        self.prefix_len = keys.shape[2]
        shape = (batch, keys.shape[1], self.prefix_len + suffix_len, keys.shape[3])
        self.buf_k, self.buf_v = keys.new_empty(shape), values.new_empty(shape)
        self.buf_k[:, :, : self.prefix_len] = keys
        self.buf_v[:, :, : self.prefix_len] = values
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.rewind()

    def rewind(self) -> None:
        """Forget the last run's suffix."""
        self.keys = self.buf_k[:, :, : self.prefix_len]
        self.values = self.buf_v[:, :, : self.prefix_len]

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        end = self.keys.shape[2] + key_states.shape[2]
        self.buf_k[:, :, self.keys.shape[2]: end] = key_states
        self.buf_v[:, :, self.keys.shape[2]: end] = value_states
        self.keys, self.values = self.buf_k[:, :, :end], self.buf_v[:, :, :end]
        return self.keys, self.values


def _prefix_cache(prefix: list[tuple[Tensor, Tensor]], batch: int, suffix_len: int) -> DynamicCache:
    cache = DynamicCache()
    cache.layers = [_PrefixLayer(k, v, batch, suffix_len) for k, v in prefix]
    return cache


# ---------------------------------------------------------------- the reference engine and the registry

class Engine(Protocol):
    """Knockout probabilities of `token` at the last position, ``[edge, window]``.

    ``clean`` is the prompt's clean pass when the caller has it (an engine may reuse it or ignore it);
    ``heads`` restricts the knockout to those attention heads (None: all).
    """

    def __call__(
        self,
        model: HookedLlava,
        inp: MultimodalInput,
        edges: Sequence[Edge],
        windows: Sequence[range],
        token: int,
        progress: bool = False,
        clean: CleanPass | None = None,
        heads: Sequence[int] | None = None,
    ) -> Float[Tensor, "edge window"]: ...


def reference_engine(
    model: HookedLlava,
    inp: MultimodalInput,
    blocks: Sequence[Edge],
    windows: Sequence[range],
    token: int,
    progress: bool = False,
    clean: CleanPass | None = None,
    heads: Sequence[int] | None = None,
) -> Float[Tensor, "block layer"]:
    """One full forward with the knockout hooks per (block, window): slow and plain, the ground truth.

    `clean` is accepted for the engine signature and not used: every pass starts from the pixels.
    """
    input_ids, kwargs = inp.forward_args()
    n_vocab = inp.vocab_size(model)
    out = torch.empty(len(blocks), len(windows))
    jobs = [(b, w) for b in range(len(blocks)) for w in range(len(windows))]
    with torch.inference_mode():
        for b, w in tqdm(jobs, desc="knockout", unit="fwd", leave=False, disable=not progress):
            hooks = block_hooks(inp.regions, blocks[b], windows[w], heads=heads)
            # The unembedding of the last position only: the earlier positions' logits are never read.
            logits = model.bridge.run_with_hooks(input_ids, fwd_hooks=hooks, logits_to_keep=1, **kwargs)
            out[b, w] = vocab_softmax(logits[0, -1], n_vocab)[token]
    return out


fast_engine.reuses_clean = True  # type: ignore[attr-defined]  # layer_sweep hands it its clean pass
fast_engine.shortcut = True  # type: ignore[attr-defined]  # self-checked against the reference (mm_lens.selfcheck)
# The plain engine: no shortcut to self-check, and the sweep's greedy answer is decoded without the KV cache.
reference_engine.plain = True  # type: ignore[attr-defined]

#: Engines by name.
ENGINES: dict[str, Engine] = {"reference": reference_engine, "fast": fast_engine}
assert tuple(ENGINES) == ENGINE_NAMES and DEFAULT_ENGINE in ENGINES  # the torch-free list the CLI offers


def get_engine(engine: str | Engine) -> Engine:
    """The engine called `engine` (or `engine` itself when it is a callable), else an error listing the names."""
    if callable(engine):
        return engine
    if engine not in ENGINES:
        raise MMLensError(f"unknown sweep engine {engine!r}; available: {', '.join(sorted(ENGINES))} (or a callable)")
    return ENGINES[engine]
