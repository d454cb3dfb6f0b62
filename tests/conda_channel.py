"""Build a small, real conda channel for the conda-backend tests.

No conda channel is reachable from the test machines, so the tests make one:
real `.conda` archives (written by conda-package-handling, conda's own
package library), indexed by rattler's indexer, served over HTTP or file://.
The packages are STAND-INS: they carry the names, versions and dependency
metadata of the conda-forge packages in envs/conda.toml (cuda-version's
`__cuda >=12` constraint, cuda-nvcc's pin on cuda-version, ...), but their
payload is tiny:

- python: a venv-style shim over the interpreter running the tests
  (bin/python3.11 -> that interpreter, pyvenv.cfg at the prefix), so the
  prefix has a real python whose sys.prefix is the conda prefix and uv
  installs real wheels into its site-packages.
- cuda-cudart: a real shared library built with the host's C compiler that
  exports cudaRuntimeGetVersion (returns the CUDA version); no GPU code.
- cuda-nvcc: a shell script that prints nvcc's version banner and carries
  conda's prefix placeholder (rewritten on install, as for real packages).
- libhwloc: a hwloc.pc with the prefix placeholder; the rest are marker files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

PLACEHOLDER = "/opt/anaconda1anaconda2anaconda3"
# Build times before envs/stack.toml's cut-offs, like real published packages.
BUILT = int(datetime(2026, 6, 1, tzinfo=timezone.utc).timestamp() * 1000)


def make_package(channel: Path, name: str, version: str, build: str, subdir: str = "linux-64",
                 depends=(), constrains=(), files: dict | None = None, noarch: str | None = None,
                 timestamp: int = BUILT) -> Path:
    """One .conda archive in channel/subdir. `files` maps a path in the
    prefix to text/bytes, or to ("symlink", target)."""
    import conda_package_handling.api as cph

    work = channel.parent / ".build" / f"{subdir}-{name}-{version}-{build}"
    shutil.rmtree(work, ignore_errors=True)
    (work / "info").mkdir(parents=True)
    paths = []
    for rel, content in sorted((files or {}).items()):
        target = work / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, tuple):
            os.symlink(content[1], target)
            data = content[1].encode()
            paths.append({"_path": rel, "path_type": "softlink", "sha256": hashlib.sha256(data).hexdigest(), "size_in_bytes": len(data)})
            continue
        data = content.encode() if isinstance(content, str) else content
        target.write_bytes(data)
        entry = {"_path": rel, "path_type": "hardlink", "sha256": hashlib.sha256(data).hexdigest(), "size_in_bytes": len(data)}
        if PLACEHOLDER.encode() in data:
            entry.update(file_mode="text", prefix_placeholder=PLACEHOLDER)
        if rel.startswith("bin/") or rel.endswith(".so") or ".so." in rel:
            target.chmod(0o755)
        paths.append(entry)
    index = {
        "name": name, "version": version, "build": build, "build_number": int(build.rsplit("_", 1)[-1]),
        "depends": list(depends), "constrains": list(constrains), "subdir": subdir,
        "timestamp": timestamp, "license": "stand-in for tests",
    }
    if subdir == "noarch":
        index["noarch"] = noarch or "generic"
    else:
        index.update(arch="x86_64", platform="linux")
    (work / "info" / "index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    (work / "info" / "paths.json").write_text(json.dumps({"paths": paths, "paths_version": 1}, indent=2))
    (work / "info" / "files").write_text("".join(p["_path"] + "\n" for p in paths))
    members = sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file() or p.is_symlink())
    out = channel / subdir
    out.mkdir(parents=True, exist_ok=True)
    archive = out / f"{name}-{version}-{build}.conda"
    archive.unlink(missing_ok=True)
    cph.create(str(work), members, str(archive))
    return archive


def _cudart_library(work: Path, cuda: str) -> bytes | None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None
    major, minor = (int(x) for x in cuda.split(".")[:2])
    src = work / f"cudart-{cuda}.c"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_text(f"int cudaRuntimeGetVersion(int *v) {{ *v = {major * 1000 + minor * 10}; return 0; }}\n")
    lib = src.with_suffix(".so")
    subprocess.run([cc, "-shared", "-fPIC", f"-Wl,-soname,libcudart.so.{major}", "-o", str(lib), str(src)], check=True)
    return lib.read_bytes()


def python_shim(interpreter: str, venv_cfg: bool = True) -> tuple[str, dict]:
    """The stand-in python's version and files for `interpreter`."""
    real = os.path.realpath(interpreter)
    out = subprocess.run([real, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    mm = ".".join(out.split(".")[:2])
    files = {
        f"bin/python{mm}": ("symlink", real),
        "bin/python3": ("symlink", f"python{mm}"),
        "bin/python": ("symlink", f"python{mm}"),
        f"lib/python{mm}/site-packages/README.ktenv-standin": "site-packages of the stand-in python\n",
    }
    if venv_cfg:
        files["pyvenv.cfg"] = f"home = {os.path.dirname(real)}\ninclude-system-site-packages = false\nversion = {out}\n"
    return out, files


def build_channel(channel: Path, interpreter: str = sys.executable) -> Path:
    """The stand-in channel for envs/conda.toml's packages, indexed."""
    from ktenv.lock.rattler import index_channel

    channel.mkdir(parents=True, exist_ok=True)
    glibc = "__glibc >=2.17,<3.0.a0"
    pyver, pyfiles = python_shim(interpreter)
    make_package(channel, "python", pyver, "h_ktenv_0", depends=[glibc, "libgcc >=13"], files=pyfiles)

    make_package(channel, "libgcc", "14.2.0", "h_ktenv_2", depends=[glibc], files={"share/ktenv-standin/libgcc": "stand-in\n"})
    make_package(channel, "libstdcxx", "14.2.0", "h_ktenv_2", depends=["libgcc 14.2.0 h_ktenv_2"], files={"share/ktenv-standin/libstdcxx": "stand-in\n"})
    for cv in ("12.8", "12.9"):
        # conda-forge's cuda-version: a noarch pin whose constraint on the
        # driver is the CUDA major only.
        make_package(channel, "cuda-version", cv, "h_ktenv_3", "noarch",
                     constrains=[f"__cuda >={cv.split('.')[0]}", f"cudatoolkit {cv}|{cv}.*"])
    for cv, full_rt, full_nvcc in (("12.8", "12.8.90", "12.8.93"), ("12.9", "12.9.79", "12.9.86")):
        nxt = f"{cv.split('.')[0]}.{int(cv.split('.')[1]) + 1}"
        pin = f"cuda-version >={cv},<{nxt}.0a0"
        lib = _cudart_library(channel.parent / ".build" / "src", cv)
        rt_files = {"lib/libcudart.so.12": lib} if lib else {"lib/README.no-compiler": "no C compiler when built\n"}
        make_package(channel, "cuda-cudart", full_rt, "h_ktenv_0", depends=[pin, "libgcc >=13", "libstdcxx >=13", glibc], files=rt_files)
        make_package(channel, "cuda-cudart-dev", full_rt, "h_ktenv_0", depends=[pin, f"cuda-cudart {full_rt} h_ktenv_0"], files={
            "include/cuda_runtime_api.h": "/* stand-in */\nint cudaRuntimeGetVersion(int *runtimeVersion);\n",
            "lib/libcudart.so": ("symlink", "libcudart.so.12"),
        })
        make_package(channel, "cuda-nvcc", full_nvcc, "h_ktenv_0",
                     depends=[pin, "gcc_linux-64", "gxx_linux-64", f"cuda-cudart-dev {cv}.*"], files={
            "bin/nvcc": f"#!/bin/sh\n# stand-in nvcc installed in {PLACEHOLDER}\n"
                        f"echo 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
                        f"echo 'Cuda compilation tools, release {cv}, V{full_nvcc}'\n",
        })
    for gv in ("13.3.0", "14.2.0"):
        make_package(channel, "gcc_linux-64", gv, "h_ktenv_10", depends=["libgcc >=13"], files={
            "etc/conda/activate.d/activate-gcc_linux-64.sh": f"export CC={PLACEHOLDER}/bin/x86_64-conda-linux-gnu-cc\n"})
        make_package(channel, "gxx_linux-64", gv, "h_ktenv_10", depends=[f"gcc_linux-64 {gv} h_ktenv_10", "libstdcxx >=13"], files={
            "etc/conda/activate.d/activate-gxx_linux-64.sh": f"export CXX={PLACEHOLDER}/bin/x86_64-conda-linux-gnu-c++\n"})
    make_package(channel, "cmake", "3.31.6", "h_ktenv_0", depends=["libgcc >=13", "libstdcxx >=13", glibc],
                 files={"share/ktenv-standin/cmake": "stand-in\n"})
    make_package(channel, "pkg-config", "0.29.2", "h_ktenv_1008", depends=["libgcc >=13", glibc],
                 files={"share/ktenv-standin/pkg-config": "stand-in\n"})
    make_package(channel, "libhwloc", "2.11.2", "h_ktenv_1", depends=["libgcc >=13", "libstdcxx >=13", glibc], files={
        "lib/pkgconfig/hwloc.pc": f"prefix={PLACEHOLDER}\nlibdir=${{prefix}}/lib\nincludedir=${{prefix}}/include\n\n"
                                  "Name: hwloc\nDescription: stand-in\nVersion: 2.11.2\nLibs: -L${libdir} -lhwloc\nCflags: -I${includedir}\n"})
    make_package(channel, "libnuma", "2.0.18", "h_ktenv_0", depends=["libgcc >=13", glibc], files={"include/numa.h": "/* stand-in */\n"})
    make_package(channel, "numactl", "2.0.18", "h_ktenv_0", depends=["libnuma 2.0.18 h_ktenv_0", glibc],
                 files={"bin/numactl": "#!/bin/sh\nexec \"$@\"\n"})
    # Probes for the virtual-package tests.
    make_package(channel, "ktenv-probe-cuda128", "1.0", "h_ktenv_0", "noarch", depends=["__cuda >=12.8"])
    make_package(channel, "ktenv-probe-glibc234", "1.0", "h_ktenv_0", "noarch", depends=["__glibc >=2.34"])
    index_channel(channel)
    return channel


def make_wheel(out: Path, name: str = "ktenv_probe_pkg", version: str = "0.1.0") -> Path:
    """A pure-python wheel written per the wheel spec (PEP 427), no build backend needed."""
    import base64
    import zipfile

    dist = f"{name}-{version}"
    files = {
        f"{name}/__init__.py": b"VALUE = 42\n",
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n".encode(),
        f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: ktenv-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}.dist-info/RECORD,,")
    files[f"{dist}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    out.mkdir(parents=True, exist_ok=True)
    wheel = out / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
    return wheel
