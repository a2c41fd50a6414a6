"""PyTorch bridge: rollouts and single steps as ``torch.autograd.Function``s.

Inputs are named arrays fed from torch tensors, in the syntax of
:func:`diffsim.core.protocol.input_arrays`: ``"model.<field>"``, ``"state0.<field>"``,
``"controls.<field>"`` (stacked over frames) and ``"controls[k].<field>"``.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
import warp as wp

from diffsim.core.protocol import Control, Model, Solver, State, input_arrays
from diffsim.core.rollout import Rollout
from diffsim.errors import ConfigError, InvalidParameter


def _targets(name: str, *, model: Model, state: State, controls: Sequence[Control]) -> list[wp.array]:
    """Arrays addressed by ``name`` (see :func:`diffsim.core.protocol.input_arrays`)."""
    return input_arrays(name, model=model, state=state, controls=controls)


def _copy_in(tensor: torch.Tensor, arrays: list[wp.array], name: str = "input") -> None:
    values = tensor.detach()
    if values.is_floating_point() and not bool(torch.isfinite(values).all()):
        raise InvalidParameter(name, "a tensor with NaN or inf entries", "finite values")
    if len(arrays) > 1 and values.shape[0] != len(arrays):
        raise ConfigError(
            f"expected a leading dimension of {len(arrays)} (one per frame), got {tuple(values.shape)}."
        )
    chunks = values if len(arrays) > 1 else [values]
    for chunk, arr in zip(chunks, arrays, strict=True):
        values32 = chunk.to(dtype=torch.float32).contiguous().reshape(arr.shape + _inner(arr))
        src = wp.from_torch(values32, dtype=arr.dtype)
        wp.copy(arr, src.to(arr.device))


def _inner(arr: wp.array) -> tuple[int, ...]:
    dtype = arr.dtype
    return tuple(getattr(dtype, "_shape_", ()))


def _grad_out(arrays: list[wp.array], like: torch.Tensor) -> torch.Tensor:
    grads = []
    for arr in arrays:
        if arr.grad is None:
            grads.append(torch.zeros(arr.shape + _inner(arr), dtype=torch.float32))
        else:
            # clone: the Warp buffer is zeroed and reused by later backward passes
            grads.append(wp.to_torch(arr.grad).clone().cpu())
    out = torch.stack(grads) if len(arrays) > 1 else grads[0]
    return out.reshape(like.shape).to(dtype=like.dtype, device=like.device)


class _RolloutFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rollout: Rollout, names: tuple[str, ...], *tensors: torch.Tensor) -> torch.Tensor:
        targets = [
            _targets(n, model=rollout.model, state=rollout.state0, controls=rollout.controls) for n in names
        ]
        for tensor, arrays, name in zip(tensors, targets, names, strict=True):
            _copy_in(tensor, arrays, name)
        loss = rollout.forward()
        ctx.rollout = rollout
        ctx.targets = targets
        ctx.save_for_backward(*tensors)
        ref = tensors[0] if tensors else torch.zeros(())
        return torch.tensor(loss, dtype=torch.float32, device=ref.device)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        rollout: Rollout = ctx.rollout
        tensors = ctx.saved_tensors
        for arrays in ctx.targets:
            for arr in arrays:
                if arr.grad is not None:
                    arr.grad.zero_()
        rollout.backward()
        scale = float(grad_output.detach().cpu())
        grads = [_grad_out(arrays, t) * scale for arrays, t in zip(ctx.targets, tensors, strict=True)]
        return (None, None, *grads)


def rollout_loss(rollout: Rollout, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Run ``rollout`` with ``inputs`` copied into its arrays; return its loss as a torch scalar.

    ``loss.backward()`` then fills each input tensor's ``.grad`` via the checkpointed backward.
    Arrays named in ``inputs`` must have been created with ``requires_grad=True``.

    Example::

        E = torch.full((n,), 1e5, requires_grad=True)
        loss = rollout_loss(rollout, {"model.particle_young_modulus": E})
        loss.backward()  # E.grad now holds d(loss)/dE
    """
    names = tuple(inputs)
    return _RolloutFunction.apply(rollout, names, *inputs.values())


class _StepFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, solver, model, state_in, control, dt, names, outputs, taping, *tensors):
        # The step reads private copies of the state and of any model arrays fed from torch: a
        # later step on the same State must not change what this tape reads in its backward.
        state_in = state_in.clone(requires_grad=True)
        replaced = {n.partition(".")[2]: wp.clone(model.array(n.partition(".")[2]), requires_grad=True)
                    for n in names if n.startswith("model.")}
        if replaced:
            model = model.with_arrays(replaced)
        for tensor, name in zip(tensors, names, strict=True):
            _copy_in(tensor, _targets(name, model=model, state=state_in, controls=[control]), name)
        state_out = solver.new_state(model, requires_grad=True)
        if not taping:
            solver.step(model, state_in, state_out, control, dt)
            return tuple(wp.to_torch(state_out.array(o)).clone() for o in outputs)
        claim = solver.begin_step_scratch()
        tape = wp.Tape()
        with tape:
            solver.step(model, state_in, state_out, control, dt)
        solver.end_step_scratch(claim)
        # the step's scratch goes back when its backward has run or its graph is dropped
        weakref.finalize(tape, solver.release_step_scratch, claim)
        ctx.tape, ctx.state_out, ctx.names = tape, state_out, names
        ctx.model, ctx.state_in, ctx.control, ctx.solver = model, state_in, control, solver
        ctx.outputs = outputs
        ctx.save_for_backward(*tensors)
        return tuple(wp.to_torch(state_out.array(o)).clone() for o in outputs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        tensors = ctx.saved_tensors
        targets = [_targets(n, model=ctx.model, state=ctx.state_in, controls=[ctx.control]) for n in ctx.names]
        for arrays in targets:
            for arr in arrays:
                if arr.grad is not None:
                    arr.grad.zero_()
        ctx.solver.zero_scratch_grad()
        ctx.state_out.zero_grad()
        for name, g in zip(ctx.outputs, grad_outputs, strict=True):
            arr = ctx.state_out.array(name)
            if g is not None:
                # copy, never alias: Warp must not keep torch's grad_output buffer
                wp.copy(arr.grad, wp.from_torch(g.detach().to(torch.float32).contiguous(), dtype=arr.dtype))
        ctx.tape.backward()
        grads = [_grad_out(arrays, t) for arrays, t in zip(targets, tensors, strict=True)]
        ctx.tape.reset()
        ctx.tape = None  # drops the tape: its finalizer hands the step's scratch back
        return (None, None, None, None, None, None, None, None, *grads)


def step(
    solver: Solver,
    model: Model,
    state_in: State,
    control: Control,
    dt: float,
    inputs: dict[str, torch.Tensor],
    outputs: Sequence[str],
) -> tuple[torch.Tensor, ...]:
    """One differentiable solver step from torch.

    ``inputs`` are copied into the named arrays (``model.``, ``state.``, ``control.`` fields);
    the returned tensors are the named ``outputs`` fields of the new state.
    """
    names = tuple(inputs)
    # decided here: inside Function.forward torch always reports grad mode as off
    taping = torch.is_grad_enabled() and any(t.requires_grad for t in inputs.values())
    return _StepFunction.apply(solver, model, state_in, control, dt, names, tuple(outputs), taping,
                               *inputs.values())
