"""Random-number state of one rank as JSON-ready values, so a resumed run draws the same dropout
masks and routing choices as the uninterrupted one."""

from __future__ import annotations

import base64
import random
from typing import Any

import numpy as np
import torch


def _encode_tensor(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode()


def _decode_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def capture_rng_state() -> dict[str, Any]:
    version, words, gauss_next = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch_cpu": _encode_tensor(torch.get_rng_state()),
        "python": [version, list(words), gauss_next],
        "numpy": [
            np_kind,
            base64.b64encode(np_keys.tobytes()).decode(),
            int(np_pos),
            int(np_has_gauss),
            float(np_gauss),
        ],
    }
    # Only the current card's generator: each worker owns one card.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = _encode_tensor(torch.cuda.get_rng_state())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(_decode_tensor(state["torch_cpu"]))
    version, words, gauss_next = state["python"]
    random.setstate((version, tuple(words), gauss_next))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    keys = np.frombuffer(base64.b64decode(np_keys), dtype=np.uint32).copy()
    np.random.set_state((np_kind, keys, np_pos, np_has_gauss, np_gauss))
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_decode_tensor(state["torch_cuda"]))
