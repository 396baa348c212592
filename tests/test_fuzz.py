"""Fuzzing (issue 7): data loaders against random shapes, dtypes and corrupt bytes must give correct batches or a
DataError, never another exception; streaming observers must agree with one-shot statistics exactly.

Bounded (a few dozen examples per test, no deadline) so that the whole file runs in well under a minute.
"""
from __future__ import annotations

import io
import math
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from edgeq.calibrate.observers import HistogramObserver
from edgeq.data import Dataset, batches, open_data
from edgeq.errors import DataError
from edgeq.model import TensorSpec

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
DATA_DTYPES = ["float32", "float64", "float16", "int64", "int32", "uint8", "bool", "complex64"]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


# ----- strategies -----------------------------------------------------------------------------------------------

@st.composite
def specs(draw) -> list[TensorSpec]:
    """One or two model inputs: rank 1-4, each dim fixed (1-3), symbolic, or unknown; float32 or int64."""
    out = []
    for i in range(draw(st.integers(1, 2))):
        dims = draw(st.lists(st.one_of(st.integers(1, 3), st.just("N"), st.none()), min_size=1, max_size=4))
        out.append(TensorSpec(f"in{i}", np.dtype(draw(st.sampled_from(["float32", "int64"]))), tuple(dims)))
    return out


@st.composite
def arrays_for(draw, spec_list: list[TensorSpec]) -> dict[str, np.ndarray]:
    """Arrays that mostly fit the specs (the sample axis first), sometimes with a wrong key, rank, dim or dtype,
    and with values drawn by hypothesis (NaN, Inf and extremes included)."""
    n = draw(st.integers(0, 5))
    arrays = {}
    for spec in spec_list:
        fitting = [n] + [d if isinstance(d, int) else draw(st.integers(1, 3)) for d in spec.shape[1:]]
        shape = draw(st.one_of(st.just(tuple(fitting)), hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=3)))
        dtype = draw(st.sampled_from([spec.dtype.name] * 3 + DATA_DTYPES))
        key = draw(st.sampled_from([spec.name] * 4 + ["other"]))
        arrays[key] = draw(hnp.arrays(np.dtype(dtype), shape))
    if draw(st.booleans()):
        arrays["labels"] = np.arange(draw(st.sampled_from([n, n, n + 1, max(n - 1, 0)])))
    return arrays


# ----- loaders: random shapes and dtypes -------------------------------------------------------------------------

def check_batches(dataset: Dataset, spec_list: list[TensorSpec], batch_size: int) -> None:
    """Every batch fits the model exactly (names, dtypes, ranks, fixed dims, finite values, labels), or DataError."""
    try:
        out = list(batches(dataset, spec_list, batch_size))
    except DataError:
        return
    fixed = {s.shape[0] for s in spec_list if isinstance(s.shape[0], int)}
    limit = next(iter(fixed)) if len(fixed) == 1 else batch_size  # a fixed batch dim sets the batch size
    for batch in out:
        assert set(batch.inputs) == {s.name for s in spec_list}
        assert {len(a) for a in batch.inputs.values()} == {batch.size}
        assert 0 < batch.size <= limit
        for spec in spec_list:
            arr = batch.inputs[spec.name]
            assert arr.dtype == spec.dtype and arr.ndim == spec.rank
            assert all(have == want for have, want in zip(arr.shape[1:], spec.shape[1:]) if isinstance(want, int))
            assert arr.dtype.kind != "f" or np.isfinite(arr).all()
        assert batch.labels is None or len(batch.labels) == batch.size


@FUZZ
@given(data=st.data(), batch_size=st.integers(1, 4))
def test_arrays_of_any_shape_and_dtype_give_batches_or_data_error(scratch, data, batch_size):
    spec_list = data.draw(specs())
    arrays = data.draw(arrays_for(spec_list))
    path = scratch / "fuzz.npz"
    np.savez(path, **arrays)
    try:
        dataset = Dataset.from_npz(path)
    except DataError:
        return
    check_batches(dataset, spec_list, batch_size)


@FUZZ
@given(spec_list=specs(), shapes=st.lists(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=3), min_size=1, max_size=4),
       dtype=st.sampled_from(DATA_DTYPES), labels=st.one_of(st.none(), st.integers(0, 5)), batch_size=st.integers(1, 4))
def test_npy_folders_of_any_shapes_give_batches_or_data_error(scratch, spec_list, shapes, dtype, labels, batch_size):
    folder = scratch / "npy"
    folder.mkdir(exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    rng = np.random.default_rng(0)
    for i, shape in enumerate(shapes):
        np.save(folder / f"s{i}.npy", rng.normal(size=shape).astype(dtype))
    if labels is not None:
        np.save(folder / "labels.npy", np.arange(labels))
    try:
        dataset = open_data(folder)
    except DataError:
        return
    check_batches(dataset, spec_list[:1], batch_size)


# ----- loaders: corrupt bytes -----------------------------------------------------------------------------------

def _valid_file(kind: str) -> bytes:
    rng = np.random.default_rng(1)
    arrays = {"x": rng.normal(size=(6, 1, 4, 4)).astype(np.float32), "labels": np.arange(6)}
    buf = io.BytesIO()
    if kind == "npy":
        np.save(buf, arrays["x"])
    else:
        (np.savez_compressed if kind == "npz-compressed" else np.savez)(buf, **arrays)
    return buf.getvalue()


VALID = {kind: _valid_file(kind) for kind in ("npz", "npz-compressed", "npy")}
SPEC = [TensorSpec("x", np.dtype("float32"), ("N", 1, 4, 4))]


def load_everything(path) -> None:
    """Open, read every value (mmap pages included) and batch against a model that fits the valid file."""
    dataset = open_data(path)
    for chunk in dataset.chunks():
        for arr in chunk.inputs.values():
            np.asarray(arr).tobytes()
    list(batches(dataset, SPEC, 4))


@FUZZ
@given(content=st.binary(max_size=3000), suffix=st.sampled_from([".npz", ".npy"]))
def test_random_bytes_are_a_data_error(scratch, content, suffix):
    path = scratch / f"random{suffix}"
    path.write_bytes(content)
    with pytest.raises(DataError):
        load_everything(path)


@FUZZ
@given(kind=st.sampled_from(sorted(VALID)), cut=st.one_of(st.none(), st.floats(0, 1)),
       flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), max_size=4))
def test_truncated_or_bit_flipped_files_load_or_are_a_data_error(scratch, kind, cut, flips):
    content = bytearray(VALID[kind])
    for where, mask in flips:
        content[int(where * len(content))] ^= mask
    if cut is not None:
        content = content[: int(cut * len(content))]
    path = scratch / ("mutated.npy" if kind == "npy" else "mutated.npz")
    path.write_bytes(bytes(content))
    try:
        load_everything(path)
    except DataError:
        pass


def test_a_truncated_valid_file_is_always_refused(scratch):
    """Cutting even one byte off must not yield data silently (zip's directory and the .npy size both guard it)."""
    for kind, content in VALID.items():
        for cut in (0, 1, len(content) // 2, len(content) - 1):
            path = scratch / ("cut.npy" if kind == "npy" else "cut.npz")
            path.write_bytes(content[:cut])
            with pytest.raises(DataError):
                load_everything(path)


def test_zip_with_a_member_that_is_not_an_array_is_refused(scratch):
    """numpy hands back such members as raw bytes; found by this file's first run."""
    path = scratch / "odd.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", VALID["npy"])
        zf.writestr("notes.txt", b"hello")
    with pytest.raises(DataError, match="'notes.txt' is not a numpy array"):
        load_everything(path)


# ----- observers: histograms and percentiles --------------------------------------------------------------------

values = hnp.arrays(np.float32, st.integers(1, 400),
                    elements=st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32))


@FUZZ
@given(x=values, percentile=st.floats(90, 100))
def test_percentile_range_contains_the_true_percentiles_within_min_max(x, percentile):
    obs = HistogramObserver()
    obs.update(x)
    low, high = obs.percentile_range(percentile)
    ordered = np.sort(x.astype(np.float64))
    n = len(ordered)
    tail = 1.0 - percentile / 100.0
    # The histogram answers with bin edges around the sample at that rank: never inside it, never beyond min/max.
    rank_low = min(int(math.floor(tail * n)), n - 1)
    rank_high = max(int(math.ceil((1.0 - tail) * n)) - 1, 0)
    assert ordered[0] <= low <= ordered[rank_low]
    assert ordered[rank_high] <= high <= ordered[-1]


@FUZZ
@given(x=values, cuts=st.lists(st.floats(0, 1), max_size=6), order=st.randoms(use_true_random=False))
def test_streaming_in_any_chunking_and_order_equals_one_shot(x, cuts, order):
    one_shot = HistogramObserver()
    one_shot.update(x)
    chunks = np.split(x, sorted({int(c * len(x)) for c in cuts}))
    order.shuffle(chunks)
    streamed = HistogramObserver()
    for chunk in chunks:
        streamed.update(chunk)
    assert streamed.half_width == one_shot.half_width
    np.testing.assert_array_equal(streamed.counts, one_shot.counts)
    assert (streamed.minmax.low, streamed.minmax.high) == (one_shot.minmax.low, one_shot.minmax.high)
