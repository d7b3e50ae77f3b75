# %% [markdown]
# # 05 · ControlNet: the underdrawing
#
# The prompt says *what*; it is bad at saying *where*. "A kneeling person, the left knee forward, the body turned a
# little" is a paragraph the painter half-ignores. A **ControlNet** takes a second input, a **control image**: the
# edges of a photo, a scribble, a depth map, or a stick-figure skeleton. It is a copy of the painter's first half
# that reads the control image and nudges every step toward it. The blog's example: draw the skeleton of a kneeling
# person, upright or at an angle, and the painter draws what the sketch says.
#
# The course's ControlNet is **shapes-v1-layout**, trained by the project for the shapes world: its control image
# says where the shape goes and how big it is (its edges, or a filled blob), and the prompt still says the colour.

# %%
# Setup
import tempfile
from pathlib import Path

from IPython.display import Markdown, display
from PIL import Image

from sdkit import checkpoints, controlnet, plots, pose, preprocess, widgets
from sdkit.errors import SdkitError
from sdkit.generate import GenerationSettings, generate
from sdkit.shapes import data
from sdkit.shapes.controls import LayoutEditor, control_image
from sdkit.shapes.placement import disagreement, held_out, iou, placement
from sdkit.shapes.detect import shape_mask

# %%
# Parameters
MODEL = "shapes-v1"
CONTROLNET = "shapes-v1-layout"               # a name from models/controlnet
SAMPLES = 16                                  # held-out layouts to measure placement on (the model card: 32)
WEIGHTS = (0.0, 0.5, 1.0)                     # ControlNet weights to measure (0 = without it)
STEPS = 20

# %%
pipe = checkpoints.load(MODEL)
net = controlnet.load(CONTROLNET, pipe=pipe)
print(controlnet.describe(net))

# %% [markdown]
# ## 1. Control images: what a ControlNet reads
#
# A ControlNet learned one kind of picture: **white lines or regions on black**. A *preprocessor* turns your picture
# into that kind: **canny** finds edges, **scribble** turns dark strokes into white ones, **lineart** inverts black
# line art. They run here with OpenCV, offline, in milliseconds. (Depth maps and pose detection from a photo need
# model files of their own; see the end of this notebook.)

# %%
photo = data.draw(data.ShapeSpec(shape="triangle", colour="blue", background="white", size=0.6, cx=0.4, cy=0.55),
                  size=256)
doodle = Image.new("RGB", (256, 256), "white")
from PIL import ImageDraw  # noqa: E402

ImageDraw.Draw(doodle).ellipse((60, 40, 200, 170), outline="black", width=10)
plots.grid([photo, preprocess.run("canny", photo), doodle, preprocess.run("scribble", doodle),
            preprocess.run("lineart", doodle)],
           labels=["a picture", "canny edges", "a doodle", "scribble", "lineart (inverted)"], cols=5, size=1.8)

# %% [markdown]
# The control image is then fitted to the picture's size, in one of A1111's three ways: **just resize** stretches,
# **crop and resize** fills the frame and cuts the middle out, **resize and fill** fits it and pads with black
# (which a ControlNet reads as "nothing here").

# %%
wide = preprocess.run("canny", data.draw(data.ShapeSpec("circle", "red", "white", 0.8, 0.5, 0.5), size=128)).resize((256, 128))
plots.grid([wide] + [preprocess.resize(wide, width=128, height=128, mode=m) for m in preprocess.RESIZE_MODES],
           labels=["2:1 control image"] + list(preprocess.RESIZE_MODES), cols=4, size=1.8)

# %% [markdown]
# ## 2. Poses: the blog's kneeling person
#
# OpenPose ControlNets read a stick figure of 18 joints, each limb in a fixed colour: the colours tell the model
# which limb is which (red-orange shoulders, green right leg, blue left leg, ...). `sdkit.pose` draws them exactly
# as the annotator they were trained on does, from presets you can move joint by joint. The blog's two kneeling
# variants are presets:

# %%
names = ("standing", "kneeling", "kneeling_angle", "sitting", "arms_up")
plots.grid([pose.draw(pose.preset(n), width=256, height=256) for n in names], labels=names, cols=5, size=1.8)

# %% [markdown]
# Move a joint: pick it, drag its x and y. Try the right wrist up to the face, or the left knee further forward.
# The skeleton saves as OpenPose JSON, which pose editors exchange, and `python -m sdkit pose --preset kneeling
# --out kneel.png` writes the same picture from a terminal. (shapes-v1 cannot paint people: with an SD1.5
# checkpoint and `control_v11p_sd15_openpose` in your models folder, this is the skeleton to give it.)

# %%
editor = pose.Editor(start="kneeling", px=192)
saved = pose.save_json(editor.pose, Path(tempfile.mkdtemp()) / "kneel.json", width=512, height=512)
print("saved", saved.name, "with", sum(p is not None for p in pose.load_json(saved)[0].points), "joints")
editor.widget

# %% [markdown]
# ## 3. The shapes ControlNet follows a layout
#
# Four layouts the model never saw in training, each as a control image, each prompt naming the colour and shape.
# Without the ControlNet the shape lands where its seed puts it; with it, where the control image says.

# %%
samples = held_out(4)
row = []
for seed, sample in enumerate(samples):
    settings = GenerationSettings(prompt=sample.prompt(), seed=seed, steps=STEPS, width=64, height=64)
    unit = controlnet.Unit(model=CONTROLNET, picture=sample.control())
    row += [sample.control(), generate(pipe, settings, progress=False)[0],
            generate(pipe, settings.replace(controlnets=(unit,)), progress=False)[0]]
plots.grid(row, labels=["control", "without", "with ControlNet"] * 4, cols=6, size=1.4)

# %% [markdown]
# ## 4. Measured: how well does the shape land where it is told?
#
# **Placement IoU**: the overlap of the region the control image marks and the shape the detector finds, divided by
# their union (1 = exactly there, 0 = elsewhere), averaged over held-out layouts at random positions and sizes.
# Weight 0 is the model without the ControlNet. (Shapes here are big, so even a shape in the wrong place overlaps
# the right one a little: that is the 0.4 or so without it.)

# %%
scores = placement(pipe, model=CONTROLNET, weights=WEIGHTS, count=SAMPLES, steps=STEPS, progress=False)
display(Markdown("| ControlNet weight | placement IoU |\n|---|---|\n" +
                 "\n".join(f"| {w:g} | {s:.2f} |" for w, s in scores.items())))
plots.sweep(list(scores), {"placement IoU": list(scores.values())}, xlabel="ControlNet weight",
            ylabel="mean IoU", title=f"{SAMPLES} held-out layouts, {STEPS} steps")

# %% [markdown]
# The model card measured the same on 32 layouts, from weight 0 to 1.5 (`python -m sdkit.shapes.controls card`):

# %%
card = (net.path.with_suffix(".md")).read_text()
display(Markdown(card[card.index("| ControlNet weight"):card.index("Weight 0 is")]))

# %% [markdown]
# **Start and end.** A ControlNet can be on for part of the steps only (A1111's *Guidance Start/End*). Where a
# shape goes is decided in the first, noisiest steps, so a ControlNet that starts late hardly moves it, and one that
# stops early still does most of the work:

# %%
late = placement(pipe, model=CONTROLNET, weights=(1.0,), count=8, steps=STEPS, start=0.5, progress=False)[1.0]
early = placement(pipe, model=CONTROLNET, weights=(1.0,), count=8, steps=STEPS, end=0.3, progress=False)[1.0]
print(f"on for the second half only (start 0.5): IoU {late:.2f}; on for the first 30% only (end 0.3): {early:.2f}")

# %% [markdown]
# ## 5. When the prompt and the control image disagree
#
# The prompt asks for a *square*, the control image draws a *circle*. Who wins? Measured on 8 layouts, the
# prompt naming the next shape over:

# %%
fight = disagreement(pipe, model=CONTROLNET, count=8, steps=STEPS, progress=False)
print(f"shows the control image's shape: {fight['control']:.0%}, the prompt's: {fight['prompt']:.0%}, "
      f"neither: {fight['neither']:.0%}; placement IoU {fight['iou']:.2f}")
sample = held_out(1)[0]
asked = data.SHAPES[(data.SHAPES.index(sample.spec.shape) + 1) % 3]
settings = GenerationSettings(prompt=f"a red {asked} on a white background", seed=0, steps=STEPS, width=64, height=64)
picture = generate(pipe, settings.replace(controlnets=(controlnet.Unit(model=CONTROLNET, picture=sample.control()),)),
                   progress=False)[0]
plots.grid([sample.control(), picture], labels=[f"control: a {sample.spec.shape}", f"prompt: a red {asked}"], cols=2,
           size=1.8)

# %% [markdown]
# On the model card's 16 layouts the prompt decided the *shape* every time, and the control image still decided
# *where* (placement IoU 0.59, against 0.42 with no ControlNet). This ControlNet learned the layout, not the
# outline: the prompt says what, the control image says where. Real canny or pose ControlNets follow their lines
# much more closely, because their training pictures always matched their control images line for line.

# %% [markdown]
# ## 6. The wrong ControlNet is refused
#
# A ControlNet is half a painter: it only fits the family it was made from (SD1.5, SD2 and SDXL each have their
# own). Given to another painter, it is refused before anything is drawn, naming both. Here the shapes ControlNet
# meets a tiny random SD1-architecture painter:

# %%
from sdkit.testing import write_tiny  # noqa: E402

tiny = Path(tempfile.mkdtemp()) / "tiny-sd1.safetensors"
write_tiny("sd1", tiny)
other = checkpoints.load(tiny)
try:
    controlnet.load(CONTROLNET, pipe=other)
except SdkitError as error:
    print(error)
pipe = checkpoints.load(MODEL)  # back to the shapes painter

# %% [markdown]
# Preprocessors that need weights say which file is missing and where it goes:

# %%
for name in ("depth", "openpose"):
    try:
        preprocess.run(name, photo)
    except SdkitError as error:
        print(f"{name}: {error}\n")

# %% [markdown]
# ## 7. Now try it yourself
#
# The panel's **ControlNet** group: move the shape with the x, y and size sliders, switch between edges and a
# blob, drag the **weight** and the **start/end** range, and change the colour in the prompt.

# %%
editor = LayoutEditor(shape="square", cx=0.65, cy=0.35, size=0.4)
unit = controlnet.Unit(model=CONTROLNET, picture=editor.picture())  # the panel starts from these settings
start = GenerationSettings(prompt="a yellow square on a black background", seed=5, steps=STEPS, width=64, height=64,
                           controlnets=(unit,))
panel = widgets.Panel(MODEL, settings=start, groups=[controlnet.control_group(source=editor, model=CONTROLNET)])
panel.generate(wait=True)
print("placement IoU of this picture:", round(iou(data.mask(editor.spec()) >= 128, shape_mask(panel.gallery[0].image)), 2))
panel

# %% [markdown]
# ## What to take away
#
# * A ControlNet reads a control image (edges, a scribble, a depth map, a pose skeleton) and makes the painter
#   follow its layout; the prompt still decides the rest.
# * Measured here: placement IoU against the ControlNet's weight, its start/end, and what wins when prompt and
#   control image disagree.
# * `python -m sdkit generate --controlnet NAME:WEIGHT:START:END --control-image FILE --preprocess canny` does the
#   same from a terminal, and the PNG records the unit as A1111 writes it.
