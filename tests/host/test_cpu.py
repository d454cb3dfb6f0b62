"""hostinfo: CPU flags, ISA features, NUMA/physical cores, memory, disk.

Recorded /proc/cpuinfo samples live in tests/fixtures/cpuinfo (see its
README); sysfs trees are written per test, shaped like the kernel's.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from ktenv.host import cpu as hostinfo

FIX = Path(__file__).parents[1] / "fixtures" / "cpuinfo"


def sample(name: str) -> hostinfo.CpuInfo:
    return hostinfo.cpu_info((FIX / name).read_text())


# --- cpu_info ---------------------------------------------------------------------

@pytest.mark.parametrize("name, model, vendor, logical", [
    ("sapphire-rapids-xeon-8462y.txt", "Intel(R) Xeon(R) Platinum 8462Y+", "GenuineIntel", 4),
    ("zen4-threadripper-7960x.txt", "AMD Ryzen Threadripper 7960X 24-Cores", "AuthenticAMD", 4),
    ("skylake-sp-xeon-gold-6140.txt", "Intel(R) Xeon(R) Gold 6140 CPU @ 2.30GHz", "GenuineIntel", 8),
    ("cascade-lake-xeon-silver-4214.txt", "Intel(R) Xeon(R) Silver 4214 CPU @ 2.20GHz", "GenuineIntel", 4),
    ("haswell-e-i7-5820k.txt", "Intel(R) Core(TM) i7-5820K CPU @ 3.30GHz", "GenuineIntel", 12),
    ("kvm-amd-epyc-zen4-2vcpu.txt", "AMD EPYC", "AuthenticAMD", 2),
    ("emerald-rapids-kvm-16vcpu.txt", "Intel(R) Xeon(R) Processor", "GenuineIntel", 16),
])
def test_cpu_info_fields(name, model, vendor, logical):
    c = sample(name)
    assert (c.model, c.vendor, c.logical_cpus) == (model, vendor, logical)
    assert "avx2" in c.flags and all(f == f.lower() for f in c.flags)


ISA = {
    # feature:            SPR    Zen4   SKX    CLX    HSW
    "amx_tile":          (True, False, False, False, False),
    "amx_int8":          (True, False, False, False, False),
    "amx_bf16":          (True, False, False, False, False),
    "avx512f":           (True, True, True, True, False),
    "avx512bw":          (True, True, True, True, False),
    "avx512dq":          (True, True, True, True, False),
    "avx512vl":          (True, True, True, True, False),
    "avx512_vnni":       (True, True, False, True, False),
    "avx512_bf16":       (True, True, False, False, False),
    "avx512_vbmi":       (True, True, False, False, False),
    "avx2":              (True, True, True, True, True),
    "fma":               (True, True, True, True, True),
    "f16c":              (True, True, True, True, True),
}
SAMPLES = ("sapphire-rapids-xeon-8462y.txt", "zen4-threadripper-7960x.txt", "skylake-sp-xeon-gold-6140.txt",
           "cascade-lake-xeon-silver-4214.txt", "haswell-e-i7-5820k.txt")


@pytest.mark.parametrize("i, name", list(enumerate(SAMPLES)))
def test_isa_features_per_generation(i, name):
    got = hostinfo.isa_features(sample(name).flags)
    assert list(got) == list(hostinfo.ISA_FEATURES)
    assert got == {k: v[i] for k, v in ISA.items()}


def test_isa_summary_lines():
    assert hostinfo.isa_summary(sample("sapphire-rapids-xeon-8462y.txt").flags) == (
        "AMX (tile/int8/bf16), AVX512 F/BW/DQ/VL/VNNI/BF16/VBMI, AVX2, FMA, F16C")
    assert hostinfo.isa_summary(sample("skylake-sp-xeon-gold-6140.txt").flags) == "AVX512 F/BW/DQ/VL, AVX2, FMA, F16C"
    assert hostinfo.isa_summary(sample("haswell-e-i7-5820k.txt").flags) == "AVX2, FMA, F16C"
    assert hostinfo.isa_summary(["sse2"]) == "none of AVX2/AVX512/AMX"


def test_vbmi_is_found_under_either_spelling():
    # Linux prints `avx512vbmi` (no underscore) on both Zen 4 and SPR; the
    # feature must still count, as it does for kt-kernel's own loader.
    flags = sample("zen4-threadripper-7960x.txt").flags
    assert "avx512vbmi" in flags and "avx512_vbmi" not in flags
    assert hostinfo.has_flag(flags, "avx512_vbmi")
    assert not hostinfo.has_flag(flags, "avx512_vbmi2x")


def test_flags_are_the_intersection_of_all_processors():
    # A hybrid part (or a VM with uneven CPUID masks) must report only what
    # every core can run: a thread may land on any of them.
    text = (FIX / "sapphire-rapids-xeon-8462y.txt").read_text()
    blocks = text.strip().split("\n\n")
    blocks[-1] = blocks[-1].replace(" amx_tile", "")
    c = hostinfo.cpu_info("\n\n".join(blocks) + "\n")
    assert "amx_tile" not in c.flags and "amx_int8" in c.flags
    assert not hostinfo.isa_features(c.flags)["amx_tile"]


def test_cpu_info_reads_this_machine():
    c = hostinfo.cpu_info()
    assert c.logical_cpus >= 1 and c.model
    if os.uname().machine == "x86_64":
        assert "sse2" in c.flags


# --- numa_nodes -------------------------------------------------------------------

def write_sysfs(root: Path, nodes: dict[int, list[int]], siblings: dict[int, list[int]] | None,
                core_ids: dict[int, tuple[int, int]] | None = None, with_node_dir: bool = True) -> Path:
    """A /sys shaped like the kernel's: node/nodeN/cpulist and cpu/cpuN/topology/*."""
    sysfs = root / "sys"
    all_cpus = sorted(c for cs in nodes.values() for c in cs)
    cpu_dir = sysfs / "devices/system/cpu"
    cpu_dir.mkdir(parents=True)
    (cpu_dir / "online").write_text(f"{all_cpus[0]}-{all_cpus[-1]}\n")
    for cpu in all_cpus:
        topo = cpu_dir / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        if siblings is not None:
            (topo / "thread_siblings_list").write_text(",".join(map(str, siblings[cpu])) + "\n")
        if core_ids is not None:
            pkg, core = core_ids[cpu]
            (topo / "physical_package_id").write_text(f"{pkg}\n")
            (topo / "core_id").write_text(f"{core}\n")
    if with_node_dir:
        for n, cpus in nodes.items():
            d = sysfs / "devices/system/node" / f"node{n}"
            d.mkdir(parents=True)
            (d / "cpulist").write_text(_cpulist(cpus) + "\n")
    return sysfs


def _cpulist(cpus: list[int]) -> str:
    out, start = [], None
    for i, c in enumerate(cpus):
        if start is None:
            start = c
        if i + 1 == len(cpus) or cpus[i + 1] != c + 1:
            out.append(f"{start}-{c}" if c != start else f"{c}")
            start = None
    return ",".join(out)


def spr_like(cores_per_node: int = 4, nodes: int = 2):
    """2 sockets, HT: node n has cores n*C..(n+1)*C-1 and their siblings +nodes*C (as on the 8462Y+)."""
    total = cores_per_node * nodes
    layout = {n: list(range(n * cores_per_node, (n + 1) * cores_per_node))
              + list(range(total + n * cores_per_node, total + (n + 1) * cores_per_node)) for n in range(nodes)}
    sib = {}
    for c in range(total):
        sib[c] = sib[c + total] = [c, c + total]
    ids = {c: (c // cores_per_node, c % cores_per_node) for c in range(total)}
    ids.update({c + total: ids[c] for c in range(total)})
    return layout, sib, ids


def test_parse_cpulist():
    assert hostinfo.parse_cpulist("0-31,64-95\n") == list(range(32)) + list(range(64, 96))
    assert hostinfo.parse_cpulist("0,2,4-5") == [0, 2, 4, 5]
    assert hostinfo.parse_cpulist("\n") == []


def test_numa_counts_hyperthread_siblings_once(tmp_path):
    layout, sib, _ = spr_like()
    nodes = hostinfo.numa_nodes(write_sysfs(tmp_path, layout, sib))
    assert [(n.id, len(n.cpus), n.physical_cores) for n in nodes] == [(0, 8, 4), (1, 8, 4)]
    assert nodes[0].cpus == (0, 1, 2, 3, 8, 9, 10, 11)


def test_numa_falls_back_to_core_id_and_package(tmp_path):
    # Without thread_siblings_list the (package, core_id) pair decides; core_id
    # alone repeats across sockets, which would undercount by half.
    layout, _, ids = spr_like()
    nodes = hostinfo.numa_nodes(write_sysfs(tmp_path, layout, None, ids))
    assert [n.physical_cores for n in nodes] == [4, 4]
    one_node = {0: sorted(layout[0] + layout[1])}
    nodes = hostinfo.numa_nodes(write_sysfs(tmp_path / "b", one_node, None, ids))
    assert [(len(n.cpus), n.physical_cores) for n in nodes] == [(16, 8)]


def test_numa_without_topology_counts_logical(tmp_path):
    nodes = hostinfo.numa_nodes(write_sysfs(tmp_path, {0: [0, 1, 2]}, None))
    assert [(n.id, n.physical_cores) for n in nodes] == [(0, 3)]


def test_numa_memory_only_node_is_kept_with_no_cpus(tmp_path):
    layout, sib, _ = spr_like(2, 1)
    sysfs = write_sysfs(tmp_path, layout, sib)
    d = sysfs / "devices/system/node/node1"  # e.g. CXL memory: a node without CPUs
    d.mkdir()
    (d / "cpulist").write_text("\n")
    nodes = hostinfo.numa_nodes(sysfs)
    assert [(n.id, n.cpus, n.physical_cores) for n in nodes] == [(0, (0, 1, 2, 3), 2), (1, (), 0)]


def test_numa_without_node_directory_is_one_node(tmp_path):
    layout, sib, _ = spr_like(2, 2)
    nodes = hostinfo.numa_nodes(write_sysfs(tmp_path, layout, sib, with_node_dir=False))
    assert [(n.id, len(n.cpus), n.physical_cores) for n in nodes] == [(0, 8, 4)]
    # Not even /sys/devices/system/cpu: os.cpu_count() logical CPUs, one node.
    nodes = hostinfo.numa_nodes(tmp_path / "nothing")
    assert len(nodes) == 1 and len(nodes[0].cpus) == (os.cpu_count() or 1)


def test_numa_on_this_machine_agrees_with_the_kernel():
    nodes = hostinfo.numa_nodes()
    assert sum(len(n.cpus) for n in nodes) == len(hostinfo.parse_cpulist(Path("/sys/devices/system/cpu/online").read_text()))
    assert all(0 < n.physical_cores <= len(n.cpus) for n in nodes if n.cpus)
    # lscpu is an independent reader of the same topology.
    lscpu = shutil.which("lscpu")
    if lscpu:
        import subprocess
        rows = [r for r in subprocess.run([lscpu, "-p=CORE,SOCKET"], capture_output=True, text=True).stdout.splitlines()
                if r and not r.startswith("#")]
        assert sum(n.physical_cores for n in nodes) == len(set(rows))


# --- memory and disk --------------------------------------------------------------

MEMINFO = """MemTotal:       131928064 kB
MemFree:        127252112 kB
MemAvailable:   130246552 kB
Buffers:          513852 kB
"""


def test_memory_bytes_from_text_and_live():
    assert hostinfo.memory_bytes(MEMINFO) == 131928064 * 1024
    assert hostinfo.memory_available_bytes(MEMINFO) == 130246552 * 1024
    assert hostinfo.memory_available_bytes("MemTotal: 1 kB\n") is None
    # The kernel's own count through another door: both come from totalram_pages.
    assert abs(hostinfo.memory_bytes() - os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) < 64 << 20


def test_memory_bytes_refuses_text_without_memtotal():
    with pytest.raises(ValueError, match="MemTotal"):
        hostinfo.memory_bytes("MemFree: 1 kB\n")


def test_disk_free_of_a_path_not_created_yet(tmp_path):
    future = tmp_path / "not" / "yet" / "there"
    assert abs(hostinfo.disk_free(future) - shutil.disk_usage(tmp_path).free) < 256 << 20
