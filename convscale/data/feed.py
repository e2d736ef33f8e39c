"""Batches onto the training device: uint8 from pinned memory, normalised there, one batch ahead.

``DeviceFeed`` takes a source's ``uint8=True`` batches (page-locked on the host, or already on
the GPU for procedural data rendered there) and yields float32 images ready for the model. On
CUDA the next batch's fetch, copy and normalisation are queued on a side stream while the
current step runs (the training stream waits only for that batch's event, never the host); on
the CPU it is a plain loop. Normalising after the copy moves a quarter of float32's bytes.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional

import torch


class DeviceFeed:
    """Iterate ``(images float32, labels int64)`` on ``device`` from uint8 host (or device) batches.

    ``normalize``: the source's uint8 -> float32 function (``source.normalize``; float batches,
    from a source that has no uint8 form, pass through);
    ``memory_format``: ``torch.channels_last`` for NHWC models, else ``torch.contiguous_format``.
    """

    def __init__(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                 normalize: Optional[Callable[[torch.Tensor], torch.Tensor]],
                 memory_format: torch.memory_format = torch.contiguous_format):
        self.batches = iter(batches)
        self.device, self.normalize, self.memory_format = device, normalize, memory_format
        self.stream: Optional[torch.cuda.Stream] = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._ahead: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._done = False
        if self.stream is not None:
            self._ahead = self._fetch()

    def _prepare(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        x = x.to(self.device, non_blocking=True)  # asynchronous from page-locked memory
        y = y.to(self.device, non_blocking=True)
        x = self.normalize(x) if x.dtype == torch.uint8 else x
        return x.contiguous(memory_format=self.memory_format), y

    def _fetch(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        with torch.cuda.stream(self.stream):  # procedural data renders here too, beside the training
            try:
                return self._prepare(next(self.batches))
            except StopIteration:
                self._done = True
                return None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.stream is None:
            return self._prepare(next(self.batches))
        if self._ahead is None:
            raise StopIteration
        x, y = self._ahead
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)
        # the tensors were made on the side stream: keep their memory until the training stream is done
        x.record_stream(current)
        y.record_stream(current)
        self._ahead = None if self._done else self._fetch()
        return x, y
