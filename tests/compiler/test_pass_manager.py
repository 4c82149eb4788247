"""Tracing, the pass manager's verification and dumps."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ligerjax.compiler import PassContext, PassManager, PassReport, VerificationError, ir
from ligerjax.compiler.trace import trace_module


class TwoLayer(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(4, 8, rngs=rngs), nnx.Linear(8, 4, rngs=rngs)])

    def __call__(self, x):
        return self.layers[1](jax.nn.relu(self.layers[0](x)))


@pytest.fixture
def traced():
    return trace_module(TwoLayer(nnx.Rngs(0)), jnp.ones((2, 4), jnp.float32))


def test_trace_names_weights_and_keeps_them_as_inputs(traced):
    assert traced.weight_paths == (
        "layers.0.bias",
        "layers.0.kernel",
        "layers.1.bias",
        "layers.1.kernel",
    )
    assert not traced.jaxpr.consts
    assert len(traced.jaxpr.jaxpr.invars) == 5
    x = jnp.arange(8, dtype=jnp.float32).reshape(2, 4)
    (got,) = ir.eval_jaxpr(traced.jaxpr, *traced.weights, x)
    np.testing.assert_allclose(got, traced(traced.weights, x), rtol=1e-6)


def _identity(program, ctx):
    return program, PassReport(name="identity")


@dataclasses.dataclass(frozen=True)
class _Broken:
    """A program whose outputs are off by one."""

    inner: object

    @property
    def jaxpr(self):
        return self.inner.jaxpr

    def __call__(self, weights, *args):
        return jax.tree_util.tree_map(lambda y: y + 1, self.inner(weights, *args))


def _off_by_one(program, ctx):
    return _Broken(program), PassReport(name="off_by_one")


def test_debug_mode_verifies_and_dumps(traced, tmp_path):
    ctx = PassContext(debug=True, dump_dir=str(tmp_path))
    program, reports = PassManager([_identity]).run(traced, ctx)
    assert program is traced
    assert [r.name for r in reports] == ["identity"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00_traced.jaxpr.txt",
        "01__identity.jaxpr.txt",
    ]
    assert "dot_general" in (tmp_path / "01__identity.jaxpr.txt").read_text()


def test_dump_dir_from_environment(traced, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGERJAX_DUMP_DIR", str(tmp_path / "dumps"))
    PassManager([_identity]).run(traced, PassContext())
    assert (tmp_path / "dumps" / "01__identity.jaxpr.txt").exists()


def test_debug_mode_catches_wrong_numerics(traced):
    with pytest.raises(VerificationError, match="off_by_one"):
        PassManager([_off_by_one]).run(traced, PassContext(debug=True))


def test_well_formedness_check_catches_use_before_definition(traced):
    eqns = list(traced.jaxpr.jaxpr.eqns)
    bad = ir.rebuild(traced.jaxpr, eqns[::-1])
    with pytest.raises(ValueError, match="undefined var"):
        ir.check_well_formed(bad)
    ir.check_well_formed(traced.jaxpr)


def test_primitive_lookup_and_counts(traced):
    assert ir.primitive_by_name("dot_general").name == "dot_general"
    with pytest.raises(ValueError, match="no_such_primitive"):
        ir.primitive_by_name("no_such_primitive")
    assert ir.count_primitives(traced.jaxpr)["dot_general"] == 2
