"""GLM-4V on a tiny random checkpoint (GLM-4's language model with partial rotary and sandwich norms): knockout
through the attention-interface route equals the oracle (both engines, all heads and one head), image positions
and markers, painted boxes across smart_resize rounding, the flow CLI."""

from __future__ import annotations

import warnings

import pytest
import torch

from family_checks import check_flow_cli, check_merged_grid, check_oracle_suite, check_related_by_painting
from family_tokenizers import saved_tokenizer
from oracle import plain_model

IMAGE = ["<|begin_of_image|>", "<|image|>", "<|end_of_image|>"]
VIDEO = ["<|begin_of_video|>", "<|video|>", "<|end_of_video|>"]
SPECIAL = ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", *IMAGE, *VIDEO]
# GLM-4.1V's template, reduced to one image and text: [gMASK]<sop><|user|>\n<|begin_of_image|><|image|>...
TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|begin_of_image|><|image|><|end_of_image|>{% elif c['type'] == 'text' %}"
    "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CELL = 28  # patch_size 14 x spatial_merge_size 2


def build(out):
    import transformers
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    tok = saved_tokenizer("qwen3", out / "tok", add=SPECIAL)
    tok.chat_template = TEMPLATE
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    # head_dim 32 with GLM's partial rotary (half the head), the mRoPE sections covering the rotary half.
    text = dict(hidden_size=128, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                 "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3, image_size=56, out_hidden_size=128)
    config = transformers.Glm4vConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image|>"], video_token_id=ids["<|video|>"],
        image_start_token_id=ids["<|begin_of_image|>"], image_end_token_id=ids["<|end_of_image|>"],
        video_start_token_id=ids["<|begin_of_video|>"], video_end_token_id=ids["<|end_of_video|>"],
        tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.Glm4vForConditionalGeneration(config).eval()
    path = out / "glm4v"
    model.save_pretrained(path)
    # min / max pixels count the frame twice (temporal_patch_size): 2 .. 16 merged cells.
    image_processor = Glm4vImageProcessorPil(size={"shortest_edge": CELL * CELL * 4,
                                                   "longest_edge": CELL * CELL * 32},
                                             patch_size=14, merge_size=2, temporal_patch_size=2)
    image_processor.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "chat_template.jinja").write_text(TEMPLATE)
    return path


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    from mm_lens.model import load

    path = build(tmp_path_factory.mktemp("glm4v"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load(str(path))
    return path, model


def test_knockout_equals_oracle(glm, make_image):
    """Both engines equal the oracle: the standard blocks, one head, targets inside and before the image."""
    from mm_lens.inputs import prepare

    path, model = glm
    inp = prepare(model, make_image(60, 44), "Is the cube red or blue ?", protocol="checkpoint",
                  spans={"True Option": "red"})
    check_oracle_suite(model, plain_model(str(path)), inp)


def test_image_positions_and_markers(glm, make_image):
    from mm_lens.inputs import prepare

    _, model = glm
    inp = prepare(model, make_image(60, 44), "What is this ?", protocol="checkpoint")
    check_merged_grid(model, inp, ["<|begin_of_image|>", "<|end_of_image|>"])
    types = inp.extra["mm_token_type_ids"][0].tolist()
    assert [p for p, t in enumerate(types) if t == 1] == inp.regions.positions("Image")


@pytest.mark.parametrize("size", [(60, 44), (100, 50), (45, 90), (200, 150), (30, 30)])  # round, max, min
def test_related_by_painting(glm, make_image, size):
    _, model = glm
    w, h = size
    check_related_by_painting(model, make_image(w, h), [(4, 4, 10, 8), (w // 3, 2, w // 2, h - 6), (0, 0, w, 6)])


def test_knockout_live(glm):
    """The load-time proof passed, through the attention-interface route (its pre-softmax scores and the refusal
    without it: `test_routes`, on every native-attention family)."""
    assert glm[1].self_checks["knockout_live"] > 0
    assert glm[1].family.route.name == "attention-interface"


def test_flow_cli(glm, tmp_path, make_image):
    path, _ = glm
    check_flow_cli(path, tmp_path, make_image, [(60, 44), (50, 70)])


@pytest.mark.parametrize("size", [(60, 44), (100, 50), (200, 150)])
def test_layout_is_the_models_packing(glm, make_image, size):
    """The layout's (row, col) of each image position is the model's own: the vision tower's patch coordinates
    (each merged feature is ``merge**2`` consecutive patches), the language model's 3-D mRoPE positions of the
    image tokens, and `qwen_pixel_tiles` folds the patches back into the image the processor resized."""
    import numpy as np
    from PIL import Image as PILImage

    from mm_lens.inputs import prepare

    _, model = glm
    image = make_image(*size)
    inp = prepare(model, image, "What is this ?", protocol="checkpoint")
    codes = [(t.row, t.col) for t in inp.regions.image_tokens]
    hf = model.hf_model
    merge = hf.config.vision_config.spatial_merge_size
    seen = {}

    def coords(module, args, kwargs):
        seen["h"], seen["w"] = args[3].tolist(), args[4].tolist()

    def positions(module, args, kwargs):
        seen["pos"] = kwargs["position_ids"]

    handles = [hf.model.visual.embeddings.register_forward_pre_hook(coords, with_kwargs=True),
               hf.model.language_model.register_forward_pre_hook(positions, with_kwargs=True)]
    try:
        input_ids, kwargs = inp.forward_args()
        with torch.inference_mode():
            hf(input_ids=input_ids, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    n = merge * merge
    tower = [(seen["h"][k * n] // merge, seen["w"][k * n] // merge) for k in range(len(codes))]
    assert all(seen["h"][k * n + i] // merge == tower[k][0] and seen["w"][k * n + i] // merge == tower[k][1]
               for k in range(len(codes)) for i in range(n))
    assert tower == codes
    image_pos = inp.regions.positions("Image")
    pos = seen["pos"][:, 0, image_pos]  # [3, image tokens]: (t, h, w) streams
    start = int(pos[0, 0])
    assert [(int(h) - start, int(w) - start) for h, w in zip(pos[1], pos[2], strict=True)] == codes
    # The folded patches are the processor's resized, normalised image.
    tiles = model.family.pixel_tiles({"pixel_values": inp.pixel_values, **inp.extra})
    proc = model.processor.image_processor
    _, hh, ww = tiles.shape[1:]
    resized = np.asarray(image.convert("RGB").resize((ww, hh), PILImage.BICUBIC), dtype=np.float32) / 255
    want = (torch.from_numpy(resized).permute(2, 0, 1) - torch.tensor(proc.image_mean)[:, None, None]) \
        / torch.tensor(proc.image_std)[:, None, None]
    assert torch.allclose(tiles[0].float(), want, atol=1e-4)
