"""Trace a Flax NNX module to a ClosedJaxpr whose inputs are [weights..., args...]."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx

from ligerjax.compiler import ir


def _key_str(key: Any) -> str | None:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return None if key.name == "value" else key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def param_path(path: Sequence[Any]) -> str:
    """A dotted parameter path (``layers.0.self_attn.q_proj.kernel``) from a pytree key path."""
    return ".".join(s for s in (_key_str(k) for k in path) if s is not None)


@dataclasses.dataclass(frozen=True)
class Traced:
    """A traced model step.

    ``jaxpr``'s invars are the flat weight leaves (named by ``weight_paths``) followed by the
    flat leaves of the example arguments; weights are never closure constants.
    """

    graphdef: Any
    weight_paths: tuple[str, ...]
    weights: tuple[jax.Array, ...]
    state_treedef: Any
    args_treedef: Any
    out_treedef: Any
    jaxpr: ir.ClosedJaxpr
    example_args: tuple[Any, ...]
    call: Callable[..., Any] | None = None

    @property
    def num_weights(self) -> int:
        return len(self.weights)

    def flat_call(self, *flat: Any) -> list[Any]:
        """Run the original model on flat weights then flat arguments; flat outputs."""
        ws, xs = flat[: self.num_weights], flat[self.num_weights :]
        state = jax.tree_util.tree_unflatten(self.state_treedef, ws)
        args = jax.tree_util.tree_unflatten(self.args_treedef, xs)
        out = _apply(self.call, nnx.merge(self.graphdef, state), args)
        return jax.tree_util.tree_leaves(out)

    def at_args(self, example_args: tuple[Any, ...]) -> Traced:
        """This step traced again at ``example_args``' shapes (same structure as the traced
        arguments): a jaxpr's shapes are fixed, so a pass that needs the step at other
        shapes (micro-batches) asks for it here. Passes that rewrite a ``Traced`` and keep
        its type override this to re-apply their rewrite to the re-traced source."""
        jaxpr = ir.make_jaxpr(self.flat_call, *self.weights, *self.flat_args(example_args))
        return dataclasses.replace(self, jaxpr=jaxpr, example_args=tuple(example_args))

    def flat_args(self, args: Sequence[Any]) -> list[Any]:
        """The leaves of ``args``, which must have the traced arguments' structure."""
        flat, treedef = jax.tree_util.tree_flatten(tuple(args))
        if treedef != self.args_treedef:
            raise ValueError(f"arguments {treedef} do not match the traced {self.args_treedef}")
        return flat

    def __call__(self, weights: Sequence[jax.Array], *args: Any) -> Any:
        """Run the unmodified model with these weights (same order as ``weight_paths``)."""
        flat = jax.tree_util.tree_leaves(args)
        outs = jax.jit(self.flat_call)(*weights, *flat)
        return jax.tree_util.tree_unflatten(self.out_treedef, outs)


def _apply(call: Callable[..., Any] | None, model: nnx.Module, args: Sequence[Any]) -> Any:
    return model(*args) if call is None else call(model, *args)


def trace_module(
    model: nnx.Module, *example_args: Any, call: Callable[..., Any] | None = None
) -> Traced:
    """Trace ``model(*example_args)`` (or ``call(model, *example_args)``) with the model's
    state as explicit jaxpr inputs. Weights and arguments may be ``jax.ShapeDtypeStruct``s
    (an abstract model from ``nnx.eval_shape``): tracing reads only shapes."""
    graphdef, state = nnx.split(model)
    with_path, state_treedef = jax.tree_util.tree_flatten_with_path(state)
    paths = tuple(param_path(p) for p, _ in with_path)
    weights = tuple(leaf for _, leaf in with_path)
    flat_args, args_treedef = jax.tree_util.tree_flatten(example_args)
    out_box: list[Any] = []

    def step(*flat: Any) -> list[Any]:
        ws, xs = flat[: len(weights)], flat[len(weights) :]
        m = nnx.merge(graphdef, jax.tree_util.tree_unflatten(state_treedef, ws))
        out = _apply(call, m, jax.tree_util.tree_unflatten(args_treedef, xs))
        leaves, treedef = jax.tree_util.tree_flatten(out)
        out_box.append(treedef)
        return leaves

    jaxpr = jax.make_jaxpr(step)(*weights, *flat_args)
    return Traced(
        graphdef=graphdef,
        weight_paths=paths,
        weights=weights,
        state_treedef=state_treedef,
        args_treedef=args_treedef,
        out_treedef=out_box[0],
        jaxpr=jaxpr,
        example_args=tuple(example_args),
        call=call,
    )
