"""chameleon_jax.cpu: the host-device count it asks XLA for, the CPU it reports, the XLA flags it chooses."""
import os

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


INTEL_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
siblings\t: 2
cpu cores\t: 1
flags\t\t: fpu sse avx2 fma avx512f avx512_vnni avx512_bf16 avx512_fp16

processor\t: 1
vendor_id\t: GenuineIntel
"""
AMD_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
siblings\t: 2
cpu cores\t: 2
flags\t\t: fpu avx2 fma avx512f avx512_bf16 amx_tile_not_a_feature
"""


def test_machine_reads_vendor_model_hyperthreads_and_isa():
    intel, amd = cpu.machine(INTEL_CPUINFO), cpu.machine(AMD_CPUINFO)
    assert (intel.vendor, intel.model, intel.threads_per_core) == (cpu.INTEL, "Intel(R) Xeon(R) Processor", 2)
    assert intel.features == ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16")
    assert (amd.vendor, amd.threads_per_core) == (cpu.AMD, 1)
    assert "amx_tile" not in amd.features  # whole flag names only


def test_configure_xla_adds_the_vendors_flags_and_keeps_the_users(monkeypatch):
    choices = (cpu.XlaChoice((cpu.INTEL,), ("--xla_a=1", "--xla_b=true"), "measured"),
               cpu.XlaChoice((cpu.AMD,), ("--xla_c=2",), "measured"))
    monkeypatch.setattr(cpu, "XLA_CHOICES", choices)
    monkeypatch.setattr("jax._src.xla_bridge.backends_are_initialized", lambda: False)
    monkeypatch.delenv(cpu.XLA_FLAGS_SET_ENV, raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_b=false --other=1")
    assert cpu.configure_xla(cpu.machine(INTEL_CPUINFO)) == ["--xla_a=1"]  # the user's --xla_b stays
    assert os.environ["XLA_FLAGS"] == "--xla_b=false --other=1 --xla_a=1"
    assert os.environ[cpu.XLA_FLAGS_SET_ENV] == "--xla_a=1"
    assert cpu.configure_xla(cpu.machine(INTEL_CPUINFO)) == []  # idempotent (the huge-page re-exec runs it again)
    monkeypatch.setenv("XLA_FLAGS", "")
    assert cpu.configure_xla(cpu.machine(AMD_CPUINFO)) == ["--xla_c=2"]
    monkeypatch.setattr("jax._src.xla_bridge.backends_are_initialized", lambda: True)
    monkeypatch.setenv("XLA_FLAGS", "")
    assert cpu.configure_xla(cpu.machine(AMD_CPUINFO)) == [] and os.environ["XLA_FLAGS"] == ""  # too late


def test_describe_names_the_cpu_the_flags_and_the_versions(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_x=1")
    text = cpu.describe("torch 2 threads")
    m = cpu.machine()
    assert m.model in text and m.vendor in text and "--xla_x=1" in text
    assert f"jax {jax.__version__}" in text and "torch 2 threads" in text and "intra-op pool" in text
