"""mm_lens.compat: each work-around shows the bug it fixes, and that it is fixed.

- TL 4.3 on transformers >= 5.24 never writes the KV cache (transformers passes it as ``cache=``): with the fix the
  clean pass keeps its keys and a cached continuation equals a full forward; without it (where the bug exists) the
  keys are ``None``.
- TL 4.3's boot runs ``pip install torchvision`` when ``AutoProcessor`` fails; mm-lens's boot never does.
- TL 4.3 ships no Qwen2-VL adapter, and its Qwen2.5-VL adapter cannot boot Qwen2-VL (a gated vision MLP mapped onto
  fc1 / fc2); `compat.qwen2_vl_adapter` boots it, registered through `register_tl_adapter` (which takes an adapter
  class or a function returning one), and `without_required_libraries` waives a library the subclass inherits.
"""

from __future__ import annotations

import subprocess

import pytest
import torch
import transformers

from mm_lens import compat
from mm_lens.engines import clean_pass
from mm_lens.errors import MMLensError
from mm_lens.inputs import prepare
from mm_lens.sweep import greedy_answer


@pytest.fixture(params=["tiny_llava", "tiny_llava_next"])
def model(request):
    return request.getfixturevalue(request.param)


def _inputs(model, make_image):
    return prepare(model, make_image(40, 28, seed=3), "Is the square red or blue?")


def _cached_vs_full(model, inp, clean, token):
    """Max |logit difference| of one cached step from `clean` against a full forward of prompt + token."""
    ids, kwargs = inp.forward_args(extra=[token])
    with torch.inference_mode():
        cached = model.bridge(ids[:, -1:], past_key_values=clean.cache)[0, -1]
        full = model.bridge(ids, **kwargs)[0, -1]
    return float((cached - full).abs().max())


def test_clean_pass_keeps_the_prompts_keys_and_a_cached_step_equals_a_full_forward(model, make_image):
    inp = _inputs(model, make_image)
    clean = clean_pass(model, inp)
    n_pos = inp.input_ids.shape[1]
    assert len(clean.keys_values) == model.n_layers
    for keys, values in clean.keys_values:
        assert keys is not None and values is not None
        assert keys.shape[2] == values.shape[2] == n_pos
    token = int(clean.last_logits.argmax())
    assert _cached_vs_full(model, inp, clean, token) < 1e-4


def test_bridge_generate_with_the_cache_equals_uncached_greedy_decoding(tiny_llava, make_image):
    """TL's cached ``generate`` against decoding by full forwards (mm-lens's plain greedy decoding).

    (TL 4.3's own uncached multimodal ``generate`` gives other tokens from the second on, on transformers 5.18 and
    5.25 alike; it is not the reference here.)
    """
    inp = _inputs(tiny_llava, make_image)
    ids, kwargs = inp.forward_args()
    plain = greedy_answer(tiny_llava, inp, max_new_tokens=4, cached=False).token_ids
    with torch.inference_mode():
        out = tiny_llava.bridge.generate(ids, max_new_tokens=len(plain), do_sample=False, use_past_kv_cache=True,
                                         verbose=False, return_type="tokens", stop_at_eos=False, **kwargs)
    assert out[0, ids.shape[1]:].tolist() == plain


@pytest.mark.skipif(not compat.transformers_names_cache_kwarg(),
                    reason=f"transformers {transformers.__version__} still passes past_key_values: no bug to show")
def test_without_the_fix_the_cache_stays_empty(tiny_llava, make_image, monkeypatch):
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    assert compat.kv_cache_fix_installed()  # mm-lens's load installed it
    monkeypatch.setattr(AttentionBridge, "_update_kv_cache", AttentionBridge._update_kv_cache.__wrapped__)
    assert not compat.kv_cache_fix_installed()
    clean = clean_pass(tiny_llava, _inputs(tiny_llava, make_image))
    assert all(keys is None for keys, _ in clean.keys_values)  # TL 4.3 on transformers >= 5.24: the bug


def test_the_fix_applies_only_where_transformers_renamed_the_argument():
    assert compat.install_kv_cache_fix() == compat.transformers_names_cache_kwarg()
    assert compat.kv_cache_fix_installed() == compat.transformers_names_cache_kwarg()
    assert compat.install_kv_cache_fix() == compat.kv_cache_fix_installed()  # idempotent


def _record_subprocesses(monkeypatch) -> list:
    calls: list = []

    def record(*args, **kwargs):
        calls.append(args[0] if args else kwargs.get("args"))
        return 0

    for name in ("check_call", "run", "call", "check_output"):
        monkeypatch.setattr(subprocess, name, record)
    return calls


def _failing_auto_processor(monkeypatch):
    def fail(*args, **kwargs):
        raise ImportError("this processor needs torchvision (simulated)")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", fail)


def test_tl_boot_alone_would_pip_install_torchvision(tiny_llava_path, monkeypatch):
    """The hazard itself: TL's processor loader, unguarded, shells out to pip when AutoProcessor fails."""
    import importlib.util

    from transformer_lens.model_bridge.sources.transformers import helpers

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: TL has nothing to install")
    calls = _record_subprocesses(monkeypatch)
    _failing_auto_processor(monkeypatch)

    class Cfg:
        is_multimodal = True

    helpers.load_modality_processor(object(), Cfg(), str(tiny_llava_path), False, None)
    assert any("torchvision" in " ".join(map(str, call)) for call in calls), calls


def test_mm_lens_boot_never_installs_torchvision(tiny_llava_path, monkeypatch):
    calls = _record_subprocesses(monkeypatch)
    _failing_auto_processor(monkeypatch)
    bridge = compat.boot_bridge(str(tiny_llava_path), dtype=torch.float32)
    assert bridge is not None
    assert calls == []


@pytest.fixture
def tl_tables(monkeypatch):
    """TL's three adapter tables, copied for the test: registrations made in it do not outlive it."""
    from transformer_lens.factories import architecture_adapter_factory as factory
    from transformer_lens.utilities import architectures

    monkeypatch.setattr(factory, "SUPPORTED_ARCHITECTURES", dict(factory.SUPPORTED_ARCHITECTURES))
    registry = factory.ArchitectureAdapterFactory
    monkeypatch.setattr(registry, "_adapters", dict(registry._adapters))
    monkeypatch.setattr(architectures, "MULTIMODAL_ARCHITECTURES", set(architectures.MULTIMODAL_ARCHITECTURES))
    return factory.SUPPORTED_ARCHITECTURES, registry._adapters, architectures.MULTIMODAL_ARCHITECTURES


@pytest.fixture(scope="module")
def qwen2_vl_path(tmp_path_factory):
    from test_family_qwen_vl import build

    return build("qwen2_vl", tmp_path_factory.mktemp("qwen2_vl"))


def test_tl_has_no_qwen2_vl_adapter_and_its_qwen2_5_vl_adapter_cannot_boot_it(qwen2_vl_path, tl_tables):
    """The gap `qwen2_vl_adapter` fills (noticed the day TL ships one: then the subclass may go)."""
    supported, adapters, multimodal = tl_tables
    assert "Qwen2VLForConditionalGeneration" not in adapters or adapters["Qwen2VLForConditionalGeneration"] is \
        compat.qwen2_vl_adapter()  # a process where mm-lens's load registered it
    for table in (supported, adapters):
        table.pop("Qwen2VLForConditionalGeneration", None)
    multimodal.discard("Qwen2VLForConditionalGeneration")
    compat.register_tl_adapter("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    with pytest.raises(AttributeError, match="gate_proj"):
        compat.boot_bridge(str(qwen2_vl_path), architecture="Qwen2VLForConditionalGeneration",
                           unused_libraries=("torchvision",), dtype=torch.float32)


def test_qwen2_vl_adapter_boots_qwen2_vl_with_its_vision_mlp_hooked(qwen2_vl_path, tl_tables):
    supported, adapters, multimodal = tl_tables
    for table in (supported, adapters):
        table.pop("Qwen2VLForConditionalGeneration", None)
    multimodal.discard("Qwen2VLForConditionalGeneration")
    compat.register_tl_adapter("Qwen2VLForConditionalGeneration", compat.qwen2_vl_adapter)
    bridge = compat.boot_bridge(str(qwen2_vl_path), architecture="Qwen2VLForConditionalGeneration",
                                unused_libraries=("torchvision",), dtype=torch.float32)
    vision = bridge.original_model.config.vision_config
    assert bridge.cfg.vision_hidden_size == vision.embed_dim != vision.hidden_size
    pixel_values = torch.randn(16, 3 * 2 * 14 * 14)
    grid = torch.tensor([[1, 4, 4]])
    seen = {}

    def grab(x, hook):
        seen[hook.name] = x.detach().clone()
        return x

    names = ["vision_encoder.blocks.0.mlp.in.hook_out", "vision_encoder.blocks.1.mlp.out.hook_out",
             "vision_projector.hook_out"]
    with torch.inference_mode(), bridge.hooks(fwd_hooks=[(n, grab) for n in names]):
        bridge(torch.tensor([[1, 2, 3]]))  # text only: the tower does not run
        assert seen == {}
        bridge.original_model.model.get_image_features(pixel_values, grid)
    assert set(seen) == set(names)
    assert seen[names[0]].shape == (16, int(vision.embed_dim * vision.mlp_ratio))
    assert seen[names[1]].shape == (16, vision.embed_dim)
    assert seen[names[2]].shape == (4, vision.hidden_size)


def test_register_tl_adapter_takes_an_architecture_an_adapter_class_or_a_function(tl_tables):
    supported, adapters, multimodal = tl_tables
    cls = compat.qwen2_vl_adapter()
    assert compat.qwen2_vl_adapter() is cls  # one class per process
    for arch, like in (("MMLensTestByName", "Qwen2_5_VLForConditionalGeneration"), ("MMLensTestByClass", cls),
                       ("MMLensTestByFunction", compat.qwen2_vl_adapter)):
        compat.register_tl_adapter(arch, like)
        expected = supported["Qwen2_5_VLForConditionalGeneration"] if isinstance(like, str) else cls
        assert supported[arch] is adapters[arch] is expected
        assert arch in multimodal  # the class derives from a multimodal TL adapter
    with pytest.raises(MMLensError, match="no adapter"):
        compat.register_tl_adapter("MMLensTestUnknown", "NoSuchArchitecture")


def test_without_required_libraries_waives_an_inherited_library_and_removes_the_override(tl_tables):
    supported, _, _ = tl_tables
    compat.register_tl_adapter("MMLensTestQwen2VL", compat.qwen2_vl_adapter)
    cls, parent = compat.qwen2_vl_adapter(), supported["Qwen2_5_VLForConditionalGeneration"]
    assert "required_libraries" not in cls.__dict__ and cls.required_libraries == ["torchvision"]
    with compat.without_required_libraries("MMLensTestQwen2VL", ("torchvision",)):
        assert cls.required_libraries == [] and parent.required_libraries == ["torchvision"]
    assert "required_libraries" not in cls.__dict__ and cls.required_libraries == ["torchvision"]
    with compat.without_required_libraries("Qwen2_5_VLForConditionalGeneration", ("torchvision",)):
        assert parent.required_libraries == []
    assert parent.__dict__["required_libraries"] == ["torchvision"]
