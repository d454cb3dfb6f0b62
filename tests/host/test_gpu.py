"""ktenv.gpu: parsers on recorded nvidia-smi/NVML output, arch mapping from envs/."""

import json
import shutil
from pathlib import Path

import pytest

from ktenv import spec
from ktenv.host import gpu

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures" / "doctor"
H100 = FIX / "h100"
MIXED = FIX / "mixed-3090-4090"


@pytest.fixture(scope="module")
def envs():
    return spec.load(ROOT / "envs")


def test_smi_query_mixed_host():
    gpus, driver = gpu.parse_smi_query((MIXED / "nvidia-smi-query.csv").read_text())
    assert driver == "570.133.07"
    assert [(g.index, g.name, g.compute_capability) for g in gpus] == [
        (0, "NVIDIA GeForce RTX 3090", "8.6"),
        (1, "NVIDIA GeForce RTX 4090", "8.9"),
    ]
    assert gpus[0].memory_bytes == 24576 * 2**20
    assert gpus[1].uuid.startswith("GPU-9e2f4a71")
    assert gpus[1].pci_bus_id == "00000000:41:00.0"


def test_smi_query_nounits_and_old_driver():
    # nounits drops "MiB"; drivers before ~510 do not know compute_cap.
    text = "0, Tesla T4, [Field not supported], 15360, GPU-aaaa, 470.82.01, 00000000:00:04.0\n"
    gpus, driver = gpu.parse_smi_query(text)
    assert gpus[0].compute_capability == ""
    assert gpus[0].memory_bytes == 15360 * 2**20
    assert driver == "470.82.01"


def test_smi_query_wrong_field_count_is_an_error():
    with pytest.raises(ValueError, match="expected 7"):
        gpu.parse_smi_query("0, NVIDIA H100, 9.0\n")


def test_smi_header():
    assert gpu.parse_smi_header((MIXED / "nvidia-smi.txt").read_text()) == ("570.133.07", "12.8")
    assert gpu.parse_smi_header("no banner here") == ("", "")


def test_cuda_version_from_int():
    assert gpu.cuda_version_from_int(12080) == "12.8"
    assert gpu.cuda_version_from_int(13000) == "13.0"
    assert gpu.cuda_version_from_int(12040) == "12.4"
    assert gpu.cuda_version_from_int(0) == ""


def test_nvml_and_smi_agree_on_recorded_h100():
    """The real H100 recording: both sources must describe the same GPU."""
    via_nvml = gpu.from_nvml_record(json.loads((H100 / "nvml.json").read_text()))
    via_smi = gpu.from_smi((H100 / "nvidia-smi-query.csv").read_text(), (H100 / "nvidia-smi.txt").read_text())
    assert via_nvml.source == "nvml" and via_smi.source == "nvidia-smi"
    assert len(via_nvml.gpus) == len(via_smi.gpus) >= 1
    for a, b in zip(via_nvml.gpus, via_smi.gpus):
        assert (a.index, a.name, a.compute_capability, a.uuid) == (b.index, b.name, b.compute_capability, b.uuid)
        assert a.compute_capability == "9.0"
        # NVML reports bytes; nvidia-smi rounds to MiB.
        assert abs(a.memory_bytes - b.memory_bytes) < 2**20
    assert via_nvml.driver_version == via_smi.driver_version
    assert via_nvml.cuda_version == via_smi.cuda_version


def test_detect_falls_back_to_smi_and_says_why():
    def no_nvml():
        raise RuntimeError("NVML did not initialise (NVML Shared Library Not Found)")

    def smi():
        return (MIXED / "nvidia-smi-query.csv").read_text(), (MIXED / "nvidia-smi.txt").read_text()

    host = gpu.detect(nvml=no_nvml, smi=smi)
    assert host.source == "nvidia-smi"
    assert len(host.gpus) == 2 and host.cuda_version == "12.8"
    assert "Shared Library Not Found" in host.notes[0]


def test_detect_with_nothing():
    def fail(msg):
        def f():
            raise RuntimeError(msg)
        return f

    host = gpu.detect(nvml=fail("no libnvidia-ml"), smi=fail("nvidia-smi is not on PATH"))
    assert host.gpus == () and host.source == "none"
    assert host.notes == ("NVML: no libnvidia-ml.", "nvidia-smi: nvidia-smi is not on PATH.")


def test_detect_on_this_host_does_not_crash():
    """This machine has no NVIDIA driver: real NVML and real PATH lookup, no GPU, reasons given."""
    host = gpu.detect()
    if host.gpus:
        pytest.skip("this host has an NVIDIA GPU")
    assert host.source == "none"
    assert any(n.startswith("NVML:") for n in host.notes)
    assert any(n.startswith("nvidia-smi:") for n in host.notes)


def test_read_nvml_without_driver_raises_a_sentence():
    pytest.importorskip("pynvml")
    if shutil.which("nvidia-smi"):
        pytest.skip("this host has the NVIDIA driver")
    with pytest.raises(RuntimeError, match="libnvidia-ml.so.1 comes with the NVIDIA driver"):
        gpu.read_nvml()


def test_read_nvidia_smi_failure_is_a_sentence(tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it couldn'\\''t communicate with the NVIDIA driver.' >&2\nexit 9\n")
    fake.chmod(0o755)
    with pytest.raises(RuntimeError, match="exit code 9: NVIDIA-SMI has failed"):
        gpu.read_nvidia_smi(str(fake))


@pytest.mark.parametrize("cc,arch,supported", [
    ("8.9", "sm89", True), ("9.0", "sm90", True), ("10.0", "sm100", True), ("12.0", "sm120", True),
    ("8.0", "sm80", False), ("8.6", "sm86", False), ("7.5", None, None), ("10.3", None, None), ("", None, None),
])
def test_arch_for_cc_reads_envs(envs, cc, arch, supported):
    a = gpu.arch_for_cc(envs, cc)
    assert (a.name if a else None) == arch
    if a:
        assert a.supported is supported
        if not supported:
            assert "fp8e4nv" in a.reason


def test_arch_for_cc_follows_the_data(envs, tmp_path):
    """No table in code: edit an arch file's compute_capability and the mapping moves."""
    copy = tmp_path / "envs"
    shutil.copytree(ROOT / "envs", copy)
    p = copy / "sm89.toml"
    p.write_text(p.read_text().replace('compute_capability = "8.9"', 'compute_capability = "8.7"'))
    edited = spec.load(copy)
    assert gpu.arch_for_cc(edited, "8.9") is None
    assert gpu.arch_for_cc(edited, "8.7").name == "sm89"


def _mixed():
    gpus, _ = gpu.parse_smi_query((MIXED / "nvidia-smi-query.csv").read_text())
    return gpus


def test_visible_unset_and_empty():
    gpus = _mixed()
    assert gpu.visible_gpus(gpus, {}).gpus == tuple(gpus)
    assert gpu.visible_gpus(gpus, {"CUDA_VISIBLE_DEVICES": ""}).gpus == ()


def test_visible_by_index_pci_order():
    gpus = _mixed()
    v = gpu.visible_gpus(gpus, {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
    assert [g.name for g in v.gpus] == ["NVIDIA GeForce RTX 4090"] and v.note == ""


def test_visible_by_index_on_mixed_host_warns_about_order():
    v = gpu.visible_gpus(_mixed(), {"CUDA_VISIBLE_DEVICES": "1"})
    assert "fastest GPU first" in v.note


def test_visible_by_uuid_prefix_and_stop_at_invalid():
    gpus = _mixed()
    v = gpu.visible_gpus(gpus, {"CUDA_VISIBLE_DEVICES": "GPU-9e2f4a71,7,0"})
    # CUDA stops at the first entry it cannot use (7), so 0 is not visible.
    assert [g.index for g in v.gpus] == [1]
