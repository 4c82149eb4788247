"""Deviceless GPU compiles: targets, meshes, compile_text, and what the HLO keeps."""

from __future__ import annotations

import importlib.resources
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ligerjax.compiler.deviceless import (
    TARGETS,
    compile_text,
    cpu_mesh,
    get_target,
    gpu_mesh,
    normalize_flags,
    run_options,
    target_config_text,
    xla_flags_string,
)
from ligerjax.cost import get_device
from ligerjax.schedule.hlo_schedule import parse_hlo


def _psum_step(mesh, *, secondary_psum: bool = False, dtype=jnp.float32):
    """A primary (named_scope "primary") matmul + psum, and a secondary one."""

    def step(x_p, w_p, x_s, w_s):
        with jax.named_scope("primary"):
            y_p = jax.lax.psum(x_p @ w_p, "tp")
        with jax.named_scope("secondary"):
            y_s = x_s @ w_s
            if secondary_psum:
                y_s = jax.lax.psum(y_s, "tp")
        return y_p, y_s

    col, row = P(None, "tp"), P("tp", None)
    fn = jax.shard_map(
        step,
        mesh=mesh,
        in_specs=(col, row, col, row),
        out_specs=(P(), P() if secondary_psum else P("tp")),
    )

    def arg(shape, spec):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    return fn, (arg((8, 256), col), arg((256, 64), row), arg((64, 256), col), arg((256, 64), row))


def test_unknown_target_error_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"a100, a100-pcie, cpu, h100"):
        get_target("tpu-v5")
    with pytest.raises(ValueError, match="known"):
        gpu_mesh("v100", 4)


def test_targets_name_their_cost_model_devices_and_a100_turns_the_scheduler_on():
    for target in TARGETS.values():
        get_device(target.cost_device)
    assert TARGETS["h100"].cost_device == "h100-sxm"
    assert TARGETS["a100"].cost_device == "a100-sxm"
    assert TARGETS["a100-pcie"].cost_device == "a100-pcie"
    assert TARGETS["a100-pcie"].config_file == TARGETS["a100"].config_file
    assert TARGETS["a100"].flags == {"xla_gpu_enable_latency_hiding_scheduler": True}
    assert xla_flags_string(TARGETS["a100"].flags) == (
        "--xla_gpu_enable_latency_hiding_scheduler=true"
    )


def test_targets_ship_as_package_data():
    files = importlib.resources.files("ligerjax.compiler.targets")
    for name in ("h100", "a100"):
        config_file = TARGETS[name].config_file
        assert config_file is not None and (files / config_file).is_file()
    assert 'device_description_str: "NVIDIA H100' in target_config_text("h100")
    assert 'device_description_str: "NVIDIA A100-SXM4-80GB"' in target_config_text("a100")


def test_flags_are_normalized_to_what_compile_options_accept():
    assert normalize_flags({"--xla_a": "true", "xla_b": "False", "xla_c": 0}) == {
        "xla_a": True,
        "xla_b": False,
        "xla_c": 0,
    }
    with pytest.raises(ValueError, match="xla_d"):
        normalize_flags({"xla_d": [1]})


def test_missing_aot_extra_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "jax_plugins.xla_cuda12", None)
    with pytest.raises(ImportError, match=r"ligerjax\[aot\]"):
        gpu_mesh("h100", 4)


@pytest.mark.multidevice
def test_compile_text_on_cpu_devices_gives_a_synchronous_all_reduce():
    mesh = cpu_mesh(8)
    fn, args = _psum_step(mesh)
    out = compile_text(fn, *args, target="cpu")
    assert out.target == "cpu" and out.flags == {} and out.compile_s > 0
    module = parse_hlo(out.text)
    (all_reduce,) = [i for i in module.entry.instrs if i.opcode == "all-reduce"]
    assert all_reduce.replica_groups == (tuple(range(8)),)
    assert "/primary/" in all_reduce.op_name
    assert not module.pairs


@pytest.mark.deviceless
@pytest.mark.parametrize(("target", "kind"), [("h100", "H100"), ("a100", "A100")])
def test_gpu_meshes_build_from_the_target_configs(target, kind):
    mesh = gpu_mesh(target, 4, ("dp", "tp"), shape=(2, 2))
    assert mesh.shape == {"dp": 2, "tp": 2}
    assert all(kind in d.device_kind for d in mesh.devices.flat)
    with pytest.raises(ValueError, match="shape"):
        gpu_mesh(target, 4, ("dp", "tp"), shape=(2, 3))


@pytest.mark.deviceless
@pytest.mark.parametrize(("target", "table"), [("h100", "h100-sxm"), ("a100", "a100-sxm")])
def test_running_on_gpus_turns_the_scheduler_on_and_plans_with_their_table(target, table):
    from ligerjax.ligerized import cost_model_for

    mesh = gpu_mesh(target, 2)
    assert run_options(mesh) == {"xla_gpu_enable_latency_hiding_scheduler": True}
    assert cost_model_for(mesh).device.name == table


def test_running_on_cpus_needs_no_options_and_plans_with_the_cpu_table():
    from ligerjax.ligerized import cost_model_for

    mesh = cpu_mesh(2)
    assert run_options(mesh) == {}
    assert cost_model_for(mesh).device.name == "cpu"


@pytest.mark.deviceless
def test_a_mesh_of_another_target_is_refused():
    fn, args = _psum_step(gpu_mesh("h100", 4))
    with pytest.raises(ValueError, match="not target 'a100'"):
        compile_text(fn, *args, target="a100")


@pytest.mark.deviceless
def test_named_scope_reaches_the_all_reduce_start_metadata():
    """Measured fact the interleave emitter relies on (see the deviceless module docstring)."""
    fn, args = _psum_step(gpu_mesh("h100", 4), dtype=jnp.bfloat16)
    module = parse_hlo(compile_text(fn, *args, target="h100").text)
    (start,) = [i for i in module.entry.instrs if i.opcode == "all-reduce-start"]
    assert start.op_name.endswith("/primary/psum_invariant")
    assert module.entry[module.done_of[start.name].done].op_name == start.op_name
    gemms = [i for i in module.entry.instrs if "/secondary/" in i.op_name]
    assert gemms


@pytest.mark.deviceless
def test_a_combined_all_reduce_loses_its_op_name_but_keeps_both_scopes():
    """XLA's all-reduce combiner merges the two batches' psums into one untagged op."""
    fn, args = _psum_step(gpu_mesh("h100", 4), secondary_psum=True, dtype=jnp.bfloat16)
    module = parse_hlo(compile_text(fn, *args, target="h100").text)
    (start,) = [i for i in module.entry.instrs if i.opcode == "all-reduce-start"]
    assert start.op_name == ""
    assert any("/primary/" in s for s in start.scopes)
    assert any("/secondary/" in s for s in start.scopes)
    split = compile_text(
        fn,
        *args,
        target="h100",
        flags={
            "xla_disable_hlo_passes": "all-reduce-combiner",
            "xla_gpu_all_reduce_combine_threshold_bytes": 0,
        },
    )
    starts = [i for i in parse_hlo(split.text).entry.instrs if i.opcode == "all-reduce-start"]
    assert sorted(i.op_name.split("/")[-2] for i in starts) == ["primary", "secondary"]


@pytest.mark.deviceless
def test_a100_flags_take_effect():
    fn, args = _psum_step(gpu_mesh("a100", 4), dtype=jnp.bfloat16)
    with_lhs = compile_text(fn, *args, target="a100")
    without = compile_text(
        fn, *args, target="a100", flags={"xla_gpu_enable_latency_hiding_scheduler": "false"}
    )
    assert with_lhs.flags["xla_gpu_enable_latency_hiding_scheduler"] is True
    assert "scheduling_name=" in with_lhs.text
    assert "scheduling_name=" not in without.text
