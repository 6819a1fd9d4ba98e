"""A1111's prompt syntax: the parser, chunking, weighted encoding, and what each dialect does with it.

Parser and chunking tests need no model; encoding tests run the tiny SD 1.x
and SDXL pipelines in-process; the dialect tests go through the real stack.
"""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests
from PIL import Image

from common.catalog import find_model, list_loras
from common.jobspec import JobSpec
from common.promptsyntax import BREAK, Fragment, parse_prompt, uses_syntax
from tests.conftest import KEY_A
from tests.helpers import fetch, read_parameters

A1111 = "a1111"
LONG = ", ".join(["a red fox in the snow"] * 10)       # ~120 tokens of the tiny tokenizer: two chunks
BASE = dict(model="sdq-tiny", width=64, height=64, num_inference_steps=3, guidance_scale=7.5)


def pairs(text: str) -> list[tuple[str, float]]:
    return [("BREAK", -1) if f.breaks else (f.text, round(f.weight, 4)) for f in parse_prompt(text)]


# --- the parser (A1111's own doctest cases, then the rest of its syntax) -----------------------
def test_the_parser_reads_a1111_emphasis_as_the_web_ui_does():
    assert pairs("normal text") == [("normal text", 1.0)]
    assert pairs("an (important) word") == [("an ", 1.0), ("important", 1.1), (" word", 1.0)]
    assert pairs("(unbalanced") == [("unbalanced", 1.1)]
    assert pairs(r"\(literal\]") == [("(literal]", 1.0)]
    assert pairs("(unnecessary)(parens)") == [("unnecessaryparens", 1.1)]
    assert pairs("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
        ("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55), (", sun, ", 1.1),
        ("sky", 1.4641), (".", 1.1)]


@pytest.mark.parametrize("text,expected", [
    ("(word:1.5)", [("word", 1.5)]),
    ("(word: 0.25 )", [("word", 0.25)]),
    ("(word:1.0)", [("word", 1.0)]),
    ("[word]", [("word", 0.9091)]),
    ("[[word]]", [("word", 0.8264)]),
    ("((word))", [("word", 1.21)]),
    ("([word])", [("word", 1.0)]),
    (r"a \(b\) \[c\] \\d", [(r"a (b) [c] \d", 1.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1), ("b", 1.0)]),
    ("aBREAK b, BREAKfast", [("aBREAK b, BREAKfast", 1.0)]),          # only the word BREAK, upper case
    ("a break b", [("a break b", 1.0)]),
    ("(a:1.2.3) b", [("a:1.2.3) b", 1.1)]),                          # not a number: text, bracket left open
    ("[from:to:0.5]", [("from:to:0.5", 0.9091)]),                     # prompt editing is not parsed: text
    ("", [("", 1.0)]),
])
def test_the_parser_weights_escapes_and_breaks(text, expected):
    assert pairs(text) == expected


def test_uses_syntax_says_when_a1111_would_read_a_prompt_differently():
    assert not uses_syntax("a red fox, in snow: at dusk")
    assert uses_syntax("a (red) fox") and uses_syntax("a [red] fox") and uses_syntax("a BREAK b")
    assert uses_syntax(r"a \(red\) fox") and not uses_syntax(None)


# --- chunking (a vocabulary of numbers: no model needed) ----------------------------------------
START, END, PAD, COMMA = 1, 2, 0, 3


def vocab(groups=None):
    from worker.conditioning import Vocabulary

    def tokenize(texts):   # "5 6 , 7" -> [5, 6, 3, 7]
        return [[COMMA if word == "," else int(word) for word in text.split()] for text in texts]

    return Vocabulary(START, END, PAD, COMMA, tokenize, groups or {})


def chunks_of(text, groups=None):
    from worker.conditioning import chunk_prompt

    return chunk_prompt([BREAK if f.breaks else f for f in parse_prompt(text)], vocab(groups))


def test_a_chunk_is_75_tokens_wrapped_in_start_and_end_then_padding():
    (chunk,) = chunks_of("10 11 (12:1.5)")
    assert chunk.tokens == [START, 10, 11, 12, END] + [PAD] * 72
    assert chunk.weights == [1.0, 1.0, 1.0, 1.5] + [1.0] * 73


def test_a_long_prompt_is_cut_into_chunks_and_break_starts_one():
    chunks = chunks_of(" ".join(["10"] * 150))
    assert [len(c.tokens) for c in chunks] == [77, 77]
    assert chunks[1].tokens[:76] == [START] + [10] * 75 and chunks[1].tokens[76] == END
    assert [c.tokens[:3] for c in chunks_of("10 BREAK 11")] == [[START, 10, END], [START, 11, END]]
    assert len(chunks_of("BREAK 10")) == 2 and len(chunks_of("10 BREAK")) == 1    # a trailing BREAK adds none


def test_a_full_chunk_ends_after_a_nearby_comma():
    chunks = chunks_of(" ".join(["10"] * 60) + " , " + " ".join(["11"] * 30))
    assert chunks[0].tokens[60:63] == [10, COMMA, END]                  # the 14 tokens after the comma moved on
    assert chunks[1].tokens[1:31] == [11] * 30
    far = chunks_of("10 , " + " ".join(["11"] * 90))                    # a comma more than 20 tokens back: no move
    assert far[0].tokens[75] == 11


def test_an_embedding_s_vectors_stay_in_one_chunk():
    chunks = chunks_of(" ".join(["10"] * 74) + " 50", groups={50: [50, 51, 52]})
    assert chunks[0].tokens[74:] == [10, END, PAD]
    assert chunks[1].tokens[:5] == [START, 50, 51, 52, END]


# --- encoding on the tiny pipelines ---------------------------------------------------------------
@pytest.fixture(scope="module")
def sd(settings):
    from worker.registry import load_pipeline

    return load_pipeline(find_model(settings.models_dir, "sdq-tiny"), "cpu", None, "float32",
                         embeddings_dir=settings.embeddings_dir)


@pytest.fixture(scope="module")
def xl(settings):
    from worker.registry import load_pipeline

    return load_pipeline(find_model(settings.models_dir, "sdq-tiny-xl"), "cpu", None, "float32",
                         embeddings_dir=settings.embeddings_dir)


def embeds(pipe, prompt, negative=None):
    from worker.conditioning import prompt_embeddings

    return prompt_embeddings(pipe, prompt, negative)


def same(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def image(pipe, settings, **values) -> np.ndarray:
    from worker.generation import generate

    spec = JobSpec(**{"prompt": "a red fox", "seed": 5, **BASE, "model": "m", **values})
    result = generate(pipe, spec, None, list_loras(settings.lora_dir), lambda *a: a[-1])
    return np.asarray(result.images[0], dtype=np.int16)


@pytest.mark.parametrize("family", ["sd", "xl"])
def test_weights_change_the_conditioning_and_weight_one_changes_nothing(request, family):
    pipe = request.getfixturevalue(family)
    plain = embeds(pipe, "a red fox")
    assert same(embeds(pipe, "a (red:1.0) fox"), plain)
    assert not same(embeds(pipe, "a (red:1.5) fox"), plain)
    assert same(embeds(pipe, "a (red) fox"), embeds(pipe, "a (red:1.1) fox"))
    assert same(embeds(pipe, "a [red] fox"), embeds(pipe, f"a (red:{1 / 1.1!r}) fox"))
    assert not same(embeds(pipe, "a [red] fox"), plain)
    escaped = embeds(pipe, r"a \(red\) fox")                          # literal parentheses: tokens, weight 1
    assert not same(escaped, plain) and not same(escaped, embeds(pipe, "a (red) fox"))


def test_weighting_keeps_each_chunk_s_mean():
    import torch

    from worker.conditioning import emphasised

    states = torch.randn(2, 77, 32)
    weights = torch.ones(2, 77)
    weights[0, 5:9] = 1.6
    weights[1, 2] = 0.3
    out = emphasised(states, weights)
    assert torch.allclose(out.mean(dim=(1, 2)), states.mean(dim=(1, 2)), atol=1e-6)
    assert not torch.allclose(out, states)


@pytest.mark.parametrize("family", ["sd", "xl"])
def test_break_and_long_prompts_make_chunks_and_the_negative_prompt_is_padded_to_match(request, family):
    pipe = request.getfixturevalue(family)
    broken = embeds(pipe, "a red fox BREAK in the snow")
    assert broken["prompt_embeds"].shape[1] == 154 == broken["negative_prompt_embeds"].shape[1]
    assert not same(broken, embeds(pipe, "a red fox in the snow"))
    long = embeds(pipe, LONG, "blurry")
    assert long["prompt_embeds"].shape[1] == 154 == long["negative_prompt_embeds"].shape[1]
    empty = embeds(pipe, "")["prompt_embeds"]
    assert long["negative_prompt_embeds"][:, 77:].equal(empty)          # padded with the empty prompt's chunk


def test_sdxl_gets_pooled_embeddings_and_zeros_for_an_empty_negative_prompt(xl):
    out = embeds(xl, LONG)
    assert out["pooled_prompt_embeds"].shape == (1, 64)
    assert not out["negative_prompt_embeds"][:, :77].any() and not out["negative_pooled_prompt_embeds"].any()
    assert out["negative_prompt_embeds"][:, 77:].any()                  # the second chunk pads with the empty prompt
    other_tail = embeds(xl, LONG + ", a lighthouse")                    # pooled: the first chunk's only
    assert out["pooled_prompt_embeds"].equal(other_tail["pooled_prompt_embeds"])
    assert not out["prompt_embeds"].equal(other_tail["prompt_embeds"])


@pytest.mark.parametrize("family", ["sd", "xl"])
def test_an_unweighted_prompt_makes_diffusers_own_image(request, settings, family):
    """A1111's syntax with nothing to weigh is the plain encoding exactly (one chunk, mean unchanged)."""
    pipe = request.getfixturevalue(family)
    for negative in (None, "blurry"):
        plain = image(pipe, settings, negative_prompt=negative)
        assert np.array_equal(image(pipe, settings, negative_prompt=negative, prompt_syntax=A1111), plain)
    assert not np.array_equal(image(pipe, settings, prompt="a (red:1.6) fox", prompt_syntax=A1111),
                              image(pipe, settings))


@pytest.mark.parametrize("family", ["sd", "xl"])
def test_a_long_prompt_s_tail_changes_the_image_only_in_a1111_syntax(request, settings, family):
    pipe = request.getfixturevalue(family)
    tails = [LONG + ", a lighthouse at dusk", LONG + ", a bowl of fruit"]
    plain = [image(pipe, settings, prompt=p) for p in tails]
    assert np.array_equal(*plain)                                        # plain: cut at 77 tokens
    weighted = [image(pipe, settings, prompt=p, prompt_syntax=A1111) for p in tails]
    assert not np.array_equal(*weighted)


@pytest.mark.parametrize("family", ["sd", "xl"])
def test_jobs_with_different_weighted_prompts_share_calls_and_get_their_solo_images(request, settings, family):
    from worker.generation import BatchMember, generate_batch

    pipe = request.getfixturevalue(family)
    same_call = dict(BASE, model="m", prompt_syntax=A1111, family="sd1" if family == "sd" else "sdxl")
    jobs = [JobSpec(prompt="a (red:1.4) fox", seed=1, negative_prompt="[blurry]", **same_call),
            JobSpec(prompt=LONG, seed=2, negative_prompt="fog", num_images=2, **same_call),
            JobSpec(prompt="a [lighthouse] BREAK at dusk", seed=3, negative_prompt="rain", **same_call),
            JobSpec(prompt="a (bowl:0.7) of fruit", seed=4, negative_prompt="(dark:1.2)", **same_call)]
    assert len({job.batch_key() for job in jobs}) == 1
    calls = []
    members = [BatchMember(job, None, lambda step, total: None) for job in jobs]
    generate_batch(pipe, members, list_loras(settings.lora_dir), fault=calls.append)
    assert calls == [2, 3]                 # one call per conditioning length: 77 tokens (jobs 1, 4), 154 (2, 3)
    for job, member in zip(jobs, members):
        assert len(member.result.images) == job.num_images
        alone = [image_of_job(pipe, settings, job, n) for n in range(job.num_images)]
        for got, want in zip(member.result.images, alone):
            assert np.abs(np.asarray(got, dtype=np.int16) - want).max() <= 2


def test_jobs_waiting_for_their_own_call_are_checked_at_every_step(sd, settings):
    """A job whose prompt length runs in the next call reports step 0 while it waits (the watchdog sees it
    alive), and a cancel ends it there, before its call starts."""
    from common.errors import JobCancelled
    from worker.generation import BatchMember, generate_batch

    same_call = dict(BASE, model="m", prompt_syntax=A1111, family="sd1")
    short = JobSpec(prompt="a (red:1.2) fox", seed=1, **same_call)
    long, cancelled = JobSpec(prompt=LONG, seed=2, **same_call), JobSpec(prompt=LONG + " x", seed=3, **same_call)
    seen: dict[int, list[int]] = {1: [], 2: [], 3: []}

    def recorder(seed: int, cancel_after: int | None = None):
        def on_step(step: int, total: int) -> None:
            seen[seed].append(step)
            if cancel_after is not None and len(seen[seed]) > cancel_after:
                raise JobCancelled(str(seed))
        return on_step

    members = [BatchMember(short, None, recorder(1)), BatchMember(long, None, recorder(2)),
               BatchMember(cancelled, None, recorder(3, cancel_after=1))]
    dropped = []
    generate_batch(sd, members, list_loras(settings.lora_dir), on_drop=dropped.append)
    steps = len(seen[1])
    assert seen[1] == list(range(1, steps + 1))
    assert seen[2] == [0] * steps + list(range(1, steps + 1))             # waited, then ran
    assert seen[3] == [0, 0] and dropped == [members[2]] and members[2].result is None
    assert members[0].result and members[1].result


def image_of_job(pipe, settings, job: JobSpec, n: int) -> np.ndarray:
    from worker.generation import generate

    result = generate(pipe, job, None, list_loras(settings.lora_dir), lambda *a: a[-1])
    return np.asarray(result.images[n], dtype=np.int16)


def test_plain_and_a1111_jobs_never_share_a_call():
    plain = JobSpec(prompt="a", seed=1, **BASE)
    assert plain.batch_key() != JobSpec(prompt="b", seed=2, prompt_syntax=A1111, **BASE).batch_key()
    assert "prompt_syntax" not in plain.to_dict()                        # the native hot path stores no more


def test_the_sdxl_refiner_pass_takes_a1111_prompts(settings, xl):
    from worker.generation import generate
    from worker.registry import load_pipeline

    refiner = load_pipeline(find_model(settings.models_dir, "sdq-tiny-xl-refiner"), "cpu", None, "float32",
                            embeddings_dir=settings.embeddings_dir)
    spec = dict(BASE, model="sdq-tiny-xl", prompt="a (red:1.3) fox BREAK snow", seed=9, refiner="r",
                refiner_switch=0.5, num_images=2, num_inference_steps=4)
    weighted = generate(xl, JobSpec(**spec, prompt_syntax=A1111), None, {}, lambda *a: a[-1], refiner=refiner)
    plain = generate(xl, JobSpec(**spec), None, {}, lambda *a: a[-1], refiner=refiner)
    assert len(weighted.images) == 2 and weighted.images[0].size == (64, 64)
    assert np.asarray(weighted.images[0]).tolist() != np.asarray(plain.images[0]).tolist()


# --- through the dialects ---------------------------------------------------------------------------
def a1111(stack, body: dict) -> dict:
    response = requests.post(f"{stack.api_url}/sdapi/v1/txt2img", auth=("x", KEY_A), timeout=300,
                             json={"seed": 3, "width": 64, "height": 64, "steps": 3, **body})
    assert response.status_code == 200, response.text
    return response.json()


def pixels_of(b64: str) -> bytes:
    return Image.open(io.BytesIO(base64.b64decode(b64))).tobytes()


def test_the_a1111_dialect_reads_its_syntax_and_records_the_prompt_as_written(stack):
    plain = a1111(stack, {"prompt": "a red fox"})
    same_weight = a1111(stack, {"prompt": "a (red:1.0) fox"})
    weighted = a1111(stack, {"prompt": "a (red:1.6) fox", "negative_prompt": "[blurry]"})
    assert pixels_of(same_weight["images"][0]) == pixels_of(plain["images"][0])
    assert pixels_of(weighted["images"][0]) != pixels_of(plain["images"][0])
    info = json.loads(weighted["info"])
    assert info["prompt"] == "a (red:1.6) fox" and info["negative_prompt"] == "[blurry]"
    text = Image.open(io.BytesIO(base64.b64decode(weighted["images"][0]))).info["parameters"]
    assert text.startswith("a (red:1.6) fox\nNegative prompt: [blurry]\n")
    assert not any("syntax" in w for w in info["warnings"])


def test_the_a1111_dialect_passes_flux_prompts_as_written_with_a_note(stack):
    body = a1111(stack, {"prompt": "a (red:1.3) fox (studio photo)",
                         "override_settings": {"sd_model_checkpoint": "sdq-tiny-flux"}})
    info = json.loads(body["info"])
    assert info["prompt"] == "a (red:1.3) fox (studio photo)"
    assert any("not applied to FLUX.1 models" in w for w in info["warnings"]), info["warnings"]


def test_native_prompt_syntax_is_plain_unless_asked(api):
    plain = api.run(prompt="a (red:1.6) fox", seed=8)
    again = api.run(prompt="a (red:1.6) fox", seed=8, prompt_syntax="plain")
    weighted = api.run(prompt="a (red:1.6) fox", seed=8, prompt_syntax="a1111")
    assert weighted["status"] == "completed", weighted
    assert fetch(plain["result_url"]) == fetch(again["result_url"])
    assert Image.open(io.BytesIO(fetch(weighted["result_url"]))).tobytes() != \
        Image.open(io.BytesIO(fetch(plain["result_url"]))).tobytes()
    assert read_parameters(fetch(weighted["result_url"])).startswith("a (red:1.6) fox\n")


def fields_of(response: requests.Response) -> list[str]:
    return [entry["loc"][-1] for entry in response.json()["detail"]]


@pytest.mark.parametrize("model", ["sdq-tiny-flux", "sdq-tiny-sd3"])
def test_native_a1111_syntax_on_sd3_and_flux_is_a_422_naming_the_field(api, model):
    response = api.post("/api/v1/generate", {"prompt": "a (fox:1.2)", "model": model, "prompt_syntax": "a1111"})
    assert response.status_code == 422, response.text
    assert fields_of(response) == ["prompt_syntax"]
    unknown = api.post("/api/v1/generate", {"prompt": "a fox", "prompt_syntax": "compel"})
    assert unknown.status_code == 422 and fields_of(unknown) == ["prompt_syntax"]


def test_native_a1111_syntax_runs_on_sdxl(api):
    task = api.run(prompt="a (red:1.4) fox BREAK " + LONG, model="sdq-tiny-xl", prompt_syntax="a1111",
                   negative_prompt="[blurry]", width=64, height=64, num_inference_steps=2)
    assert task["status"] == "completed", task
