"""A small causal transformer language model, trained here on the Python standard library's docstrings: the test
model for INT4 and perplexity (no download).

Bytes are tokens (vocabulary 256). Pre-LayerNorm GPT blocks; the ONNX graph is written node by node from the trained
weights (no exporter), so every linear layer is a plain MatMul with a constant [K, N] weight, as in exported LLMs.
Text is split by docstring: held-out docstrings never appear in training.

>>> from edgeq.testing import lm
>>> paths = lm.build_lm("lm-cache")                       # doctest: +SKIP
>>> sorted(paths)                                          # doctest: +SKIP
['calib', 'heldout', 'model']
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

VOCAB = 256
LM_OPSET = 21


@dataclass(frozen=True)
class LMConfig:
    """Architecture, corpus and training budget. The defaults (3.3 M parameters; 800 steps of 16 x 128 tokens, about
    two passes over the whole standard library's docstrings) train in about 10 minutes on 2 idle cores; the tests
    use a smaller one."""

    d_model: int = 256
    heads: int = 4
    layers: int = 4
    d_ff: int = 1024
    context: int = 128
    steps: int = 800
    batch: int = 16
    lr: float = 2e-3
    seed: int = 0
    heldout_fraction: float = 0.1
    corpus: str = "stdlib"

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def docstring_texts(corpus: str = "stdlib") -> list[str]:
    """Every module, class and function docstring (of at least 200 characters) of the whole standard library
    (`corpus="stdlib"`, about 1 MB) or of the modules edgeq.testing.zoo draws sentences from (`"modules"`, about 0.35 MB),
    whitespace-normalised, ASCII only, in a fixed order."""
    from edgeq.demo.text import stdlib_docstrings

    texts = set()
    for raw in stdlib_docstrings(whole=corpus == "stdlib"):
        doc = " ".join(raw.split())
        if len(doc) >= 200 and doc.isascii():
            texts.add(doc)
    return sorted(texts)


def split_texts(fraction: float = 0.1, corpus: str = "stdlib") -> tuple[bytes, bytes]:
    """Training and held-out bytes; a docstring goes to held-out by a hash of its text (stable across runs)."""
    train, held = [], []
    for text in docstring_texts(corpus):
        bucket = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 16 ** 8
        (held if bucket < fraction else train).append(text)
    return "\n".join(train).encode(), "\n".join(held).encode()


def windows(data: bytes, length: int, stride: int | None = None) -> np.ndarray:
    """Non-overlapping (or `stride`-spaced) windows of token ids, int64 [n, length]."""
    ids = np.frombuffer(data, np.uint8).astype(np.int64)
    stride = stride or length
    starts = np.arange(0, len(ids) - length + 1, stride)
    return np.stack([ids[s:s + length] for s in starts])


def train_lm(config: LMConfig = LMConfig(), log=None) -> dict[str, np.ndarray]:
    """Train with torch (imported here only); returns the weights as numpy arrays named like the ONNX initializers."""
    import torch

    torch.manual_seed(config.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    train, _ = split_texts(config.heldout_fraction, config.corpus)
    ids = torch.from_numpy(np.frombuffer(train, np.uint8).astype(np.int64))
    model = _torch_lm(config)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warm = max(1, config.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / config.steps))))
    gen = torch.Generator().manual_seed(config.seed)
    model.train()
    for step in range(config.steps):
        starts = torch.randint(0, len(ids) - config.context - 1, (config.batch,), generator=gen)
        x = torch.stack([ids[s:s + config.context] for s in starts])
        y = torch.stack([ids[s + 1:s + config.context + 1] for s in starts])
        loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log and (step % 100 == 0 or step == config.steps - 1):
            log(f"step {step} loss {loss.item():.3f}")
    model.eval()
    return {name: p.detach().numpy().astype(np.float32).copy() for name, p in model.named_parameters()}


def _torch_lm(config: LMConfig):
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            d = config.d_model
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
            self.fc1, self.fc2 = nn.Linear(d, config.d_ff), nn.Linear(config.d_ff, d)

        def forward(self, x):
            b, t, d = x.shape
            h = self.ln1(x)
            split = lambda z: z.view(b, t, config.heads, d // config.heads).transpose(1, 2)  # noqa: E731
            a = torch.nn.functional.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)), is_causal=True)
            x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
            return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(VOCAB, config.d_model)
            self.pos = nn.Embedding(config.context, config.d_model)
            self.blocks = nn.ModuleList(Block() for _ in range(config.layers))
            self.ln_f = nn.LayerNorm(config.d_model)
            self.head = nn.Linear(config.d_model, VOCAB, bias=False)
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, 0, 0.02)

        def forward(self, ids):
            x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
            for block in self.blocks:
                x = block(x)
            return self.head(self.ln_f(x))

    return LM()


def to_onnx(weights: dict[str, np.ndarray], config: LMConfig) -> onnx.ModelProto:
    """The ONNX graph of the trained LM: int64 `input_ids` [batch, sequence ≤ context] → float `logits`
    [batch, sequence, 256]. torch's Linear weight [N, K] becomes a MatMul weight [K, N]."""
    d, heads = config.d_model, config.heads
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op: str, inputs: list[str], name: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def linear(x: str, prefix: str, bias: bool = True) -> str:
        w = const(f"{prefix}.weight", weights[f"{prefix}.weight"].T.copy())
        y = node("MatMul", [x, w], f"{prefix}/MatMul")
        return node("Add", [y, const(f"{prefix}.bias", weights[f"{prefix}.bias"])], f"{prefix}/Add") if bias else y

    def layernorm(x: str, prefix: str) -> str:
        return node("LayerNormalization", [x, const(f"{prefix}.weight", weights[f"{prefix}.weight"]),
                                           const(f"{prefix}.bias", weights[f"{prefix}.bias"])], f"{prefix}/LN", axis=-1, epsilon=1e-5)

    const("heads_shape", np.array([0, 0, heads, d // heads], np.int64))
    const("model_shape", np.array([0, 0, d], np.int64))
    const("zero", np.array([0], np.int64))
    const("one", np.array([1], np.int64))
    const("mask_axes", np.array([2, 3], np.int64))
    causal = np.triu(np.full((config.context, config.context), -1e9, np.float32), 1)[None, None]
    const("causal_mask", causal)
    const("attn_scale", np.array(1 / np.sqrt(d // heads), np.float32))
    const("two", np.array([2], np.int64))
    seq = node("Slice", [node("Shape", ["input_ids"], "ids_shape"), "one", "two"], "seq_len")
    positions = node("Slice", [const("pos.weight", weights["pos.weight"]), "zero", seq, "zero"], "pos_slice")
    x = node("Add", [node("Gather", [const("tok.weight", weights["tok.weight"]), "input_ids"], "tok/Gather"), positions], "embed")
    mask = node("Slice", ["causal_mask", node("Concat", ["zero", "zero"], "mask_starts", axis=0),
                          node("Concat", [seq, seq], "mask_ends", axis=0), "mask_axes"], "mask")
    for i in range(config.layers):
        p = f"blocks.{i}"
        h = layernorm(x, f"{p}.ln1")
        q, k, v = (node("Transpose", [node("Reshape", [linear(h, f"{p}.{n}"), "heads_shape"], f"{p}.{n}/Reshape")],
                        f"{p}.{n}/Transpose", perm=[0, 2, 1, 3]) for n in "qkv")
        kt = node("Transpose", [k], f"{p}.kT", perm=[0, 1, 3, 2])
        scores = node("Add", [node("Mul", [node("MatMul", [q, kt], f"{p}.scores"), "attn_scale"], f"{p}.scaled"), mask], f"{p}.masked")
        att = node("MatMul", [node("Softmax", [scores], f"{p}.softmax", axis=-1), v], f"{p}.attend")
        merged = node("Reshape", [node("Transpose", [att], f"{p}.merge/Transpose", perm=[0, 2, 1, 3]), "model_shape"], f"{p}.merge")
        x = node("Add", [x, linear(merged, f"{p}.o")], f"{p}.res1")
        ff = linear(node("Gelu", [linear(layernorm(x, f"{p}.ln2"), f"{p}.fc1")], f"{p}.gelu"), f"{p}.fc2")
        x = node("Add", [x, ff], f"{p}.res2")
    logits = linear(layernorm(x, "ln_f"), "head", bias=False)
    nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits"))
    graph = helper.make_graph(nodes, "docstring_lm", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", VOCAB])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", LM_OPSET)], producer_name="edgeq.testing.lm")
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def build_lm(folder: str | Path, config: LMConfig = LMConfig(), calib_windows: int = 128, log=None) -> dict[str, Path]:
    """Train (or reuse from `folder`) the LM; write `model` (ONNX), `heldout` and `calib` (.npz with `input_ids`
    windows of `context` tokens: held-out text, and training text for calibration). Cached by the config's hash."""
    folder = Path(folder)
    stem = f"docstring_lm_{config.key()}"
    paths = {"model": folder / f"{stem}.onnx", "heldout": folder / f"{stem}_heldout.npz", "calib": folder / f"{stem}_calib.npz"}
    if all(p.is_file() for p in paths.values()):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    weights = train_lm(config, log=log)
    train, held = split_texts(config.heldout_fraction, config.corpus)
    rng = np.random.default_rng(config.seed + 1)
    calib = windows(train, config.context, stride=config.context // 2)
    calib = calib[rng.choice(len(calib), size=min(calib_windows, len(calib)), replace=False)]
    from edgeq import atomic

    for key, ids in (("heldout", windows(held, config.context)), ("calib", calib)):
        with atomic.atomic_path(paths[key]) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, input_ids=ids)  # a file object: np.savez would append ".npz" to the temporary name
    with atomic.atomic_path(paths["model"]) as tmp:
        onnx.save(to_onnx(weights, config), tmp)
    return paths
