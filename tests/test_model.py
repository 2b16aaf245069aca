"""mm_lens.model: loading tiny checkpoints as TL bridges, offline, with clear errors."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch
import transformers as tf

from mm_lens.errors import MMLensError
from mm_lens.model import HookedLlava, load

HF_CLASSES = {"llava": tf.LlavaForConditionalGeneration, "llava_next": tf.LlavaNextForConditionalGeneration}


@pytest.fixture(params=["llava", "llava_next"])
def model_and_path(request):
    """(loaded model, checkpoint path) for each supported type."""
    fixture = "tiny_llava" if request.param == "llava" else "tiny_llava_next"
    return request.getfixturevalue(fixture), request.getfixturevalue(f"{fixture}_path")


def test_load_gives_eval_bridge_and_processor(model_and_path):
    model, path = model_and_path
    assert isinstance(model, HookedLlava)
    assert model.model_type == ("llava" if "next" not in path.name else "llava_next")
    assert model.name == str(path)
    assert model.n_layers == 4
    assert not model.bridge.training and not model.hf_model.training
    assert model.hf_model is model.bridge.original_model
    assert model.tokenizer is model.processor.tokenizer
    assert model.device == torch.device("cpu")
    assert hasattr(model.processor, "image_processor")


def test_bridge_logits_equal_hf_eager(model_and_path, make_image):
    model, path = model_and_path
    hf = HF_CLASSES[model.model_type].from_pretrained(path, attn_implementation="eager").eval()
    prompt = "USER: <image>\nWhat color is the ball? ASSISTANT:"
    enc = model.processor(images=make_image(48, 32, seed=3), text=prompt, return_tensors="pt")
    assert (enc["input_ids"] == model.config.image_token_id).sum() > 0
    kwargs = {k: v for k, v in enc.items() if k != "input_ids"}
    with torch.inference_mode():
        ours = model.bridge(enc["input_ids"], **kwargs)
        theirs = hf(**enc).logits
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    # The image matters: a different image changes the logits.
    enc2 = model.processor(images=make_image(48, 32, seed=4), text=prompt, return_tensors="pt")
    with torch.inference_mode():
        other = model.bridge(enc2["input_ids"], **{k: v for k, v in enc2.items() if k != "input_ids"})
    assert not torch.allclose(ours, other)


def test_local_load_is_offline_fast_and_restores_env(tiny_llava_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    start = time.perf_counter()
    model = load(tiny_llava_path)  # a Path works too
    elapsed = time.perf_counter() - start
    assert elapsed < 10, f"local load took {elapsed:.1f}s: something waits on the network"
    assert model.model_type == "llava"
    assert "HF_HUB_OFFLINE" not in os.environ and "TRANSFORMERS_OFFLINE" not in os.environ
    assert hub_constants.HF_HUB_OFFLINE is False


def test_dtype_is_applied(tiny_llava_path):
    model = load(str(tiny_llava_path), dtype="bfloat16")
    assert next(model.hf_model.parameters()).dtype == torch.bfloat16
    with pytest.raises(MMLensError, match="dtype 'float7'"):
        load(str(tiny_llava_path), dtype="float7")


def _copy(src, dst, drop=()):
    shutil.copytree(src, dst)
    for name in drop:
        (dst / name).unlink()
    return dst


def test_missing_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(MMLensError, match="does not exist") as err:
        load(str(missing))
    assert str(missing) in str(err.value)


def test_path_is_a_file(tiny_llava_path):
    with pytest.raises(MMLensError, match="not a directory"):
        load(str(tiny_llava_path / "config.json"))


def test_missing_config(tiny_llava_path, tmp_path):
    path = _copy(tiny_llava_path, tmp_path / "ckpt", drop=["config.json"])
    with pytest.raises(MMLensError, match="config.json"):
        load(str(path))


def test_unsupported_model_type(tiny_llava_path, tmp_path):
    path = _copy(tiny_llava_path, tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "llama4"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(MMLensError, match="'llama4'") as err:
        load(str(path))
    assert "llava, llava_next" in str(err.value)


@pytest.mark.parametrize("drop", [["tokenizer.json"], ["tokenizer_config.json"]])
def test_missing_tokenizer(tiny_llava_path, tmp_path, drop):
    path = _copy(tiny_llava_path, tmp_path / "ckpt", drop=drop)
    with pytest.raises(MMLensError, match="tokenizer"):
        load(str(path))


def test_missing_image_processor(tiny_llava_path, tmp_path):
    path = _copy(tiny_llava_path, tmp_path / "ckpt", drop=["processor_config.json"])
    with pytest.raises(MMLensError, match="processor_config.json"):
        load(str(path))


def test_device_and_device_map_are_exclusive(tiny_llava_path):
    with pytest.raises(MMLensError, match="device_map"):
        load(str(tiny_llava_path), device="cpu", device_map="auto")
