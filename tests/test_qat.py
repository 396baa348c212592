"""QAT: the fake-quant module computes what the deployed QDQ model computes, with PTQ's placement and scales."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import edgeq  # noqa: E402
from edgeq import qat  # noqa: E402
from edgeq.errors import UserError  # noqa: E402
from edgeq.evaluate import validate  # noqa: E402
from edgeq.model import make_session  # noqa: E402

CONFIGS = {
    "int8-per-channel": edgeq.Int8Static(),
    "int8-per-tensor": edgeq.Int8Static(per_channel=False),
    "w4a8-per-tensor": edgeq.Int8Static(per_channel=False, weight_bits=4),
}


def tiny_net() -> nn.Module:
    """Conv+BN+ReLU twice, pooling, two fully connected layers: the shapes of the demo CNN at 8×8."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    train, val = order[:1200], order[1200:]
    return x[train], y[train], x[val], y[val]


@pytest.fixture(scope="module")
def trained(digits):
    x, y, _, _ = digits
    torch.manual_seed(0)
    model = tiny_net()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(6):
        model.train()
        for start in range(0, len(xt), 64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[start:start + 64]), yt[start:start + 64]).backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def prepared(trained, digits):
    return {name: qat.prepare(trained, cfg, calib=digits[0][:256]) for name, cfg in CONFIGS.items()}


def output_step(module) -> float:
    """The scale of the last activation pair: the quantization step of the model's output."""
    return float([m for m in module.modules() if isinstance(m, qat.ActQuant)][-1].effective_scale().detach())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_equals_fake_quant_within_one_step(prepared, digits, name):
    module = prepared[name]
    onnx_model = qat.to_onnx(module)
    x = digits[2]
    deployed = make_session(onnx_model.proto, threads=1).run(None, {"input": x})[0]
    with torch.no_grad():
        simulated = module(torch.from_numpy(x)).numpy()
    step = output_step(module)
    assert np.abs(deployed - simulated).max() <= step * 1.001
    assert np.mean(np.abs(deployed - simulated) > step / 2) < 0.02, "almost every output is bit-exact"


def test_export_after_training_with_learned_scales_still_matches(trained, digits):
    x, y, vx, _ = digits
    module = qat.prepare(trained, CONFIGS["w4a8-per-tensor"], calib=x[:256], learn_scales=True)
    scales = [p for n, p in module.named_parameters() if n.endswith("scale")]
    assert scales, "LSQ makes the scales parameters"
    before = [float(s.detach().reshape(-1)[0]) for s in scales]
    qat.finetune(module, (x[:600], y[:600]), epochs=1, lr=1e-3)
    assert any(float(s.detach().reshape(-1)[0]) != b for s, b in zip(scales, before)), "the scales were trained"
    deployed = make_session(qat.to_onnx(module).proto, threads=1).run(None, {"input": vx})[0]
    with torch.no_grad():
        simulated = module(torch.from_numpy(vx)).numpy()
    assert np.abs(deployed - simulated).max() <= output_step(module) * 1.001


def export_fp32(model: nn.Module, folder) -> str:
    """The original network (BatchNorm modules, not the QAT template) as a user exports it for PTQ."""
    import warnings

    path = folder / "fp32.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def qdq_signature(proto: onnx.ModelProto) -> list[tuple]:
    """Each node's op and the ops producing its inputs (names differ between exports, the structure must not),
    plus the integer type of every quantized initializer."""
    types = {i.name: i.data_type for i in proto.graph.initializer}
    producer = {o: (n.op_type, types.get(n.input[0])) for n in proto.graph.node for o in n.output}
    nodes = [(n.op_type, tuple(producer.get(i, ("init" if i in types else "input", None)) for i in n.input),
              types.get(n.input[0]) if n.op_type == "DequantizeLinear" else None) for n in proto.graph.node]
    # Topological order among the weight DequantizeLinear nodes is arbitrary: compare the multiset, and the order of
    # the nodes on the activation path.
    return sorted(nodes, key=repr) + [n for n in nodes if n[2] is None or n[1][0][0] != "init"]


@pytest.mark.parametrize("name", ["int8-per-channel", "w4a8-per-tensor"])
def test_ptq_and_qat_models_of_the_same_network_have_the_same_qdq_structure(prepared, trained, digits, tmp_path, name):
    path = export_fp32(trained, tmp_path)
    ptq = edgeq.quantize(edgeq.load(path), CONFIGS[name], calib=edgeq.Dataset.from_arrays({"input": digits[0][:256]}))
    exported = qat.to_onnx(prepared[name])
    assert qdq_signature(exported.proto) == qdq_signature(ptq.proto)
    ops = [n.op_type for n in exported.proto.graph.node]
    # input, conv1, conv2, maxpool and flatten (both re-using conv2's scale), fc1, fc2
    assert ops.count("QuantizeLinear") == 7 and "BatchNormalization" not in ops
    assert sum(isinstance(m, qat.ActQuant) for m in prepared[name].modules()) == 5


@pytest.mark.parametrize("name", list(CONFIGS))
def test_zero_epoch_qat_reproduces_ptq_accuracy(prepared, trained, digits, tmp_path, name):
    x, _, vx, vy = digits
    path = export_fp32(trained, tmp_path)
    val = edgeq.Dataset.from_arrays({"input": vx}, labels=vy)
    ptq = edgeq.quantize(edgeq.load(path), CONFIGS[name], calib=edgeq.Dataset.from_arrays({"input": x[:256]}))
    module = prepared[name]
    result = qat.finetune(module, (x[:64], digits[1][:64]), epochs=0)
    assert result.history == [] and result.best_epoch == 0
    exported = qat.export(module, tmp_path / "qat.onnx")
    assert abs(validate(exported, val).value - validate(ptq, val).value) <= 0.5
    assert abs(qat.score(module, torch.from_numpy(vx), torch.from_numpy(vy), "classification") - validate(ptq, val).value) <= 0.5


def test_weights_are_quantized_as_the_recipe_says(prepared):
    module = prepared["int8-per-channel"]
    conv = next(m for m in module.modules() if isinstance(m, qat.QConv))
    w = conv.quant_weight().detach()
    scale = conv.weight_scales().reshape(-1, 1, 1, 1)
    q = w / scale
    assert torch.allclose(q, q.round(), atol=1e-3) and q.abs().max() <= 127
    assert torch.allclose(q.abs().amax(dim=(1, 2, 3)), torch.full((conv.out_channels,), 127.0))
    w4 = next(m for m in prepared["w4a8-per-tensor"].modules() if isinstance(m, qat.QConv))
    q4 = (w4.quant_weight() / w4.weight_scales()).detach()
    assert w4.weight_scales().numel() == 1 and q4.min() >= -8 and q4.max() <= 7


def test_conv_bn_is_folded_and_the_float_network_is_unchanged(prepared, trained, digits):
    module = prepared["int8-per-channel"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in module.modules())
    qat.fake_quant_enabled(module, False)
    try:
        with torch.no_grad():
            folded = module(torch.from_numpy(digits[2])).numpy()
            original = trained(torch.from_numpy(digits[2])).numpy()
    finally:
        qat.fake_quant_enabled(module, True)
    assert np.allclose(folded, original, atol=1e-4)


def test_finetune_regression_reduces_mse_and_keeps_the_best_epoch():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 6)).astype(np.float32)
    y = (x @ rng.normal(size=(6, 1)) + 0.1 * np.sin(3 * x[:, :1])).astype(np.float32)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1))
    module = qat.prepare(net, edgeq.Int8Static(), calib=x[:128])
    result = qat.finetune(module, (x[:400], y[:400]), (x[400:], y[400:]), task="regression", epochs=4, lr=3e-3, patience=10)
    scores = [h["val_score"] for h in result.history]
    assert result.best_score == max(scores) and result.best_score > scores[0]
    deployed = make_session(qat.to_onnx(module).proto, threads=1).run(None, {"input": x[400:]})[0]
    assert np.abs(deployed - module(torch.from_numpy(x[400:])).detach().numpy()).max() <= output_step(module) * 1.001


def test_early_stop_restores_the_best_state(trained, digits):
    x, y, _, _ = digits
    module = qat.prepare(trained, CONFIGS["int8-per-tensor"], calib=x[:256])
    # A learning rate this large wrecks the model: early stopping must bring back epoch 0.
    result = qat.finetune(module, (x[:300], y[:300]), (x[300:600], y[300:600]), epochs=3, lr=0.5, patience=1)
    assert result.best_epoch == 0 and result.stopped_early
    assert qat.score(module, torch.from_numpy(x[300:600]), torch.from_numpy(y[300:600]), "classification") == result.best_score


@pytest.mark.parametrize("kwargs, message", [
    ({"config": edgeq.Fp16()}, "static recipe"),
    ({"calib": None}, "calibration data"),
    ({"calib": np.zeros((0, 1, 8, 8), np.float32)}, "non-empty"),
    ({"calib": {"a": np.zeros((4, 1, 8, 8), np.float32), "b": np.zeros((4, 1, 8, 8), np.float32)}}, "one input"),
])
def test_bad_arguments_are_user_errors(trained, digits, kwargs, message):
    with pytest.raises(edgeq.errors.ConfigError, match="weight_bits"):  # the config refuses it when it is made
        edgeq.Int8Static(weight_bits=3)
    args = {"config": edgeq.Int8Static(), "calib": digits[0][:64]} | kwargs
    with pytest.raises(UserError, match=message):
        qat.prepare(trained, args["config"], calib=args["calib"])


def test_finetune_refuses_bad_data_and_options(prepared, digits):
    x, y, _, _ = digits
    with pytest.raises(UserError, match="labels"):
        qat.finetune(prepared["int8-per-tensor"], (x[:10], y[:9]))
    with pytest.raises(UserError, match="task"):
        qat.finetune(prepared["int8-per-tensor"], (x[:10], y[:10]), task="ranking")
    with pytest.raises(UserError, match="class-id"):
        qat.finetune(prepared["int8-per-tensor"], (x[:10], y[:10] + 0.5))
    with pytest.raises(UserError, match="not prepared"):
        qat.export(tiny_net(), "never.onnx")


def test_4bit_weights_in_int8_storage_compute_the_same(prepared, digits):
    module = prepared["w4a8-per-tensor"]
    packed, widened = qat.to_onnx(module), qat.to_onnx(module, weight_storage="int8")
    types = {i.data_type for i in widened.proto.graph.initializer}
    assert onnx.TensorProto.INT4 not in types and onnx.TensorProto.INT4 in {i.data_type for i in packed.proto.graph.initializer}
    x = digits[2]
    a = make_session(packed.proto, threads=1).run(None, {"input": x})[0]
    b = make_session(widened.proto, threads=1).run(None, {"input": x})[0]
    assert np.abs(a - b).max() <= output_step(module) * 1.001
    with pytest.raises(UserError, match="weight storage"):
        qat.to_onnx(module, weight_storage="int2")
