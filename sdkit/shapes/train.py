"""Train the shapes-world model family on this CPU: python -m sdkit.shapes.train {vae,text,unet,all,bundle}.

Each part is seeded, logs to runs/shapes/<part>.log, saves its state every few hundred steps and resumes from
it when run again. Data are drawn on the fly from the procedural world, seeded by (seed, step), so a resumed
run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from sdkit.checkpoints import CONFIGS, _tokenizer, from_shipped_config
from sdkit.shapes import data

CONFIG = CONFIGS / "shapes"
RUNS = Path("runs/shapes")
BUNDLE = Path(__file__).resolve().parents[2] / "models" / "checkpoints" / "shapes-v1.safetensors"
ATTRIBUTE_CLASSES = {"colour": list(data.COLOURS), "shape": list(data.SHAPES), "background": list(data.BACKGROUNDS)}


@dataclass
class Plan:
    """How long and how hard one part trains."""

    steps: int
    batch: int
    lr: float
    seed: int = 0
    save_every: int = 200
    warmup: int = 100  # steps of linear learning-rate warm-up before the cosine decay


PLANS = {"vae": Plan(steps=1000, batch=16, lr=2e-3), "text": Plan(steps=500, batch=128, lr=2e-3),
         "unet": Plan(steps=3000, batch=64, lr=1e-3)}


def config(part: str) -> dict:
    """The shipped diffusers/transformers config of one part."""
    folder = {"vae": "vae", "text": "text_encoder", "unet": "unet"}[part]
    return json.loads((CONFIG / folder / "config.json").read_text())


def build(part: str, *, seed: int = 0) -> torch.nn.Module:
    """A freshly initialised model for `part`, from the shipped config."""
    torch.manual_seed(seed)
    return from_shipped_config("shapes", {"vae": "vae", "text": "text_encoder", "unet": "unet"}[part])


def load_part(part: str, *, runs: Path = RUNS) -> torch.nn.Module:
    """A trained part from runs/, in eval mode and frozen."""
    path = runs / f"{part}.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `python -m sdkit.shapes.train {part}` first")
    model = build(part)
    model.load_state_dict(load_file(path))
    return model.eval().requires_grad_(False)


def images_batch(step: int, *, plan: Plan, full_probability: float = 0.7) -> tuple[torch.Tensor, list[str]]:
    """The batch of step `step`: images in [-1, 1] (N, 3, 64, 64) and their captions, seeded by (seed, step)."""
    pixels, captions = data.dataset_arrays(plan.batch, seed=plan.seed * 1_000_003 + step,
                                           full_probability=full_probability)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1, captions


class Log:
    """Appends one JSON line per report to runs/shapes/<part>.log."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **fields: object) -> None:
        """Add one record."""
        with self.path.open("a") as f:
            f.write(json.dumps(fields) + "\n")


def _save_state(path: Path, **state: object) -> None:
    """Write training state atomically (a crash never leaves a half-written file)."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _vae_loss(model, step: int, plan: Plan) -> torch.Tensor:
    """L1 + L2 reconstruction of the posterior mean, plus a small pull of the latents towards 0.

    Decoding the mean (not a noisy sample) lets this small VAE learn exact colours in minutes; the latents'
    spread is kept in check by the pull, and the UNet is trained on the same means.
    """
    images, _ = images_batch(step, plan=plan)
    latents = model.encode(images).latent_dist.mean
    recon = model.decode(latents).sample
    return F.l1_loss(recon, images) + F.mse_loss(recon, images) + 1e-4 * latents.pow(2).mean()


class TextTask(torch.nn.Module):
    """Text encoder plus three small heads that read colour, shape and background (or 'not said') from a caption."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        hidden = encoder.config.hidden_size
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(hidden, len(v) + 1) for k, v in ATTRIBUTE_CLASSES.items()})
        self.tokenizer = _tokenizer("clip_l")

    def forward(self, captions: list[str]) -> dict[str, torch.Tensor]:
        ids = self.tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        out = self.encoder(ids.input_ids)
        return {k: head(out.pooler_output) for k, head in self.heads.items()}


def _text_loss(model: TextTask, step: int, plan: Plan) -> torch.Tensor:
    """Cross-entropy of each attribute the caption states, with 'not said' as its own class."""
    rng = np.random.default_rng(plan.seed * 1_000_003 + step)
    captions = [data.caption(data.random_spec(rng), rng=rng, full_probability=0.5) for _ in range(plan.batch)]
    logits = model(captions)
    loss = torch.zeros(())
    for name, classes in ATTRIBUTE_CLASSES.items():
        said = [data.parse_caption(c)[name] for c in captions]
        target = torch.tensor([classes.index(s) if s else len(classes) for s in said])
        loss = loss + F.cross_entropy(logits[name], target)
    return loss


class UnetTask(torch.nn.Module):
    """The UNet with the frozen VAE and text encoder it learns to denoise for."""

    def __init__(self, unet: torch.nn.Module, *, runs: Path) -> None:
        super().__init__()
        from diffusers import DDPMScheduler

        self.unet = unet
        self.vae = load_part("vae", runs=runs)
        self.text = load_part("text", runs=runs)
        self.tokenizer = _tokenizer("clip_l")
        self.noise = DDPMScheduler.from_pretrained(CONFIG, subfolder="scheduler")
        self.scaling = config("vae")["scaling_factor"]
        self._embeddings: dict[str, torch.Tensor] = {}

    def embed(self, captions: list[str]) -> torch.Tensor:
        """Frozen text-encoder outputs, cached per caption (the world has fewer than 100 distinct captions)."""
        return frozen_context(self._embeddings, self.tokenizer, self.text, captions)


def frozen_context(cache: dict[str, torch.Tensor], tokenizer, text: torch.nn.Module,
                   captions: list[str]) -> torch.Tensor:
    """A frozen text encoder's outputs for `captions`, each caption encoded once and kept in `cache`."""
    missing = [c for c in dict.fromkeys(captions) if c not in cache]
    if missing:
        ids = tokenizer(missing, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        with torch.no_grad():
            cache.update(zip(missing, text(ids.input_ids).last_hidden_state))
    return torch.stack([cache[c] for c in captions])


OFFSET_NOISE = 0.1  # per-image, per-channel constant added to the noise: lets the model move whole-image brightness


def _unet_loss(model: UnetTask, step: int, plan: Plan) -> torch.Tensor:
    """Epsilon-prediction loss with 10% of captions dropped to "" for classifier-free guidance.

    The noise carries a small per-channel offset ("offset noise"): with SD's noise schedule the last step still
    holds a trace of the image's mean, and a model trained without the offset cannot make a background fully
    white or black from pure noise.
    """
    images, captions = images_batch(step, plan=plan)
    generator = torch.Generator().manual_seed(plan.seed * 1_000_003 + step)
    drop = torch.rand(len(captions), generator=generator) < 0.1
    captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
    with torch.no_grad():
        latents = model.vae.encode(images).latent_dist.mean * model.scaling
    noise = torch.randn(latents.shape, generator=generator)
    noise = noise + OFFSET_NOISE * torch.randn((*latents.shape[:2], 1, 1), generator=generator)
    t = torch.randint(0, model.noise.config.num_train_timesteps, (len(captions),), generator=generator)
    noisy = model.noise.add_noise(latents, noise, t)
    return F.mse_loss(model.unet(noisy, t, model.embed(captions)).sample, noise)


def fit(task: torch.nn.Module, plan: Plan, *, name: str, runs: Path, parameters: int | None = None) -> float:
    """Train `task` (its `loss(step, plan)`, its trainable parameters) by `plan`, resuming from runs/<name>.state.pt
    and logging to runs/<name>.log (`parameters`: the count to log, by default the trainable ones); returns the
    training seconds. Every shapes-world model and add-on trains through this one loop."""
    torch.manual_seed(plan.seed)
    trainable = [p for p in task.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=plan.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / plan.warmup) * 0.5 * (1 + np.cos(np.pi * min(s, plan.steps) / plan.steps)))
    state_path, log = runs / f"{name}.state.pt", Log(runs / f"{name}.log")
    start, elapsed = 0, 0.0
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)  # our own file, written by _save_state
        for p, saved in zip(trainable, state["trainable"]):
            p.data.copy_(saved)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start, elapsed = state["step"], state["elapsed"]
    if start == 0:
        log.write(event="start", part=name, plan=asdict(plan), threads=torch.get_num_threads(),
                  parameters=parameters or sum(p.numel() for p in trainable))
    began = time.perf_counter() - elapsed
    running = []
    for step in tqdm(range(start, plan.steps), initial=start, total=plan.steps, desc=f"train {name}"):
        loss = task.loss(step, plan)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        running.append(loss.item())
        done = step + 1
        if done % 50 == 0 or done == plan.steps:
            log.write(step=done, loss=float(np.mean(running)), lr=schedule.get_last_lr()[0],
                      seconds=round(time.perf_counter() - began, 1))
            running = []
        if done % plan.save_every == 0 or done == plan.steps:
            _save_state(state_path, trainable=[p.detach() for p in trainable], optimizer=optimizer.state_dict(),
                        schedule=schedule.state_dict(), step=done, elapsed=time.perf_counter() - began)
    seconds = round(time.perf_counter() - began, 1)
    log.write(event="done", part=name, seconds=seconds)
    return seconds


class _Task(torch.nn.Module):
    """A part and its loss function, as fit() takes them."""

    def __init__(self, inner: torch.nn.Module, loss_fn) -> None:
        super().__init__()
        self.inner, self.loss_fn = inner, loss_fn

    def loss(self, step: int, plan: Plan) -> torch.Tensor:
        """This step's loss."""
        return self.loss_fn(self.inner, step, plan)


def train(part: str, *, runs: Path = RUNS, steps: int | None = None) -> Path:
    """Train (or resume) one part; returns the path of its weights in runs/."""
    plan = PLANS[part]
    plan = Plan(**{**asdict(plan), "steps": steps or plan.steps})
    torch.manual_seed(plan.seed)
    model = build(part, seed=plan.seed)
    inner: torch.nn.Module = {"vae": lambda: model, "text": lambda: TextTask(model),
                              "unet": lambda: UnetTask(model, runs=runs)}[part]()
    task = _Task(inner, {"vae": _vae_loss, "text": _text_loss, "unet": _unet_loss}[part]).train()
    fit(task, plan, name=part, runs=runs, parameters=sum(p.numel() for p in model.parameters()))
    out = runs / f"{part}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    if part == "vae":
        _set_scaling_factor(model)
    return out


def _set_scaling_factor(vae: torch.nn.Module) -> None:
    """Measure the latents' spread and store 1/std as the VAE's scaling_factor, as SD did for its VAE."""
    images, _ = images_batch(10**6, plan=Plan(steps=1, batch=512, lr=0))
    with torch.no_grad():
        latents = vae.eval().encode(images).latent_dist.mean
    path = CONFIG / "vae" / "config.json"
    values = json.loads(path.read_text())
    values["scaling_factor"] = round(1.0 / latents.std().item(), 5)
    path.write_text(json.dumps(values, indent=2) + "\n")


def bundle(*, runs: Path = RUNS, out: Path = BUNDLE) -> Path:
    """Write the trained parts as one fp16 single-file checkpoint in the original SD layout."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from sdkit.convert import save_single_file

    pipe = StableDiffusionPipeline(
        vae=load_part("vae", runs=runs), text_encoder=load_part("text", runs=runs), unet=load_part("unet", runs=runs),
        tokenizer=_tokenizer("clip_l"), scheduler=EulerDiscreteScheduler.from_pretrained(CONFIG, subfolder="scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    metadata = {"modelspec.architecture": "sdkit-shapes-v1", "modelspec.title": "shapes-v1",
                "modelspec.description": "sdkit's shapes-world teaching model", "modelspec.prediction_type": "epsilon",
                "modelspec.resolution": "64x64"}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_single_file(pipe, tmp, family="sd1", metadata=metadata, dtype=torch.float16)
    os.replace(tmp, out)
    return out


def _log_summary(part: str, runs: Path) -> dict:
    """Seconds, steps and final loss of one part, read from its log."""
    records = [json.loads(line) for line in (runs / f"{part}.log").read_text().splitlines()]
    start = next(r for r in records if r.get("event") == "start")
    done = [r for r in records if r.get("event") == "done"][-1]
    last = [r for r in records if "loss" in r][-1]
    return {"seconds": done["seconds"], "steps": last["step"], "final_loss": round(last["loss"], 4),
            "parameters": start["parameters"], "batch": start["plan"]["batch"], "lr": start["plan"]["lr"]}


def model_card(*, runs: Path = RUNS, out: Path = BUNDLE) -> Path:
    """Evaluate the bundled checkpoint and write its model card next to it."""
    from sdkit import device, formats
    from sdkit.checkpoints import load
    from sdkit.shapes.evaluate import evaluate, format_report

    result = evaluate(load(out), seeds=4)
    info = formats.info(out)
    parts = {part: _log_summary(part, runs) for part in ("vae", "text", "unet")}
    rows = "\n".join(f"| {p} | {s['parameters']:,} | {s['steps']} x {s['batch']} | {s['lr']} | {s['final_loss']} | "
                     f"{s['seconds'] / 60:.1f} min |" for p, s in parts.items())
    total = sum(s["seconds"] for s in parts.values()) / 60
    card = f"""# shapes-v1

sdkit's teaching model: a tiny Stable Diffusion 1.x-architecture text-to-image model for the *shapes world*
(one circle, square or upright triangle in red, green, blue or yellow on a white or black background, 64x64).
Written in the original single-file layout (`model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.*`), fp16, so `sdkit.checkpoints.load` reads it exactly like a civitai file.

- file: `{out.name}`, {info['size_bytes'] / 2**20:.1f} MiB, {info['parameters']:,} parameters, sha256 `{info['sha256']}`
- parts: `AutoencoderKL` (4 latent channels, 64x64 -> 16x16), `CLIPTextModel` (2 layers, width 64, the SD1 CLIP
  tokenizer), `UNet2DConditionModel` with cross-attention; configs in `sdkit/configs/shapes/`
- trained by `python -m sdkit.shapes.train all` (seeded, resumable) on {device.report().cpu},
  {torch.get_num_threads()} threads, {total:.1f} minutes in all:

| part | parameters | steps x batch | lr | final loss | time |
|---|---|---|---|---|---|
{rows}

- data: drawn on the fly by `sdkit.shapes.data` (70% full captions, 30% partial ones such as "a red shape",
  "a circle" or ""); captions dropped to "" 10% of the time for classifier-free guidance. Never seen: rotation,
  outlines, stripes, stars, other colours (kept for the LoRA, embedding and ControlNet lessons).

## Measured accuracy

`python -m sdkit evaluate shapes` (24 full captions x 4 seeds, judged by `sdkit.shapes.detect`):

```
{format_report(result)}
```
"""
    path = out.with_suffix(".md")
    path.write_text(card)
    return path


def command_line(module: str, parts: list[str], argv: list[str] | None, *, models: Path | None = None) -> argparse.Namespace:
    """The arguments every shapes-world training script takes: which part, --runs, --steps (and --models)."""
    import importlib

    doc = importlib.import_module(module).__doc__ or ""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.splitlines()[0])
    parser.add_argument("part", choices=parts)
    parser.add_argument("--runs", type=Path, default=RUNS, help="where logs and resumable states go")
    parser.add_argument("--steps", type=int, help="override the plan's step count (for quick trials)")
    if models is not None:
        parser.add_argument("--models", type=Path, default=models, help="the models folder the files go into")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Command line: which part(s) to train, then bundle."""
    args = command_line("sdkit.shapes.train", ["vae", "text", "unet", "all", "bundle", "card"], argv)
    parts = ["vae", "text", "unet"] if args.part == "all" else [] if args.part in ("bundle", "card") else [args.part]
    for part in parts:
        train(part, runs=args.runs, steps=args.steps)
    if args.part in ("all", "bundle"):
        print(bundle(runs=args.runs))
    if args.part in ("all", "card"):
        print(model_card(runs=args.runs))


if __name__ == "__main__":
    main()
