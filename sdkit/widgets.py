"""The panel: controls built from GenerationSettings, Generate/Cancel off the main thread, live preview, a gallery,
and the control groups that lessons (LoRAs, embeddings, VAE, ControlNet, upscalers) plug in.

    panel = widgets.Panel("shapes-v1")            # display it as a cell's last line
    panel = widgets.Panel("shapes-v1", groups=[compare.CompareGroup()])

A lesson adds its controls by subclassing `ControlGroup` (below); nothing here changes for a new concept.
"""

from __future__ import annotations

import html
import io
import random
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import ipywidgets as w
from PIL import Image

from sdkit.errors import SdkitError
from sdkit.generate import Cancelled, GenerationSettings, sampler_names

DEBOUNCE_S = 0.1  # auto-run waits this long after the last change: a burst of changes makes one run
GALLERY_SIZE = 8
PREVIEW_EVERY_S = 0.15  # at most ~7 previews a second: each costs a PNG encode and a message to the browser
DISPLAY_PX = 256  # the main image is shown at least this wide (shapes-world pictures are 64 px)


# --- the extension point ---------------------------------------------------------------------------


class ControlGroup:
    """A lesson's controls in the panel: subclass it, build the widgets, and say what they do to a run.

    The panel shows `widgets` under `title` and re-renders (with auto-run on) when one of them changes. For every
    run it calls, in order: `update(settings)` to write this group's part of the settings; `variants(settings)` to
    turn one run into several (a side-by-side comparison); `prepare(pipe, settings)`, in the worker thread, before
    each image (load a LoRA, swap a VAE); and `compose(images, settings)` to make the picture shown. "Use these
    settings" calls `show(settings)` to put an earlier image's values back into the controls, and so does a panel
    built with settings (one built without them leaves each group as it was made).
    """

    title: str = ""
    widgets: list[w.Widget]  # set by the subclass, usually in __init__

    def update(self, settings: GenerationSettings) -> GenerationSettings:
        """settings with this group's part written in (fields or `extra`)."""
        return settings

    def variants(self, settings: GenerationSettings) -> list[GenerationSettings]:
        """The runs one press of Generate makes; most groups leave it at one."""
        return [settings]

    def prepare(self, pipe, settings: GenerationSettings) -> None:
        """Apply this group to the pipeline before an image is made (runs in the worker thread)."""

    def compose(self, images: list[Image.Image], settings: list[GenerationSettings]) -> Image.Image | None:
        """The picture to show for a run of several images, or None to leave it to another group (or the last image)."""
        return None

    def show(self, settings: GenerationSettings) -> None:
        """Set this group's controls from settings (an earlier image's)."""


# --- which control shows which field ---------------------------------------------------------------


@dataclass(frozen=True)
class Ranges:
    """Sensible slider ranges for one model family, and whether moving a slider re-renders by itself."""

    size: tuple[int, int, int]  # min, max, step
    steps: tuple[int, int] = (1, 150)  # A1111's range
    cfg: tuple[float, float, float] = (1.0, 20.0, 0.5)
    auto_run: bool = False  # on only where a run takes well under a second


RANGES: dict[str, Ranges] = {
    "shapes": Ranges(size=(32, 128, 8), auto_run=True),
    "sd1": Ranges(size=(256, 1024, 64)),
    "sd2": Ranges(size=(256, 1024, 64)),
    "sdxl": Ranges(size=(512, 2048, 64)),
}


def _sampler_options() -> list[tuple[str, str]]:
    """(A1111's name, sdkit's name) for each sampler; the Karras variants are the Schedule control's job."""
    from sdkit.metadata import A1111_SAMPLER_NAMES

    return [(A1111_SAMPLER_NAMES.get(n, n), n) for n in sampler_names() if not n.endswith("_karras")]


def _schedule_options() -> list[tuple[str, str]]:
    """(A1111's name, sdkit's name) for each schedule type generate() runs."""
    from sdkit.generate import SCHEDULES
    from sdkit.metadata import SCHEDULE_NAMES

    return [(SCHEDULE_NAMES.get(n, "Automatic"), n) for n in SCHEDULES]


LABEL = {"description_width": "72px"}
COLUMN_PX = 540  # the controls' column; the picture sits to its right (below it on a narrow screen)


def _slider(cls, description: str, low, high, step=1) -> w.Widget:
    return cls(description=description, min=low, max=high, step=step, continuous_update=False,
               style=LABEL, layout=w.Layout(width="100%"))


# GenerationSettings field -> the control that shows it: the one place where a field meets a widget.
CONTROLS: dict[str, Callable[[Ranges], w.ValueWidget]] = {
    "model": lambda r: w.Dropdown(description="Model", options=[], style=LABEL, layout=w.Layout(width="100%")),
    "prompt": lambda r: w.Textarea(description="Prompt", rows=2, continuous_update=False, style=LABEL,
                                   placeholder="say exactly what you want", layout=w.Layout(width="100%")),
    "negative_prompt": lambda r: w.Textarea(description="Negative", rows=1, continuous_update=False, style=LABEL,
                                            placeholder="what you do not want", layout=w.Layout(width="100%")),
    "seed": lambda r: w.BoundedIntText(description="Seed", min=-1, max=2**32 - 1, continuous_update=False,
                                       style=LABEL, layout=w.Layout(width="200px")),
    "steps": lambda r: _slider(w.IntSlider, "Steps", *r.steps),
    "cfg": lambda r: _slider(w.FloatSlider, "CFG", *r.cfg),
    "sampler": lambda r: w.Dropdown(description="Sampler", options=_sampler_options(), style=LABEL,
                                    layout=w.Layout(width="50%")),
    "scheduler": lambda r: w.Dropdown(description="Schedule", options=_schedule_options(), style=LABEL,
                                      layout=w.Layout(width="50%")),
    "width": lambda r: _slider(w.IntSlider, "Width", *r.size),
    "height": lambda r: _slider(w.IntSlider, "Height", *r.size),
    "clip_skip": lambda r: _slider(w.IntSlider, "CLIP skip", 1, 4),
}
# batch_size and extra have no control: the gallery collects images one run at a time, groups write `extra`.


def _apply_ranges(controls: dict[str, w.Widget], ranges: Ranges) -> None:
    """Give the size/steps/CFG sliders a family's ranges."""
    for name, (low, high, *step) in (("width", ranges.size), ("height", ranges.size), ("steps", ranges.steps),
                                     ("cfg", ranges.cfg)):
        control = controls[name]
        control.min, control.max = min(low, control.min), max(high, control.max)  # never an empty range in between
        control.min, control.max = low, high
        if step:
            control.step = step[0]


def png(image: Image.Image, *, min_px: int = 0) -> bytes:
    """image as PNG bytes, scaled up by a whole factor (pixels stay sharp) to at least min_px wide."""
    factor = max(1, -(-min_px // image.width)) if min_px else 1
    if factor > 1:
        image = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def one_line(error: BaseException) -> str:
    """The message a learner sees for an error: an SdkitError's message and fix, or one line for anything else."""
    if isinstance(error, SdkitError):
        return f"{error.message} Fix: {error.fix}" if error.fix else error.message
    first = (str(error).strip().splitlines() or [""])[0]
    return (f"{type(error).__name__}: {first[:300]} (unexpected: the panel still works; panel.last_error has the "
            f"details for a bug report)")


@dataclass
class Shot:
    """One image in the gallery, with exactly what made it."""

    image: Image.Image
    settings: GenerationSettings
    parameters: str
    model_hash: str
    thumbnail: w.Widget | None = None


# --- the panel -------------------------------------------------------------------------------------


@dataclass
class Job:
    """One request to the worker: the runs to make (none: just load the model), and its own cancel flag."""

    runs: list[GenerationSettings]
    model: str
    preview: bool
    requested: float
    cancel: threading.Event = field(default_factory=threading.Event)


class Panel:
    """Prompt, seed, sliders, Generate/Cancel, progress, live preview and a gallery, for one model at a time.

    The model is loaded by name through `checkpoints.load` (which keeps one pipeline in memory), so a panel never
    holds a second copy; a pipeline passed in is used as the model dropdown's first entry.
    """

    def __init__(self, model="shapes-v1", *, groups: list[ControlGroup] = (), settings: GenerationSettings | None = None,
                 root: str | Path | None = None, auto_run: bool | None = None, preview: bool = True,
                 out_dir: str | Path = "outputs") -> None:
        from sdkit.paths import ModelPaths

        self.groups = list(groups)
        self.root, self.out_dir = root, Path(out_dir)
        self.family = "sd1"
        self.gallery: list[Shot] = []
        self.last_error: str = ""  # the full traceback of the last unexpected error
        self.last_shown_at = 0.0  # perf_counter() when the last finished image was put on screen
        self.runs_done = 0  # finished runs, numbered in the status so two runs with the same timing read apart
        self._given: tuple[str, object] | None = None  # (dropdown entry, pipeline) for a pipeline passed in
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: Job | None = None
        self._current: Job | None = None
        self._worker: threading.Thread | None = None
        self._timer: threading.Timer | None = None
        self._idle = threading.Event()
        self._idle.set()
        self._quiet = 0  # >0 while the panel itself sets controls: no auto-run for those changes

        self.controls = {name: make(RANGES["sd1"]) for name, make in CONTROLS.items()}
        names = ModelPaths.from_root(root).list("checkpoints")
        if not isinstance(model, (str, Path)):  # a pipeline loaded by the caller
            info = getattr(model, "sdkit", None)
            entry = f"{info.name} (loaded)" if info else "(in memory)"
            self._given = (entry, model)
            names = [entry] + names
            model = entry
        else:
            model = next((n for n in names if Path(n).stem == Path(model).stem), str(model))
            names = names if model in names else [model] + names
        self.controls["model"].options = names
        self.auto_run = w.Checkbox(description="auto-run", indent=False, layout=w.Layout(width="100px"),
                                   tooltip="re-render by itself when a control changes")
        self.preview = w.Checkbox(value=preview, description="live preview", indent=False,
                                  layout=w.Layout(width="120px"), tooltip="show the picture while it denoises")
        self.dice = w.Button(description="", icon="random", tooltip="a new random seed", layout=w.Layout(width="40px"))
        self.seed_used = w.HTML()
        self.generate_button = w.Button(description="Generate", button_style="primary", icon="play")
        self.cancel_button = w.Button(description="Cancel", icon="stop", disabled=True)
        self.progress = w.IntProgress(value=0, min=0, max=1, layout=w.Layout(width="160px"))
        self.progress_text = w.Label("")
        self.status = w.HTML("")
        self.image = w.Image(format="png", layout=w.Layout(width=f"{DISPLAY_PX}px", max_width="100%",
                                                           object_fit="contain"))
        self.gallery_box = w.HBox(layout=w.Layout(flex_flow="row wrap"))
        self._classes()

        self._quiet += 1
        self.controls["model"].value = model
        self._set_model_controls(self._family_of(model) or "sd1")
        self.show(settings or GenerationSettings(prompt="a red circle on a white background", steps=20, seed=1,
                                                 width=self.controls["width"].value,
                                                 height=self.controls["height"].value),
                  groups=settings is not None)  # without settings, each group keeps the state it was built with
        if auto_run is not None:
            self.auto_run.value = auto_run
        self._quiet -= 1

        self.dice.on_click(lambda _: setattr(self.controls["seed"], "value", random.randrange(2**32)))
        self.generate_button.on_click(lambda _: self.generate())
        self.cancel_button.on_click(lambda _: self.cancel())
        for name, control in self.controls.items():
            control.observe(self._model_changed if name == "model" else self._changed, names="value")
        for control in _value_widgets([c for g in self.groups for c in g.widgets]):
            control.observe(self._changed, names="value")
        self.box = self._layout()

    # --- building -----------------------------------------------------------------------------------

    def _classes(self) -> None:
        """CSS classes, so a browser test (or a stylesheet) finds each part."""
        for name, control in self.controls.items():
            control.add_class(f"sdkit-{name.replace('_', '-')}")
        for name in ("auto_run", "preview", "dice", "seed_used", "generate_button", "cancel_button", "progress",
                     "progress_text", "status", "image", "gallery_box"):
            getattr(self, name).add_class("sdkit-" + name.replace("_button", "").replace("_box", "").replace("_", "-"))

    def _layout(self) -> w.VBox:
        """The controls in the order a learner reads them, the picture beside them, the gallery below."""
        c = self.controls
        rows = [c["model"], w.HBox([self.auto_run, self.preview]), c["prompt"], c["negative_prompt"],
                w.HBox([c["seed"], self.dice, self.seed_used]), c["steps"], c["cfg"],
                w.HBox([c["sampler"], c["scheduler"]]), c["width"], c["height"], c["clip_skip"]]
        if self.groups:
            extras = w.Accordion(children=[w.VBox(g.widgets) for g in self.groups],
                                 titles=tuple(g.title or type(g).__name__ for g in self.groups))
            rows.append(extras)
        rows += [w.HBox([self.generate_button, self.cancel_button]), w.HBox([self.progress, self.progress_text]),
                 self.status]
        controls = w.VBox(rows, layout=w.Layout(width=f"{COLUMN_PX}px", margin="0 16px 0 0"))
        top = w.HBox([controls, self.image], layout=w.Layout(flex_flow="row wrap", align_items="flex-start"))
        box = w.VBox([top, w.HTML("<b>Gallery</b> (newest first)"), self.gallery_box])
        box.add_class("sdkit-panel")
        return box

    def _repr_mimebundle_(self, **kwargs):
        """Show the panel when it is a cell's value; a saved notebook read on the web shows the last picture."""
        import base64

        bundle = self.box._repr_mimebundle_(**kwargs)
        picture = ""
        if self.gallery:
            shot = self.gallery[0]
            data = base64.b64encode(png(shot.image, min_px=DISPLAY_PX)).decode()
            picture = (f"<img src='data:image/png;base64,{data}'/><pre style='white-space:pre-wrap'>"
                       f"{html.escape(shot.parameters)}</pre>")
        bundle["text/html"] = f"<p><i>The sdkit panel: run this notebook in JupyterLab to use it.</i></p>{picture}"
        return bundle

    # --- settings in and out ------------------------------------------------------------------------

    def settings(self) -> GenerationSettings:
        """The settings the controls show now, with every group's part written in."""
        values = {name: control.value for name, control in self.controls.items()}
        values["model"] = Path(str(values["model"] or "").removesuffix(" (loaded)")).stem
        settings = GenerationSettings(**values)
        for group in self.groups:
            settings = group.update(settings)
        return settings

    def runs(self) -> list[GenerationSettings]:
        """The runs one press of Generate makes now (groups may make several), each checked."""
        from sdkit.generate import check_sampler

        runs = [self.settings()]
        for group in self.groups:
            runs = [variant for run in runs for variant in group.variants(run)]
        for run in runs:
            run.check()
            check_sampler(run)
        return runs

    def show(self, settings: GenerationSettings, *, groups: bool = True) -> None:
        """Put settings into the controls (the gallery's "use these settings"), and into the groups' controls unless
        groups=False; one re-render if auto-run is on."""
        notes = []
        self._quiet += 1
        try:
            wanted = {f.name: getattr(settings, f.name) for f in fields(settings) if f.name in self.controls}
            model = self._option_for(wanted.pop("model"))
            if model and model != self.controls["model"].value:
                self.controls["model"].value = model
                self._set_model_controls(self._family_of(model) or self.family)
            for name, value in wanted.items():
                control = self.controls[name]
                if hasattr(control, "max") and not isinstance(control, w.BoundedIntText):
                    control.max, control.min = max(control.max, value), min(control.min, value)  # reproduce, not clamp
                options = [v for _, v in control.options] if isinstance(control, w.Dropdown) else None
                if options is not None and value not in options:
                    notes.append(f"{name} {value!r} is not offered here; kept {control.value!r}")
                    continue
                control.value = value
            for group in self.groups if groups else ():
                group.show(settings)
        finally:
            self._quiet -= 1
        if notes:
            self.status.value = self._message("; ".join(notes) + ".", "error")
        self._changed(None)

    def _option_for(self, model: str) -> str | None:
        """The model dropdown's entry for a settings' model name (A1111 writes it without folder or extension)."""
        for option in self.controls["model"].options:
            if model and (option == model or Path(option.removesuffix(" (loaded)")).stem == Path(model).stem):
                return option
        return None

    def _family_of(self, entry: str) -> str | None:
        """The family of a dropdown entry, from its tensor names only (no load); None when that can't be told cheaply."""
        from sdkit import formats
        from sdkit.paths import ModelPaths

        if self._given and entry == self._given[0]:
            pipe = self._given[1]
            info = getattr(pipe, "sdkit", None)
            return info.family if info else ("sdxl" if hasattr(pipe, "text_encoder_2") else "sd1")
        try:
            path = ModelPaths.from_root(self.root).find("checkpoints", entry)
            if formats.file_format(path) == "pickle":
                return None  # reading a pickle's names means reading all of it: the load will tell
            specs, metadata = formats.read_specs(path)
            return formats.detect_family(specs, metadata)
        except SdkitError:
            return None  # the load will say what is wrong with the file

    def _set_model_controls(self, family: str) -> None:
        """Ranges, native size and auto-run default for a model family."""
        from sdkit.formats import NATIVE_SIZE

        ranges = RANGES.get(family, RANGES["sd1"])
        self.family = family
        self._quiet += 1
        try:
            _apply_ranges(self.controls, ranges)
            native = 64 if family == "shapes" else NATIVE_SIZE.get(family, 512)
            self.controls["width"].value = self.controls["height"].value = native
            self.auto_run.value = ranges.auto_run
        finally:
            self._quiet -= 1

    # --- running ------------------------------------------------------------------------------------

    def _changed(self, _change) -> None:
        """A control moved: with auto-run on, one run after the changes stop for DEBOUNCE_S."""
        if self._quiet or not self.auto_run.value:
            return
        with self._lock:
            self._drop_timer()
            self._idle.clear()  # wait() covers the run this change is about to start
            self._timer = threading.Timer(DEBOUNCE_S, self._fire)
            self._timer.daemon = True
            self._timer.start()

    def _fire(self) -> None:
        """The debounce timer ran out: start the run, unless a newer change or a Cancel replaced this timer."""
        with self._lock:
            if self._timer is not threading.current_thread():
                return
        self.generate()

    def _drop_timer(self) -> None:
        """Forget the debounce timer (call with the lock held); a timer already firing sees it is no longer current."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _model_changed(self, change) -> None:
        """Another model picked: its ranges now, its weights loaded in the background (and drawn, with auto-run)."""
        if self._quiet:
            return
        family = self._family_of(change["new"])
        if family:
            self._set_model_controls(family)
        if self.auto_run.value:
            self.generate()
        else:
            self._submit([])

    def generate(self, *, wait: bool = False) -> None:
        """Start a run with the controls' settings; a run in progress is cancelled first (the newest wins)."""
        try:
            runs = self.runs()
        except Exception as error:  # noqa: BLE001 - bad settings (or a group's bug) become one line
            self._report(error)
            with self._lock:
                self._drop_timer()
            self._settle()
            return
        self._submit(runs)
        if wait:
            self.wait()

    def cancel(self) -> None:
        """Stop the run in progress after the step it is on, and drop any queued one; the pipeline stays usable."""
        with self._lock:
            self._pending = None
            self._drop_timer()
            if self._current is not None:
                self._current.cancel.set()
        self._settle()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no run is in progress or due; False if `timeout` seconds passed first.

        While it blocks, the notebook handles no clicks (Cancel included): use it in scripts and tests.
        """
        if threading.current_thread() is self._worker:
            raise SdkitError("panel.wait() was called from the panel's own worker thread; it would never return.",
                             fix="call wait() from the notebook, not from a control group's prepare/compose")
        return self._idle.wait(timeout)

    def _settle(self) -> None:
        """Mark the panel idle if nothing runs or waits to run."""
        with self._lock:
            if self._timer is None and self._pending is None and self._current is None:
                self._idle.set()

    def _submit(self, runs: list[GenerationSettings]) -> None:
        """Queue a job (no runs: just load the chosen model), replacing any queued one; cancel the running one."""
        job = Job(runs=runs, model=self.controls["model"].value, preview=self.preview.value,
                  requested=time.perf_counter())
        with self._lock:
            self._drop_timer()
            self._pending = job
            self._idle.clear()
            if self._current is not None:
                self._current.cancel.set()  # the run in progress stops at its next step
            if self._worker is None:
                # One long-lived thread: a new thread per run would also build a new OpenMP thread team (~0.1 s).
                self._worker = threading.Thread(target=self._work, name="sdkit-panel", daemon=True)
                self._worker.start()
            self._wake.notify()

    def _work(self) -> None:
        """The worker thread: run the newest job, then sleep until the next. Widgets are set, never printed to."""
        while True:
            with self._lock:
                while self._pending is None:
                    if self._timer is None and self._current is None:
                        self._idle.set()
                    self._wake.wait()
                self._current, self._pending = self._pending, None
            try:
                self._run(self._current)
            except BaseException:  # noqa: BLE001 - the worker must outlive anything a run (or a group) throws
                self.last_error = traceback.format_exc()
            finally:
                with self._lock:
                    self._current = None

    def _run(self, job: Job) -> None:
        """Load if needed, then make the images of one job; every outcome ends as one line in the status."""
        self.generate_button.disabled, self.cancel_button.disabled = True, False
        self.progress.bar_style = ""
        started = time.perf_counter()
        try:
            pipe = self._load(job.model)
            if not job.runs:
                self.status.value = self._message(f"{job.model} is loaded.", "info")
                return
            self.status.value = self._message("Running …", "info")
            notes = self._make(pipe, job)
            self.runs_done += 1
            self.status.value = self._message(
                f"Done (run {self.runs_done}) in {time.perf_counter() - started:.2f} s "
                f"({time.perf_counter() - job.requested:.2f} s since the change)."
                + "".join(f" Note: {note.rstrip('.')}." for note in notes), "info")
        except Cancelled:
            self.progress.bar_style = "warning"
            if self._pending is None:  # a newer request replaced this run: its own status follows
                self.status.value = self._message(f"Cancelled after step {self.progress.value} of "
                                                  f"{self.progress.max}; press Generate to run again.", "info")
        except Exception as error:  # noqa: BLE001 - anything from a run becomes one line; the panel keeps working
            self.progress.bar_style = "danger"
            self._report(error)
        finally:
            self.generate_button.disabled, self.cancel_button.disabled = False, True

    def _report(self, error: BaseException) -> None:
        """Show an error as one line; keep the traceback of an unexpected one for a bug report."""
        if not isinstance(error, SdkitError):
            self.last_error = "".join(traceback.format_exception(error))
        self.status.value = self._message(one_line(error), "error")

    def _load(self, entry: str):
        """The pipeline for a dropdown entry: the one passed in, or checkpoints.load's (cached) one."""
        if self._given and entry == self._given[0]:
            return self._given[1]
        from sdkit import checkpoints
        from sdkit.paths import ModelPaths

        path = ModelPaths.from_root(self.root).find("checkpoints", entry)
        if not checkpoints.is_loaded(path):
            self.status.value = self._message(f"Loading {entry} …", "info")
        pipe = checkpoints.load(path, root=self.root)
        if pipe.sdkit.family != self.family:  # a pickle's family is known only now
            self._set_model_controls(pipe.sdkit.family)
        return pipe

    def _make(self, pipe, job: Job) -> list[str]:
        """Generate every run of a job, show the picture and add each image to the gallery; the runs' notes."""
        from sdkit.generate import generate

        total = sum(run.steps for run in job.runs)
        self.progress.max, self.progress.value = total, 0
        self.progress_text.value = f"0/{total}"
        done_before, last_preview, preview = 0, [0.0], [job.preview]

        def on_step(done: int, steps: int, latents, denoised) -> None:
            self.progress.value = done_before + done
            self.progress_text.value = f"{done_before + done}/{total}"
            now = time.perf_counter()
            if preview[0] and done < steps and now - last_preview[0] > PREVIEW_EVERY_S:
                try:
                    from sdkit import preview as previews

                    self._put(previews.show(pipe, latents if denoised is None else denoised))
                except Exception:  # noqa: BLE001 - a preview must never cost the picture
                    self.last_error = traceback.format_exc()
                    preview[0] = False
                last_preview[0] = now

        images, made = [], []
        for run in job.runs:
            for group in self.groups:
                group.prepare(pipe, run)
            image = generate(pipe, run, progress=False, cancel=job.cancel, on_step=on_step)[0]
            done_before += run.steps
            images.append(image)
            made.append(image.sdkit_settings)
        shown = next((p for g in self.groups if (p := g.compose(images, made)) is not None), images[-1])
        self._put(shown)
        self.last_shown_at = time.perf_counter()
        self.progress.value = total
        self.progress_text.value = f"{total}/{total}"
        self.progress.bar_style = "success"
        self.seed_used.value = f"seed used: <b>{made[-1].seed}</b>" if job.runs[-1].seed == -1 else ""
        for image, used in zip(images, made):
            self._add_to_gallery(image, used, model_hash=getattr(getattr(pipe, "sdkit", None), "autov2", ""))
        return sorted({note for image in images for note in getattr(image, "sdkit_notes", [])})

    def _put(self, picture: Image.Image) -> None:
        """Show a picture: small ones scaled up by a whole factor, at most as wide as the notebook."""
        data = png(picture, min_px=DISPLAY_PX)
        width = picture.width * max(1, -(-DISPLAY_PX // picture.width))
        if self.image.layout.width != f"{width}px":
            self.image.layout.width = f"{width}px"
        self.image.value = data

    # --- gallery ------------------------------------------------------------------------------------

    def _add_to_gallery(self, image: Image.Image, settings: GenerationSettings, *, model_hash: str) -> None:
        """Put an image first in the gallery, with its parameters text, Use and Save; the oldest drops out."""
        from sdkit.metadata import format_parameters

        shot = Shot(image=image, settings=settings, model_hash=model_hash,
                    parameters=format_parameters(settings, model_hash=model_hash))
        shot.thumbnail = self._thumbnail(shot)
        dropped = self.gallery[GALLERY_SIZE - 1:]
        self.gallery = [shot] + self.gallery[: GALLERY_SIZE - 1]
        self.gallery_box.children = [s.thumbnail for s in self.gallery]
        for old in dropped:
            _close(old.thumbnail)

    def _thumbnail(self, shot: Shot) -> w.Widget:
        """One gallery entry."""
        small = shot.image.copy()
        small.thumbnail((192, 192))
        picture = w.Image(value=png(small, min_px=96), format="png", layout=w.Layout(width="96px"))
        text = w.HTML(f"<details><summary>seed {shot.settings.seed}</summary><pre style='white-space:pre-wrap;"
                      f"font-size:11px;max-width:230px'>{html.escape(shot.parameters)}</pre></details>")
        use = w.Button(description="Use", tooltip="put these settings back into the controls",
                       layout=w.Layout(width="56px"))
        save = w.Button(description="Save", tooltip=f"save as a numbered PNG with its settings in {self.out_dir}/",
                        layout=w.Layout(width="56px"))
        use.on_click(lambda _: self.show(shot.settings))
        save.on_click(lambda _: self.save(shot))
        use.add_class("sdkit-use")
        save.add_class("sdkit-save")
        item = w.VBox([picture, text, w.HBox([use, save])], layout=w.Layout(margin="0 8px 8px 0"))
        item.add_class("sdkit-gallery-item")
        return item

    def save(self, shot: Shot | None = None) -> Path | None:
        """Save an image (the newest by default) as a numbered PNG with its settings; never overwrites."""
        from sdkit.metadata import save_image

        shot = shot or (self.gallery[0] if self.gallery else None)
        if shot is None:
            self.status.value = self._message("Nothing to save yet.", "error")
            return None
        try:
            path = save_image(shot.image, settings=shot.settings, out_dir=self.out_dir, model_hash=shot.model_hash)
        except (SdkitError, OSError) as error:
            self.status.value = self._message(one_line(error) if isinstance(error, SdkitError) else
                                              f"Could not save into {self.out_dir}: {error}. Fix: choose a folder "
                                              f"you can write to (Panel(out_dir=...)) or free some disk space.",
                                              "error")
            return None
        self.status.value = self._message(f"Saved {path}", "info")
        return path

    @staticmethod
    def _message(text: str, kind: str) -> str:
        """One line of status HTML."""
        colour = {"error": "#b00020", "info": "inherit"}[kind]
        mark = "⚠ " if kind == "error" else ""
        return f"<span class='sdkit-{kind}' style='color:{colour}'>{mark}{html.escape(text)}</span>"


def _value_widgets(widgets: list[w.Widget]) -> list[w.Widget]:
    """Every widget with a value in a tree of boxes."""
    found = []
    for widget in widgets:
        if hasattr(widget, "children"):
            found += _value_widgets(list(widget.children))
        elif hasattr(widget, "value"):
            found.append(widget)
    return found


def _close(widget: w.Widget) -> None:
    """Close a widget and everything in it (frees the browser's copy and the kernel's)."""
    for child in getattr(widget, "children", ()):
        _close(child)
    widget.close()


def panel(model="shapes-v1", **kwargs) -> Panel:
    """A Panel on a model name (from the model folders) or a loaded pipeline."""
    return Panel(model, **kwargs)
