"""Using every CPU core from one process.

XLA:CPU runs a convolution, and most elementwise and attention work, on one thread per device; only
dots use its intra-op pool. Exposing each core as its own host device and sharding the batch over a
`data` mesh axis runs those ops on all cores at once (measured on the 2-vCPU dev box: a 64 px ×32-channel
3×3 conv at 53 GFLOP/s on one device, 111 over two; the VQ-GAN smoke step 0.71 s → 0.43 s).

Call `use_every_core()` first thing in an entry point, before anything touches a JAX backend. It never
overrides a device count the user chose (`jax_num_cpu_devices`, or the XLA flag), and does nothing once
backends exist. On a GPU/TPU host it is harmless: it only shapes the CPU client, which is not the
default backend there.

`start_up()` is the first call of every CPU entry point: it sets the XLA flags chosen for this CPU's
vendor (`XLA_CHOICES`, each with the measurement behind it) and re-executes with huge pages.
`describe()` says where a run happened (CPU model, vendor, cores, ISA features, XLA flags in force,
versions, threads); every benchmark prints it.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import os
import sys

# jax is imported inside the functions: an entry point calls use_huge_pages() first, and it re-executes
# the process, so a jax import before it (~2 s of CPU) would be thrown away.

log = logging.getLogger(__name__)
XLA_FLAG = "--xla_force_host_platform_device_count"


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
NO_HUGE_PAGES_ENV = "CHAMELEON_JAX_NO_HUGE_PAGES"


def use_huge_pages() -> None:
    """Re-executes this process once with glibc's malloc asking for transparent huge pages.

    XLA:CPU allocates an executable's temporaries afresh on every call, as one large mmap; with 4 KiB
    pages each train step of benchmarks/bench_train_step.py took ~522,000 minor page faults (2 GiB
    faulted in and zeroed, 1.6-2.3 s of system time per 5-6 s step). With `glibc.malloc.hugetlb=1`
    (glibc >= 2.35; older ones ignore it) malloc madvises those blocks as huge pages: ~1,700 faults,
    0.2-0.4 s of system time, and the step 10-15% faster (measured 2026-11-26, same window).
    Call it first thing in an entry point's `__main__`: it must run before the process allocates
    much, and child processes inherit the setting. Does nothing off Linux, when the kernel disables
    transparent huge pages, when already set, or when CHAMELEON_JAX_NO_HUGE_PAGES is set.
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (not sys.platform.startswith("linux") or os.environ.get(NO_HUGE_PAGES_ENV)
            or "glibc.malloc.hugetlb" in tunables or not _transparent_huge_pages()):
        return
    os.environ["GLIBC_TUNABLES"] = f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def _transparent_huge_pages() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def core_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (containers, taskset)
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def use_every_core(n: int | None = None, divides: tuple[int, ...] = ()) -> int:
    """Asks for `n` CPU devices (default: one per core, lowered to the largest count that divides every
    batch size in `divides`, so a data-parallel mesh fits); returns the count that will be in effect."""
    if _configured_count() > 0:
        return _configured_count()
    flags = os.environ.get("XLA_FLAGS", "")
    if XLA_FLAG in flags:
        return int(flags.split(XLA_FLAG + "=")[1].split()[0])
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
        log.warning("use_every_core() called after JAX initialised its backends; keeping one CPU device")
        return 1
    n = n or core_count()
    while n > 1 and any(b % n for b in divides):
        n -= 1
    _set_count(n)
    return n


def data_mesh(batch_size: int, devices=None) -> "jax.sharding.Mesh":
    """A 1-D ("data",) mesh over the first k of `devices` (default all), k the largest count that divides
    `batch_size`, so a batch shards evenly over it (one device per core after `use_every_core`)."""
    import jax
    devices = list(jax.devices() if devices is None else devices)
    k = max(n for n in range(1, len(devices) + 1) if batch_size % n == 0)
    return jax.make_mesh((k,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices[:k])


def _configured_count() -> int:
    import jax
    return jax.config.jax_num_cpu_devices  # -1 unless someone chose


def _set_count(n: int) -> None:
    import jax
    jax.config.update("jax_num_cpu_devices", n)


# ---------------------------------------------------------------------------------------------------
# Where a run happens, and the XLA flags chosen for it.

# ISA features that decide which matmul kernels a library can use: AVX-512 (and its bf16/fp16 dot
# instructions) and Intel's AMX tiles, which oneDNN uses and XLA's YNNPACK/Eigen kernels do not.
ISA_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")
INTEL, AMD = "GenuineIntel", "AuthenticAMD"
XLA_FLAGS_SET_ENV = "CHAMELEON_JAX_XLA_FLAGS_SET"  # what start_up() added, so a report can tell it apart


@dataclasses.dataclass(frozen=True)
class Machine:
    vendor: str  # the cpuid vendor string: GenuineIntel, AuthenticAMD, ...
    model: str  # "model name" from /proc/cpuinfo
    cpus: int  # logical CPUs this process may use
    threads_per_core: int  # 2 where the CPUs are hyperthreads sharing one core's vector units
    features: tuple[str, ...]  # the ISA_FEATURES present


def machine(cpuinfo_text: str | None = None) -> Machine:
    """This host's CPU, from /proc/cpuinfo (its first processor block); other systems give what
    `platform` knows and no features."""
    if cpuinfo_text is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo_text = f.read()
        except OSError:
            import platform
            return Machine(platform.machine(), platform.processor() or "unknown", core_count(), 1, ())
    fields: dict[str, str] = {}
    for line in cpuinfo_text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    flags = set(fields.get("flags", "").split())
    siblings, cores = int(fields.get("siblings", 0) or 0), int(fields.get("cpu cores", 0) or 0)
    return Machine(vendor=fields.get("vendor_id", "unknown"), model=fields.get("model name", "unknown"),
                   cpus=core_count(), threads_per_core=max(1, siblings // cores) if cores else 1,
                   features=tuple(f for f in ISA_FEATURES if f in flags))


@dataclasses.dataclass(frozen=True)
class XlaChoice:
    """XLA flags that won on one CPU vendor and not on another, with the measurement behind them."""
    vendors: tuple[str, ...]
    flags: tuple[str, ...]
    reason: str


# None yet. Measured 2026-12-02 on AMD EPYC with benchmarks/bench_xla_cpu_options.py (jaxlib 0.10.2):
# - oneDNN dots (--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_use_onednn=true
#   --xla_cpu_experimental_onednn_fusion_type=dot), the candidate for Intel, where torch's own matmuls
#   come from Intel's libraries: 5-15% more work per CPU-second than YNNPACK on the train step's matmul
#   shapes, but 2.5-5x slower on decode's [1 or 16, 256] x [256, 65536] head, and the train step
#   itself aborts when it first runs ("partition compile failed", a bug in XLA's computation
#   partitioner), with XLA's new or old loop emitters alike;
# - Eigen dots and convolutions (YNNPACK off): the same abort; the 64 px VQ encode 0.79x;
# - 512-bit vectors in XLA's own loops: within noise.
# So every vendor keeps XLA's default (YNNPACK). A flag that wins on one vendor goes here, with its
# measurement, after bench_xla_cpu_options has shown it on that vendor.
XLA_CHOICES: tuple[XlaChoice, ...] = ()


def xla_flags_for(m: Machine) -> list[str]:
    return [flag for choice in XLA_CHOICES if m.vendor in choice.vendors for flag in choice.flags]


def configure_xla(m: Machine | None = None) -> list[str]:
    """Appends this CPU's chosen XLA flags to XLA_FLAGS and returns those it added.

    A flag the user already set (same name, any value) is kept as the user wrote it. XLA reads
    XLA_FLAGS once, when the first backend starts, so this must run before anything touches JAX."""
    env = os.environ.get("XLA_FLAGS", "")
    present = {tok.split("=", 1)[0] for tok in env.split()}
    added = [f for f in xla_flags_for(m or machine()) if f.split("=", 1)[0] not in present]
    if added:
        if "jax" in sys.modules:
            from jax._src import xla_bridge
            if xla_bridge.backends_are_initialized():
                log.warning("configure_xla() called after JAX started its backends: %s not applied", added)
                return []
        os.environ["XLA_FLAGS"] = " ".join([env, *added]).strip()
        previous = os.environ.get(XLA_FLAGS_SET_ENV, "")
        os.environ[XLA_FLAGS_SET_ENV] = " ".join([previous, *added]).strip()
    return added


def start_up() -> None:
    """The first call of a CPU entry point's `__main__`: this CPU's XLA flags, then huge pages (which
    re-executes the process; the flags travel in its environment)."""
    configure_xla()
    use_huge_pages()


def describe(threads: str = "") -> str:
    """Where this process runs, for a benchmark's header: CPU, ISA features, the XLA flags in force
    (and which of them start_up() chose for this CPU), versions, threads. `threads` adds the
    caller's own thread settings (e.g. torch's thread counts)."""
    m = machine()
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"
    set_here = os.environ.get(XLA_FLAGS_SET_ENV, "")
    chosen = f"of which chameleon_jax.cpu chose for {m.vendor}: {set_here}" if set_here else \
        f"chameleon_jax.cpu chose none for {m.vendor}"
    devices = ""
    if "jax" in sys.modules:
        from jax._src import xla_bridge
        if xla_bridge.backends_are_initialized():
            import jax
            devices = f"{jax.device_count()} {jax.default_backend()} device(s); "
    lines = [
        f"cpu: {m.model} ({m.vendor}), {m.cpus} logical CPUs usable, {m.threads_per_core} thread(s) per core; "
        f"ISA: {' '.join(m.features) or 'none of ' + '/'.join(ISA_FEATURES)}"
        f"{'' if 'amx_tile' in m.features else ' (no AMX)'}",
        f"XLA_FLAGS: {os.environ.get('XLA_FLAGS', '')!r} ({chosen})",
        f"versions: jax {version('jax')}, jaxlib {version('jaxlib')}, torch {version('torch')}, "
        f"transformers {version('transformers')}",
        f"threads: {devices}XLA:CPU intra-op pool {core_count()} threads per process; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
        f"{'; ' + threads if threads else ''}; GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}",
    ]
    return "\n".join(lines)
