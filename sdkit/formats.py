"""Safe reading of weight files, family detection from tensor names and shapes, hashes (sha256, AutoV2)."""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import re
import struct
import warnings
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from sdkit.errors import SdkitError

SAFETENSORS = (".safetensors", ".sft")
PICKLES = (".ckpt", ".pt", ".pth", ".bin")
MAX_HEADER = 100 * 2**20

# safetensors dtype names -> torch dtype names
DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
          "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
          "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool"}

# Where each component's tensors live in the original (LDM / A1111 / ComfyUI) single-file layout.
COMPONENT_PREFIXES = {
    "unet": ("model.diffusion_model.",),
    "vae": ("first_stage_model.", "vae."),
    "text_encoder": ("cond_stage_model.", "conditioner.embedders.0.", "text_encoders.clip_l."),
    "text_encoder_2": ("conditioner.embedders.1.", "text_encoders.t5xxl."),
}
UNET_CONTEXT_KEY = "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
CONTEXT_DIM_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl_refiner"}
NATIVE_SIZE = {"sd1": 512, "sd2": 768, "sdxl": 1024, "sdxl_refiner": 1024, "flux": 1024, "sd3": 1024,
               "shapes": 64}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's dtype and shape, known without reading its data."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


def file_format(path: Path) -> str:
    """'safetensors' or 'pickle', from the extension; anything else is refused."""
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS:
        return "safetensors"
    if suffix in PICKLES:
        return "pickle"
    raise SdkitError(
        f"{path.name}: {suffix or 'no extension'} is not a weight-file extension sdkit reads.",
        fix=f"use a {', '.join(SAFETENSORS + PICKLES)} file",
    )


def _describe_start(data: bytes) -> str:
    """What the first bytes of a non-model file look like, for an error message."""
    text = data[:64].decode("utf-8", errors="replace").strip().lower()
    if text.startswith(("<!doctype", "<html")):
        return "it is a web page, not a model: the download probably needed a login or failed"
    if text.startswith("version https://git-lfs"):
        return "it is a Git LFS pointer, not the model: the file itself was never downloaded"
    if data[:8].isascii():
        return f"it starts with text ({data[:24]!r})"
    return "its first bytes are not a safetensors header"


def _head(path: Path, size: int = 64) -> bytes:
    """The first bytes of a file."""
    with path.open("rb") as f:
        return f.read(size)


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorSpec], dict[str, str]]:
    """Tensor specs and metadata from a safetensors header, checking the file is whole."""
    size = path.stat().st_size
    if size == 0:
        raise SdkitError(f"{path} is empty (0 bytes).", fix="download the file again")
    with path.open("rb") as f:
        start = f.read(8)
        if len(start) < 8:
            raise SdkitError(f"{path} is {size} bytes, too short to be a safetensors file.", fix="download it again")
        (header_len,) = struct.unpack("<Q", start)
        if header_len > min(MAX_HEADER, size - 8):
            raise SdkitError(f"{path} is not a valid safetensors file: {_describe_start(start + f.read(56))}.",
                             fix="download the file again from its source; check it is the model and not a web page")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
        assert isinstance(header, dict)
    except (ValueError, AssertionError):
        raise SdkitError(f"{path} has a damaged safetensors header (not JSON).", fix="download the file again") from None
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise SdkitError(f"{path} has a damaged safetensors header (its __metadata__ is not a table).",
                         fix="download the file again")
    specs, spans = _check_entries(path, header, data_size=size - 8 - header_len)
    _check_layout(path, spans, data_size=size - 8 - header_len)
    return specs, {str(k): str(v) for k, v in metadata.items()}


def _check_entries(path: Path, header: dict, *, data_size: int) -> tuple[dict[str, TensorSpec], list]:
    """Each tensor entry: a known dtype, a shape of whole numbers, and offsets inside the file that hold exactly
    shape x item size bytes (so no tensor can reach outside the file or claim more than it has)."""
    specs: dict[str, TensorSpec] = {}
    spans = []
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SdkitError(f"{path} has a damaged entry {name!r} in its header.", fix="download it again") from None
        if dtype not in DTYPES:
            raise SdkitError(f"{path}: tensor {name!r} has dtype {dtype!r}, which safetensors does not define.",
                             fix="download the file again; if it persists the file was not made by safetensors")
        numbers = [*shape, begin, end] if isinstance(shape, list) else None
        if numbers is None or not all(type(n) is int and n >= 0 for n in numbers):
            raise SdkitError(f"{path}: tensor {name!r} has a damaged shape {shape!r} or offsets {[begin, end]!r}.",
                             fix="download the file again")
        count = math.prod(shape)
        if end > data_size:
            raise SdkitError(f"{path} is truncated: tensor {name!r} ends at byte {end:,} of the data, but the file "
                             f"holds {data_size:,} data bytes.", fix="the download stopped early; download it again")
        if end - begin != count * ITEM_BYTES[DTYPES[dtype]]:
            raise SdkitError(f"{path} is damaged: tensor {name!r} ({dtype} {shape}) needs "
                             f"{count * ITEM_BYTES[DTYPES[dtype]]:,} bytes but its offsets give {end - begin:,}.",
                             fix="download the file again")
        specs[name] = TensorSpec(DTYPES[dtype], tuple(shape))
        spans.append((begin, end, name))
    return specs, spans


def _check_layout(path: Path, spans: list, *, data_size: int) -> None:
    """The tensors tile the data exactly, as the safetensors format requires: no two share bytes (a crafted file
    could make one write show through another), and no bytes belong to none."""
    position, previous = 0, ""
    for begin, end, name in sorted(spans):
        if begin < position:
            raise SdkitError(f"{path} is damaged: tensors {previous!r} and {name!r} overlap in the file.",
                             fix="download the file again")
        if begin > position:
            raise SdkitError(f"{path} is damaged: bytes {position:,}-{begin:,} of its data belong to no tensor.",
                             fix="download the file again")
        position, previous = end, name
    if position != data_size:
        raise SdkitError(f"{path} is damaged: {data_size - position:,} bytes after its last tensor belong to none.",
                         fix="download the file again")


def _numpy_globals() -> list:
    """numpy scalars and dtypes: plain data that training tools store as `global_step`; A1111 allows them too."""
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    return [scalar, np.dtype] + [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]


def load_pickle(path: Path) -> dict:
    """A .ckpt/.pt/.bin state dict through torch.load(weights_only=True) only; anything more is refused."""
    data = read_pickle(path)
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise SdkitError(f"{path} holds a {type(data).__name__}, not a dict of tensors.", fix="use a state-dict file")
    return {k: v for k, v in data.items() if hasattr(v, "shape")}


def read_pickle(path: Path):
    """Whatever a .ckpt/.pt/.bin holds (dicts, tensors, numbers, strings), through torch.load(weights_only=True) only."""
    import torch

    if path.stat().st_size == 0:
        raise SdkitError(f"{path} is empty (0 bytes).", fix="download the file again")
    try:
        with torch.serialization.safe_globals(_numpy_globals()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # a foreign file: refused below
            try:
                data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:  # legacy (non-zip) files cannot be memory-mapped
                if "mmap" not in str(error) and "zip" not in str(error):
                    raise
                data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
        if "weights_only" in text or "Unsupported global" in text or "WeightsUnpickler" in text:
            raise SdkitError(
                f"{path} refused: it needs more than plain tensors to open (it would run Python code from the "
                f"file, which can do anything to your computer). Detail: {text.splitlines()[0][:200]}",
                fix="get the .safetensors version of this model, or convert it with a tool you trust",
            ) from None
        raise SdkitError(f"{path} is not a PyTorch weight file: {_describe_start(_head(path))}.",
                         fix="download the file again") from None
    except Exception as error:  # torch raises many types for damaged or foreign files  # noqa: BLE001
        start = _head(path)
        if not start.startswith(b"PK") and not start.startswith(b"\x80"):
            raise SdkitError(f"{path} is not a PyTorch weight file: {_describe_start(start)}.",
                             fix="download the file again") from None
        reason = (str(error).splitlines() or [type(error).__name__])[0][:160]
        raise SdkitError(f"{path} could not be read as a PyTorch file ({reason}).",
                         fix="the file is damaged or truncated; download it again") from None
    return data


def read_tensors(path: Path, *, nested: bool = False) -> tuple[dict, dict[str, str]]:
    """A weight file's contents and metadata: safetensors after the header checks, pickles through
    torch.load(weights_only=True) only. `nested`: a pickle's dict as it is (sub-dicts such as `params_ema` or
    `string_to_param` kept); otherwise its plain name -> tensor dict."""
    if file_format(path) == "safetensors":
        from safetensors.torch import load_file

        _, metadata = read_safetensors_header(path)  # the friendly errors for damaged files come from here
        data = load_file(str(path))
    elif not nested:
        data, metadata = load_pickle(path), {}
    else:
        data, metadata = read_pickle(path), {}
        if not isinstance(data, dict):
            raise SdkitError(f"{path.name} holds a {type(data).__name__}, not a dict of tensors.",
                             fix="use the .safetensors (or state-dict .pt/.pth) file the model's page offers")
    check_finite(path, data)
    return data, metadata


def nonfinite(tensor) -> bool:
    """Whether a tensor holds NaN or infinity (float16/bfloat16/float32/float64; float8 has no isfinite on every
    build, and integers cannot hold them)."""
    import torch

    return tensor.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) and \
        not bool(torch.isfinite(tensor).all())


def check_finite(path: Path, tensors: dict) -> None:
    """Refuse weights holding NaN or infinity (a damaged or badly merged file): they would paint black pictures."""
    import torch

    for name, value in tensors.items():
        if isinstance(value, dict):
            check_finite(path, value)
        elif isinstance(value, torch.Tensor) and nonfinite(value):
            raise SdkitError(f"{path.name}: tensor {name!r} holds NaN or infinite values; the file is damaged or was "
                             f"merged badly, and would paint black or noise.", fix="download the file again, or use "
                             "another version of the model")


def read_specs(path: Path) -> tuple[dict[str, TensorSpec], dict[str, str]]:
    """Tensor specs and metadata of any weight file; safetensors without reading tensor data."""
    if not path.is_file():
        raise SdkitError(f"{path} does not exist.", fix="check the path, or run `python -m sdkit models`")
    if file_format(path) == "safetensors":
        return read_safetensors_header(path)
    state = load_pickle(path)
    return {k: TensorSpec(str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in state.items()}, {}


class MappedTensors(dict):
    """The tensors of a safetensors file as zero-copy views of one private memory map (name -> tensor).

    Nothing is read until a tensor is used; `release` hands pages that have been copied back to the OS, so
    converting a file to another dtype never holds the whole file and the whole result at once. The map is private
    (copy-on-write): nothing done to these tensors can reach the user's file.
    """

    def __init__(self, path: Path) -> None:
        import mmap
        import warnings

        import torch

        read_safetensors_header(path)  # clear errors for empty, truncated or foreign files first
        with path.open("rb") as f:
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except OSError:  # a writable private map counts against memory commit; a read-only one does not
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        (header_len,) = struct.unpack("<Q", self._map[:8])
        header = json.loads(self._map[8:8 + header_len])  # parsed from the map itself: offsets match what is mapped
        header.pop("__metadata__", None)
        start, size = 8 + header_len, len(self._map)
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a read-only map makes torch warn that tensors are not writable
            whole = torch.frombuffer(self._map, dtype=torch.uint8)
            self._base, self._end = whole.data_ptr(), whole.data_ptr() + len(whole)
            for name, entry in header.items():
                self[name] = _mapped(path, name, entry, buffer=self._map, start=start, size=size)

    def release(self, pointer: int, size: int) -> None:
        """Drop the resident pages of the bytes [pointer, pointer + size) of this map; they read back from disk if used."""
        import mmap

        if not (self._base <= pointer < self._end) or size <= 0 or not hasattr(self._map, "madvise"):
            return  # a copy made during conversion, not part of the file; or an OS without madvise (Windows)
        page = mmap.PAGESIZE
        first = -(-(pointer - self._base) // page) * page  # whole pages only: neighbours may share the edge pages
        last = min(pointer + size, self._end) - self._base
        last = last // page * page
        if last > first:
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)


def _mapped(path: Path, name: str, entry: dict, *, buffer, start: int, size: int):
    """One tensor of a safetensors file as a view of `buffer`, after checking its entry against the file."""
    import torch

    dtype = getattr(torch, DTYPES.get(entry.get("dtype"), ""), None)
    if not isinstance(dtype, torch.dtype):
        raise SdkitError(f"{path}: tensor {name!r} has dtype {entry.get('dtype')!r}, which PyTorch cannot read.",
                         fix="convert the file to fp16 or fp32 with the tool that made it")
    shape, (begin, end) = tuple(entry["shape"]), entry["data_offsets"]
    count = math.prod(shape)
    if not 0 <= begin <= end or end - begin != count * dtype.itemsize or start + end > size:
        raise SdkitError(f"{path} is damaged: tensor {name!r} ({entry['dtype']} {list(shape)}) does not fit its bytes "
                         f"{begin}-{end} in the file.", fix="download the file again")
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    # frombuffer needs no alignment: files whose header is not padded to 8 bytes (older writers) work as they are
    return torch.frombuffer(buffer, dtype=dtype, count=count, offset=start + begin).view(shape)


def load_state_dict(path: Path) -> dict:
    """All tensors of a weight file, memory-mapped: a MappedTensors for safetensors, torch.load(mmap=True) for
    zip-format pickles (whose pages stay resident until every tensor is gone); legacy pickles are read into RAM."""
    if file_format(path) == "safetensors":
        import errno

        try:
            return MappedTensors(path)
        except OSError as error:
            if error.errno == errno.ENOMEM:
                raise SdkitError(f"{path} could not be memory-mapped: the system is out of memory.",
                                 fix="close other programs, or use a smaller file") from None
            raise SdkitError(f"{path} could not be read ({error}).", fix="check the file and download it again") from None
        except ValueError as error:
            raise SdkitError(f"{path} could not be read ({error}).", fix="download the file again") from None
    return load_pickle(path)


def components(names: list[str]) -> list[str]:
    """Which model components (unet, vae, text encoders, transformer) a file holds."""
    found = [c for c, prefixes in COMPONENT_PREFIXES.items() if any(n.startswith(prefixes) for n in names)]
    if any("double_blocks." in n or "joint_blocks." in n for n in names):
        found = ["transformer"] + [c for c in found if c != "unet"]
    elif "unet" not in found and any(n.startswith(("input_blocks.", "down_blocks.")) for n in names):
        found.insert(0, "unet")
    return found


def detect_family(specs: dict[str, TensorSpec], metadata: dict[str, str] | None = None) -> str:
    """The model family (sd1, sd2, sdxl, sdxl_refiner, flux, sd3, shapes) from tensor names and shapes."""
    return explain_family(specs, metadata)[0]


# The tensor names that give each family away, checked in this order (the first match decides).
FAMILY_CLUES: tuple[tuple[str, str, str], ...] = (
    ("flux", "double_blocks.0.img_attn.qkv.weight", "contains"),
    ("sd3", "joint_blocks.0.context_block", "contains"),
    ("sdxl", "conditioner.embedders.1.model.", "prefix"),
    ("sdxl_refiner", "conditioner.embedders.0.model.", "prefix"),
    ("sd2", "cond_stage_model.model.", "prefix"),
    ("sd1", "cond_stage_model.transformer.", "prefix"),
)


def explain_family(specs: dict[str, TensorSpec], metadata: dict[str, str] | None = None) -> tuple[str, str]:
    """(family, the clue that decided it): a metadata field, a tensor name, or a UNet's cross-attention width."""
    metadata = metadata or {}
    architecture = metadata.get("modelspec.architecture", "")
    if architecture.startswith("sdkit-shapes"):
        return "shapes", f"metadata modelspec.architecture = {architecture!r}"
    names = list(specs)
    for family, clue, how in FAMILY_CLUES:
        found = next((n for n in names if (clue in n if how == "contains" else n.startswith(clue))), None)
        if found:
            return family, f"tensor {found}"
    for name, spec in specs.items():  # a bare UNet: the cross-attention width says which text encoder it expects
        if name.endswith(UNET_CONTEXT_KEY) and spec.shape[-1] in CONTEXT_DIM_FAMILY:
            if any(n.endswith("label_emb.0.0.weight") for n in names) or spec.shape[-1] != 2048:
                return CONTEXT_DIM_FAMILY[spec.shape[-1]], f"cross-attention width {spec.shape[-1]} of {name}"
    sample = ", ".join(sorted(names)[:8])
    raise SdkitError(
        f"Unknown model family: none of the tensor names sdkit knows for SD1, SD2, SDXL, SD3 or FLUX were seen "
        f"({len(names)} tensors, e.g. {sample}).",
        fix="this is not a checkpoint, or a kind sdkit does not load yet; check the model page for what it is",
    )


ITEM_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1,
              "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "uint16": 2, "uint32": 4, "uint64": 8,
              "bool": 1}


def parts(specs: dict[str, TensorSpec]) -> list[dict]:
    """One row per model part a file holds: its tensor-name prefix, tensors, parameters, main dtype and MiB."""
    rows: dict[str, dict] = {}
    transformer = any("double_blocks." in n or "joint_blocks." in n for n in specs)  # FLUX/SD3: no UNet
    for name, spec in specs.items():
        part, prefix = next(((c, p) for c, prefixes in COMPONENT_PREFIXES.items() for p in prefixes
                             if name.startswith(p)), ("other", ""))
        part = "transformer" if part == "unet" and transformer else part
        row = rows.setdefault(part, {"part": part, "prefix": prefix, "tensors": 0, "parameters": 0, "bytes": 0,
                                     "dtypes": Counter()})
        row["tensors"] += 1
        row["parameters"] += spec.numel
        row["bytes"] += spec.numel * ITEM_BYTES.get(spec.dtype, 4)
        row["dtypes"][spec.dtype] += spec.numel
    return [{"part": r["part"], "prefix": r["prefix"] or "(other names)", "tensors": r["tensors"],
             "parameters": r["parameters"], "dtype": r["dtypes"].most_common(1)[0][0],
             "MiB": round(r["bytes"] / 2**20, 2)} for r in rows.values()]


def _hash_file(path: Path) -> str:
    """sha256 of a whole file, read in 8 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(8 * 2**20), b""):
            digest.update(block)
    return digest.hexdigest()


@lru_cache(maxsize=256)
def _cached_sha256(path: Path, size: int, mtime_ns: int) -> str:
    return _hash_file(path)


def sha256(path: Path) -> str:
    """sha256 of the file, cached per (path, size, mtime) for this process."""
    stat = path.stat()
    return _cached_sha256(path.resolve(), stat.st_size, stat.st_mtime_ns)


def addnet_hash(path: Path) -> str:
    """kohya's hash of a .safetensors file's tensor data (header excluded), as A1111's "Lora hashes"; cached like sha256."""
    stat = path.stat()  # generate() asks on every run: a slider move must not re-read the LoRA file
    return _cached_addnet_hash(path.resolve(), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=256)
def _cached_addnet_hash(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        header = struct.unpack("<Q", f.read(8))[0]
        f.seek(8 + header)
        for block in iter(lambda: f.read(8 * 2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def autov2(path: Path) -> str:
    """civitai's AutoV2 hash (A1111's "Model hash"): the first 10 hex digits of the file's sha256."""
    return sha256(path)[:10]


def info(path: str | Path, *, hashes: bool = True) -> dict:
    """What a weight file is: family, format, dtype, parameters, components, sha256, AutoV2 hash."""
    path = Path(path)
    specs, metadata = read_specs(path)
    if not specs:
        raise SdkitError(f"{path} holds no tensors.", fix="download the file again")
    by_dtype: Counter[str] = Counter()
    for spec in specs.values():
        by_dtype[spec.dtype] += spec.numel
    family = detect_family(specs, metadata)
    result = {
        "file": str(path),
        "family": family,
        "format": file_format(path),
        "dtype": by_dtype.most_common(1)[0][0],
        "parameters": sum(by_dtype.values()),
        "components": components(list(specs)),
        "tensors": len(specs),
        "size_bytes": path.stat().st_size,
        "native_size": NATIVE_SIZE.get(family),
    }
    if hashes:
        result["sha256"] = sha256(path)
        result["autov2"] = result["sha256"][:10]
    if metadata:
        result["metadata"] = metadata
    return result
