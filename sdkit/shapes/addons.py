"""Train shapes-v1's teaching add-ons on this CPU: python -m sdkit.shapes.addons {lora,embedding,all,cards}.

- `outlines`: a style LoRA in kohya's LoCon layout with its `ss_*` metadata: every shape drawn as an outline,
  a style the base model never saw. Trained with PEFT's LoRA layers on a frozen shapes-v1.
- `moon`: a textual-inversion embedding in A1111's `.safetensors` layout (`emb_params`): two vectors for a word the
  model never learned, "moon", meaning a yellow circle on a black background. Only those two vectors train.

An embedding cannot teach the painter to draw something new, only name what it can draw: a first try taught "plum"
for purple, a colour shapes-v1 never saw. Its VAE turns purple (128, 0, 128) into blue-violet (89, 1, 174) and its
UNet paints only its four saturated colours, so the trained word gave purple in 0 of 16 pictures.

Both are seeded and resumable and log to runs/shapes/<name>.log, like the base model's parts (sdkit.shapes.train).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sdkit.shapes import data
from sdkit.shapes.train import BUNDLE, OFFSET_NOISE, RUNS, Plan, command_line, fit, frozen_context

MODELS = BUNDLE.parents[1]
LORA_NAME, EMBEDDING_NAME = "outlines", "moon"
MOON = {"shape": "circle", "colour": "yellow", "background": "black"}  # the look the word "moon" names
MOON_CAPTIONS = ("a moon", "the moon", "moon", "a moon at night")
INIT_WORD = "circle"  # the new vectors start as this word's vector (textual inversion's "initializer token")
LORA_RANK = 4
# kohya's LoCon set: the transformer blocks' linear layers and the ResNet/sampler 3x3 convolutions.
LORA_TARGETS = (r".*(attn[12]\.(to_q|to_k|to_v|to_out\.0)|proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2"
                r"|resnets\.\d+\.conv[12]|samplers\.0\.conv)$")


PLANS = {"lora": Plan(steps=800, batch=32, lr=2e-3, save_every=100, warmup=50),
         "embedding": Plan(steps=600, batch=32, lr=5e-3, save_every=100, warmup=50)}


def base_parts() -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module, object, object]:
    """The bundled shapes-v1 in fp32 whatever this machine would choose (so training does not depend on the
    machine), as copies the cached pipeline does not share: unet, vae, text encoder, tokenizer, noise schedule."""
    import copy

    from diffusers import DDPMScheduler

    from sdkit.checkpoints import load
    from sdkit.shapes.train import CONFIG

    previous = os.environ.get("SDKIT_DTYPE")
    os.environ["SDKIT_DTYPE"] = "float32"
    try:
        pipe = load(BUNDLE)
    finally:
        if previous is None:
            os.environ.pop("SDKIT_DTYPE")
        else:
            os.environ["SDKIT_DTYPE"] = previous
    parts = [copy.deepcopy(m).eval().requires_grad_(False) for m in (pipe.unet, pipe.vae, pipe.text_encoder)]
    return (*parts, copy.deepcopy(pipe.tokenizer), DDPMScheduler.from_pretrained(CONFIG, subfolder="scheduler"))


def _batch(step: int, plan: Plan, *, style: str = "fill", look: dict | None = None) -> tuple[torch.Tensor, list[str]]:
    """Seeded images in [-1, 1] and captions: base-vocabulary specs drawn in `style`, with the base world's captions;
    with `look`, specs forced to that look and captioned with the new word."""
    rng = np.random.default_rng(plan.seed * 1_000_003 + step)
    images, captions = [], []
    for _ in range(plan.batch):
        spec = data.random_spec(rng)
        spec.style = style
        for name, value in (look or {}).items():
            setattr(spec, name, value)
        images.append(np.asarray(data.draw(spec)))
        captions.append(MOON_CAPTIONS[int(rng.integers(len(MOON_CAPTIONS)))] if look else data.caption(spec, rng=rng))
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return pixels, captions


def _denoise_loss(unet, vae, noise_schedule, pixels: torch.Tensor, context: torch.Tensor, *, generator) -> torch.Tensor:
    """Epsilon-prediction loss with offset noise, exactly as the base UNet was trained."""
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator)
    noise = noise + OFFSET_NOISE * torch.randn((*latents.shape[:2], 1, 1), generator=generator)
    t = torch.randint(0, noise_schedule.config.num_train_timesteps, (len(pixels),), generator=generator)
    return F.mse_loss(unet(noise_schedule.add_noise(latents, noise, t), t, context).sample, noise)


class LoraTask(torch.nn.Module):
    """shapes-v1's UNet with PEFT LoRA layers on kohya's LoCon targets; only the LoRA layers train."""

    def __init__(self) -> None:
        super().__init__()
        from peft import LoraConfig

        self.unet, self.vae, self.text, self.tokenizer, self.noise = base_parts()
        self.unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=LORA_TARGETS,
                                         init_lora_weights="gaussian"))
        self._context: dict[str, torch.Tensor] = {}

    def context(self, captions: list[str]) -> torch.Tensor:
        """Frozen text-encoder outputs, cached per caption."""
        return frozen_context(self._context, self.tokenizer, self.text, captions)

    def loss(self, step: int, plan: Plan) -> torch.Tensor:
        """Outlined shapes with the base world's captions (10% dropped to "" for CFG)."""
        pixels, captions = _batch(step, plan, style="outline")
        generator = torch.Generator().manual_seed(plan.seed * 1_000_003 + step)
        drop = (torch.rand(len(captions), generator=generator) < 0.1).tolist()
        captions = ["" if d else c for c, d in zip(captions, drop)]
        return _denoise_loss(self.unet, self.vae, self.noise, pixels, self.context(captions), generator=generator)

    def lora_state(self) -> dict[str, torch.Tensor]:
        """The trained layers in kohya's layout: lora_unet_<module>.lora_down/lora_up/alpha."""
        from peft.utils import get_peft_model_state_dict

        out = {}
        for key, value in get_peft_model_state_dict(self.unet).items():
            module, part = key.rsplit(".lora_", 1)
            layer = "lora_unet_" + module.replace(".", "_")
            out[f"{layer}.{'lora_down' if part.startswith('A') else 'lora_up'}.weight"] = value.detach().half()
            out[f"{layer}.alpha"] = torch.tensor(float(LORA_RANK), dtype=torch.float16)
        return out


class EmbeddingTask(torch.nn.Module):
    """Two new input vectors for the word "moon"; the text encoder and UNet stay frozen."""

    def __init__(self, *, count: int = 2) -> None:
        super().__init__()
        from sdkit.embeddings import tokens

        self.unet, self.vae, self.text, self.tokenizer, self.noise = base_parts()
        self.words = tokens(EMBEDDING_NAME, count)
        self.tokenizer.add_tokens([w for w in self.words if w not in self.tokenizer.get_vocab()])
        self.text.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        self.new_ids = self.tokenizer.convert_tokens_to_ids(self.words)
        table = self.text.get_input_embeddings()
        start = table.weight[self.tokenizer([INIT_WORD], add_special_tokens=False).input_ids[0]].mean(0)
        self.vectors = torch.nn.Parameter(start.repeat(count, 1).clone())
        table.register_forward_hook(self._swap)  # the encoder's own forward, with the new rows read from `vectors`

    def _swap(self, _module, inputs, output: torch.Tensor) -> torch.Tensor:
        """Token-embedding output with the new word's rows replaced by the trainable vectors."""
        (ids,) = inputs
        for k, token in enumerate(self.new_ids):
            output = torch.where((ids == token)[..., None], self.vectors[k], output)
        return output

    def context(self, captions: list[str]) -> torch.Tensor:
        """Text-encoder outputs for captions that say "moon"."""
        prompts = [c.replace(EMBEDDING_NAME, " ".join(self.words)) for c in captions]
        ids = self.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        return self.text(ids.input_ids).last_hidden_state

    def loss(self, step: int, plan: Plan) -> torch.Tensor:
        """Yellow circles on black anywhere and of any size, captioned "a moon" and the like."""
        pixels, captions = _batch(step, plan, look=MOON)
        generator = torch.Generator().manual_seed(plan.seed * 1_000_003 + step)
        return _denoise_loss(self.unet, self.vae, self.noise, pixels, self.context(captions), generator=generator)


def train(part: str, *, runs: Path = RUNS, steps: int | None = None, models: Path = MODELS) -> Path:
    """Train (or resume) the LoRA or the embedding; returns the file written under models/."""
    plan = Plan(**{**asdict(PLANS[part]), "steps": steps or PLANS[part].steps})
    torch.manual_seed(plan.seed)
    task = LoraTask() if part == "lora" else EmbeddingTask()
    seconds = fit(task, plan, name=LORA_NAME if part == "lora" else EMBEDDING_NAME, runs=runs)
    return _write_lora(task, plan, seconds, models) if part == "lora" else _write_embedding(task, models)


def _write_lora(task: LoraTask, plan: Plan, seconds: float, models: Path) -> Path:
    """models/loras/outlines.safetensors with the ss_* metadata kohya's trainer writes."""
    from safetensors.torch import save_file

    from sdkit import formats

    metadata = {
        "ss_network_module": "networks.lora", "ss_network_dim": str(LORA_RANK), "ss_network_alpha": str(LORA_RANK),
        "ss_network_args": json.dumps({"conv_dim": str(LORA_RANK), "conv_alpha": str(LORA_RANK), "algo": "locon"}),
        "ss_base_model_version": "sdkit-shapes-v1", "ss_sd_model_name": BUNDLE.name,
        "ss_new_sd_model_hash": formats.sha256(BUNDLE), "ss_output_name": LORA_NAME,
        "ss_resolution": "(64, 64)", "ss_steps": str(plan.steps), "ss_max_train_steps": str(plan.steps),
        "ss_batch_size_per_device": str(plan.batch), "ss_learning_rate": str(plan.lr), "ss_unet_lr": str(plan.lr),
        "ss_text_encoder_lr": "0", "ss_seed": str(plan.seed), "ss_noise_offset": str(OFFSET_NOISE),
        "ss_training_comment": "sdkit.shapes.addons: every shape drawn as an outline, no trigger word",
        "ss_training_time_seconds": str(seconds),
        "modelspec.architecture": "sdkit-shapes-v1/lora", "modelspec.title": LORA_NAME,
    }
    return _atomic_save(task.lora_state(), models / "loras" / f"{LORA_NAME}.safetensors", metadata, save_file)


def _write_embedding(task: EmbeddingTask, models: Path) -> Path:
    """models/embeddings/moon.safetensors: A1111's layout (emb_params, one row per vector)."""
    from safetensors.torch import save_file

    tensors = {"emb_params": task.vectors.detach().clone().contiguous()}
    return _atomic_save(tensors, models / "embeddings" / f"{EMBEDDING_NAME}.safetensors", None, save_file)


def _atomic_save(tensors: dict, out: Path, metadata: dict | None, save_file) -> Path:
    """Write next to `out`, then rename: a crash never leaves a half-written model."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: which add-on(s) to train."""
    args = command_line("sdkit.shapes.addons", ["lora", "embedding", "all", "cards"], argv, models=MODELS)
    for part in {"all": ["lora", "embedding"], "cards": []}.get(args.part, [args.part]):
        print(train(part, runs=args.runs, steps=args.steps, models=args.models))
    if args.part in ("all", "cards"):
        print(*model_cards(runs=args.runs, models=args.models), sep="\n")



# --- model cards -------------------------------------------------------------------------------------------------

CARD_WEIGHTS = (-1.0, 0.0, 0.5, 1.0, 1.5, 2.0)


def _training(name: str, runs: Path) -> dict:
    """Steps, batch, final loss, trainable parameters and minutes, from a training log."""
    records = [json.loads(line) for line in (runs / f"{name}.log").read_text().splitlines()]
    start = next(r for r in records if r.get("event") == "start")
    done = [r for r in records if r.get("event") == "done"][-1]
    last = [r for r in records if "loss" in r][-1]
    return {"steps": last["step"], "batch": start["plan"]["batch"], "lr": start["plan"]["lr"],
            "loss": round(last["loss"], 4), "parameters": start["parameters"], "minutes": done["seconds"] / 60}


def model_cards(*, runs: Path = RUNS, models: Path = MODELS) -> list[Path]:
    """Measure both add-ons on the bundled model (16 seeded samples each) and write their model cards."""
    from sdkit import device, embeddings, formats, loras
    from sdkit.checkpoints import load
    from sdkit.shapes.evaluate import ADDON_SAMPLES, style_share, word_share

    pipe = load(BUNDLE)
    machine = f"{device.report().cpu}, {torch.get_num_threads()} threads"
    lora_path, embedding_path = models / "loras" / f"{LORA_NAME}.safetensors", models / "embeddings" / f"{EMBEDDING_NAME}.safetensors"
    lora = loras.load(lora_path)
    shares = style_share(pipe, lora, weights=CARD_WEIGHTS)
    words = word_share(pipe, EMBEDDING_NAME, look=MOON, prompts=MOON_CAPTIONS)
    info, t = loras.describe(lora), _training(LORA_NAME, runs)
    rows = "\n".join(f"| {w:g} | {s:.0%} |" for w, s in shares.items())
    lora_card = f"""# {LORA_NAME}

A style LoRA for shapes-v1: it draws every shape as an **outline**, a style the base model never saw. Made for
notebook 03; loaded by `sdkit.loras` like any kohya LoRA from civitai (`<lora:{LORA_NAME}:1>` in a prompt).

- file: `{lora_path.name}`, {lora_path.stat().st_size / 1024:.0f} KiB, sha256 `{formats.sha256(lora_path)}`
- layout: kohya LoCon ({info['type']}), {info['layers']} layers (the UNet's attention and feed-forward linears and
  its ResNet/sampler 3x3 convolutions), rank {info['rank']}, alpha {LORA_RANK}, fp16, `ss_*` metadata as kohya's
  trainer writes it; no text-encoder layers and no trigger word: the style applies to every prompt
- trained by `python -m sdkit.shapes.addons lora` (seeded, resumable; PEFT's LoRA layers on a frozen shapes-v1):
  {t['steps']} steps x batch {t['batch']} of outlined shapes with the base world's captions, lr {t['lr']},
  {t['parameters']:,} trainable parameters, final loss {t['loss']}, {t['minutes']:.1f} minutes on {machine}

## Measured effect

`python -m sdkit.shapes.addons cards`: {ADDON_SAMPLES} full captions (every shape, colour and background), seeds
0-{ADDON_SAMPLES - 1}, 20 steps, CFG 7, euler_a; the share the detector (`sdkit.shapes.detect`) sees as outlines:

| LoRA weight | outlined |
|---|---|
{rows}
"""
    emb = embeddings.describe(embeddings.load(embedding_path))
    t = _training(EMBEDDING_NAME, runs)
    look = "a {colour} {shape} on a {background} background".format(**MOON)
    embedding_card = f"""# {EMBEDDING_NAME}

A textual-inversion embedding for shapes-v1: it teaches the word **{EMBEDDING_NAME}**, which the model never learned,
for a look it can draw: {look}. Made for notebook 04; the file name is the word, as in A1111: write
`a {EMBEDDING_NAME}`.

- file: `{embedding_path.name}`, A1111/kohya `.safetensors` layout (`emb_params`), {emb['vectors']} vectors of
  width {emb['widths']['*']}, sha256 `{formats.sha256(embedding_path)}`
- trained by `python -m sdkit.shapes.addons embedding` (seeded, resumable): only the {t['parameters']} numbers of
  the two vectors train, both started as the vector of "{INIT_WORD}"; the text encoder and UNet stay frozen.
  {t["steps"]} steps x batch {t["batch"]} of pictures of {look} (every size and place), captioned
  {", ".join(repr(c) for c in MOON_CAPTIONS)}, lr {t['lr']}, final loss {t['loss']}, {t['minutes']:.1f} minutes
  on {machine}

## Measured effect

`python -m sdkit.shapes.addons cards`: {ADDON_SAMPLES} pictures of the prompts {", ".join(repr(c) for c in MOON_CAPTIONS)}
in turn, seeds 0-{ADDON_SAMPLES - 1}, 20 steps, CFG 7, euler_a; the share the detector sees as {look}:

| | {look} |
|---|---|
| with `{embedding_path.name}` | {words['with']:.0%} |
| without it (the word read as plain text) | {words['without']:.0%} |

## What an embedding cannot do

A first try taught the word "plum" for purple, a colour shapes-v1 never saw, the same way. Its VAE turns purple
(128, 0, 128) into blue-violet (89, 1, 174), and its UNet paints only its four saturated colours, so "a plum
circle" gave purple in 0 of 16 pictures (red on white backgrounds, blue on black). An embedding finds a word for
what the painter can already draw; a new colour or style needs the painter changed: a LoRA (see `outlines`).
"""
    out = [lora_path.with_suffix(".md"), embedding_path.with_suffix(".md")]
    out[0].write_text(lora_card)
    out[1].write_text(embedding_card)
    return out


if __name__ == "__main__":
    main()
