"""Benchmarks behind ``ligerjax bench NAME``: each one command, one result line, a peer."""

from __future__ import annotations

import os
import subprocess
import sys


def rerun_with_cpu_devices(bench: str, num_devices: int = 8) -> int:
    """Run ``ligerjax bench <bench>`` with this process's arguments again in a child whose
    CPU backend has ``num_devices`` virtual devices (JAX reads ``XLA_FLAGS`` once, when
    it starts its backends); return the child's exit status."""
    env = dict(os.environ)
    flag = f"--xla_force_host_platform_device_count={num_devices}"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    cmd = [sys.executable, "-m", "ligerjax.cli", "bench", bench, *sys.argv[3:]]
    return subprocess.call(cmd, env=env)
