"""sdkit beside the CPU engines a learner would otherwise use: OpenVINO and stable-diffusion.cpp, on the same file.

Each engine runs in its own worker process (so its peak memory is its own) and loads the same single-file SD1.5
checkpoint. The parent asks the workers in turn, part by part and round by round, so a slow spell of the machine
falls on every engine alike ("interleaved"). Both peers are optional extras (`pip install '.[peers]'`); the course
never needs them.

stable-diffusion.cpp has no call for one UNet step: its parts are read from its own log of whole images (a 4-step
image without CFG gives the step, the VAE decode and the image; a 2-step image with CFG gives the CFG step).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata as package_metadata
from pathlib import Path

from sdkit import allocator
from sdkit.errors import SdkitError
from sdkit.openvino_unet import no_telemetry

PARTS = ("unet_step_cfg", "unet_step", "vae_decode", "image_4_steps")
PART_NAMES = {"unet_step_cfg": "UNet step, CFG", "unet_step": "UNet step, no CFG",
              "vae_decode": "VAE decode", "image_4_steps": "4-step image, no CFG"}
PACKAGES = {"openvino": "openvino", "sdcpp": "stable-diffusion-cpp-python"}
INSTALL = "pip install '.[peers]' (in the sdkit folder; the course does not need it)"
PROMPT = "a sheep in a field, photo"


@dataclass(frozen=True)
class Engine:
    """One engine setting the bench times: which worker runs it and with what precision."""

    name: str
    package: str | None  # the optional package it needs (None: sdkit itself)
    precision: str  # what the worker is told: "auto" = the engine's own choice
    label: str
    default: bool = True  # timed unless `engines` names others


ENGINES = {e.name: e for e in [
    Engine("sdkit", None, "auto", "sdkit (its per-machine choice)"),
    Engine("openvino", "openvino", "auto", "OpenVINO, static shapes, the precision it picks"),
    Engine("openvino_bf16", "openvino", "bf16", "OpenVINO, static shapes, bf16 forced"),
    Engine("sdcpp_f16", "sdcpp", "f16", "stable-diffusion.cpp, f16 weights"),
    Engine("sdcpp_q8_0", "sdcpp", "q8_0", "stable-diffusion.cpp, q8_0 weights"),
    # Both in fp32, as every engine runs on a CPU without bf16 units (AVX2 laptops): on request only.
    Engine("sdkit_fp32", None, "f32", "sdkit, fp32 forced (SDKIT_DTYPE=float32)", default=False),
    # sdkit with its UNet run in OpenVINO whatever the measurement picked (its other parts in PyTorch): on request only.
    Engine("sdkit_openvino", "openvino", "auto", "sdkit, UNet in OpenVINO (SDKIT_BACKEND=openvino)", default=False),
    Engine("openvino_f32", "openvino", "f32", "OpenVINO, static shapes, fp32 forced", default=False),
]}


def version(package: str) -> str | None:
    """The installed version of an optional peer package, or None."""
    try:
        return package_metadata.version(PACKAGES[package])
    except package_metadata.PackageNotFoundError:
        return None


def available(*, bf16: bool) -> tuple[list[str], list[str]]:
    """(engines that can run here, lines saying what is missing). Forced bf16 needs a CPU with bf16 units."""
    here, missing = [], []
    for engine in ENGINES.values():
        if engine.package and version(engine.package) is None:
            line = f"{PACKAGES[engine.package]} is not installed: {INSTALL}"
            if line not in missing:
                missing.append(line)
        elif engine.precision == "bf16" and not bf16:
            missing.append(f"{engine.name}: this CPU has no bf16 units (AMX or AVX512-BF16), so bf16 is not forced")
        else:
            here.append(engine.name)
    return here, missing


# --- the parent: one run, engines interleaved ------------------------------------------------------------------------


class Worker:
    """A worker process running one engine; JSON lines in, JSON lines out (its own stdout, not its chatter)."""

    def __init__(self, engine: str, *, checkpoint: Path, size: int, threads: int, folder: Path) -> None:
        self.engine, self.log = engine, folder / f"{engine}.log"
        env = os.environ | {"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        self._stderr = self.log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sdkit.peers", engine, str(checkpoint), str(size), str(threads), str(folder)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env)

    def ask(self, request: dict) -> dict:
        """Send one request, wait for its answer; a crashed worker answers with its last log line."""
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            return {"error": self.last_log_line() or f"the {self.engine} worker stopped"}
        return json.loads(line)

    def last_log_line(self) -> str:
        """The last non-empty line the worker wrote to its log (its error, when it crashed)."""
        lines = [x for x in self.log.read_text(errors="replace").splitlines() if x.strip()]
        return lines[-1][:300] if lines else ""

    def close(self) -> None:
        """Stop the worker."""
        if self.process.poll() is None:
            try:
                self.process.stdin.close()
                self.process.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
        self._stderr.close()


def write_checkpoint(path: Path) -> Path:
    """A real-size SD1.5 single file with random weights, fp16 as civitai serves them (about 2 GB)."""
    import torch

    from sdkit.bench import real_size_pipeline
    from sdkit.convert import save_single_file

    torch.manual_seed(0)
    pipe = real_size_pipeline("sd1", dtype=torch.float16)
    save_single_file(pipe, path, family="sd1", dtype=torch.float16,
                     metadata={"modelspec.title": "random SD1.5 (sdkit bench --peers)"})
    return path


def run(*, engines: list[str] | None = None, checkpoint: Path | None = None, size: int = 512, rounds: int = 5,
        threads: int | None = None, progress: bool = True) -> dict:
    """Time every engine that is here on the same SD1.5 file, interleaved: `peers.<engine>.<part>` seconds and RSS."""
    import torch
    from tqdm.auto import tqdm

    from sdkit import device

    report = device.report()
    here, missing = available(bf16=report.cpu_has_bf16)
    unknown = [e for e in engines or () if e not in ENGINES]
    if unknown:
        raise SdkitError(f"{', '.join(unknown)}: not an engine the bench knows.", fix=f"use {', '.join(ENGINES)}")
    engines = [e for e in (engines or [n for n in here if ENGINES[n].default]) if e in here]
    threads = threads or torch.get_num_threads()
    result: dict = {"machine": {"cpu": report.cpu, "cores": report.cores, "isa": report.isa, "threads": threads,
                                "torch": report.torch_version, "malloc_tunables": allocator.active()},
                    "size": size, "rounds": rounds, "missing": missing,
                    "versions": {p: version(p) for p in PACKAGES}, "engines": {}, "peers": {}}
    with tempfile.TemporaryDirectory(prefix="sdkit-peers-") as folder:
        written = checkpoint is None
        if written:
            checkpoint = write_checkpoint(Path(folder) / "random-sd15.safetensors")
            device.return_free_memory()
            result["checkpoint"] = "random SD1.5 weights, real size, fp16 single file"
        else:
            result["checkpoint"] = Path(checkpoint).name
        workers: dict[str, Worker] = {}
        times: dict[str, dict[str, list[dict]]] = {}
        kinds: dict[str, dict[str, float]] = {}
        try:
            for name in tqdm(engines, desc="loading engines", disable=not progress):
                # one at a time: each loads alone, so load times and memory peaks do not overlap
                if name == "openvino_bf16" and _picks_bf16(result["engines"].get("openvino", {})):
                    result["missing"].append("openvino_bf16: OpenVINO picks bf16 on this CPU by itself, so the "
                                             "openvino row is bf16 (a second copy would only double its memory)")
                    continue
                workers[name] = Worker(name, checkpoint=Path(checkpoint), size=size, threads=threads,
                                       folder=Path(folder))
                result["engines"][name] = {"label": ENGINES[name].label} | workers[name].ask({"do": "load"})
            live = [n for n in workers if "error" not in result["engines"][n]]
            times = {n: {p: [] for p in PARTS} for n in live}
            # stable-diffusion.cpp is timed in the first round only: each of its parts is a whole image (minutes)
            steps = [(r, p, n) for r in range(rounds) for p in PARTS for n in live
                     if r == 0 or ENGINES[n].package != "sdcpp"]
            for round_, part, name in tqdm(steps, desc="timing, interleaved", disable=not progress):
                answer = workers[name].ask({"do": part, "round": round_})
                times[name][part].append(answer)
            kinds = _breakdowns(workers, live, progress=progress)
        finally:
            for worker in workers.values():
                worker.close()
    for name, parts in times.items():
        result["peers"][name] = {part: _summary(answers) for part, answers in parts.items()}
    result["cfg_rounds"] = cfg_rounds(result)
    if kinds:
        from sdkit.bench import Case, gflop_by_kind, kind_table

        # FLOPs counted only for the run's own SD1.5 file (GFLOP/s left out for another checkpoint)
        gflop = gflop_by_kind(Case("peers", "sd1", "unet", size, 2)) if written else {}
        result["breakdown"] = {name: kind_table(spent, gflop) for name, spent in kinds.items()}
    return result


def _breakdowns(workers: dict, names: list[str], *, rounds: int = 2, progress: bool) -> dict[str, dict[str, float]]:
    """Each engine's UNet step with CFG by operator kind, profiled in turn `rounds` times; the fastest call of each."""
    from tqdm.auto import tqdm

    best: dict[str, dict[str, float]] = {}
    for _, name in tqdm([(r, n) for r in range(rounds) for n in names if ENGINES[n].package != "sdcpp"],
                        desc="profiling by operator kind", disable=not progress):
        spent = workers[name].ask({"do": "breakdown"}).get("kinds")
        if spent and (name not in best or sum(spent.values()) < sum(best[name].values())):
            best[name] = spent
    return best


def _picks_bf16(loaded: dict) -> bool:
    """Whether a loaded OpenVINO engine runs in bf16 by its own choice."""
    return "inference precision bf16" in loaded.get("note", "")


def _summary(answers: list[dict]) -> dict:
    """Median seconds and the highest peak RSS of one part's runs (or the error that stopped it)."""
    good = [a for a in answers if "seconds" in a]
    if not good:
        return {"error": next((a["error"] for a in answers if "error" in a), "not run")}
    return {"seconds": round(statistics.median(a["seconds"] for a in good), 3),
            "best_seconds": round(min(a["seconds"] for a in good), 3),
            "runs": [round(a["seconds"], 3) for a in good],
            "peak_rss_gib": round(max(a["peak_rss_gib"] for a in good), 2)}


def format_table(result: dict) -> str:
    """The peers run as a text table, fastest UNet step with CFG marked."""
    m = result["machine"]
    lines = [f"{m['cpu']}, {m['cores']} cores, {m['threads']} threads, {', '.join(m['isa'])}, torch {m['torch']}",
             f"{result['checkpoint']}, {result['size']}², seconds: median of {result['rounds']} interleaved rounds and the "
             "best (stable-diffusion.cpp: the first round only)", "",
             f"{'engine':<15} " + " ".join(f"{PART_NAMES[p]:>24}" for p in PARTS) + f" {'peak RSS':>10}"]
    for name, parts in result["peers"].items():
        cells = [f"{parts[p]['seconds']:>9.2f} s (best {parts[p]['best_seconds']:.2f})" if "seconds" in parts[p]
                 else f"{'failed':>20}" for p in PARTS]
        errors = {parts[p]["error"] for p in PARTS if "error" in parts[p]}
        rss = max((parts[p].get("peak_rss_gib", 0) for p in PARTS), default=0)
        lines.append(f"{name:<15} " + " ".join(cells) + f" {rss:>6.2f} GiB")
        lines += [f"  {name} failed: {error}" for error in sorted(errors)]
    for name, engine in result["engines"].items():
        detail = engine.get("error") or engine.get("note", "")
        lines.append(f"{name}: {engine['label']}; load {engine.get('load_s', 0):.0f} s. {detail}".rstrip())
    ratio = cfg_ratio(result)
    if ratio:
        verdict = "sdkit faster" if ratio > 1 else "OpenVINO faster" if ratio < 1 else "the same"
        lines.append(f"sdkit's UNet step with CFG vs OpenVINO's fastest (medians): {ratio:.3f}x ({verdict})")
    pairs = result.get("cfg_rounds")
    if pairs:
        lines.append(f"  round by round ({pairs['against']}'s seconds over sdkit's, back to back): median "
                     f"{pairs['median']:.3f}x; sdkit faster in {pairs['sdkit_faster']} of {pairs['rounds']} rounds "
                     f"({', '.join(f'{r:.2f}' for r in pairs['ratios'])})")
    if result.get("breakdown"):
        lines += ["", "UNet step with CFG by operator kind (one profiled call each, the faster of two): seconds "
                      "(GFLOP/s)"]
        for name, table in result["breakdown"].items():
            cells = [f"{kind} {row['seconds']:.2f}" + (f" ({row['gflops']:.0f})" if row["gflops"] else "")
                     for kind, row in table.items()]
            lines.append(f"  {name:<15} " + ", ".join(cells) + f"; total {sum(r['seconds'] for r in table.values()):.2f}")
    lines += [f"not run: {line}" for line in result["missing"]]
    return "\n".join(lines)


def cfg_rounds(result: dict) -> dict | None:
    """sdkit's UNet step with CFG against OpenVINO's faster row, round by round: each round ran the two back to back,
    so a slow spell of a shared machine falls on both; OpenVINO's seconds over sdkit's (above 1: sdkit faster)."""
    peers = result["peers"]
    ours = peers.get("sdkit", {}).get("unet_step_cfg", {}).get("runs")
    rivals = [n for n in ("openvino", "openvino_bf16") if "runs" in peers.get(n, {}).get("unet_step_cfg", {})]
    if not ours or not rivals:
        return None
    rival = min(rivals, key=lambda n: peers[n]["unet_step_cfg"]["seconds"])
    theirs = peers[rival]["unet_step_cfg"]["runs"]
    if len(theirs) != len(ours):  # a failed run would pair the wrong rounds
        return None
    ratios = [round(t / o, 3) for o, t in zip(ours, theirs)]
    return {"against": rival, "ratios": ratios, "median": round(statistics.median(ratios), 3),
            "sdkit_faster": sum(r > 1 for r in ratios), "rounds": len(ratios)}


def cfg_ratio(result: dict) -> float | None:
    """OpenVINO's best UNet-step-with-CFG seconds over sdkit's (above 1: sdkit is faster), when both ran."""
    peers = result["peers"]
    ours = peers.get("sdkit", {}).get("unet_step_cfg", {}).get("seconds")
    theirs = [peers[n]["unet_step_cfg"]["seconds"] for n in ("openvino", "openvino_bf16")
              if "seconds" in peers.get(n, {}).get("unet_step_cfg", {})]
    return round(min(theirs) / ours, 3) if ours and theirs else None


# --- the workers ------------------------------------------------------------------------------------------------------


class _SdkitRunner:
    """sdkit's own path: `checkpoints.load` (its per-machine choice), then the UNet, VAE and `generate` as the course
    runs them."""

    def __init__(self, checkpoint: Path, size: int, precision: str, backend: str | None = None) -> None:
        import torch

        from sdkit import checkpoints, device

        if precision == "f32":
            os.environ["SDKIT_DTYPE"] = "float32"  # this worker process only
        if backend:
            os.environ["SDKIT_BACKEND"] = backend
        self.pipe = checkpoints.load(checkpoint)
        self.size, self.torch = size, torch
        choice = device.choose(device.report())["unet"]
        self.note = f"{choice.dtype}{' in OpenVINO' if choice.backend == 'openvino' else ''}: {choice.reason}"
        self.openvino = choice.backend == "openvino"
        if self.openvino:  # converted at load, as the first picture would: its seconds count in load_s
            from sdkit import openvino_unet

            openvino_unet.engine(self.pipe)
        torch.manual_seed(0)
        side = size // 8
        dtype = self.pipe.unet.dtype
        self.sample = {b: torch.randn(b, self.pipe.unet.config.in_channels, side, side, dtype=dtype) for b in (1, 2)}
        width = self.pipe.unet.config.cross_attention_dim
        self.context = {b: torch.randn(b, 77, width, dtype=dtype) for b in (1, 2)}
        self.latents = torch.randn(1, self.pipe.unet.config.in_channels, side, side)

    def breakdown(self) -> dict[str, float] | None:
        """A UNet step with CFG by operator kind, from PyTorch's profiler (None where OpenVINO runs the UNet)."""
        from sdkit.bench import profile_kinds

        if self.openvino:
            return None
        with self.torch.inference_mode():
            return profile_kinds(lambda: self.pipe.unet(self.sample[2], self.torch.tensor(500), self.context[2]))

    def __call__(self, part: str) -> float:
        from sdkit import openvino_unet, vae
        from sdkit.generate import GenerationSettings, generate

        torch = self.torch
        start = time.perf_counter()
        with torch.inference_mode():
            if part.startswith("unet_step"):
                batch = 2 if part == "unet_step_cfg" else 1
                with openvino_unet.running(self.pipe, on=self.openvino):
                    self.pipe.unet(self.sample[batch], torch.tensor(500), self.context[batch])
            elif part == "vae_decode":
                vae.decode(self.pipe, self.latents)
            else:
                generate(self.pipe, GenerationSettings(prompt=PROMPT, steps=4, cfg=1.0, sampler="euler",
                                                       width=self.size, height=self.size), progress=False)
        return time.perf_counter() - start


def convert_openvino(checkpoint: Path, size: int, folder: Path) -> None:
    """The checkpoint's UNet, VAE decoder and text encoder as OpenVINO IR files at static shapes.

    Loaded in fp32 by sdkit (OpenVINO lowers the precision when it compiles), converted with
    `openvino.convert_model` from example inputs, written with `openvino.save_model` (weights in fp16).
    Run in its own process: the fp32 model and its traced copy need several GB that a worker should not keep.
    """
    no_telemetry()
    os.environ["SDKIT_DTYPE"] = "float32"
    import openvino as ov
    import torch

    from sdkit import checkpoints

    pipe = checkpoints.load(checkpoint)
    side = size // 8
    parts = {"unet": (_UnetCall(pipe.unet), (torch.randn(2, 4, side, side), torch.tensor([500.0]),
                                             torch.randn(2, 77, 768)))}
    parts["decoder"] = (_DecoderCall(pipe.vae), (torch.randn(1, 4, side, side),))
    parts["text"] = (_TextCall(pipe.text_encoder), (torch.ones(1, 77, dtype=torch.int64),))
    folder.mkdir(parents=True, exist_ok=True)
    for name, (module, example) in parts.items():
        with torch.no_grad():
            model = ov.convert_model(module, example_input=example)
        model.reshape({i: ov.PartialShape(list(x.shape)) for i, x in enumerate(example)})  # static shapes
        ov.save_model(model, folder / f"{name}.xml")  # weights stored fp16, as OpenVINO's own tools store them
        del model


class _OpenvinoRunner:
    """OpenVINO: the same file converted to IR (`convert_openvino`, once per run), compiled for the CPU with the
    precision OpenVINO picks (or bf16 forced); the image is an euler loop around its three models."""

    def __init__(self, checkpoint: Path, size: int, precision: str, threads: int, folder: Path) -> None:
        no_telemetry()
        import openvino as ov
        import torch

        from sdkit.checkpoints import CONFIGS, _tokenizer

        ir = folder / "openvino"
        if not (ir / "text.xml").exists():
            subprocess.run([sys.executable, "-m", "sdkit.peers", "convert-openvino", str(checkpoint), str(size),
                            str(ir)], check=True, stdout=sys.stderr)
        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        if precision in ("bf16", "f32"):
            config["INFERENCE_PRECISION_HINT"] = precision
        core = ov.Core()
        self.unet = {}
        for batch in (2, 1):  # one file, two static batch sizes; both map the same weights file
            model = core.read_model(ir / "unet.xml")
            model.reshape({0: [batch, 4, size // 8, size // 8], 2: [batch, 77, 768]})
            # PERF_COUNT: per-node times for `breakdown` (a clock read per node, ~2,000 nodes in a 2-4 s call)
            self.unet[batch] = core.compile_model(model, "CPU", config | {"PERF_COUNT": True})
        self.decoder = core.compile_model(ir / "decoder.xml", "CPU", config)
        self.text = core.compile_model(ir / "text.xml", "CPU", config)
        self.tokenizer = _tokenizer("clip_l")
        self.scheduler_config = json.loads((CONFIGS / "sd1" / "scheduler" / "scheduler_config.json").read_text())
        self.size, self.torch, side = size, torch, size // 8
        self.note = f"OpenVINO {ov.get_version().split('-')[0]}, inference precision " \
                    f"{self.unet[2].get_property('INFERENCE_PRECISION_HINT').to_string()}"
        torch.manual_seed(0)
        self.inputs = {b: [torch.randn(b, 4, side, side).numpy(), torch.tensor([500.0]).numpy(),
                           torch.randn(b, 77, 768).numpy()] for b in (1, 2)}
        self.latents = torch.randn(1, 4, side, side).numpy()

    def breakdown(self) -> dict[str, float]:
        """A UNet step with CFG by operator kind, from OpenVINO's per-node times."""
        from sdkit.openvino_unet import kinds

        return kinds(self.unet[2], self.inputs[2])

    def __call__(self, part: str) -> float:
        start = time.perf_counter()
        if part.startswith("unet_step"):
            batch = 2 if part == "unet_step_cfg" else 1
            self.unet[batch](self.inputs[batch])
        elif part == "vae_decode":
            self.decoder([self.latents])
        else:
            self.image()
        return time.perf_counter() - start

    def image(self):
        """One 4-step euler image without CFG: tokenize, encode, denoise, decode, to a picture."""
        import numpy as np
        from diffusers import EulerDiscreteScheduler
        from PIL import Image

        torch = self.torch
        ids = self.tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="np")
        context = self.text([ids.input_ids.astype("int64")])[0]
        scheduler = EulerDiscreteScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(4)
        generator = torch.Generator().manual_seed(0)
        latents = torch.randn(1, 4, self.size // 8, self.size // 8, generator=generator) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(latents, t)
            eps = torch.from_numpy(self.unet[1]([x.numpy(), t.reshape(1).float().numpy(), context])[0])
            latents = scheduler.step(eps, t, latents).prev_sample
        pixels = self.decoder([(latents / 0.18215).numpy()])[0][0]  # SD1's VAE scaling factor
        return Image.fromarray((np.clip(pixels / 2 + 0.5, 0, 1) * 255).round().astype("uint8").transpose(1, 2, 0))


class _UnetCall:
    """The UNet as a plain function of (sample, timestep, context) -> noise, for tracing."""

    def __new__(cls, unet):
        import torch

        class Call(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.unet = unet

            def forward(self, sample, timestep, context):
                return self.unet(sample, timestep, context, return_dict=False)[0]

        return Call().eval()


class _DecoderCall:
    """The VAE's decoding half as a plain function, for tracing."""

    def __new__(cls, vae):
        import torch

        class Call(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.vae = vae

            def forward(self, latents):
                return self.vae.decode(latents, return_dict=False)[0]

        return Call().eval()


class _TextCall:
    """The text encoder as a plain function of token ids, for tracing."""

    def __new__(cls, text_encoder):
        import torch

        class Call(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.text = text_encoder

            def forward(self, ids):
                return self.text(ids, return_dict=False)[0]

        return Call().eval()


SDCPP_TIMES = {"sampling": re.compile(r"sampling completed, taking ([0-9.]+)\s*s"),
               "decode": re.compile(r"decode_first_stage completed, taking ([0-9.]+)\s*s"),
               "image": re.compile(r"generate_image completed in ([0-9.]+)\s*s")}


def sdcpp_times(log: str) -> dict[str, float]:
    """The sampling, decode and whole-image seconds stable-diffusion.cpp logged for one image (the last of each)."""
    found = {}
    for key, pattern in SDCPP_TIMES.items():
        values = pattern.findall(log)
        if values:
            found[key] = float(values[-1])
    missing = set(SDCPP_TIMES) - set(found)
    if missing:
        raise SdkitError(f"stable-diffusion.cpp's log did not say its {', '.join(sorted(missing))} time.",
                         fix="its log format changed: update sdkit.peers.SDCPP_TIMES")
    return found


class _SdcppRunner:
    """stable-diffusion.cpp through its Python binding: the same file, weights cast to f16 or q8_0 on load."""

    def __init__(self, checkpoint: Path, size: int, precision: str, threads: int) -> None:
        import io

        import stable_diffusion_cpp

        self.log = io.StringIO()
        sys.stderr = _Tee(self.log, sys.__stderr__)  # its binding prints the engine's log to sys.stderr
        self.engine = stable_diffusion_cpp.StableDiffusion(model_path=str(checkpoint), wtype=precision,
                                                           n_threads=threads, verbose=True)
        self.size, self.note, self.cache = size, f"{precision} weights, {threads} threads", {}

    def generate(self, *, steps: int, cfg: float) -> dict[str, float]:
        """One image; its logged times, with `step` = sampling seconds per step."""
        self.log.seek(0)
        self.log.truncate()
        self.engine.generate_image(prompt=PROMPT, width=self.size, height=self.size, cfg_scale=cfg,
                                   sample_steps=steps, sample_method="euler", seed=0)
        found = sdcpp_times(self.log.getvalue())
        return found | {"step": found["sampling"] / steps}

    def __call__(self, part: str, round_: int) -> float:
        if part == "unet_step_cfg":
            return self.generate(steps=2, cfg=7.0)["step"]
        if (round_, "plain") not in self.cache:  # one 4-step image gives the three other parts of a round
            self.cache = {(round_, "plain"): self.generate(steps=4, cfg=1.0)}
        found = self.cache[(round_, "plain")]
        return {"unet_step": found["step"], "vae_decode": found["decode"], "image_4_steps": found["image"]}[part]


class _Tee:
    """A text stream writing to two others."""

    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def _peak_reset() -> None:
    """Reset this process's peak-RSS counter (see sdkit.bench)."""
    from sdkit.bench import _peak_reset as reset

    reset()


def serve(engine: str, checkpoint: Path, size: int, threads: int, folder: Path) -> None:
    """A worker's loop: answer JSON requests on the real stdout; whatever libraries print goes to stderr."""
    import torch

    torch.set_num_threads(threads)
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # C code printing to stdout must not corrupt the answers
    sys.stdout = sys.stderr
    from sdkit.bench import peak_rss_gib

    spec = ENGINES[engine]
    runner: Callable | None = None
    needs_round = spec.package == "sdcpp"
    warmed: set[str] = set()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            _peak_reset()
            if request["do"] == "load":
                started = time.perf_counter()
                if spec.name.startswith("sdkit"):
                    runner = _SdkitRunner(checkpoint, size, spec.precision, backend=spec.package)
                elif spec.package == "openvino":
                    runner = _OpenvinoRunner(checkpoint, size, spec.precision, threads, folder)
                else:
                    runner = _SdcppRunner(checkpoint, size, spec.precision, threads)
                answer = {"load_s": round(time.perf_counter() - started, 1), "note": runner.note,
                          "peak_rss_gib": round(peak_rss_gib(), 2)}
            elif request["do"] == "breakdown":
                answer = {"kinds": getattr(runner, "breakdown", lambda: None)()}
            else:
                part = request["do"]
                if needs_round:
                    seconds = runner(part, request["round"])
                else:
                    if part not in warmed:  # first calls allocate and pick kernels: not what a step costs
                        runner(part)
                        warmed.add(part)
                        _peak_reset()
                    seconds = runner(part)
                answer = {"seconds": seconds, "peak_rss_gib": round(peak_rss_gib(), 2)}
        except Exception as error:  # noqa: BLE001 - reported to the parent as this engine's result, one line
            print(f"{type(error).__name__}: {error}", file=sys.stderr)
            answer = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


if __name__ == "__main__":
    if sys.argv[1] == "convert-openvino":
        convert_openvino(Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
    else:
        serve(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]))
