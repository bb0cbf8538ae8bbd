"""Measure the tensor memory a block of training code allocates: its peak, per phase.

What counts is what PyTorch's allocator hands out for tensors (weights, gradients, optimizer
state, activations, buffers of DDP and DeepSpeed), not the Python heap or libraries: the same
bytes :mod:`edgekd.plan.training` predicts. On CUDA the allocator's own statistics
(``torch.cuda.max_memory_allocated``); on CPU every allocation and free that ``torch.profiler``
records with ``profile_memory=True`` (the CPU allocator keeps no statistics of its own).

    with TensorMemory() as mem:
        with mem.phase("forward"):
            ...
    mem.peak_bytes, mem.phases["forward"]   # bytes live at the block's and the phase's peak

Tensors alive before the block are not seen on CPU: start it before the models are built.
"""

from __future__ import annotations

import bisect
import itertools
from contextlib import contextmanager

import torch


class TensorMemory:
    """Peak tensor bytes of a block and of named phases inside it (see the module docstring)."""

    def __init__(self, device: str = "cpu"):
        self.device = torch.device(device)
        self.peak_bytes = 0
        self.end_bytes = 0
        self.phases: dict[str, int] = {}
        self._prof = None
        self._cuda_phases: dict[str, int] = {}

    def __enter__(self) -> TensorMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        return self

    @contextmanager
    def phase(self, name: str):
        """Mark a phase; its peak is kept under ``name`` (the highest of repeated phases)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            # keep the peak reached before the phase, then measure the phase alone
            peak = torch.cuda.max_memory_allocated(self.device) - self._base
            self.peak_bytes = max(self.peak_bytes, peak)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - self._base
            self._cuda_phases[name] = max(self._cuda_phases.get(name, 0), peak)
            self.peak_bytes = max(self.peak_bytes, peak)
            return
        with torch.profiler.record_function(f"phase::{name}"):
            yield

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(
                self.peak_bytes, torch.cuda.max_memory_allocated(self.device) - self._base
            )
            self.end_bytes = torch.cuda.memory_allocated(self.device) - self._base
            self.phases = dict(self._cuda_phases)
            return
        self._prof.__exit__(*exc)
        events = self._prof.profiler.kineto_results.events()
        memory = sorted(
            (e.start_ns(), e.nbytes())
            for e in events
            if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
        )
        times = [t for t, _ in memory]
        live = list(itertools.accumulate(n for _, n in memory))
        self.peak_bytes = max(live, default=0)
        self.end_bytes = live[-1] if live else 0
        for e in events:
            name = e.name()
            if not name.startswith("phase::"):
                continue
            start, end = e.start_ns(), e.end_ns()
            # live bytes at the phase's start, then at every event inside it
            i, j = bisect.bisect_left(times, start), bisect.bisect_right(times, end)
            inside = live[i:j] + ([live[i - 1]] if i > 0 else [0])
            key = name[len("phase::") :]
            self.phases[key] = max(self.phases.get(key, 0), max(inside))
