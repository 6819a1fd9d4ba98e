"""Latent previews (worker/previews.py) on CPU: each family's projection, Flux's packed latents, TAESD, bfloat16,
the interval and the encoding. The end-to-end path (SSE preview events, A1111 current_image) is in test_events.py."""
from __future__ import annotations

import base64
import io

import pytest
import torch
from PIL import Image

from worker.previews import (PROJECTIONS, Previewer, RawPreview, TaesdCache, encode_preview, family_of,
                             preview_interval, project)


class StableDiffusionXLPipeline:        # family_of reads class names; these stand for the real pipelines
    pass


class StableDiffusion3Pipeline:
    pass


class FluxPipeline:
    vae_scale_factor = 8

    @staticmethod
    def _unpack_latents(latents, height, width, vae_scale_factor):
        from diffusers import FluxPipeline as Real

        return Real._unpack_latents(latents, height, width, vae_scale_factor)


def test_families_are_read_from_pipeline_classes():
    assert family_of(StableDiffusionXLPipeline()) == "sdxl"
    assert family_of(StableDiffusion3Pipeline()) == "sd3"
    assert family_of(FluxPipeline()) == "flux"
    assert family_of(object()) == "sd1"


@pytest.mark.parametrize("family", sorted(PROJECTIONS))
def test_each_family_projects_its_latents_to_rgb(family):
    channels = len(PROJECTIONS[family][0])
    rgb = project(torch.randn(channels, 12, 20), family)
    assert rgb.shape == (12, 20, 3) and rgb.dtype.name == "uint8"


def test_the_projection_is_the_published_linear_map():
    latent = torch.zeros(4, 1, 1)
    latent[0] = 1.0                                         # one unit of channel 0: its row of SD 1.x's factors
    rgb = project(latent, "sd1")[0, 0]
    expected = [(f + 1) / 2 * 255 for f in PROJECTIONS["sd1"][0][0]]
    assert [abs(a - b) <= 1 for a, b in zip(rgb.tolist(), expected)] == [True, True, True]


def test_other_channel_counts_show_their_first_channels_and_bfloat16_works():
    rgb = project(torch.randn(2, 8, 8, dtype=torch.bfloat16), "sdxl")
    assert rgb.shape == (8, 8, 3)


def test_flux_latents_are_unpacked_before_the_projection():
    previewer = Previewer(every=1, width=64, height=32)
    packed = torch.randn(2, (32 // 16) * (64 // 16), 64)     # (batch, patches, 16 channels x 2 x 2)
    raw = previewer.render(FluxPipeline(), packed, 1, 4)
    assert raw.rgb.shape == (4, 8, 3) and raw.long_side == 64


def test_taesd_decodes_when_its_folder_is_present(tmp_path):
    from diffusers import AutoencoderTiny

    tiny = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                           num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=4)
    tiny.save_pretrained(tmp_path / "taesd" / "taesdxl")
    cache = TaesdCache(tmp_path)
    previewer = Previewer(every=2, width=64, height=64, taesd=cache)
    raw = previewer.render(StableDiffusionXLPipeline(), torch.randn(1, 4, 8, 8, dtype=torch.bfloat16), 2, 4)
    assert raw.rgb.shape == (64, 64, 3)                     # TAESD upsamples 8x, where the projection does not
    assert cache.decoder("sdxl", "cpu", torch.bfloat16).dtype == torch.bfloat16   # loaded once, in the job's dtype
    assert cache.decoder("sd3", "cpu", torch.float32) is None                     # no taesd3 folder: projection
    assert Previewer(every=2, width=64, height=64, taesd=cache).render(
        StableDiffusion3Pipeline(), torch.randn(1, 16, 8, 8), 2, 4).rgb.shape == (8, 8, 3)


def test_a_broken_taesd_folder_falls_back_to_the_projection(tmp_path):
    folder = tmp_path / "taesd" / "taesd"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{not json")
    raw = Previewer(every=1, width=32, height=32, taesd=TaesdCache(tmp_path)).render(object(), torch.randn(1, 4, 4, 4),
                                                                                     1, 2)
    assert raw.rgb.shape == (4, 4, 3)


def test_interval_is_widened_to_the_most_previews_a_job_makes():
    assert preview_interval(0, 150, 50) == 0
    assert preview_interval(1, 20, 50) == 1
    assert preview_interval(1, 150, 50) == 3
    assert preview_interval(10, 150, 50) == 10


def test_previews_are_small_data_urls_never_larger_than_the_image():
    raw = RawPreview(3, 10, torch.zeros(8, 16, 3, dtype=torch.uint8).numpy(), long_side=128)
    preview = encode_preview(raw, 256, "webp")
    assert preview.image.startswith("data:image/webp;base64,") and (preview.width, preview.height) == (128, 64)
    image = Image.open(io.BytesIO(base64.b64decode(preview.image.partition(",")[2])))
    assert image.size == (128, 64)
    big = encode_preview(RawPreview(3, 10, raw.rgb, long_side=2048), 256, "jpeg")
    assert (big.width, big.height) == (256, 128) and big.image.startswith("data:image/jpeg;base64,")


def test_a_shared_call_gives_each_job_its_own_images_latents():
    from common.jobspec import JobSpec
    from worker.generation import BatchMember, SharedStep

    seen: dict[str, tuple] = {}

    def member(name: str, images: int) -> BatchMember:
        spec = JobSpec(prompt=name, model="m", width=64, height=64, num_inference_steps=4, guidance_scale=7,
                       seed=1, num_images=images)
        return BatchMember(spec, None, lambda step, total: None,
                           lambda pipe, latents, step, total: seen.update({name: (latents[:, 0, 0, 0].tolist(), step)}))

    first, second = member("first", 2), member("second", 1)
    latents = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 4, 2, 2)

    class Pipe:
        num_timesteps = 4

    SharedStep([first, second], on_drop=lambda m: None)(Pipe(), 1, None, {"latents": latents})
    assert seen == {"first": ([0.0, 1.0], 2), "second": ([2.0], 2)}


def test_a_two_pass_job_offers_its_latents_on_the_job_s_scale():
    """The refiner and hires passes count on one scale (PassSteps); previews follow that scale."""
    from worker.generation import PassSteps

    offered, counted = [], []

    class Monitor:                        # the worker's StepMonitor as PassSteps sees it
        def on_shared_step(self, step, total):
            counted.append(step)

        def offer_latents(self, pipe, latents, step, total):
            offered.append((step, total, latents.shape[0]))

    steps = PassSteps(Monitor(), total=4)
    for i in range(4):
        steps(object(), i % 2, None, {"latents": torch.zeros(1, 4, 2, 2)})
    assert counted == [1, 2, 3, 4] and offered == [(1, 4, 1), (2, 4, 1), (3, 4, 1), (4, 4, 1)]


def test_the_job_s_family_chooses_the_projection_over_the_class_name():
    latents = torch.randn(1, 16, 4, 4)
    named = Previewer(every=1, width=32, height=32, family="sd3").render(object(), latents, 1, 2)
    assert (named.rgb == project(latents[0], "sd3")).all()
    assert not (named.rgb == project(latents[0], "sd1")).all()
