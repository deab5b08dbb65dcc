"""chameleon_jax.cpu: the host-device count it asks XLA for."""
import jax

from chameleon_jax import cpu


def test_a_count_already_chosen_wins():
    assert jax.config.jax_num_cpu_devices == 8  # conftest's choice
    assert cpu.use_every_core(n=2) == 8 and jax.device_count() == 8


def test_device_count_divides_every_batch(monkeypatch):
    asked = []
    monkeypatch.setattr(cpu, "_configured_count", lambda: -1)
    monkeypatch.setattr(cpu, "_set_count", asked.append)
    monkeypatch.setattr("jax._src.xla_bridge.backends_are_initialized", lambda: False)
    monkeypatch.setenv("XLA_FLAGS", "")
    assert cpu.use_every_core(n=6, divides=(8, 8)) == 4  # 6 cores, batch 8: the largest divisor is 4
    assert cpu.use_every_core(n=3, divides=(8,)) == 2
    assert cpu.use_every_core(n=5, divides=(7,)) == 1
    assert asked == [4, 2, 1]
    monkeypatch.setenv("XLA_FLAGS", f"--foo=1 {cpu.XLA_FLAG}=3")  # the user's XLA flag is kept
    assert cpu.use_every_core(n=6) == 3 and len(asked) == 3
    monkeypatch.setattr("jax._src.xla_bridge.backends_are_initialized", lambda: True)
    monkeypatch.setenv("XLA_FLAGS", "")
    assert cpu.use_every_core(n=4) == 1 and len(asked) == 3  # too late: nothing changes


def test_data_mesh_spans_the_largest_device_count_dividing_the_batch():
    import jax

    from chameleon_jax import cpu

    devices = jax.devices()  # 8 fake CPU devices (conftest)
    assert cpu.data_mesh(12, devices).devices.size == 6
    assert cpu.data_mesh(7, devices).devices.size == 7
    assert cpu.data_mesh(5, devices[:4]).devices.size == 1
    assert cpu.data_mesh(16, devices).axis_names == ("data",)


def _run_child(env_extra):
    import os
    import subprocess
    import sys
    code = ("import os; from chameleon_jax import cpu; cpu.use_huge_pages(); "
            "print(os.getpid(), os.environ.get('GLIBC_TUNABLES', ''))")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "CHAMELEON_JAX_NO_HUGE_PAGES")}
    env.update(env_extra, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert len([ln for ln in lines if ln.strip()]) == 1, out.stdout  # the re-exec prints once, not twice
    return lines[0].split(" ", 1)[1]


def test_use_huge_pages_reexecs_once_with_the_tunable_and_keeps_other_tunables():
    from chameleon_jax import cpu
    if not cpu._transparent_huge_pages():
        import pytest
        pytest.skip("this kernel has transparent huge pages off; use_huge_pages is then a no-op")
    assert _run_child({}) == cpu.HUGE_PAGES_TUNABLE
    assert _run_child({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == \
        "glibc.malloc.arena_max=2:" + cpu.HUGE_PAGES_TUNABLE
    assert _run_child({"CHAMELEON_JAX_NO_HUGE_PAGES": "1"}) == ""
