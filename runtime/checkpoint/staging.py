"""The device-to-host copy of one save into the snapshot, split so that training barely waits.

Model buffers are copied at once (a forward pass may update them: running statistics, expert token
counts); parameters and optimizer state are copied in the background, because until the next
optimizer.step() nothing writes them, and fence() orders that step after the copy.
"""

from __future__ import annotations

from typing import Any

import torch

from .layout import KeyPath, as_template_kind, rebuild_state


class StagingCopy:
    def __init__(
        self,
        sources: list[torch.Tensor],
        views: list[torch.Tensor],
        copy_at_once: list[bool],
        copy_stream: "torch.cuda.Stream | None",
    ) -> None:
        self._now = [(v, s) for v, s, at_once in zip(views, sources, copy_at_once, strict=True) if at_once]
        self._later = [
            (v, s) for v, s, at_once in zip(views, sources, copy_at_once, strict=True) if not at_once
        ]
        self._stream = copy_stream
        self.error: str | None = None
        self._ready = self._done = None
        if copy_stream is not None:
            # The copy stream must not read a parameter before the optimizer step that wrote it.
            self._ready = torch.cuda.Event()
            self._ready.record()
            self._done = torch.cuda.Event()

    def copy_at_once(self) -> None:
        """On the trainer's thread, before save_async returns."""
        for view, source in self._now:
            view.copy_(source)

    def copy_in_background(self) -> None:
        """On the writer thread, while the next forward and backward run."""
        if self._stream is None:
            for view, source in self._later:
                view.copy_(source)  # ATen drops the GIL for the copy: the trainer's thread runs on
            return
        with torch.cuda.device(self._stream.device), torch.cuda.stream(self._stream):
            self._stream.wait_event(self._ready)
            for view, source in self._later:
                view.copy_(source, non_blocking=True)  # into page-locked memory: a real async DMA
            self._done.record(self._stream)

    def fence(self) -> None:
        """On the trainer's thread once the copies are issued: the next optimizer step must not
        overwrite what is still being copied. On a GPU the wait is queued on the stream, the host
        goes on."""
        if self._done is not None:
            torch.cuda.current_stream().wait_event(self._done)

    def wait_copied(self) -> None:
        """On the writer thread: the bytes are in host memory."""
        if self._done is not None:
            self._done.synchronize()


def staged_state_dict(
    live: dict[str, Any], paths: list[KeyPath], views: list[torch.Tensor], others: dict[KeyPath, Any]
) -> dict[str, Any]:
    """The state dict DCP saves: the live one's structure, tensors replaced by their host copies."""
    view_of = dict(zip(paths, views, strict=True))

    def leaf_for(path: KeyPath, leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor):
            return as_template_kind(view_of[path], leaf)
        return others[path]

    return rebuild_state(live, leaf_for)
