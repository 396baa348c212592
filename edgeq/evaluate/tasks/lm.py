"""Causal language models on token windows: perplexity from the mean negative log-likelihood per window."""
from __future__ import annotations

import numpy as np

from edgeq.errors import DataError
from edgeq.model import Model


def causal_lm_input(model: Model) -> str | None:
    """The token-id input of a causal LM: a single integer input [batch, sequence] and a rank-3 float first output."""
    inputs, outputs = model.inputs, model.outputs
    if len(inputs) == 1 and inputs[0].dtype.kind in "iu" and inputs[0].rank == 2 and outputs and outputs[0].rank == 3 \
            and outputs[0].dtype.kind == "f":
        return inputs[0].name
    return None


def window_nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Mean negative log-likelihood (nats per token) of each window's next tokens: logits [n, T, V], ids [n, T].

    >>> float(window_nll(np.zeros((1, 3, 4)), np.array([[0, 1, 2]]))[0]) == float(np.log(4))
    True
    """
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise DataError(f"token windows have shape {ids.shape}", "give input_ids as [windows, tokens] with at least 2 tokens")
    z = logits[:, :-1].astype(np.float64)
    top = z.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(z - top).sum(axis=-1)) + top[..., 0]
    target = np.take_along_axis(z, ids[:, 1:, None].astype(np.int64), axis=-1)[..., 0]
    return (lse - target).mean(axis=1)
