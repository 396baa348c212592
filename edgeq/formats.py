"""Model files that are not ONNX, recognised from their first bytes (or a folder's layout) so that the error says
what the file is and how to get an ONNX model from it, instead of "corrupt or truncated protobuf".

edgeq quantizes ONNX models; `bench` and `validate` also run `.tflite` files (in LiteRT, `edgeq.runtimes`), and
`edgeq export --to tflite` writes them. `quantize`, `validate`, `auto` and `bench` take a PyTorch model too, as
MODULE:FACTORY with `--weights` or as a `.pt2` program (`edgeq.torch_in`): a PyTorch file that reaches the ONNX
loader is told how. Each message names the way to an ONNX model that works now.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

from edgeq.errors import ModelError

_HDF5 = b"\x89HDF\r\n\x1a\n"
_TF2ONNX = "pip install tf2onnx, then python -m tf2onnx.convert"


def refuse_foreign(path: Path) -> None:
    """Raise a ModelError naming the format and the conversion when `path` is a known non-ONNX model. Called where
    reading `path` as ONNX has failed, so a valid ONNX model (whatever its suffix) costs nothing."""
    found = _recognise(path)
    if found is not None:
        kind, fix = found
        raise ModelError(f"{path} is {kind}, not an ONNX model; this command reads ONNX models (.onnx)", fix)


def _recognise(path: Path) -> tuple[str, str] | None:
    if path.is_dir():
        if (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file():
            return "a TensorFlow SavedModel folder", f"convert it: {_TF2ONNX} --saved-model {path} --output model.onnx"
        return None
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        return None
    if head[4:8] == b"TFL3":
        return ("a TensorFlow Lite flatbuffer", f"`edgeq bench` and `edgeq validate` run it as it is; to quantize or analyze it, "
                f"convert it: {_TF2ONNX} --tflite {path} --output model.onnx")
    if head.startswith(_HDF5):
        return "a Keras HDF5 model", "convert it with tf2onnx: pip install tf2onnx; tf2onnx.convert.from_keras(keras_model, output_path='model.onnx')"
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a pickled (legacy) PyTorch checkpoint", _TORCH_EXPORT
    if zipfile.is_zipfile(path):
        return _recognise_zip(path)
    if path.suffix == ".pb":
        return ("a TensorFlow frozen graph (.pb)",
                f"convert it: {_TF2ONNX} --graphdef {path} --inputs INPUT:0 --outputs OUTPUT:0 --output model.onnx")
    return None


_TORCH_EXPORT = ("give the model as MODULE:FACTORY --weights FILE --input-shape 1,3,32,32 (FILE a state dict, "
                 "torch.save(model.state_dict(), PATH)): `edgeq quantize`, `validate`, `auto` and `bench` export it to ONNX")


def _recognise_zip(path: Path) -> tuple[str, str] | None:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    if any("/code/" in n for n in names) and any(n.endswith("data.pkl") for n in names):
        return ("a TorchScript archive", "give the original module as MODULE:FACTORY with --weights (a state dict), "
                "or export it with torch.onnx.export(model, example_input, 'model.onnx')")
    if any(n.endswith("/archive_format") for n in names) and any("/models/" in n and n.endswith(".json") for n in names):
        return ("a torch.export program (.pt2)", "`edgeq quantize`, `validate`, `auto` and `bench` read it named MODEL.pt2; "
                "for this command, export it to ONNX: edgeq.from_torch(torch.export.load(PATH)).save('model.onnx')")
    if any(n.endswith("data.pkl") for n in names):
        return "a PyTorch checkpoint (torch.save)", _TORCH_EXPORT
    if "config.json" in names and any(n.endswith(".weights.h5") for n in names):
        return "a Keras model (.keras)", "convert it with tf2onnx: pip install tf2onnx; tf2onnx.convert.from_keras(keras_model, output_path='model.onnx')"
    return None
