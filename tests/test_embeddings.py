"""Textual inversion embeddings: the file formats, which models they fit, loading into warm pipelines
(tokens, weight sharing in bfloat16, the folder changing), prompts using them, and the A1111 listing.

The stack's embeddings folder (tests/conftest.py) holds tiny_emb (SD 1.x, emb_params safetensors),
Tiny_Trained (SD 1.x, A1111's .pt with step and checkpoint), tiny_xl_emb (SDXL clip_l + clip_g) and
broken_emb (not an embedding).
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import requests

from common.catalog import find_model, list_loras
from common.embeddings import embedding_facts, fit_problem, list_embeddings, read_embedding_facts, report_for
from common.jobspec import JobSpec
from tests.conftest import KEY_B
from tests.helpers import fetch, pixels

SD_NAMES = {"tiny_emb", "Tiny_Trained"}
BASE = dict(model="m", width=64, height=64, num_inference_steps=3, guidance_scale=7.5, seed=4)


# --- files and fit, without torch in the reading ---------------------------------------------------
def test_a1111_formats_are_read_from_their_headers(settings):
    folder = settings.embeddings_dir
    assert set(list_embeddings(folder)) == SD_NAMES | {"tiny_xl_emb", "broken_emb"}
    trained = read_embedding_facts(folder / "Tiny_Trained.pt")
    assert trained.to_dict() == {"step": 500, "sd_checkpoint": "0123456789", "sd_checkpoint_name": "sdq-tiny",
                                 "shape": 32, "vectors": 3}
    assert read_embedding_facts(folder / "tiny_emb.safetensors").to_dict()["vectors"] == 2
    pair = read_embedding_facts(folder / "tiny_xl_emb.safetensors")
    assert pair.pair and dict(pair.parts) == {"clip_l": 32, "clip_g": 64} and pair.shape == 96
    assert embedding_facts(folder / "broken_emb.pt") is None


def test_older_torch_files_are_read_too(tmp_path):
    """torch's legacy (pre-zip) format and the ParameterDict of the original textual inversion trainer."""
    import torch

    vectors = torch.randn(4, 768)
    torch.save({"string_to_param": {"*": vectors}, "step": 9}, tmp_path / "legacy.pt",
               _use_new_zipfile_serialization=False)
    torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors)})},
               tmp_path / "params.pt")
    torch.save({"<cat-toy>": torch.randn(768)}, tmp_path / "learned_embeds.bin")
    assert read_embedding_facts(tmp_path / "legacy.pt").to_dict()["step"] == 9
    assert read_embedding_facts(tmp_path / "params.pt").vectors == 4
    assert read_embedding_facts(tmp_path / "learned_embeds.bin").to_dict()["vectors"] == 1


def test_an_embedding_fits_a_family_of_its_width():
    from common.embeddings import EmbeddingFacts

    sd1, sd2 = EmbeddingFacts({"": 768}, 8), EmbeddingFacts({"": 1024}, 1)
    xl = EmbeddingFacts({"clip_l": 768, "clip_g": 1280}, 2)
    assert fit_problem(sd1, "sd1") is None and fit_problem(sd2, "sd2") is None and fit_problem(xl, "sdxl") is None
    assert fit_problem(xl, "sdxl-refiner") is None                       # its clip_g half
    assert "768 wide" in fit_problem(sd1, "sd2") and "SDXL" in fit_problem(xl, "sd1")
    assert "pairs" in fit_problem(sd1, "sdxl") and "SD 1.x/2.x and SDXL" in fit_problem(sd1, "flux")
    assert fit_problem(EmbeddingFacts({"": 32}, 1), "sd1", context_width=32) is None   # the model's own width


def test_the_listing_splits_the_folder_per_model(settings):
    report = report_for(settings.embeddings_dir, "sd1", 32)
    assert set(report.loaded) == SD_NAMES and set(report.skipped) == {"tiny_xl_emb"}
    xl = report_for(settings.embeddings_dir, "sdxl", 96)
    assert set(xl.loaded) == {"tiny_xl_emb"} and set(xl.skipped) == SD_NAMES
    assert report_for(settings.embeddings_dir, "flux", None).loaded == {}


# --- warm pipelines --------------------------------------------------------------------------------
def load(settings, model: str, dtype: str = "float32", embeddings=True):
    from worker.registry import load_pipeline

    return load_pipeline(find_model(settings.models_dir, model), "cpu", None, dtype,
                         embeddings_dir=settings.embeddings_dir if embeddings else None)


@pytest.fixture(scope="module")
def sd(settings):
    return load(settings, "sdq-tiny")


@pytest.fixture(scope="module")
def xl(settings):
    return load(settings, "sdq-tiny-xl")


def image(pipe, settings, **values) -> np.ndarray:
    from worker.generation import generate

    result = generate(pipe, JobSpec(**{"prompt": "a red fox", **BASE, **values}), None,
                      list_loras(settings.lora_dir), lambda *a: a[-1])
    return np.asarray(result.images[0], dtype=np.int16)


def test_each_model_loads_the_embeddings_that_fit_it_under_its_own_tokens(sd, xl):
    from worker.embeddings import state_of

    sd_state, xl_state = state_of(sd), state_of(xl)
    assert set(sd_state.loaded) == SD_NAMES and set(xl_state.loaded) == {"tiny_xl_emb"}
    assert sd_state.loaded["Tiny_Trained"].vectors == 3
    assert {"tiny_xl_emb", "broken_emb"} <= set(sd_state.skipped) and "tiny_emb" in xl_state.skipped
    sd_tokens = {t for t in sd.tokenizer.get_vocab() if t.startswith("<emb")}
    assert len(sd_tokens) == 2 + 3                                      # every vector has its token
    for tokenizer in (xl.tokenizer, xl.tokenizer_2):                    # no SD 1.x token leaked into SDXL
        assert {t for t in tokenizer.get_vocab() if t.startswith("<emb")} == {"<emb0>", "<emb0>_1"}
    assert xl.tokenizer is not sd.tokenizer


@pytest.mark.parametrize("syntax", [None, "a1111"])
def test_an_embedding_name_changes_the_image_in_either_syntax(sd, settings, syntax):
    plain = image(sd, settings, prompt_syntax=syntax)
    named = image(sd, settings, prompt="a red fox, tiny_emb", prompt_syntax=syntax)
    other = image(sd, settings, prompt="a red fox, Tiny_Trained", prompt_syntax=syntax)
    assert not np.array_equal(named, plain) and not np.array_equal(named, other)
    assert np.array_equal(image(sd, settings, prompt="a red fox, TINY_EMB", prompt_syntax=syntax), named)
    weighted = image(sd, settings, prompt="a red fox, (tiny_emb:1.4)", prompt_syntax="a1111")
    assert not np.array_equal(weighted, named)


def test_a_name_is_a_whole_word(sd):
    from worker.embeddings import with_tokens

    assert with_tokens("tiny_emb, (Tiny_Trained:1.2) x", sd) == "<emb1>, (<emb0>:1.2) x"
    assert with_tokens("tiny_embx atiny_emb tiny_emb2", sd) == "tiny_embx atiny_emb <emb1>2"   # digits split off


def test_an_embedding_conditions_every_encoder_of_sdxl(xl, settings):
    from worker.conditioning import prompt_embeddings
    from worker.embeddings import with_tokens

    plain, named = prompt_embeddings(xl, "a red fox", None), prompt_embeddings(xl, "a red fox tiny_xl_emb", None)
    assert not named["prompt_embeds"][..., :32].equal(plain["prompt_embeds"][..., :32])     # CLIP-L part
    assert not named["prompt_embeds"][..., 32:].equal(plain["prompt_embeds"][..., 32:])     # OpenCLIP part
    assert not np.array_equal(image(xl, settings, prompt="a red fox tiny_xl_emb", prompt_syntax="a1111"),
                              image(xl, settings, prompt_syntax="a1111"))
    assert with_tokens("a red fox tiny_emb", xl) == "a red fox tiny_emb"      # an SD 1.x name is text for SDXL


def weights(pipe) -> dict[tuple[str, str], tuple]:
    import torch

    return {(name, tensor_name): (tensor.dtype, tensor.data_ptr())
            for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)
            for tensor_name, tensor in module.state_dict().items()}


@pytest.mark.parametrize("model", ["sdq-tiny", "sdq-tiny-xl"])
def test_loading_embeddings_keeps_bfloat16_weights_shared(settings, model):
    """Only each text encoder's token embedding gets new storage, once, in bfloat16; jobs then change nothing."""
    import torch

    from common.embeddings import list_embeddings
    from worker.embeddings import sync_embeddings
    from worker.generation import generate

    pipe = load(settings, model, "bfloat16", embeddings=False)
    before = weights(pipe)
    sync_embeddings(pipe, list_embeddings(settings.embeddings_dir))
    after = weights(pipe)
    assert {dtype for dtype, _ in after.values()} == {torch.bfloat16}
    moved = {key for key in before if after[key] != before[key]}
    assert {name for name, _ in moved} == {name for name in pipe.components if name.startswith("text_encoder")}
    assert all(tensor.endswith("token_embedding.weight") for _, tensor in moved)
    word = "tiny_emb" if model == "sdq-tiny" else "tiny_xl_emb"
    for syntax in (None, "a1111"):
        spec = JobSpec(**{**BASE, "prompt": f"a (red:1.2) fox, {word}", "model": model, "prompt_syntax": syntax,
                          "negative_prompt": "blur"})
        generate(pipe, spec, None, {}, lambda *a: a[-1])
        sync_embeddings(pipe, list_embeddings(settings.embeddings_dir))   # nothing changed: nothing reloaded
        assert weights(pipe) == after


def test_the_folder_is_followed_new_changed_and_removed_files(settings, tmp_path):
    from dev.tinymodel import build_tiny_embedding
    from worker.embeddings import state_of, sync_embeddings, with_tokens

    pipe = load(settings, "sdq-tiny", embeddings=False)
    folder = tmp_path / "embeddings"
    folder.mkdir()
    assert not sync_embeddings(pipe, list_embeddings(folder)).loaded
    build_tiny_embedding(settings.models_dir / "sdq-tiny", folder / "fresh.safetensors")
    sync_embeddings(pipe, list_embeddings(folder))
    assert with_tokens("a fresh fox", pipe) == "a <emb0> fox"
    build_tiny_embedding(settings.models_dir / "sdq-tiny", folder / "fresh.safetensors", vectors=4, seed=99)
    sync_embeddings(pipe, list_embeddings(folder))
    assert with_tokens("a fresh fox", pipe) == "a <emb1> fox" and state_of(pipe).loaded["fresh"].vectors == 4
    (folder / "fresh.safetensors").unlink()
    sync_embeddings(pipe, list_embeddings(folder))
    assert with_tokens("a fresh fox", pipe) == "a fresh fox"


# --- through the stack -------------------------------------------------------------------------------
def test_sdapi_embeddings_lists_loaded_and_skipped_for_the_current_model(stack):
    def listing() -> dict:
        response = requests.get(f"{stack.api_url}/sdapi/v1/embeddings", auth=("x", KEY_B), timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    body = listing()
    assert set(body["loaded"]) == SD_NAMES and set(body["skipped"]) == {"tiny_xl_emb"}
    assert body["loaded"]["Tiny_Trained"] == {"step": 500, "sd_checkpoint": "0123456789",
                                              "sd_checkpoint_name": "sdq-tiny", "shape": 32, "vectors": 3}
    assert body["skipped"]["tiny_xl_emb"]["shape"] == 96
    options = f"{stack.api_url}/sdapi/v1/options"
    assert requests.post(options, json={"sd_model_checkpoint": "sdq-tiny-xl"}, auth=("x", KEY_B),
                         timeout=30).status_code == 200
    try:
        body = listing()
        assert set(body["loaded"]) == {"tiny_xl_emb"} and set(body["skipped"]) == SD_NAMES
    finally:
        requests.post(options, json={"sd_model_checkpoint": "sdq-tiny"}, auth=("x", KEY_B), timeout=30)
    refresh = requests.post(f"{stack.api_url}/sdapi/v1/refresh-embeddings", auth=("x", KEY_B), timeout=30)
    assert refresh.status_code == 200 and refresh.json() is None


def test_a_job_naming_an_embedding_gets_it_from_the_worker(api, settings, tmp_path):
    plain = pixels(fetch(api.run(prompt="a red fox", seed=31)["result_url"]))
    named = pixels(fetch(api.run(prompt="a red fox tiny_emb", seed=31)["result_url"]))
    assert named != plain
    # An embedding added while the worker runs is loaded before its next job.
    shutil.copyfile(settings.embeddings_dir / "tiny_emb.safetensors", settings.embeddings_dir / "added_emb.safetensors")
    try:
        added = pixels(fetch(api.run(prompt="a red fox added_emb", seed=31)["result_url"]))
        assert added == named
    finally:
        (settings.embeddings_dir / "added_emb.safetensors").unlink()
