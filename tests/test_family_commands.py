"""Every analysis on every newer family, end to end, under ``--protocol checkpoint``.

The family tests (`tests/test_family_<name>.py`) prove knockout against the oracle, the regions, the painting and
``mm-lens flow``. Here each family's tiny checkpoint (built once per family by that module's own builder) goes
through the rest: the CLI commands ``lens``, ``attention``, ``patching``, ``maps``, ``study``, ``flow`` with both
engines (equal probabilities) and ``report`` over the results folder; and the API pieces the CLI does not reach:
`mm_lens.lens`, `mm_lens.attention`, `mm_lens.patching`, `mm_lens.heads` and `mm_lens.image_lens`. Each check
asserts finite values, the expected rows, and that something moves where it should.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import test_family_gemma3
import test_family_glm4v
import test_family_idefics3
import test_family_internvl
import test_family_mistral3
import test_family_onevision
import test_family_qwen_vl
from family_checks import write_dataset

REL = 1e-5
SIZE = (48, 32)  # every image: small, and wide enough to make several tiles / crops where the family tiles
QUESTION = "Is the cube red or blue ?"


def _fixture_builder(fixture):
    """A family module's checkpoint fixture as a plain ``builder(tmp_path_factory) -> path`` (its function)."""
    return fixture.__wrapped__


BUILDERS = {
    "onevision": _fixture_builder(test_family_onevision.tiny_onevision_path),
    "gemma3": lambda f: _built(test_family_gemma3.build, f.mktemp("gemma3")),
    "idefics3": lambda f: test_family_idefics3.build(f.mktemp("idefics3"), "idefics3"),
    "smolvlm": lambda f: test_family_idefics3.build(f.mktemp("smolvlm"), "smolvlm"),
    "mistral3": _fixture_builder(test_family_mistral3.tiny_mistral3_path),
    "internvl": _fixture_builder(test_family_internvl.tiny_internvl_path),
    "qwen2_5_vl": lambda f: test_family_qwen_vl.build("qwen2_5_vl", f.mktemp("qwen2_5_vl")),
    "qwen3_vl": lambda f: test_family_qwen_vl.build("qwen3_vl", f.mktemp("qwen3_vl")),
    "qwen2_vl": lambda f: test_family_qwen_vl.build("qwen2_vl", f.mktemp("qwen2_vl")),
    "glm4v": lambda f: test_family_glm4v.build(f.mktemp("glm4v")),
}
FAMILIES = list(BUILDERS)
ORIGINAL = {"llava", "llava_next"}  # covered by the rest of the suite


def _built(build, path):
    build(path)
    return path


class Tiny:
    """One family's checkpoint, its loaded model, a dataset and a results folder shared by its tests."""

    def __init__(self, name: str, path: Path, model, root: Path, make_image):
        self.name, self.path, self.model, self.root, self.make_image = name, path, model, root, make_image
        self.csv, self.images = write_dataset(root / "data", make_image, [SIZE, SIZE])
        self.results = root / "results"
        self.image = make_image(*SIZE, seed=11)
        self.other = make_image(*SIZE, seed=12)

    def load(self, path, device=None, dtype=None, device_map=None):
        """`mm_lens.model.load` for the commands: this family's checkpoint on the CPU in float32 (what the
        checkpoint protocol asks for here) is the model loaded once by the fixture; anything else loads."""
        from mm_lens.model import load

        if Path(str(path)) == self.path and device is None and device_map is None and dtype in (
                None, torch.float32, "float32"):
            return self.model
        return load(path, device=device, dtype=dtype, device_map=device_map)

    def cli(self, command: str, *args: str, out: Path | None = None, images: Path | None = None,
            dataset: bool = True) -> Path:
        """``mm_lens.cli.main`` on this family's checkpoint and dataset (the parsing, the run and its files as a
        user gets them; only the model load is shared, see `load`)."""
        from mm_lens import runs, study
        from mm_lens.cli import main

        out = out or self.results
        argv = [command, "--model", str(self.path), "--images", str(images or self.images), "--out", str(out),
                "--protocol", "checkpoint"]
        if dataset:
            argv += ["--dataset", str(self.csv)]
        with warnings.catch_warnings(), pytest.MonkeyPatch.context() as patch:
            warnings.simplefilter("ignore")
            patch.setattr(runs, "load", self.load)
            patch.setattr(study, "load", self.load)
            code = main([*argv, *args])
        assert code == 0, f"mm-lens {command} exited with {code}"
        return out

    def prepare(self, image=None, **kw):
        from mm_lens.inputs import prepare

        return prepare(self.model, image or self.image, QUESTION, protocol="checkpoint", **kw)


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory, make_image):
    from mm_lens.model import load

    name = request.param
    path = Path(BUILDERS[name](tmp_path_factory))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load(str(path))
    return Tiny(name, path, model, tmp_path_factory.mktemp(f"{name}-commands"), make_image)


def _table(path: Path, columns) -> pd.DataFrame:
    table = pd.read_csv(path, dtype={"question_id": str})
    assert len(table), f"{path.name} is empty"
    numbers = table[[c for c in columns if c in table]].to_numpy(dtype=float)
    assert np.isfinite(numbers).all(), f"{path.name} holds non-finite values"
    return table


# --------------------------------------------------------------------------------------------- API pieces


def test_every_newer_family_is_covered():
    from mm_lens.families import families

    names = {family.name for family in families()}
    assert names - set(FAMILIES) - ORIGINAL == set(), "a registered family has no builder here"


def test_family_is_the_registered_one(tiny):
    assert tiny.model.family.name == tiny.name


def test_lens_api(tiny):
    from mm_lens.lens import answer_forms, answer_lens, layer_probs

    model, inp = tiny.model, tiny.prepare()
    probs = layer_probs(model, inp)
    assert probs.shape[0] == model.n_layers  # checkpoint protocol: the stream leaving each block
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(-1), torch.ones(len(probs)), atol=1e-4)
    input_ids, kwargs = inp.forward_args()
    with torch.inference_mode():
        logits = model.bridge(input_ids, **kwargs)[0, -1]
    from mm_lens.protocol import vocab_softmax

    top = vocab_softmax(logits[None], inp.vocab_size(model))[0]
    assert torch.allclose(probs[-1], top, rtol=1e-4, atol=1e-6), "the top lens point is not the model's output"
    moved = float((probs[0] - probs[-1]).abs().sum()) / 2  # total variation between the first and last point
    assert moved > 1e-3, f"the lens does not move across layers (total variation {moved:.2g})"
    from mm_lens.protocol import LensReadout

    raw = layer_probs(model, inp, "raw")  # no final norm below the top: other distributions there, same top
    assert raw.shape == probs.shape and torch.isfinite(raw).all() and torch.allclose(raw[-1], top, atol=1e-6)
    assert float((raw[0] - probs[0]).abs().sum()) > 1e-3, "the raw readout equals the normed one below the top"
    study = layer_probs(model, inp, LensReadout(from_embeddings=True, final_norm=False))  # the study's points
    assert study.shape[0] == model.n_layers + 1 and torch.allclose(study[-1], top, rtol=1e-4, atol=1e-6)
    table = answer_lens(model, inp, answer_forms("blue", "red"))
    assert len(table) == model.n_layers * 4 and set(table.form) == {
        "answer_lower", "answer_capitalized", "false_option_lower", "false_option_capitalized"}
    assert table.prob.between(0, 1).all()


def test_attention_api(tiny):
    from mm_lens.attention import attention_mass

    model, inp = tiny.model, tiny.prepare()
    table = attention_mass(model, inp, targets=["Question", "Last"], sources=["Image", "Question"])
    assert len(table) == model.n_layers * 2 * 3 and np.isfinite(table.mass).all()
    sums = table.groupby(["layer", "target"]).mass.sum()
    assert np.allclose(sums, 1.0, atol=1e-4), f"a (layer, target) row does not sum to 1: {sums.to_dict()}"
    image = table[table.source == "Image"].mass
    assert (image > 0).all(), "no attention reaches the image"


def test_patching_api(tiny):
    from mm_lens.patching import patching_sweep

    model = tiny.model
    clean, corrupt = tiny.prepare(), tiny.prepare(tiny.other)
    layers = [0, model.n_layers - 1]
    table = patching_sweep(model, clean, corrupt, "Image", layers=layers)
    assert list(table.layer) == layers
    one = patching_sweep(model, clean, corrupt, "Image", layers=layers[:1], batch_size=1)
    assert np.allclose(table.prob[:1], one.prob, rtol=REL, atol=1e-9), "a batch of patched runs differs from one run"
    assert np.isfinite(table[["prob", "clean_prob", "corrupt_prob"]].to_numpy()).all()
    c, k = float(table.clean_prob.iloc[0]), float(table.corrupt_prob.iloc[0])
    assert abs(c - k) > 1e-6 * max(c, k), "the two images give the same answer probability: vacuous"
    first = float(table.prob.iloc[0])
    assert abs(first - c) < abs(k - c), "patching the image at layer 0 does not move the answer toward the clean one"
    some = clean.regions.image_positions[:: max(1, len(clean.regions.image_positions) // 3)][:3]
    per = patching_sweep(model, clean, corrupt, some, layers=[0], per_position=True)
    assert list(per.position) == some and np.isfinite(per.prob).all()
    assert (per.prob != per.corrupt_prob).any(), "patching one image position moved nothing"


def test_heads_api(tiny):
    from mm_lens.heads import head_sweep, n_heads

    model, inp = tiny.model, tiny.prepare()
    layers = [0, 1]
    table = head_sweep(model, inp, "Image->Last", layers=layers, question_id="q0")
    assert len(table) == len(layers) * n_heads(model)
    assert np.isfinite(table[["base_prob", "knockout_prob", "relative_change_pct"]].to_numpy()).all()
    assert table.base_prob.nunique() == 1
    assert table.relative_change_pct.abs().max() > 1e-4, "no single head's knockout moved the answer"
    ref = head_sweep(model, inp, "Image->Last", layers=layers, heads=[0], engine="reference")
    fast = table[table["head"] == 0].reset_index(drop=True)
    assert np.allclose(ref.knockout_prob, fast.knockout_prob, rtol=REL, atol=0), "head 0: engines disagree"
    tiny.results.mkdir(parents=True, exist_ok=True)
    table.to_csv(tiny.results / "heads.csv", index=False)  # drawn by the report (test_report_cli)


def test_image_lens_api(tiny):
    from mm_lens.image_lens import image_token_lens

    model, inp = tiny.model, tiny.prepare()
    n_img, last = len(inp.regions.image_positions), model.n_layers - 1
    result = image_token_lens(model, inp, layers=[0, last], k=3, words=["red", "blue"])
    assert len(result.top) == 2 * n_img * 3 and len(result.words) == 2 * n_img * 2
    assert set(result.top.position) == set(inp.regions.image_positions)
    assert result.top.prob.between(0, 1).all() and np.isfinite(result.top.prob).all()
    first = result.top[result.top["rank"] == 1]
    assert (first.prob.to_numpy() >= result.top[result.top["rank"] == 3].prob.to_numpy()).all()
    by_layer = result.words.pivot_table(index=["position", "word"], columns="layer", values="prob")
    moved = ((by_layer[0] - by_layer[last]).abs() / by_layer[last]).max()
    assert moved > 1e-3, f"the image-token lens does not move across layers (relative {moved:.2g})"
    tiny.results.mkdir(parents=True, exist_ok=True)
    result.top.to_csv(tiny.results / "image_lens.csv", index=False)  # drawn by the report (test_report_cli)


# --------------------------------------------------------------------------------------------- CLI commands


def test_lens_cli(tiny):
    out = tiny.cli("lens", "--all-samples")
    table = _table(out / "lens.csv", ["layer", "prob"])
    assert table.question_id.nunique() == 2 and table.layer.nunique() == tiny.model.n_layers
    assert table.prob.between(0, 1).all()


def test_attention_cli(tiny):
    out = tiny.cli("attention")
    table = _table(out / "attention.csv", ["layer", "mass"])
    sums = table.groupby(["question_id", "layer", "target"]).mass.sum()
    assert table.question_id.nunique() == 2 and np.allclose(sums, 1.0, atol=1e-4)


def test_patching_cli(tiny):
    out = tiny.cli("patching")
    table = _table(out / "patching.csv", ["layer", "prob", "clean_prob", "corrupt_prob"])
    assert table.question_id.nunique() == 2 and table.layer.nunique() == tiny.model.n_layers
    assert (table.clean_prob != table.corrupt_prob).any()
    out = tiny.cli("patching", "--pairs", "options", "--region", "True Option", "--region", "False Option",
                   "--site", "attn_out", out=tiny.root / "patching-options")
    table = _table(out / "patching.csv", ["layer", "prob", "clean_prob", "corrupt_prob"])
    assert set(table.question_id) == {"q0"}, "the row with options is the one the options pairs patch"
    assert set(table.region) == {"True Option", "False Option"} and set(table.site) == {"attn_out"}


def test_maps_cli(tiny):
    out = tiny.cli("maps", "--target", "Last", "--layers", "0:2", "--group", "2", "--all-samples", "--limit", "1",
                   "--method", "knockout,attention,gradient")
    table = _table(out / "maps.csv", ["value", "x0", "y0", "x1", "y1"])
    assert set(table.method) == {"knockout", "attention", "gradient"} and table.question_id.nunique() == 1
    knock = table[table.method == "knockout"]
    assert knock.value.abs().max() > 1e-6, "no patch group's knockout moved the answer"


def test_flow_engines_agree(tiny):
    runs = {}
    for engine in ("reference", "fast"):
        out = tiny.cli("flow", "--block", "Image->Last", "--window", "2",
                       "--all-samples", "--limit", "1", "--engine", engine, out=tiny.root / f"flow-{engine}")
        runs[engine] = _table(out / "flow.csv", ["layer", "base_prob", "knockout_prob"]).sort_values(
            ["question_id", "block", "layer"], ignore_index=True)
    ref, fast = runs["reference"], runs["fast"]
    assert len(ref) == tiny.model.n_layers
    assert list(ref[["question_id", "block", "layer"]].itertuples(index=False)) == list(
        fast[["question_id", "block", "layer"]].itertuples(index=False))
    assert np.allclose(fast.knockout_prob, ref.knockout_prob, rtol=REL, atol=0)
    assert np.allclose(fast.base_prob, ref.base_prob, rtol=REL, atol=0)
    assert (ref.relative_change_pct.abs() > 1e-4).any(), "no knockout moved the answer: the equality is vacuous"
    import shutil

    tiny.results.mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny.root / "flow-fast" / "flow.csv", tiny.results / "flow.csv")  # for test_report_cli


def test_report_cli(tiny):
    from mm_lens.analyses import ANALYSES
    from mm_lens.cli import main

    present = [name for name in ANALYSES if (tiny.results / f"{name}.csv").is_file()]
    assert present == list(ANALYSES), f"the earlier tests left only {present} to report"
    assert main(["report", str(tiny.results)]) == 0
    html = (tiny.results / "report.html").read_text(encoding="utf-8")
    missing = [name for name in present if ANALYSES[name].title not in html]
    assert not missing, f"the report draws no figure of {missing}"


def test_study_cli(tiny, make_image):
    from mm_lens.data.gqa import load_task

    images = tiny.root / "study-images"
    images.mkdir(exist_ok=True)
    sample = load_task("ChooseAttr")[0]
    make_image(sample.image_w // 8, sample.image_h // 8, seed=5).save(images / f"{sample.img_id}.jpg")
    out = tiny.cli("study", "--tasks", "ChooseAttr", "--limit", "1", "--window", "2", "--all-samples",
                   out=tiny.root / "study", images=images, dataset=False)
    flow = _table(out / "ChooseAttr" / "flow.csv", ["layer", "knockout_prob"])
    assert flow.layer.nunique() == tiny.model.n_layers and flow.block.nunique() == 6
    _table(out / "ChooseAttr" / "lens.csv", ["layer", "prob"])
    assert (out / "report.html").is_file()
