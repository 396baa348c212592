"""Quantization-aware training in PyTorch that exports the same deployable QDQ model as static PTQ.

    qat = edgeq.qat.prepare(model, edgeq.Int8Static(per_channel=False), calib=train_x[:512])
    edgeq.qat.finetune(qat, (train_x, train_y), (val_x, val_y), epochs=3)    # or any training loop of yours
    edgeq.qat.export(qat, "model_qat.onnx")                                 # then edgeq bench / validate / compare

torch is imported here and in edgeq.demo only, never on the ONNX paths.
"""
from edgeq.qat.export import export, to_onnx
from edgeq.qat.fake_quant import ActQuant, QConv, QConvBn, QLinear, freeze_bn
from edgeq.qat.finetune import FinetuneResult, finetune, score
from edgeq.qat.prepare import fake_quant_enabled, prepare

__all__ = ["ActQuant", "FinetuneResult", "QConv", "QConvBn", "QLinear", "export", "fake_quant_enabled", "finetune", "freeze_bn", "prepare",
           "score", "to_onnx"]
