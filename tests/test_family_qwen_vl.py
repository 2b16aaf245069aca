"""The Qwen-VL group on tiny random checkpoints (Qwen2-VL, booted through mm-lens's `compat.qwen2_vl_adapter`;
Qwen2.5-VL; Qwen3-VL): knockout through the attention-interface route equals the oracle (both engines, all heads and
one head), image positions and markers, painted boxes across smart_resize rounding, the flow CLI; Qwen3-VL's
DeepStack ablation (`without_deepstack`) against the oracle under the same ablation."""

from __future__ import annotations

import warnings

import pytest
import torch

from family_checks import (
    check_flow_cli,
    check_knockout_oracle,
    check_merged_grid,
    check_oracle_suite,
    check_related_by_painting,
)
from family_tokenizers import saved_tokenizer
from oracle import plain_model

SPECIAL = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}"
    "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build(kind: str, out):
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = saved_tokenizer("qwen3", out / "tok", add=SPECIAL)
    tok.chat_template = TEMPLATE
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                tie_word_embeddings=False)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, in_chans=3)
    cell = 28
    if kind == "qwen3_vl":
        cfg_cls, model_cls, proc_cls = (transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration,
                                        transformers.Qwen3VLProcessor)
        text.update(head_dim=16)
        text["rope_parameters"]["mrope_interleaved"] = True
        vision.update(patch_size=16, out_hidden_size=64, num_position_embeddings=64, deepstack_visual_indexes=[0])
        cell = 32
    elif kind == "qwen2_5_vl":
        cfg_cls, model_cls, proc_cls = (transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration,
                                        transformers.Qwen2_5_VLProcessor)
        vision.update(out_hidden_size=64, window_size=56, fullatt_block_indexes=[1])
    else:
        cfg_cls, model_cls, proc_cls = (transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration,
                                        transformers.Qwen2VLProcessor)
        vision.update(embed_dim=32, mlp_ratio=2, hidden_size=64)
    config = cfg_cls(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                     video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                     vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    torch.manual_seed(0)
    model = model_cls(config).eval()
    path = out / kind
    model.save_pretrained(path)
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": cell * cell * 4,
                                                     "longest_edge": cell * cell * 16},
                                               patch_size=cell // 2, merge_size=2, temporal_patch_size=2)
    del proc_cls
    image_processor.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "chat_template.jinja").write_text(TEMPLATE)
    return path


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def qwen(request, tmp_path_factory):
    from mm_lens.model import load

    path = build(request.param, tmp_path_factory.mktemp(request.param))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load(str(path))
    return path, model


def test_knockout_equals_oracle(qwen, make_image):
    """Both engines (both fast paths) equal the oracle: the standard blocks, one head, targets inside and before
    the image (`family_checks.check_oracle_suite`)."""
    from mm_lens.inputs import prepare

    path, model = qwen
    inp = prepare(model, make_image(60, 44), "Is the cube red or blue ?", protocol="checkpoint",
                  spans={"True Option": "red"})
    check_oracle_suite(model, plain_model(str(path)), inp)


def test_image_positions_and_markers(qwen, make_image):
    from mm_lens.inputs import prepare

    _, model = qwen
    inp = prepare(model, make_image(60, 44), "What is this ?", protocol="checkpoint")
    check_merged_grid(model, inp, ["<|vision_start|>", "<|vision_end|>"])


@pytest.mark.parametrize("size", [(60, 44), (100, 50), (45, 90)])
def test_related_by_painting(qwen, make_image, size):
    _, model = qwen
    w, h = size
    check_related_by_painting(model, make_image(w, h), [(4, 4, 10, 8), (w // 3, 2, w // 2, h - 6), (0, 0, w, 6)])


def test_knockout_live(qwen):
    assert qwen[1].self_checks["knockout_live"] > 0
    assert qwen[1].family.route.name == "attention-interface"


def test_flow_cli(qwen, tmp_path, make_image):
    path, _ = qwen
    check_flow_cli(path, tmp_path, make_image, [(60, 44), (50, 70)])


def test_without_deepstack(qwen, make_image):
    """The ablation drops DeepStack's additions (= its mergers' outputs zeroed), knockouts under it still equal the
    oracle under it, it is undone on exit, and a model without DeepStack is refused."""
    from mm_lens.errors import MMLensError
    from mm_lens.families.qwen_vl import without_deepstack
    from mm_lens.inputs import prepare

    path, model = qwen
    if model.model_type != "qwen3_vl":
        with pytest.raises(MMLensError, match="no DeepStack"):
            with without_deepstack(model):
                pass
        return
    inp = prepare(model, make_image(60, 44), "Is the cube red or blue ?", protocol="checkpoint",
                  spans={"True Option": "red"})
    ids, kwargs = inp.forward_args()
    mergers = model.hf_model.model.visual.deepstack_merger_list
    with torch.inference_mode():
        clean = model.bridge(ids, **kwargs)[0, -1]
        with without_deepstack(model):
            ablated = model.bridge(ids, **kwargs)[0, -1]
        handles = [m.register_forward_hook(lambda mod, a, out: torch.zeros_like(out)) for m in mergers]
        try:
            zeroed = model.bridge(ids, **kwargs)[0, -1]
        finally:
            for h in handles:
                h.remove()
        again = model.bridge(ids, **kwargs)[0, -1]
    moved = float((ablated - clean).abs().max())
    print(model.model_type, "without DeepStack: logits move", moved)
    assert moved > 1e-4
    assert torch.allclose(ablated, zeroed, atol=1e-6)
    assert torch.equal(again, clean)
    plain = plain_model(str(path))
    with without_deepstack(model), without_deepstack(plain):
        worst = check_knockout_oracle(model, plain, inp, ["Image->Question", "Image->Last"], [range(0, 2)])
    print(model.model_type, "without DeepStack", worst)
