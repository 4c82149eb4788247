"""Roofline, ring collectives, contention and NCCL settings: exact arithmetic."""

from __future__ import annotations

import pytest

from ligerjax.cost import (
    DEVICES,
    Contention,
    CostModel,
    DeviceSpec,
    apply_nccl_env,
    device_for_kind,
    get_device,
    nccl_env,
    nvidia_gpu_present,
)

# Round numbers so every duration is exact: effective compute 50 FLOP/s, memory 5 B/s,
# link 4 B/s, α 0.25 s, launch 1 s.
TOY = DeviceSpec(
    name="toy",
    vendor="nvidia",
    peak_flops=(("float16", 100.0), ("float32", 10.0)),
    memory_bandwidth=10.0,
    link_bandwidth=8.0,
    link_latency=0.25,
    launch_latency=1.0,
    memory_bytes=1e9,
    compute_efficiency=0.5,
    memory_efficiency=0.5,
    link_efficiency=0.5,
)


@pytest.fixture
def model() -> CostModel:
    return CostModel(TOY, Contention(compute=1.5, comm=1.2))


def test_roofline_takes_the_slower_of_compute_and_memory_plus_launch(model):
    assert model.op_duration(100, 0, "float16") == 1 + 100 / 50
    assert model.op_duration(100, 40, "float16") == 1 + 40 / 5  # memory-bound
    assert model.op_duration(100, 5, "fp16") == 3.0  # alias, compute-bound
    assert model.op_duration(10, 0, "float32") == 1 + 10 / 5
    assert model.is_compute_bound(100, 5) and not model.is_compute_bound(100, 40)
    assert model.compute_time(100, "float16") == 2.0
    assert model.memory_time(40) == 8.0


def test_ring_all_reduce_is_2_n_minus_1_over_n_bytes_over_bw_plus_alpha_steps(model):
    assert model.link_bandwidth == 4.0
    assert model.all_reduce(16, 4) == 2 * 3 / 4 * 16 / 4 + 0.25 * 3  # 6.75
    assert model.all_reduce(16, 2) == 2 * 1 / 2 * 16 / 4 + 0.25
    assert model.all_reduce(16, 1) == 0.0
    assert model.all_gather(16, 4) == 3 / 4 * 16 / 4 + 0.75
    assert model.reduce_scatter(16, 4) == model.all_gather(16, 4)
    assert model.permute(16) == 16 / 4 + 0.25
    assert model.comm_duration("all_reduce", 16, 4) == model.all_reduce(16, 4)
    assert model.comm_duration("permute", 16, 2) == model.permute(16)


def test_contention_inflates_by_kind(model):
    assert model.inflate(2.0, "compute") == 3.0
    assert model.inflate(2.0, "comm") == pytest.approx(2.4)
    flat = Contention.flat(0.8)
    assert flat.compute == flat.comm == pytest.approx(1.25)
    assert Contention() == flat  # Liger's prototype default
    assert Contention.none().factor("compute") == 1.0


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m: m.op_duration(1, -1), "bytes=-1"),
        (lambda m: m.op_duration(-5, 1), "flops=-5"),
        (lambda m: m.all_reduce(-2, 4), "bytes=-2"),
        (lambda m: m.all_reduce(8, 0), "n=0"),
        (lambda m: m.all_gather(8, -1), "n=-1"),
        (lambda m: m.permute(-3), "bytes=-3"),
        (lambda m: m.op_duration(1, 1, "int4"), "dtype='int4'"),
        (lambda m: m.comm_duration("broadcast", 1, 2), "collective='broadcast'"),
        (lambda m: m.inflate(1.0, "io"), "kind='io'"),
    ],
)
def test_bad_input_raises_value_error_naming_the_value(model, call, match):
    with pytest.raises(ValueError, match=match):
        call(model)


def test_bad_contention_and_device_raise():
    with pytest.raises(ValueError, match=r"compute=0\.9"):
        Contention(compute=0.9)
    with pytest.raises(ValueError, match=r"efficiency=1\.5"):
        Contention.flat(1.5)
    with pytest.raises(ValueError, match="device='tpu-v9'"):
        CostModel.for_device("tpu-v9")
    with pytest.raises(ValueError, match="device='nope'"):
        get_device("nope")


def test_device_table_has_the_six_devices_with_datasheet_peaks():
    assert set(DEVICES) == {"a100-pcie", "a100-sxm", "v100-nvlink", "h100-sxm", "h200", "cpu"}
    assert DEVICES["a100-pcie"].peak("bf16") == 312e12
    assert DEVICES["a100-pcie"].link_bandwidth == 32e9
    assert DEVICES["v100-nvlink"].peak("float16") == 125e12
    assert DEVICES["h100-sxm"].memory_bandwidth == 3.35e12
    assert DEVICES["h200"].memory_bandwidth == 4.8e12
    assert DEVICES["h200"].peak("bfloat16") == DEVICES["h100-sxm"].peak("bfloat16")
    assert get_device(TOY) is TOY


def test_device_spec_validates_its_fields():
    with pytest.raises(ValueError, match=r"compute_efficiency=1\.5"):
        TOY.replace(compute_efficiency=1.5)
    with pytest.raises(ValueError, match="memory_bandwidth=0"):
        TOY.replace(memory_bandwidth=0)
    with pytest.raises(ValueError, match="vendor='amd'"):
        TOY.replace(vendor="amd")


def test_nccl_env_values_and_validation():
    assert nccl_env(3, 256) == {"NCCL_MAX_NCHANNELS": "3", "NCCL_NTHREADS": "256"}
    with pytest.raises(ValueError, match="num_threads=100"):
        nccl_env(3, 100)
    with pytest.raises(ValueError, match="num_channels=0"):
        nccl_env(0, 256)


def test_nccl_env_is_applied_only_on_nvidia_hosts():
    env: dict[str, str] = {}
    assert apply_nccl_env(2, 128, environ=env, nvidia=False) == {}
    assert env == {}
    assert apply_nccl_env(2, 128, environ=env, nvidia=True) == nccl_env(2, 128)
    assert env["NCCL_MAX_NCHANNELS"] == "2" and env["NCCL_NTHREADS"] == "128"
    cpu_only: dict[str, str] = {"JAX_PLATFORMS": "cpu"}
    assert not nvidia_gpu_present(cpu_only)
    assert apply_nccl_env(2, 128, environ=cpu_only) == {}
    assert "NCCL_NTHREADS" not in cpu_only


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        ("NVIDIA H200", "h200"),
        ("NVIDIA H100 80GB HBM3", "h100-sxm"),
        ("NVIDIA A100-SXM4-80GB", "a100-sxm"),
        ("NVIDIA A100-PCIE-40GB", "a100-pcie"),
        ("NVIDIA A100 80GB PCIe", "a100-pcie"),
        ("Tesla V100-SXM2-32GB", "v100-nvlink"),
        ("cpu", "cpu"),
        ("NVIDIA H100 PCIe", None),
        ("NVIDIA L4", None),
        ("TPU v5 lite", None),
    ],
)
def test_device_for_kind_names_the_table_of_a_jax_device_kind(kind, name):
    assert device_for_kind(kind) == name
