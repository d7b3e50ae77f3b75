"""Property-based fuzzing of what reads untrusted bytes: the safetensors header reader, the pickle reader, the prompt
parser and the PNG-parameters parser. Each may return or raise SdkitError, never anything else.

`make test` runs a few hundred examples of each; `make fuzz` runs the `fuzz` profile (tens of thousands each, over
100,000 in all) and prints how many it tried.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdkit import formats, prompts
from sdkit.errors import SdkitError
from sdkit.metadata import format_parameters, parse_parameters

settings.register_profile("fuzz", max_examples=int(os.environ.get("SDKIT_FUZZ_EXAMPLES", "30000")), deadline=None,
                          suppress_health_check=list(HealthCheck), derandomize=False)
settings.register_profile("sdkit", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "sdkit"))

FOLDER = Path(tempfile.mkdtemp(prefix="sdkit-fuzz-"))
DTYPE_NAMES = list(formats.DTYPES) + ["F7", "", "f32", "I128"]
numbers = st.one_of(st.integers(-2, 2**20), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=3),
                    st.none())
entries = st.fixed_dictionaries({
    "dtype": st.sampled_from(DTYPE_NAMES),
    "shape": st.one_of(st.lists(numbers, max_size=4), numbers),
    "data_offsets": st.one_of(st.lists(numbers, min_size=0, max_size=3), numbers),
})
headers = st.dictionaries(st.text(max_size=12), st.one_of(entries, numbers, st.text(max_size=5)), max_size=5)


def _check_file(data: bytes, suffix: str = ".safetensors") -> None:
    """Read `data` as a weight file: specs and tensors, or an SdkitError; the tensors must match the specs."""
    path = FOLDER / f"case{suffix}"
    path.write_bytes(data)
    try:
        specs, _ = formats.read_specs(path)
        state, _ = formats.read_tensors(path)
    except SdkitError:
        return
    assert set(state) == set(specs)
    for name, tensor in state.items():
        assert tuple(tensor.shape) == specs[name].shape


@given(st.binary(max_size=256))
def test_random_bytes_as_safetensors(data):
    _check_file(data)


@given(headers, st.binary(max_size=64), st.integers(0, 3))
def test_crafted_safetensors_headers(header, body, extra):
    raw = json.dumps(header, default=str).encode() + b" " * extra
    _check_file(struct.pack("<Q", len(raw)) + raw + body)


@given(st.binary(max_size=200))
def test_random_bytes_as_pickles(data):
    _check_file(b"PK\x03\x04" + data if data[:1] == b"\0" else data, suffix=".pt")


@given(st.text(max_size=120))
def test_prompt_parser(text):
    try:
        parsed = prompts.parse(text)
    except SdkitError as error:
        assert "prompt weight" in error.message
        return
    assert all(isinstance(part, str) and isinstance(weight, float) for part, weight in parsed)


@given(st.text(max_size=160), st.text(alphabet="Steps:, 0123456789.xSeedCFGscaleSizeSampler\n\"abc", max_size=80))
def test_parameters_parser(prompt, last):
    try:
        parsed = parse_parameters(f"{prompt}\n{last}")
    except SdkitError:
        return
    assert isinstance(parsed.steps, int)


@given(st.text(max_size=60).filter(lambda t: t.strip() == t and "\n" not in t and "Negative prompt:" not in t),
       st.integers(0, 2**32 - 1), st.integers(1, 150), st.floats(0, 30).map(lambda x: round(x, 1)))
def test_parameters_round_trip(prompt, seed, steps, cfg):
    from sdkit.generate import GenerationSettings

    settings_ = GenerationSettings(prompt=prompt, seed=seed, steps=steps, cfg=cfg, width=64, height=64)
    assert parse_parameters(format_parameters(settings_)) == settings_
