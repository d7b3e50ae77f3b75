from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from sdkit import checkpoints
from sdkit.errors import SdkitError
from sdkit.generate import Cancelled, GenerationSettings, generate, make_scheduler, sampler_names

FAST = GenerationSettings(prompt="a red circle on a white background", negative_prompt="blurry", seed=7, steps=3,
                          width=32, height=32)


@pytest.fixture(scope="module")
def sd1(tiny_files):
    return checkpoints.load(tiny_files["sd1"])


def pixels(image) -> np.ndarray:
    return np.asarray(image)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_same_seed_same_pixels_other_seed_other_pixels(tiny_files, family):
    pipe = checkpoints.load(tiny_files[family])
    a, b = generate(pipe, FAST, progress=False)[0], generate(pipe, FAST, progress=False)[0]
    c = generate(pipe, FAST.replace(seed=8), progress=False)[0]
    assert a.size == (32, 32)
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(c))


def test_batch_seeds_count_up_like_a1111(sd1):
    batch = generate(sd1, FAST.replace(batch_size=3), progress=False)
    assert [im.sdkit_settings.seed for im in batch] == [7, 8, 9]
    single = generate(sd1, FAST.replace(seed=9), progress=False)[0]
    assert np.array_equal(pixels(batch[2]), pixels(single))


def test_every_sampler_runs_and_changes_the_result(sd1):
    results = {}
    for name in sampler_names():
        results[name] = pixels(generate(sd1, FAST.replace(sampler=name), progress=False)[0])
    assert len({r.tobytes() for r in results.values()}) > len(results) // 2


def test_karras_spelling_sets_the_schedule():
    s = GenerationSettings(sampler="dpmpp_2m_karras")
    assert (s.sampler, s.scheduler) == ("dpmpp_2m", "karras")
    scheduler = make_scheduler({"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                "beta_end": 0.012}, s)
    assert type(scheduler).__name__ == "DPMSolverMultistepScheduler" and scheduler.config.use_karras_sigmas


def test_clip_skip_changes_the_image(sd1):
    a = generate(sd1, FAST, progress=False)[0]
    b = generate(sd1, FAST.replace(clip_skip=2), progress=False)[0]
    assert not np.array_equal(pixels(a), pixels(b))


def test_random_seed_is_resolved_and_recorded(sd1):
    image = generate(sd1, FAST.replace(seed=-1), progress=False)[0]
    assert image.sdkit_settings.seed >= 0


def test_cancel_between_steps(sd1):
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled, match="cancelled after step 1 of 3"):
        generate(sd1, FAST, progress=False, cancel=stop)


@pytest.mark.parametrize("change, message", [
    ({"width": 30}, "multiple of 8"),
    ({"height": 8192}, "between 8 and 4096"),
    ({"steps": 0}, "at least 1 step"),
    ({"sampler": "euler_b"}, "Unknown sampler 'euler_b'; known: euler, euler_a"),
    ({"sampler": "ddim", "scheduler": "karras"}, "no Karras schedule"),
    ({"batch_size": 0}, "batch_size"),
])
def test_bad_settings_are_refused_before_work(sd1, change, message):
    with pytest.raises(SdkitError, match=message):
        generate(sd1, FAST.replace(**change), progress=False)


def test_nan_from_the_vae_is_detected(tiny_files):
    pipe = checkpoints.load(tiny_files["sd2"])
    weight = pipe.vae.post_quant_conv.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.fill_(float("nan"))
        with pytest.raises(SdkitError, match="NaN") as err:
            generate(pipe, FAST, progress=False)
        assert "even in fp32" in str(err.value) and "VAE" in err.value.fix
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_sde_sampler_is_seeded_by_the_image_seed(sd1):
    settings = FAST.replace(sampler="dpmpp_sde")
    torch.manual_seed(1)
    a = pixels(generate(sd1, settings, progress=False)[0])
    torch.manual_seed(2)
    b = pixels(generate(sd1, settings, progress=False)[0])
    assert np.array_equal(a, b)


def test_prompt_embeddings_are_cached_until_the_text_encoder_changes(tiny_files):
    pipe = checkpoints.load(tiny_files["sd1"])
    calls = []
    hook = pipe.text_encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        first = generate(pipe, FAST.replace(prompt="a cached prompt"), progress=False)[0]
        generate(pipe, FAST.replace(prompt="a cached prompt", seed=8, cfg=3.0), progress=False)
        assert len(calls) == 2  # prompt and negative prompt, once
        norm = getattr(pipe.text_encoder, "text_model", pipe.text_encoder).final_layer_norm
        with torch.no_grad():
            norm.weight.mul_(1.5)  # as a LoRA or embedding would
        try:
            changed = generate(pipe, FAST.replace(prompt="a cached prompt"), progress=False)[0]
        finally:
            with torch.no_grad():
                norm.weight.div_(1.5)
        assert len(calls) == 4 and not np.array_equal(pixels(first), pixels(changed))
    finally:
        hook.remove()


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m", "lcm", "dpmpp_sde"])
def test_step_hook_sees_every_step_and_changes_nothing(sd1, sampler):
    settings = FAST.replace(sampler=sampler, steps=4)
    seen = []
    hooked = generate(sd1, settings, progress=False,
                      on_step=lambda done, total, latents, x0: seen.append((done, total, latents.shape, x0 is None)))[0]
    plain = generate(sd1, settings, progress=False)[0]
    assert np.array_equal(pixels(hooked), pixels(plain)), "the hook must not change the random draws"
    done = [s[0] for s in seen]
    assert done == sorted(done) and seen[-1][:2] == (4, 4) and all(s[1] == 4 for s in seen)
    if sampler != "dpmpp_sde":  # a second-order sampler calls the model twice per step
        assert done == [1, 2, 3, 4]
    assert seen[0][2] == (1, 4, 16, 16)
    assert seen[0][3] is (sampler == "dpmpp_2m"), "x0 comes from the schedulers that give it"


@pytest.mark.parametrize("schedule, setting", [("exponential", "use_exponential_sigmas"), ("beta", "use_beta_sigmas"),
                                               ("sgm_uniform", "timestep_spacing")])
def test_each_schedule_type_reaches_the_scheduler_and_changes_the_picture(sd1, schedule, setting):
    settings = FAST.replace(sampler="euler", scheduler=schedule, steps=4)
    made = make_scheduler(dict(sd1.scheduler.config), settings)
    assert made.config[setting] == (True if setting.startswith("use_") else "trailing")
    plain = generate(sd1, settings.replace(scheduler="normal"), progress=False)[0]
    other = generate(sd1, settings, progress=False)[0]
    assert not np.array_equal(pixels(plain), pixels(other))


def test_a_sigma_schedule_on_a_sampler_without_one_is_refused(sd1):
    with pytest.raises(SdkitError, match="The ddim sampler has no Exponential schedule"):
        generate(sd1, FAST.replace(sampler="ddim", scheduler="exponential"), progress=False)


# --- img2img and hires fix -------------------------------------------------------------------------------------


def test_hires_fix_doubles_the_size_and_its_text_reads_back(sd1):
    from sdkit.metadata import format_parameters, parse_parameters

    settings = FAST.replace(hires_scale=2, strength=0.5, hires_steps=4)
    counted = []
    image = generate(sd1, settings, progress=False, on_step=lambda done, total, *_: counted.append((done, total)))[0]
    assert image.size == (64, 64)
    assert counted[-1] == (3 + 2, 3 + 2), "3 base steps, then int(4 hires steps x 0.5) = 2"
    text = format_parameters(image.sdkit_settings)
    assert "Denoising strength: 0.5" in text and "Hires upscale: 2, Hires steps: 4, Hires upscaler: Latent" in text
    back = parse_parameters(text)
    assert (back.hires_scale, back.hires_steps, back.hires_upscaler, back.strength) == (2, 4, "Latent", 0.5)
    again = generate(sd1, back.replace(prompt=settings.prompt), progress=False)[0]
    assert np.array_equal(pixels(again), pixels(image)), "the text reproduces the picture"


def test_a_pixel_upscaler_hires_pass_runs(sd1):
    image = generate(sd1, FAST.replace(hires_scale=1.5, hires_upscaler="Lanczos", strength=0.4), progress=False)[0]
    assert image.size == (48, 48)


def test_a_hires_pass_can_enlarge_with_an_upscale_model_by_name(sd1, tmp_path, monkeypatch):
    from sdkit.metadata import format_parameters, parse_parameters
    from sdkit.testing import write_upscaler

    (tmp_path / "upscale_models").mkdir()
    write_upscaler("compact", tmp_path / "upscale_models" / "tiny-x4.safetensors")
    monkeypatch.setenv("SDKIT_MODELS", str(tmp_path))
    settings = FAST.replace(hires_scale=1.5, hires_upscaler="tiny-x4", strength=0.4)
    image = generate(sd1, settings, progress=False)[0]
    assert image.size == (48, 48), "the model's 4x picture is resized to the hires size, as A1111 does"
    text = format_parameters(image.sdkit_settings)
    assert "Hires upscaler: tiny-x4" in text and parse_parameters(text).hires_upscaler == "tiny-x4"
    lanczos = generate(sd1, settings.replace(hires_upscaler="Lanczos"), progress=False)[0]
    assert not np.array_equal(pixels(image), pixels(lanczos))


def test_img2img_keeps_more_of_the_picture_at_low_strength(sd1, tmp_path):
    from PIL import Image

    start = np.zeros((32, 32, 3), dtype=np.uint8)
    start[8:24, 8:24] = (255, 0, 0)
    Image.fromarray(start).save(tmp_path / "start.png")
    steps = []
    low = generate(sd1, FAST.replace(init_image=str(tmp_path / "start.png"), strength=0.3, steps=10), progress=False,
                   on_step=lambda done, total, *_: steps.append(total))[0]
    high = generate(sd1, FAST.replace(init_image=str(tmp_path / "start.png"), strength=1.0, steps=10),
                    progress=False)[0]
    assert steps[-1] == 3, "img2img runs strength x steps, as A1111 does"
    distance = lambda im: np.abs(pixels(im) - start.astype(int)).mean()  # noqa: E731
    assert distance(low) < distance(high)


@pytest.mark.parametrize("change, field", [({"strength": 0}, "strength"), ({"hires_scale": 5}, "hires_scale"),
                                           ({"hires_upscaler": "R-ESRGAN 4x+", "hires_scale": 2}, "R-ESRGAN"),
                                           ({"init_image": "/nonexistent.png"}, "nonexistent"),
                                           ({"hires_scale": 2, "strength": 0.2}, "0 steps")])
def test_bad_img2img_and_hires_settings_are_refused_by_name(sd1, change, field):
    with pytest.raises(SdkitError, match=field):
        generate(sd1, FAST.replace(**change), progress=False)


def test_a_run_that_would_not_fit_in_memory_is_refused_with_a_size_that_fits(sd1, monkeypatch):
    from sdkit import generate as generation

    need = generation.memory_needed_gib(sd1, FAST.replace(width=128, height=128))
    assert need == pytest.approx(4 * generation.memory_needed_gib(sd1, FAST.replace(width=64, height=64)))
    monkeypatch.setattr(generation, "_available_gib", lambda: need / 4)
    with pytest.raises(SdkitError, match=r"a 128x128 picture needs about .* GiB .* but only .* GiB of memory is "
                                         r"free") as error:
        generate(sd1, FAST.replace(width=128, height=128), progress=False)
    assert "use 64x64 or smaller" in error.value.fix
    assert generate(sd1, FAST.replace(width=64, height=64), progress=False)  # that size does run
