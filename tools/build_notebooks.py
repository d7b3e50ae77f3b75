"""Write notebooks/*.ipynb from the jupytext percent scripts in tools/notebooks/, adding the navigation cells.

    python tools/build_notebooks.py            # sources only (fast); keeps nothing of the old outputs
    python tools/build_notebooks.py --execute  # also run each notebook and keep its pictures (what is committed)

The scripts are the source: edit them, never the .ipynb files. Each notebook gets a generated opening cell
(what you will learn, how long it takes) and closing cell (try this, links), from COURSE below. Executed notebooks
keep their outputs so a reader on the web sees the pictures; live widgets are dropped from them (a saved widget
without its kernel shows "Error displaying widget" in JupyterLab) and replaced by their static picture.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jupytext
import nbformat

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "tools" / "notebooks"
NOTEBOOKS = ROOT / "notebooks"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


@dataclass(frozen=True)
class Lesson:
    """What the navigation cells say about one notebook."""

    title: str
    learn: tuple[str, ...]
    seconds: int  # measured run time on the project's 2-core machine (printed by --execute)
    try_this: tuple[str, ...]


COURSE: dict[str, Lesson] = {
    "00_setup_and_hardware": Lesson(
        title="Setup and hardware",
        learn=("what a CPU, an iGPU and a discrete GPU are", "what fp32, bf16 and fp16 mean, measured on your machine",
               "which way of running a UNet (PyTorch's layouts, OpenVINO) is fastest here, measured",
               "how much memory each model family needs, and which fit here"),
        seconds=60,
        try_this=("Set `MATMUL_SIZE = 2048` and run again: does bf16 pull further ahead of fp32?",
                  "Run `python -m sdkit device` in a terminal: the same report, for any machine you use.",
                  "Find your own laptop's CPU in the report. Does it have AVX512-BF16 or AMX?")),
    "01_the_computer_is_dumb": Lesson(
        title="The computer is dumb",
        learn=("why a vague prompt gives a random picture and an exact prompt the picture you asked for",
               "what the seed, the steps, CFG and the sampler each do, measured",
               "how to use the panel: sliders, Generate, Cancel, the gallery"),
        seconds=45,
        try_this=("In the panel, type a vague prompt (`a shape`) and press the shuffle button by the seed a few times: what stays the same?",
                  "Drag CFG to 20 with 5 steps: the picture burns. Now give it 30 steps.",
                  "Tick *compare*, vary `sampler` with `euler, dpmpp_2m, lcm`: same seed, three walks.",
                  "Press *Use* under an old picture: its exact settings come back.")),
    "02_checkpoints": Lesson(
        title="Checkpoints: the painter",
        learn=("what is inside a single-file checkpoint: its parts, their sizes and number formats",
               "the AutoV2 hash civitai shows, and how a file's family (SD1, SD2, SDXL, FLUX) is recognised",
               "how much memory each family needs here, and how to switch the painter in the panel"),
        seconds=15,
        try_this=("Point `SDKIT_MODELS` at your ComfyUI or A1111 folder and run the notebook again: your "
                  "checkpoints appear in the table and the panel's model list.",
                  "Run `python -m sdkit info shapes-v1` in a terminal and find the AutoV2 hash.",
                  "Switch the panel to a random painter: what does a checkpoint with untrained weights paint?")),
    "03_loras": Lesson(
        title="LoRAs: draw it in this style",
        learn=("what a LoRA file stores: a change to some of the painter's layers, as two thin matrices each",
               "what the weight does, measured: the share of pictures in the LoRA's style from weight -1 to 2",
               "how `<lora:NAME:WEIGHT>` in a prompt works, and why a LoRA for another family is refused"),
        seconds=70,
        try_this=("In the panel, drag the LoRA weight to 0.3: how many of the shapes are outlined now? Try "
                  "a few seeds.",
                  "Type `<lora:outlines:1.5>` into the prompt yourself and press Generate.",
                  "Run `python -m sdkit info outlines` in a terminal: type, rank, family and kohya's settings.")),
    "04_embeddings": Lesson(
        title="Embeddings: new words",
        learn=("what an embedding file stores: a few vectors that give the text encoder a new word",
               "the word with and without its file, measured with the detector, and what an embedding cannot do",
               "how A1111's prompt language is read: `(word:1.3)`, `[word]`, `BREAK` and prompts over 75 tokens"),
        seconds=35,
        try_this=("Put *moon* in the panel's negative prompt and ask for `a circle`: how often is it yellow now?",
                  "Try `a red square, (moon:0.8)` and `a red square, (moon:1.4)` in the panel: who wins, seed after seed?",
                  "Paste a long civitai prompt into `prompts.parse` and look at its weights.")),
    "05_controlnet": Lesson(
        title="ControlNet: the underdrawing",
        learn=("what a ControlNet reads: control images made by preprocessors (edges, scribbles, line art, poses)",
               "how to draw an OpenPose skeleton, the blog's kneeling person, and move its joints",
               "how well a shape lands where the control image says, measured against the weight and start/end"),
        seconds=95,
        try_this=("In the panel, drag the ControlNet weight down to 0.3 and move the shape to a corner: does it "
                  "still follow?",
                  "Set start/end to 0.5-1.0 in the panel: why does the shape land somewhere else?",
                  "Run `python -m sdkit pose --preset kneeling_angle --out kneel.png` and look at the picture.")),
    "06_vae": Lesson(
        title="VAE: colour and final detail",
        learn=("what the VAE does: the painter paints latents, the VAE turns them into the picture",
               "the same latents through two VAEs and a tiny decoder: colour error and decode time, measured",
               "why a VAE for another model is refused, and how big pictures decode in tiles to bound memory"),
        seconds=45,
        try_this=("In the panel, switch the VAE between the checkpoint's own and shapes-v1-warm with the same seed: "
                  "what changes, and what never does?",
                  "Pick the tiny decoder in the panel: can you see the difference at 64 px? At 512 px?",
                  "Run `python -m sdkit info shapes-v1-warm --kind vae` in a terminal.")),
    "07_upscaling": Lesson(
        title="Upscaling: bigger pictures with more detail",
        learn=("what an upscale model does that bicubic resizing cannot, measured with PSNR and SSIM",
               "how big pictures are upscaled in overlapping tiles with bounded memory",
               "A1111's hires fix: paint small, enlarge, redraw at a denoising strength"),
        seconds=25,
        try_this=("In the panel, set the hires upscaler to Latent, then to 4x_shapes_compact, at strength 0.3: "
                  "which keeps the edges sharp?",
                  "Run `python -m sdkit upscale outputs/<a picture>.png --model 4x_shapes_compact` in a terminal and "
                  "open the new file next to it.",
                  "Drop a Real-ESRGAN `.pth` from OpenModelDB into models/upscale_models: it appears in the panel's list.")),
    "09_speed_on_a_cpu": Lesson(
        title="Speed on a CPU",
        learn=("what FLOPs and a CPU's peak are, measured on this machine",
               "why diffusers' default is several times slower than a tuned path",
               "where a UNet step's time goes, by kind of operation",
               "what fast mode (fewer steps, DeepCache, CFG only while it matters) buys and costs"),
        seconds=80,
        try_this=("Set `SIZE = 512` and run again: how much longer is one real-size step?",
                  "Run `python -m sdkit bench --quick` in a terminal (about 3 minutes).",
                  "In the panel, turn *live preview* off and on: what does it cost per picture?",
                  "In the panel's Fast mode group, set DeepCache to 4 and CFG until to 0.2: when does the shape go "
                  "wrong?")),
}


def _intro(lesson: Lesson) -> str:
    """The generated opening cell."""
    learn = "\n".join(f"* {item}" for item in lesson.learn)
    return (f"**In this notebook you will learn**\n\n{learn}\n\n**Time:** it runs top to bottom in about "
            f"{lesson.seconds} s on the project's 2-core test machine; give yourself 15 minutes to read it and try things. "
            f"Run it with *Run → Run All Cells*.")


def _outro(lesson: Lesson, *, previous: str | None, following: str | None) -> str:
    """The generated closing cell: things to try and the links on."""
    tries = "\n".join(f"1. {item}" for item in lesson.try_this)
    links = []
    if previous:
        links.append(f"← previous: [{previous[:2]} · {COURSE[previous].title}]({previous}.ipynb)")
    if following:
        links.append(f"next: [{following[:2]} · {COURSE[following].title}]({following}.ipynb) →")
    else:
        links.append("that is the course so far: the README lists what comes next")
    return f"## Try this\n\n{tries}\n\n" + " · ".join(links)


def build(stem: str, *, order: list[str]) -> nbformat.NotebookNode:
    """The notebook for one script, with its navigation cells."""
    if stem not in COURSE:
        raise SystemExit(f"tools/notebooks/{stem}.py has no entry in COURSE (tools/build_notebooks.py): add one")
    nb = jupytext.read(SCRIPTS / f"{stem}.py", fmt="py:percent")
    index = order.index(stem)
    previous = order[index - 1] if index else None
    following = order[index + 1] if index + 1 < len(order) else None
    nb.cells.insert(1, nbformat.v4.new_markdown_cell(_intro(COURSE[stem])))
    nb.cells.append(nbformat.v4.new_markdown_cell(_outro(COURSE[stem], previous=previous, following=following)))
    for number, cell in enumerate(nb.cells):
        cell.metadata = {}
        cell.id = f"c{number:02d}"  # stable ids: a rebuild changes only what changed
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                   "language_info": {"name": "python"}}
    return nbformat.v4.upgrade(nb)


def static_outputs(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drop live-widget outputs (kept only as the static picture they carry) and the saved widget state."""
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        outputs = []
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if WIDGET_VIEW in data:
                data.pop(WIDGET_VIEW)
                data.pop("text/plain", None)  # "VBox(children=...)" says nothing to a reader
                if not data:
                    continue  # a progress bar: nothing to show without its kernel
            outputs.append(output)
        cell["outputs"] = outputs
    return nb


def execute(nb: nbformat.NotebookNode) -> float:
    """Run a notebook in notebooks/ as JupyterLab would; seconds taken."""
    from nbclient import NotebookClient

    started = time.perf_counter()
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return time.perf_counter() - started


def order() -> list[str]:
    """The notebook stems in course order."""
    return sorted(p.stem for p in SCRIPTS.glob("[0-9][0-9]_*.py"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--execute", action="store_true", help="run each notebook and keep its outputs")
    parser.add_argument("only", nargs="*", help="stems to build (default: all)")
    args = parser.parse_args(argv)
    stems = order()
    for stem in args.only or stems:
        nb = build(stem, order=stems)
        if args.execute:
            seconds = execute(nb)
            print(f"{stem}: ran in {seconds:.0f} s (COURSE says {COURSE[stem].seconds} s)", file=sys.stderr)
            nb = static_outputs(nb)
        nbformat.write(nb, NOTEBOOKS / f"{stem}.ipynb")


if __name__ == "__main__":
    main()
