"""Data sources and batching against a model's input specs."""
import numpy as np
import pytest
from PIL import Image

import edgeq
from edgeq.data import ImagePreset, batches
from edgeq.model import TensorSpec

NCHW = [TensorSpec("x", np.dtype("float32"), ("N", 3, 16, 24))]
NHWC = [TensorSpec("x", np.dtype("float32"), ("N", 16, 24, 3))]


@pytest.fixture
def image_dir(tmp_path):
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(tmp_path / label / f"{i}.png")
    return tmp_path


def test_image_folder_gives_class_labels_and_resized_nchw(image_dir):
    ds = edgeq.open_data(image_dir, ImagePreset.named("raw,size=16x24"))
    got = list(batches(ds, NCHW, batch_size=4))
    assert [b.size for b in got] == [4, 2]
    assert got[0].inputs["x"].shape == (4, 3, 16, 24)
    assert np.concatenate([b.labels for b in got]).tolist() == [0, 0, 0, 1, 1, 1]
    assert 0.0 <= got[0].inputs["x"].min() and got[0].inputs["x"].max() <= 1.0


def test_image_preset_overrides_layout_and_normalisation(image_dir):
    preset = ImagePreset.named("imagenet,size=16x24,layout=NHWC,mean=0.5/0.5/0.5,std=0.5/0.5/0.5")
    x = next(batches(edgeq.open_data(image_dir, preset), NHWC, batch_size=6)).inputs["x"]
    assert x.shape == (6, 16, 24, 3)
    assert -1.0 <= x.min() and x.max() <= 1.0


def test_image_folder_of_the_wrong_size_is_a_user_error(image_dir):
    with pytest.raises(edgeq.UserError, match="axis 2"):
        list(batches(edgeq.open_data(image_dir, "raw"), NCHW))


def test_npy_folder_streams_one_sample_per_file_with_labels(tmp_path):
    for i in range(5):
        np.save(tmp_path / f"s{i}.npy", np.full((3, 16, 24), i, np.float32))
    np.save(tmp_path / "labels.npy", np.arange(5))
    got = list(batches(edgeq.open_data(tmp_path), NCHW, batch_size=2))
    assert [b.size for b in got] == [2, 2, 1]
    assert [float(b.inputs["x"][0, 0, 0, 0]) for b in got] == [0.0, 2.0, 4.0]
    assert np.concatenate([b.labels for b in got]).tolist() == [0, 1, 2, 3, 4]


def test_any_iterable_with_a_transform_is_a_dataset():
    items = [(np.ones((3, 16, 24), np.float32) * i, i) for i in range(7)]
    ds = edgeq.Dataset(lambda: iter(items), transform=lambda item: ({"x": item[0][None]}, [item[1]]), length=7)
    got = list(batches(ds, NCHW, batch_size=3))
    assert [b.size for b in got] == [3, 3, 1]
    assert got[1].labels.tolist() == [3, 4, 5]


def test_fixed_batch_dimension_sets_the_batch_size_and_notes_the_remainder():
    specs = [TensorSpec("x", np.dtype("float32"), (4, 3, 16, 24))]
    ds = edgeq.Dataset.from_arrays({"x": np.zeros((10, 3, 16, 24), np.float32)})
    got = list(batches(ds, specs, batch_size=32))
    assert [b.size for b in got] == [4, 4]
    assert any("dropped the last 2 samples" in n for n in ds.notes)


def test_float64_data_is_accepted_for_float32_inputs_but_ints_are_not():
    ds = edgeq.Dataset.from_arrays({"x": np.zeros((2, 3, 16, 24))})
    assert next(batches(ds, NCHW)).inputs["x"].dtype == np.float32
    with pytest.raises(edgeq.UserError, match="int64"):
        next(batches(edgeq.Dataset.from_arrays({"x": np.zeros((2, 3, 16, 24), np.int64)}), NCHW))


def test_npy_folder_counts_stacks_and_single_samples_as_the_model_sees_them(tmp_path):
    """Each .npy file holds one sample (rank - 1) or a stack (the input's rank): only the model tells which, so the
    count (for progress bars) comes from the files' headers and the model's inputs, and matches what is batched."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "0.npy", rng.normal(size=(5, 3, 16, 24)).astype(np.float32))
    np.save(tmp_path / "1.npy", rng.normal(size=(3, 16, 24)).astype(np.float32))
    data = edgeq.Dataset.from_npy_dir(tmp_path)
    assert data.samples(NCHW) == 6 == sum(b.size for b in batches(data, NCHW, batch_size=4))
    np.save(tmp_path / "2.npy", np.zeros((16, 24), np.float32))  # fits neither: unknown, and batching says why
    assert edgeq.Dataset.from_npy_dir(tmp_path).samples(NCHW) is None


def test_a_list_an_array_or_a_generator_is_a_dataset_and_a_spent_generator_says_so():
    chunks = [{"x": np.full((4, 3), i, np.float32)} for i in range(3)]
    listed = edgeq.Dataset(chunks)
    assert [b.size for b in listed.chunks()] == [4, 4, 4]
    assert [b.size for b in listed.chunks()] == [4, 4, 4]  # a list is read again for a second pass
    whole = edgeq.Dataset(np.zeros((10, 3), np.float32))  # one array: one chunk of 10 samples, not 10 chunks
    assert [b.size for b in whole.chunks()] == [10]
    once = edgeq.Dataset(c for c in chunks)
    assert sum(b.size for b in once.chunks()) == 12
    with pytest.raises(edgeq.errors.DataError, match="one-shot iterator"):
        next(once.chunks())
    with pytest.raises(edgeq.errors.DataError, match="must be an iterable"):
        edgeq.Dataset(3)
