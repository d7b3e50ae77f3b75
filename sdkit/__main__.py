"""CLI: python -m sdkit {device,models,info,generate,upscale,pose,evaluate,bench,params}."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from sdkit.errors import SdkitError


def _device(args: argparse.Namespace) -> None:
    from sdkit.device import report

    if args.measure and report().accelerator != "none":
        print(f"Not measured: sdkit runs on the {report().accelerator} GPU here, whose precision its features decide.",
              file=sys.stderr)
    elif args.measure:
        from sdkit import speed

        if args.measure == "always" or not speed.complete(report()):
            speed.measure(report(), progress=not args.json)
            report.cache_clear()  # the choices now include the measurement
    print(json.dumps(report().to_dict(), indent=2) if args.json else report())


def _models(args: argparse.Namespace) -> None:
    from sdkit.paths import ModelPaths

    registry = ModelPaths.from_root(args.root)
    found = registry.all()
    if args.json:
        print(json.dumps({"roots": [str(r) for r in registry.roots], "models": found}, indent=2))
        return
    print("roots: " + ", ".join(str(r) for r in registry.roots))
    for kind, names in found.items():
        print(f"{kind}: " + (", ".join(names) if names else "(none)"))


def _info(args: argparse.Namespace) -> None:
    from sdkit.formats import info
    from sdkit.paths import ModelPaths

    path = ModelPaths.from_root(args.root).find(args.kind, args.file)
    result = _describe_addon(path, kind=args.kind) or info(path)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for key, value in result.items():
        print(f"{key:<12} {', '.join(value) if isinstance(value, list) else value}")


def _describe_addon(path: Path, *, kind: str) -> dict | None:
    """info for a LoRA or embedding (by its folder, or by what its tensors look like); None for other files."""
    from sdkit import embeddings, formats, loras, upscale, vae

    if kind == "controlnet":
        from sdkit import controlnet

        return controlnet.peek(path)
    if kind == "upscale_models":
        result = upscale.describe(upscale.load(path))
        result["sha256"] = formats.sha256(path)
        return result
    names = list(formats.read_specs(path)[0])
    if kind in ("vae", "vae_approx"):
        result = vae.describe(vae.load(path))
        result["sha256"] = formats.sha256(path)
        return result
    looks_like_lora = any(loras._split(n) for n in names) and not any(n.startswith("model.diffusion_model.") for n in names)
    if kind == "loras" or looks_like_lora:
        result = loras.describe(loras.load(path))
    elif kind == "embeddings" or set(names) <= {"emb_params", "clip_l", "clip_g", "string_to_param.*"}:
        result = embeddings.describe(embeddings.load(path))
    else:
        return None
    result["sha256"] = formats.sha256(path)
    result["autov2"] = result["sha256"][:10]
    return result


def _generate(args: argparse.Namespace) -> None:
    from sdkit.checkpoints import load
    from sdkit.generate import GenerationSettings, check_sampler, generate
    from sdkit.metadata import save_image

    prompt = " ".join([args.prompt] + [f"<lora:{spec}>" for spec in args.lora])  # as A1111 writes them
    settings = GenerationSettings(
        prompt=prompt,
        negative_prompt=args.negative,
        seed=args.seed,
        steps=args.steps,
        cfg=args.cfg,
        sampler=args.sampler,
        width=args.width or 512,
        height=args.height or 512,
        batch_size=args.batch,
        clip_skip=args.clip_skip,
        init_image=args.init_image or "",
        strength=args.strength if args.strength is not None else args.hires_strength,
        hires_scale=args.hires_scale,
        hires_steps=args.hires_steps,
        hires_upscaler=args.hires_upscaler,
        controlnets=_units(args),
    )
    settings.check()  # before a load that can take minutes
    check_sampler(settings)
    from sdkit import upscale
    from sdkit.generate import hires_model_path

    upscaler = None
    if args.upscaler:
        upscaler = upscale.load(args.upscaler, root=args.root)  # a wrong file is refused before the long load
    from sdkit import controlnet

    for unit in settings.controlnets:
        controlnet.peek(unit.model)  # a file that is not a ControlNet is refused before the long load
    if (hires_model := hires_model_path(settings)) is not None:
        upscale.load(hires_model)  # the same for the hires pass's upscale model
    pipe = load(args.model, root=args.root)
    if args.vae:
        from sdkit import vae

        vae.apply(pipe, vae.load(args.vae, root=args.root))
    settings = settings.replace(width=args.width or pipe.sdkit.width, height=args.height or pipe.sdkit.height,
                                model=Path(pipe.sdkit.name).stem)
    for image in generate(pipe, settings, progress=not args.quiet):
        for note in getattr(image, "sdkit_notes", []):
            print(f"note: {note}", file=sys.stderr)
        path = save_image(image, settings=image.sdkit_settings, out_dir=Path(args.out), model_hash=pipe.sdkit.autov2)
        print(path)
        if upscaler is not None:
            notes: list[str] = []
            print(upscale.upscale_file(path, upscaler, progress=not args.quiet, notes=notes))
            for note in notes:
                print(f"note: {note}", file=sys.stderr)


def _units(args: argparse.Namespace) -> tuple:
    """The --controlnet units, each with the --control-image, --preprocess and --resize-mode in the same place (or
    the last one given)."""
    from sdkit import controlnet

    if not args.controlnet:
        if args.control_image:
            raise SdkitError("--control-image needs a --controlnet to read it.", fix="add --controlnet NAME")
        return ()
    if not args.control_image:
        raise SdkitError("--controlnet needs a --control-image (the picture it follows).",
                         fix="add --control-image FILE (e.g. from `python -m sdkit pose --preset kneeling --out pose.png`)")
    pick = lambda values, i, default: values[min(i, len(values) - 1)] if values else default  # noqa: E731
    return tuple(controlnet.parse_spec(spec, image=pick(args.control_image, i, ""),
                                       preprocess=pick(args.preprocess, i, "none"),
                                       resize_mode=pick(args.resize_mode, i, "crop_and_resize"))
                 for i, spec in enumerate(args.controlnet))


def _upscale(args: argparse.Namespace) -> None:
    from sdkit import upscale

    if args.out and len(args.image) > 1:
        raise SdkitError(f"--out names one file, but {len(args.image)} images were given.",
                         fix="leave --out away: each goes next to its image as <image>-<model>.png")
    chosen = upscale.load(args.model, root=args.root)
    for image in args.image:
        notes: list[str] = []
        print(upscale.upscale_file(image, chosen, out=args.out, tile=args.tile, progress=not args.quiet, notes=notes))
        for note in notes:
            print(f"note: {note}", file=sys.stderr)


def _pose(args: argparse.Namespace) -> None:
    from sdkit import pose
    from sdkit.metadata import save_png

    if args.out.suffix.lower() != ".png":
        raise SdkitError(f"{args.out}: the skeleton is written as a PNG.", fix=f"use {args.out.with_suffix('.png').name}")
    bodies = pose.load_json(args.from_json) if args.from_json else [pose.preset(args.preset)]
    print(save_png(pose.draw(bodies, width=args.width, height=args.height), path=args.out, texts={}))
    if args.json:
        print(pose.save_json(bodies, args.json, width=args.width, height=args.height))


def _evaluate(args: argparse.Namespace) -> None:
    from sdkit.checkpoints import load
    from sdkit.shapes.evaluate import evaluate, format_report

    result = evaluate(load(args.model, root=args.root), seeds=args.seeds, vague_seeds=args.vague_seeds,
                      progress=not args.json)
    print(json.dumps(result, indent=2) if args.json else format_report(result))


def _bench(args: argparse.Namespace) -> None:
    if args.peers:
        from sdkit import peers
        from sdkit.paths import ModelPaths

        checkpoint = ModelPaths.from_root(args.root).find("checkpoints", args.checkpoint) if args.checkpoint else None
        engines = [e.strip() for e in args.engines.split(",") if e.strip()] if args.engines else None
        result = peers.run(engines=engines, checkpoint=checkpoint, size=args.size, rounds=args.rounds or 5,
                           progress=not args.json)
        print(json.dumps(result, indent=2) if args.json else peers.format_table(result))
        return
    if args.packing:
        from sdkit.bench import format_packing, packing

        result = packing(size=args.size, rounds=args.rounds or 6, progress=not args.json)
        print(json.dumps(result, indent=2) if args.json else format_packing(result))
        return
    if args.allocator:
        from sdkit.bench import allocator, format_allocator

        result = allocator(size=args.size, rounds=args.rounds or 3, progress=not args.json)
        print(json.dumps(result, indent=2) if args.json else format_allocator(result))
        return
    if args.fast_mode:
        from sdkit.bench import fast_mode, format_fast

        result = fast_mode(size=args.size, repeats=args.rounds or 1, progress=not args.json)
        print(json.dumps(result, indent=2) if args.json else format_fast(result))
        return
    from sdkit.bench import bench, format_table

    result = bench(quick=args.quick, progress=not args.json)
    print(json.dumps(result, indent=2) if args.json else format_table(result))


def _params(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from sdkit.metadata import read_parameters

    settings = read_parameters(Path(args.png))
    if args.json:
        print(json.dumps(asdict(settings), indent=2))
        return
    for key, value in asdict(settings).items():
        print(f"{key:<16} {value}")


def parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m sdkit`."""
    from sdkit.preprocess import ALL_PREPROCESSORS, RESIZE_MODES

    p = argparse.ArgumentParser(prog="python -m sdkit", description="Make AI images without a discrete GPU.")
    p.add_argument("--root", help="models root: a ComfyUI or A1111 install or models folder (default: $SDKIT_MODELS or ./models)")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an unexpected error")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("device", help="what this machine has and which precision each component gets")
    s.add_argument("--json", action="store_true")
    s.add_argument("--measure", nargs="?", const="always", choices=("always", "missing"),
                   help="time each precision and layout, and OpenVINO where installed, here (about a minute) and keep "
                        "the fastest for later runs; 'missing': only when this machine has none yet, or one without a candidate there is now")
    s.set_defaults(run=_device)

    s = sub.add_parser("models", help="list the models in the models folders")
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=_models)

    s = sub.add_parser("info", help="family, format, dtype, size and hashes of a weight file")
    s.add_argument("file", help="a path, or a name in the models folder given by --kind")
    s.add_argument("--kind", default="checkpoints", help="model folder to look the name up in (default: checkpoints)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=_info)

    s = sub.add_parser("generate", help="make images and write them as numbered PNGs with their parameters")
    s.add_argument("--model", required=True, help="checkpoint name in models/checkpoints, or a path")
    s.add_argument("--prompt", required=True)
    s.add_argument("--negative", default="")
    s.add_argument("--seed", type=int, default=0, help="-1 picks a random seed")
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--cfg", type=float, default=7.0)
    s.add_argument("--sampler", default="euler_a")
    s.add_argument("--width", type=int, default=0, help="default: the model's native size")
    s.add_argument("--height", type=int, default=0, help="default: the model's native size")
    s.add_argument("--batch", type=int, default=1, help="N images with seeds seed, seed+1, ...")
    s.add_argument("--clip-skip", type=int, default=1)
    s.add_argument("--lora", action="append", default=[], metavar="NAME[:WEIGHT]",
                   help="apply a LoRA from the loras folder (repeatable); same as <lora:NAME:WEIGHT> in the prompt")
    s.add_argument("--init-image", metavar="FILE", help="img2img: start from this picture (resized to the size)")
    s.add_argument("--strength", type=float, help="img2img denoising strength, 0-1 (A1111's default 0.75)")
    s.add_argument("--hires-scale", type=float, default=1.0, help="hires fix: a second pass this many times larger")
    s.add_argument("--hires-strength", type=float, default=0.75, help="hires fix: its denoising strength")
    s.add_argument("--hires-steps", type=int, default=0, help="hires fix: its steps (0 = as many as --steps)")
    s.add_argument("--hires-upscaler", default="Latent",
                   help="Latent, Latent (nearest), Lanczos, Nearest, or an upscale model's name (upscale_models folder)")
    s.add_argument("--upscaler", metavar="NAME", help="also write each image enlarged by this upscale model "
                   "(upscale_models folder, or a path), as <image>-<model>.png")
    s.add_argument("--vae", metavar="NAME", help="decode with this VAE (or tiny decoder) from the vae folder, or a path")
    s.add_argument("--controlnet", action="append", default=[], metavar="NAME[:WEIGHT[:START:END]]",
                   help="a ControlNet from models/controlnet (repeat for several); START/END: fractions of the steps")
    s.add_argument("--control-image", action="append", default=[], metavar="FILE",
                   help="the picture each --controlnet follows, in the same order (one is shared by all)")
    s.add_argument("--preprocess", action="append", default=[], choices=list(ALL_PREPROCESSORS),
                   help="make the control image from the picture first (default none: it is one already)")
    s.add_argument("--resize-mode", action="append", default=[], choices=list(RESIZE_MODES),
                   help="how the control image meets the size (default crop_and_resize, as A1111)")
    s.add_argument("--out", default="outputs")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(run=_generate)

    s = sub.add_parser("upscale", help="enlarge images with an upscale model into new PNGs (never overwrites)")
    s.add_argument("image", nargs="+", help="PNG or JPEG files")
    s.add_argument("--model", required=True, help="upscale model name in models/upscale_models, or a path")
    s.add_argument("--out", help="output file (one image only); default <image>-<model>.png next to it")
    s.add_argument("--tile", type=int, default=512, help="tile size in input pixels (smaller: less memory)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(run=_upscale)

    s = sub.add_parser("pose", help="write an OpenPose skeleton picture (for OpenPose ControlNets) from a preset or JSON")
    source = s.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="standing, arms_up, sitting, kneeling or kneeling_angle")
    source.add_argument("--from-json", type=Path, metavar="FILE", help="OpenPose JSON (pose_keypoints_2d)")
    s.add_argument("--out", type=Path, required=True, help="the PNG to write (never over an existing file)")
    s.add_argument("--width", type=int, default=512)
    s.add_argument("--height", type=int, default=512)
    s.add_argument("--json", type=Path, metavar="FILE", help="also write the keypoints as OpenPose JSON")
    s.set_defaults(run=_pose)

    s = sub.add_parser("evaluate", help="measure how well a model follows prompts (the shapes world)")
    s.add_argument("world", choices=["shapes"], help="which world's prompts and detector to use")
    s.add_argument("--model", default="shapes-v1", help="checkpoint name or path (default: the bundled shapes-v1)")
    s.add_argument("--seeds", type=int, default=4, help="images per full caption (seeds 0..N-1)")
    s.add_argument("--vague-seeds", type=int, default=16, help="images per vague prompt")
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=_evaluate)

    s = sub.add_parser("bench", help="time diffusers' default path vs sdkit's on this machine (random weights)")
    s.add_argument("--quick", action="store_true", help="SD1.5 UNet, text encoder and decoders only (under 3 minutes)")
    s.add_argument("--peers", action="store_true",
                   help="sdkit beside OpenVINO and stable-diffusion.cpp on one SD1.5 file (pip install '.[peers]')")
    s.add_argument("--fast-mode", action="store_true",
                   help="only fast mode: one SD1.5 image full and fast, and its quality cost on shapes-v1")
    s.add_argument("--allocator", action="store_true",
                   help="only the UNet step with glibc's malloc defaults vs sdkit's tunables, in new processes")
    s.add_argument("--packing", action="store_true",
                   help="only the UNet step plain, with convolution weights packed once (not reordered every "
                        "call), and packed with fused blocks, in turn")
    s.add_argument("--checkpoint", help="with --peers: an SD1.5 file to use (default: a random real-size one)")
    s.add_argument("--engines", help="with --peers: which engines, comma-separated (default: all installed but the "
                                     "fp32-forced sdkit_fp32 and openvino_f32)")
    s.add_argument("--size", type=int, default=512, help="with --peers, --fast-mode, --allocator or --packing: image "
                                                          "side in pixels")
    s.add_argument("--rounds", type=int, help="with --peers (default 5), --fast-mode (1), --allocator (3) or "
                                                "--packing (6): interleaved rounds")
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=_bench)

    s = sub.add_parser("params", help="print the generation settings stored in a PNG")
    s.add_argument("png")
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=_params)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; bad input prints one clear error and exits 2, with no traceback."""
    args = parser().parse_args(argv)
    previous = os.environ.get("SDKIT_MODELS")
    if getattr(args, "root", None):  # every lookup of this run (LoRAs and embeddings in the prompt, hires models) too
        os.environ["SDKIT_MODELS"] = str(args.root)
    try:
        args.run(args)
    except SdkitError as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - not the user's mistake: one line, the traceback on request
        if args.debug:
            raise
        first = (str(error).splitlines() or [""])[0][:300]
        print(f"error: unexpected {type(error).__name__}: {first}\n  fix: run again with --debug for the "
              f"traceback, and report it (see SECURITY.md)", file=sys.stderr)
        return 1
    finally:
        if previous is None:
            os.environ.pop("SDKIT_MODELS", None)
        else:
            os.environ["SDKIT_MODELS"] = previous
    return 0


def cli() -> int:
    """The `sdkit` command and `python -m sdkit`: restarted once with sdkit's malloc settings, then main()."""
    from sdkit import allocator

    allocator.restart_with_tunables()  # before torch is imported: glibc reads its malloc settings only at start
    return main()


if __name__ == "__main__":
    sys.exit(cli())
