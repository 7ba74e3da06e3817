"""Ring attention for JAX (cuflash.jax_distributed) on CPUs: under jax.jit(jax.shard_map) over 1-4 host
devices, with a float64 chunk attention in place of the kernels, against whole-sequence attention; each
case in a process of its own (the host device count is fixed when JAX starts)."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("jax")

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("world_size, layout, causal, packed", [
    (1, "zigzag", True, False), (2, "zigzag", True, False), (3, "contiguous", True, False),
    (4, "zigzag", False, False), (4, "zigzag", True, False), (2, "contiguous", False, False),
    (1, "zigzag", True, True), (3, "zigzag", True, True), (4, "contiguous", True, True), (2, "zigzag", False, True)])
def test_ring_attention_under_jit_and_grad(world_size, layout, causal, packed):
    """packed: documents packed into one sequence across the devices (cu_seqlens)."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={world_size}", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [HERE, env.get("PYTHONPATH")]))
    code = f"import ring_helpers; ring_helpers.jax_ring_check({world_size}, {layout!r}, {causal}, packed={packed})"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]


@pytest.mark.parametrize("world_size, layout, causal, mask", [
    (1, "zigzag", True, "window"), (2, "zigzag", True, "window"), (3, "contiguous", False, "local_global_random"),
    (4, "zigzag", True, "local_global_random"), (4, "contiguous", True, "window")])
def test_ring_attention_with_a_block_mask(world_size, layout, causal, mask):
    """A block mask of the whole sequence: each device's chunk pairs take their parts of it (a lax.switch on
    the traced device index); pairs it leaves empty are skipped."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={world_size}", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [HERE, env.get("PYTHONPATH")]))
    code = f"import ring_helpers; ring_helpers.jax_ring_check({world_size}, {layout!r}, {causal}, mask={mask!r})"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]


def test_layout_round_trip_and_refusals():
    import jax.numpy as jnp

    import cuflash.jax_distributed as jd

    x = jnp.arange(2 * 16).reshape(2, 16)
    for layout in ("zigzag", "contiguous"):
        for world_size in (1, 2, 4):
            assert (jd.from_layout(jd.to_layout(x, world_size, layout), world_size, layout) == x).all()
    assert jd.to_layout(x, 2)[0].tolist() == [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11]
    with pytest.raises(ValueError, match="equal chunks"):
        jd.to_layout(x, 3)
    with pytest.raises(ValueError, match="layout"):
        jd.to_layout(x, 2, "striped")
