"""The host's NVIDIA GPUs: name, compute capability, memory, UUID, driver.

Two sources, NVML first: `nvidia-ml-py` (pynvml) talks to libnvidia-ml, the
library nvidia-smi itself is built on, and needs no GPU to import. Where the
library does not load (a container without the driver's user-space libraries
mounted, say) `nvidia-smi` may still work, so its CSV query and the header of
its plain output are the fallback.

Every source is split into a *read* (talks to the world, returns raw text or a
raw dict) and a *parse* (pure), so recorded outputs replay in tests exactly as
they came from a real host. Which ktenv arch a compute capability needs is read
from envs/*.toml (`compute_capability`), never from a table here.
"""

from __future__ import annotations

import csv
import io
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field

from ..spec import Arch, Spec

# The fields doctor needs, in the order parse_smi_query expects them.
SMI_FIELDS = ("index", "name", "compute_cap", "memory.total", "uuid", "driver_version", "pci.bus_id")
SMI_QUERY = ["nvidia-smi", f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader"]



@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    compute_capability: str  # "9.0"; "" when the source could not tell
    memory_bytes: int
    uuid: str
    pci_bus_id: str = ""


@dataclass(frozen=True)
class GpuHost:
    gpus: tuple[Gpu, ...]
    driver_version: str = ""
    cuda_version: str = ""  # the newest CUDA the driver supports, "13.0"
    source: str = "none"  # "nvml", "nvidia-smi" or "none"
    # Why a source gave nothing, one sentence per source tried.
    notes: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict:
        return asdict(self)


# --- NVML ------------------------------------------------------------------

def read_nvml() -> dict:
    """Everything doctor uses from NVML, as a JSON-able dict (a recording).

    Raises RuntimeError with a sentence when pynvml or libnvidia-ml is missing
    or the driver does not answer.
    """
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        raise RuntimeError("the Python package nvidia-ml-py (pynvml) is not installed") from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        raise RuntimeError(f"NVML did not initialise ({e}); libnvidia-ml.so.1 comes with the NVIDIA driver") from None
    try:
        record = {
            "driver_version": _text(pynvml.nvmlSystemGetDriverVersion()),
            "cuda_driver_version": int(pynvml.nvmlSystemGetCudaDriverVersion()),
            "devices": [],
        }
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            dev = {"index": i, "name": _text(pynvml.nvmlDeviceGetName(h))}
            try:
                dev["cc"] = list(pynvml.nvmlDeviceGetCudaComputeCapability(h))
            except pynvml.NVMLError:
                dev["cc"] = None
            dev["memory_total"] = int(pynvml.nvmlDeviceGetMemoryInfo(h).total)
            dev["uuid"] = _text(pynvml.nvmlDeviceGetUUID(h))
            try:
                dev["pci_bus_id"] = _text(pynvml.nvmlDeviceGetPciInfo(h).busId)
            except pynvml.NVMLError:
                dev["pci_bus_id"] = ""
            record["devices"].append(dev)
        return record
    except pynvml.NVMLError as e:
        raise RuntimeError(f"NVML answered with an error ({e})") from None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # shutting down a half-initialised NVML is best effort
            pass


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def cuda_version_from_int(v: int) -> str:
    """NVML/cudaDriverGetVersion encode 12.8 as 12080."""
    if not v:
        return ""
    return f"{v // 1000}.{(v % 1000) // 10}"


def from_nvml_record(record: dict) -> GpuHost:
    gpus = []
    for d in record.get("devices", []):
        cc = d.get("cc")
        gpus.append(Gpu(
            index=int(d["index"]),
            name=d["name"],
            compute_capability=f"{cc[0]}.{cc[1]}" if cc else "",
            memory_bytes=int(d["memory_total"]),
            uuid=d["uuid"],
            pci_bus_id=d.get("pci_bus_id", ""),
        ))
    return GpuHost(
        gpus=tuple(gpus),
        driver_version=record.get("driver_version", ""),
        cuda_version=cuda_version_from_int(record.get("cuda_driver_version", 0)),
        source="nvml",
    )


# --- nvidia-smi -------------------------------------------------------------

def read_nvidia_smi(exe: str | None = None, timeout: float = 30) -> tuple[str, str]:
    """(CSV query output, plain output) of nvidia-smi. RuntimeError when it fails."""
    exe = exe or shutil.which("nvidia-smi")
    if not exe:
        raise RuntimeError("nvidia-smi is not on PATH")
    out = []
    for cmd in ([exe] + SMI_QUERY[1:], [exe]):
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RuntimeError(f"`{' '.join(cmd)}` could not run ({e})") from None
        if p.returncode != 0:
            msg = (p.stdout + p.stderr).strip().splitlines()
            raise RuntimeError(f"`{' '.join(cmd)}` failed with exit code {p.returncode}: {msg[0] if msg else 'no output'}")
        out.append(p.stdout)
    return out[0], out[1]


_NA = {"", "[n/a]", "n/a", "[not supported]", "[field not supported]", "[unknown error]"}


def _mib(text: str) -> int:
    m = re.fullmatch(r"(\d+)\s*(MiB)?", text.strip())
    return int(m.group(1)) * 1024 * 1024 if m else 0


def parse_smi_query(text: str) -> tuple[list[Gpu], str]:
    """Parse `nvidia-smi --query-gpu=<SMI_FIELDS> --format=csv,noheader[,nounits]`.

    Returns the GPUs and the driver version. Drivers older than ~510 do not know
    `compute_cap` and print "[Field not supported]"; such GPUs get cc "".
    """
    gpus, driver = [], ""
    for row in csv.reader(io.StringIO(text), skipinitialspace=True):
        if not row or not "".join(row).strip():
            continue
        if len(row) != len(SMI_FIELDS):
            raise ValueError(f"nvidia-smi printed a row with {len(row)} fields, expected {len(SMI_FIELDS)}: {row!r}")
        f = dict(zip(SMI_FIELDS, (c.strip() for c in row)))
        cc = f["compute_cap"]
        if cc.lower() in _NA or not re.fullmatch(r"\d+\.\d+", cc):
            cc = ""
        gpus.append(Gpu(
            index=int(f["index"]),
            name=f["name"],
            compute_capability=cc,
            memory_bytes=_mib(f["memory.total"]),
            uuid=f["uuid"],
            pci_bus_id=f["pci.bus_id"],
        ))
        if f["driver_version"].lower() not in _NA:
            driver = f["driver_version"]
    return gpus, driver


_HEADER = re.compile(r"Driver Version:\s*(?P<driver>[\d.]+).*?CUDA Version:\s*(?P<cuda>[\d.]+|N/A)")


def parse_smi_header(text: str) -> tuple[str, str]:
    """(driver version, CUDA version) from the banner of plain `nvidia-smi`."""
    m = _HEADER.search(text)
    if not m:
        return "", ""
    cuda = m.group("cuda")
    return m.group("driver"), "" if cuda == "N/A" else cuda


def from_smi(query_text: str, header_text: str) -> GpuHost:
    gpus, driver = parse_smi_query(query_text)
    hdriver, cuda = parse_smi_header(header_text)
    return GpuHost(gpus=tuple(gpus), driver_version=driver or hdriver, cuda_version=cuda, source="nvidia-smi")


# --- detection --------------------------------------------------------------

def detect(nvml=read_nvml, smi=read_nvidia_smi) -> GpuHost:
    """NVML, else nvidia-smi, else an empty host whose notes say why.

    `nvml` and `smi` are the readers; tests pass recorded ones.
    """
    notes = []
    if nvml is not None:
        try:
            return from_nvml_record(nvml())
        except RuntimeError as e:
            notes.append(f"NVML: {e}.")
    if smi is not None:
        try:
            host = from_smi(*smi())
            return GpuHost(host.gpus, host.driver_version, host.cuda_version, host.source, tuple(notes))
        except (RuntimeError, ValueError) as e:
            notes.append(f"nvidia-smi: {e}.")
    return GpuHost(gpus=(), source="none", notes=tuple(notes))


# --- arch mapping -----------------------------------------------------------

def _cc_key(cc: str) -> tuple[int, int] | None:
    m = re.fullmatch(r"(\d+)(?:\.(\d+))?", cc.strip())
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def arch_for_cc(spec: Spec, cc: str) -> Arch | None:
    """The envs/*.toml arch (supported or not) whose compute_capability is cc."""
    key = _cc_key(cc)
    if key is None:
        return None
    for arch in spec.archs.values():
        if _cc_key(arch.compute_capability) == key:
            return arch
    return None


def version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v))


# --- CUDA_VISIBLE_DEVICES ---------------------------------------------------

@dataclass(frozen=True)
class Visible:
    gpus: tuple[Gpu, ...]
    note: str = ""  # set when the value could not be read exactly as CUDA will


def visible_gpus(gpus: tuple[Gpu, ...] | list[Gpu], env: dict) -> Visible:
    """The GPUs a CUDA program will see, from CUDA_VISIBLE_DEVICES.

    NVML and nvidia-smi ignore the variable and number GPUs in PCI bus order.
    CUDA numbers them fastest first unless CUDA_DEVICE_ORDER=PCI_BUS_ID, so on
    a host with different GPU models a bare index can name another card than
    nvidia-smi's. UUIDs (GPU-...) are unambiguous and CUDA accepts prefixes.
    """
    gpus = tuple(gpus)
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return Visible(gpus)
    chosen, note = [], ""
    mixed = len({g.name for g in gpus}) > 1
    pci_order = env.get("CUDA_DEVICE_ORDER", "") == "PCI_BUS_ID"
    for token in (t.strip() for t in value.split(",")):
        # CUDA stops at the first entry it cannot use.
        if re.fullmatch(r"\d+", token):
            match = [g for g in gpus if g.index == int(token)]
            if mixed and not pci_order:
                note = (
                    "CUDA_VISIBLE_DEVICES uses indices on a host with different GPU models, but CUDA_DEVICE_ORDER "
                    "is not PCI_BUS_ID: CUDA numbers the fastest GPU first, so the indices may not be nvidia-smi's. "
                    "ktenv read them as nvidia-smi's; set CUDA_DEVICE_ORDER=PCI_BUS_ID (or use GPU UUIDs) to make that true."
                )
        elif token.startswith("GPU-"):
            match = [g for g in gpus if g.uuid.startswith(token)]
            if len(match) > 1:
                match = []
        elif token.startswith("MIG-"):
            note = "CUDA_VISIBLE_DEVICES names a MIG instance; ktenv does not map MIG instances to GPUs."
            match = []
        else:
            match = []
        if not match:
            break
        if match[0] not in chosen:
            chosen.append(match[0])
    return Visible(tuple(chosen), note)
