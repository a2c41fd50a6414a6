"""Multi-core CPU launches: a per-item kernel runs as chunks on a thread pool, forward and adjoint.

Warp runs a CPU launch on one thread but releases the GIL while it runs, so chunks launched from
several threads use several cores. Kernels take an ``offset`` as their last input and index
``wp.tid() + offset``. On GPUs, and for small launches, this is a plain ``wp.launch``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import warp as wp

from diffsim.core.launch import LaunchCache
from diffsim.core.protocol import accumulate

#: Below this many items per chunk, thread hand-off costs more than it saves.
MIN_ITEMS_PER_CHUNK = 1024

_executor: ThreadPoolExecutor | None = None
# Private buffers per (role, argument index, dtype, device, chunk slot), grown as needed and
# viewed at the shape of the moment: launches run one at a time, and the shapes of compact grids
# change from step to step. The argument index matters: two outputs may share shape and dtype.
_private: dict[tuple, wp.array] = {}


def cpu_threads() -> int:
    """Threads used for CPU launches: ``DIFFSIM_CPU_THREADS`` if set, else the core count (max 8)."""
    value = os.environ.get("DIFFSIM_CPU_THREADS")
    if value:
        return max(1, int(value))
    return max(1, min(os.cpu_count() or 1, 8))


def _pool(workers: int) -> ThreadPoolExecutor:
    global _executor
    if _executor is None or _executor._max_workers < workers:
        _executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="diffsim-cpu")
    return _executor


def _chunks(count: int, threads: int) -> list[tuple[int, int]]:
    n = max(1, min(threads, count // MIN_ITEMS_PER_CHUNK))
    bounds = [count * i // n for i in range(n + 1)]
    return [(bounds[i], bounds[i + 1] - bounds[i]) for i in range(n)]


def _run(jobs):
    # the calling thread runs the first chunk itself: one hand-off fewer per launch
    futures = [_pool(len(jobs) - 1).submit(job) for job in jobs[1:]]
    jobs[0]()
    for f in futures:
        f.result()


def _private_buffer(role: str, index: int, like: wp.array, slot: int) -> wp.array:
    """A zeroed array shaped like ``like``, private to (role, argument index, chunk slot).

    The same view object comes back while the shape stays, so cached launch commands holding it
    need no re-packing.
    """
    key = (role, index, like.dtype, str(like.device), slot)
    base, views = _private.get(key, (None, {}))
    if base is None or base.shape[0] < like.size:
        base, views = wp.zeros(max(like.size, 1), dtype=like.dtype, device=like.device), {}
        _private[key] = (base, views)
    view = views.get(like.shape)
    if view is None:
        view = wp.array(ptr=base.ptr, dtype=like.dtype, shape=like.shape, device=like.device)
        view._keepalive = base  # a view does not own its memory
        views[like.shape] = view
    view.zero_()
    return view


def launch_items(
    kernel,
    count: int,
    inputs: Sequence,
    outputs: Sequence,
    *,
    device,
    parallel_forward: bool = True,
    scattered_outputs: bool = False,
    scattered_adjoints: Sequence[int] = (),
    adjoint_kernel=None,
    adjoint_of: Sequence[int] = (),
    cache: LaunchCache | None = None,
    site=None,
    variant=None,
) -> None:
    """Launch ``kernel`` over ``count`` items, split across CPU threads where that helps.

    Args:
        kernel: a kernel whose last input is an ``int`` offset added to ``wp.tid()``.
        count: number of items (e.g. particles).
        inputs: kernel inputs without the offset.
        outputs: kernel outputs.
        device: Warp device.
        parallel_forward: split the forward launch; False keeps it on one thread (its adjoint
            may still be split).
        scattered_outputs: the kernel adds into shared outputs (e.g. particles into a grid):
            extra chunks scatter into private zeroed copies that are summed into the outputs.
            The adjoint of that sum hands every chunk the outputs' own adjoints, so nothing
            changes in the backward pass.
        scattered_adjoints: indices into ``inputs`` of arrays whose adjoint the backward pass
            scatters into (e.g. a grid read by every particle): extra chunks accumulate those
            into private buffers that are summed afterwards, since CPU atomics are plain adds.
        adjoint_kernel: a hand-written adjoint used instead of Warp's generated one. Its inputs
            are the forward inputs (offset included), then the adjoints of every output, then the
            adjoints of the inputs listed in ``adjoint_of``, in that order.
        adjoint_of: indices into ``inputs`` whose adjoints ``adjoint_kernel`` accumulates.
        cache, site, variant: off the tape, forward launches re-use the commands of ``cache``
            recorded under (``site``, chunk) and ``variant`` (see :class:`LaunchCache`), which saves
            most of the Python cost of a launch with many arguments.
    """
    device = wp.get_device(device)
    chunks = _chunks(count, cpu_threads()) if device.is_cpu else [(0, count)]
    tape = _runtime().tape
    if tape is not None or not parallel_forward:
        cache = None

    def forward(slot: int, start: int, size: int, chunk_outputs: list):
        # prepared here, on the calling thread; the returned callable may run on any
        if cache is not None:
            return cache.command((site, slot), kernel, size, [*inputs, start], chunk_outputs, device,
                                 variant=variant).launch
        return lambda: wp.launch(kernel, dim=size, inputs=[*inputs, start], outputs=chunk_outputs, device=device,
                                 record_tape=False)

    if len(chunks) == 1 and adjoint_kernel is None and tape is None:
        forward(0, 0, count, list(outputs))()
        return
    if len(chunks) == 1 and adjoint_kernel is None:
        wp.launch(kernel, dim=count, inputs=[*inputs, 0], outputs=list(outputs), device=device)
        return
    if parallel_forward:
        chunk_outputs = [list(outputs)]
        for slot in range(1, len(chunks)):
            chunk_outputs.append([_private_buffer("output", i, a, slot) for i, a in enumerate(outputs)]
                                 if scattered_outputs else list(outputs))
        _run([forward(slot, start, size, chunk_outputs[slot]) for slot, (start, size) in enumerate(chunks)])
        if scattered_outputs:
            for private in chunk_outputs[1:]:
                for target, part in zip(outputs, private, strict=True):
                    accumulate(target, part)
    else:
        wp.launch(kernel, dim=count, inputs=[*inputs, 0], outputs=list(outputs), device=device, record_tape=False)
    if tape is None:
        return
    inputs, outputs = list(inputs), list(outputs)

    def backward():
        adj_inputs = [tape.get_adjoint(a) for a in inputs] + [None]
        adj_outputs = [tape.get_adjoint(a) for a in outputs]
        jobs, privates = [], []
        for slot, (start, size) in enumerate(chunks):
            adj_in = list(adj_inputs)
            if slot > 0:
                for index in scattered_adjoints:
                    if adj_in[index] is not None:
                        adj_in[index] = _private_buffer("gradient", index, inputs[index].grad, slot)
                        privates.append((inputs[index].grad, adj_in[index]))
            adj_in[-1] = 0
            if adjoint_kernel is not None:
                # arrays without gradients get zero stand-ins, so the kernel can read and add freely
                grads_out = [g if g is not None else wp.zeros_like(a)
                             for g, a in zip(adj_outputs, outputs, strict=True)]
                grads_in = [adj_in[i] if adj_in[i] is not None else wp.zeros_like(inputs[i]) for i in adjoint_of]
                jobs.append(lambda s=start, n=size, g=grads_out + grads_in: wp.launch(
                    adjoint_kernel, dim=n, inputs=[*inputs, s, *g], device=device, record_tape=False))
            else:
                jobs.append(lambda s=start, n=size, a=adj_in: wp.launch(
                    kernel, dim=n, inputs=[*inputs, s], outputs=outputs, adj_inputs=a, adj_outputs=adj_outputs,
                    adjoint=True, device=device, record_tape=False))
        _run(jobs)
        for target, private in privates:
            accumulate(target, private)

    tape.record_func(backward, [a for a in [*inputs, *outputs] if isinstance(a, wp.array) and a.grad is not None])


def _runtime():
    # the active tape lives on Warp's runtime object (public API has no accessor in 1.19)
    from warp._src.context import runtime

    return runtime
