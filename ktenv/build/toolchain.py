"""The CUDA toolkit an env's JIT compilers use: found, judged against torch and the arch, or provisioned.

Public API (the env build, `smoke --tier toolchain`, the kt-kernel and
flash_mla source builds all go through it):

  load(envs_dir) -> Policy                 envs/toolchain.toml, validated
  need(policy, arch, torch_cuda) -> Need   what this arch + torch ask of nvcc
  inspect(home, origin) -> Toolkit | None  one CUDA_HOME: nvcc version, include dirs
  candidates(environ, prefix, cuda_home)   every toolkit worth a look, in order
  judge(toolkit, need) -> [problems]       [] when usable ("" reasons otherwise)
  select(policy, need, ...) -> Choice      the best usable one, with every rejection;
                                           provisions a pinned source when asked
  build_env(choice_or_toolkit, base, prefix) -> dict   the environment for a build
  env_record(envs_dir, arch, torch_cuda, prefix) -> dict  the env stamp's "toolchain" entry
  for_env(envs_dir, arch, prefix) -> dict  the record to run an env with (launch, smoke)

Rules (why): the toolkit's major must be torch's (a JIT-built extension links
the toolkit's libcudart beside torch's; torch's own BuildExtension refuses
another major), and nvcc must be new enough for the arch's code (sm_100a and
sm_120a need 12.8). Among usable ones ktenv prefers torch's exact release,
then the newest; a minor mismatch works (torch only warns) and is reported.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from packaging.version import Version

from ..errors import KtenvError
from ..spec.toolchain import (  # noqa: F401 (API)
    FILE,
    ArchNeed,
    Need,
    Policy,
    Source,
    default_envs,
    load,
    need,
    need_for_sms,
)
from . import cuda_fetch

TARGET_INCLUDE = "targets/x86_64-linux/include"  # conda-forge's and NVIDIA's split layout


@dataclass
class Toolkit:
    home: str
    nvcc: str
    version: str  # "12.4.131"
    origin: str  # where it was found: "--cuda-home", "CUDA_HOME", "PATH", "ktenv cache (debian-trixie-12.4)", ...
    include_dirs: list[str] = field(default_factory=list)
    lib_dir: str = ""

    @property
    def release(self) -> str:
        return ".".join(self.version.split(".")[:2])


@dataclass
class Choice:
    need: Need
    toolkit: Toolkit | None
    host_cxx: str | None = None
    host_cc: str | None = None
    notes: list[str] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)  # {"home", "version", "origin", "problems"}
    remedy: str = ""  # summary + action, when no toolkit is usable
    summary: str = ""  # what was found and why none fits
    action: str = ""  # what the user can do

    def record(self) -> dict:
        """What the env stamp keeps (and activation reads back)."""
        tk = self.toolkit
        return {"cuda_home": tk.home if tk else None, "nvcc": tk.nvcc if tk else None,
                "version": tk.version if tk else None, "origin": tk.origin if tk else None,
                "include_dirs": tk.include_dirs if tk else [], "lib_dir": tk.lib_dir if tk else "",
                "cxx": self.host_cxx, "cc": self.host_cc,
                "arch": self.need.arch, "torch_cuda": self.need.torch_cuda, "notes": self.notes,
                "rejected": self.rejected}


def torch_cuda_of(site_packages: str | Path) -> str | None:
    """The CUDA version an installed torch was built for ("12.8"), read from torch/version.py
    without importing torch (PyPI's default wheel has no +cu128 in its version)."""
    try:
        text = (Path(site_packages) / "torch" / "version.py").read_text()
    except OSError:
        return None
    m = re.search(r"^cuda\b[^=\n]*=\s*['\"]([\d.]+)['\"]", text, re.M)
    return m.group(1) if m else None


# ------------------------------------------------------------------ finding

def _include_dirs(home: Path) -> list[str]:
    return [str(d) for d in (home / "include", home / TARGET_INCLUDE) if (d / "cuda_runtime.h").exists()]


def inspect(home: str | Path, origin: str) -> Toolkit | None:
    """The toolkit at `home` (a CUDA_HOME), or None when it has no working nvcc."""
    home = Path(home)
    nvcc = home / "bin" / "nvcc"
    if not nvcc.exists():
        return None
    version = cuda_fetch.nvcc_release(nvcc)
    if not version:
        return None
    lib = next((str(d) for d in (home / "lib64", home / "targets/x86_64-linux/lib", home / "lib")
                if any(d.glob("libcudart.so*"))), "")
    return Toolkit(str(home), str(nvcc), version, origin, _include_dirs(home), lib)


def candidates(environ: Mapping[str, str] | None = None, prefix: str | Path | None = None,
               cuda_home: str | Path | None = None, policy: Policy | None = None) -> list[Toolkit]:
    """Every toolkit worth a look, in the order a user expects them to win.

    --cuda-home, then CUDA_HOME / CUDA_PATH (what a Nix shell or a module
    system sets), the env's own prefix (a conda env's cuda-nvcc), nvcc on PATH,
    /usr/local/cuda-12.* and /usr/local/cuda, Debian's package, then the
    toolkits ktenv provisioned into its cache.
    """
    env = os.environ if environ is None else environ
    seen: set[str] = set()
    out: list[Toolkit] = []

    def add(home, origin):
        if not home:
            return
        real = os.path.realpath(home)
        if real in seen:
            return
        seen.add(real)
        tk = inspect(home, origin)
        if tk:
            out.append(tk)

    add(cuda_home, "--cuda-home")
    add(env.get("CUDA_HOME"), "CUDA_HOME")
    add(env.get("CUDA_PATH"), "CUDA_PATH")
    if prefix:
        add(prefix, "the env's prefix")
    on_path = shutil.which("nvcc", path=env.get("PATH"))
    if on_path:
        add(Path(os.path.realpath(on_path)).parent.parent, f"nvcc on PATH ({on_path})")
    for d in sorted(glob.glob("/usr/local/cuda-*"), key=lambda p: _vkey(p.rsplit("-", 1)[-1]), reverse=True):
        add(d, d)
    add("/usr/local/cuda", "/usr/local/cuda")
    add("/usr/lib/nvidia-cuda-toolkit", "Debian's nvidia-cuda-toolkit")
    for s in (policy.sources if policy else ()):
        home = cuda_fetch.installed(s)
        if home:
            add(home, f"ktenv cache ({s.name})")
    return out


def _passed_over(rejected: list[dict]) -> str:
    """Rejected toolkits, one reason each, homes sharing a reason named together.

    A wrapper script on PATH (/usr/local/bin/nvcc exec'ing cuda-13.0's) has
    no symlink to resolve, so the same compiler can turn up under two homes;
    its long reason is worth reading once.
    """
    by_reason: dict[str, list[str]] = {}
    for r in rejected:
        by_reason.setdefault(r["problems"][0], []).append(f"{r['home']} ({r['version'] or '?'})")
    return "; ".join(f"{', '.join(homes)}: {reason}" for reason, homes in by_reason.items())


def _vkey(text: str) -> tuple:
    try:
        return Version(text).release
    except Exception:
        return ()


# ------------------------------------------------------------------ judging

def problems(tk: Toolkit, need: Need) -> dict[str, str]:
    """Why `tk` cannot serve `need`, by check: "major" (torch), "arch", "headers"; {} when it can."""
    out = {}
    v = Version(tk.version)
    if v.major != need.major:
        out["major"] = (
            f"nvcc {tk.version} is CUDA {v.major}, but torch is built for CUDA {need.torch_cuda}: torch's extension "
            f"builder refuses an nvcc of another major (\"The detected CUDA version ({tk.release}) mismatches the "
            f"version that was used to compile PyTorch ({need.torch_cuda})\"), and its JIT (load_inline) does not "
            f"check but links the kernel to libcudart.so.{v.major} beside torch's libcudart.so.{need.major}")
    elif v < Version(need.min_nvcc):
        out["arch"] = (f"nvcc {tk.version} cannot compile for {need.arch} ({', '.join(need.targets)}): "
                       f"needs CUDA >= {need.min_nvcc} ({need.why_min})")
    if not tk.include_dirs:
        out["headers"] = (f"{tk.home} has no cuda_runtime.h (neither include/ nor {TARGET_INCLUDE}/): a bare nvcc "
                          "without the CUDA runtime headers cannot compile the kernels")
    return out


def judge(tk: Toolkit, need: Need) -> list[str]:
    """Why `tk` cannot serve `need`; [] when it can."""
    return list(problems(tk, need).values())


def _rank(tk: Toolkit, need: Need) -> tuple:
    exact = tk.release == need.torch_cuda
    return (exact, Version(tk.version))


def host_compiler(tk: Toolkit, policy: Policy, environ: Mapping[str, str] | None = None) -> tuple[str | None, str | None, str]:
    """(cc, cxx, note): the newest GCC this nvcc accepts (its crt/host_config.h refuses newer ones)."""
    env = os.environ if environ is None else environ
    limit = policy.max_gcc.get(tk.release)
    if limit is None:
        known = sorted(policy.max_gcc, key=Version)
        older = [k for k in known if Version(k) <= Version(tk.release)]
        limit = policy.max_gcc[older[-1]] if older else None
    names = []
    if env.get("CXX"):
        names.append((env.get("CC") or "", env["CXX"]))
    names.append(("gcc", "g++"))
    names += [(f"gcc-{n}", f"g++-{n}") for n in range(20, 8, -1)]
    for cc, cxx in names:
        path = shutil.which(cxx.split()[0], path=env.get("PATH"))
        if not path:
            continue
        major = _gcc_major(path)
        if major is None:
            continue  # clang or unknown: leave it to the user's CXX
        if limit is None or major <= limit:
            ccpath = shutil.which(cc, path=env.get("PATH")) if cc else None
            return ccpath, path, f"host compiler {path} (GCC {major}; nvcc {tk.release} accepts GCC <= {limit})"
    return None, None, (f"no GCC <= {limit} found for nvcc {tk.release} (its crt/host_config.h refuses newer "
                        f"GCC): install g++-{limit} and set CXX=g++-{limit} CC=gcc-{limit}")


def _gcc_major(path: str) -> int | None:
    try:
        out = subprocess.run([path, "-dumpfullversion", "-dumpversion"], capture_output=True, text=True, timeout=20)
        ver = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    if "clang" in ver.lower():
        return None
    m = re.match(r"(\d+)", out.stdout.strip())
    return int(m.group(1)) if m else None


# ------------------------------------------------------------------ choosing

def usable_sources(policy: Policy, need: Need) -> list[Source]:
    return [s for s in policy.sources
            if Version(s.version).major == need.major and Version(s.version) >= Version(need.min_nvcc)]


def select(policy: Policy, need: Need, *, environ: Mapping[str, str] | None = None,
           prefix: str | Path | None = None, cuda_home: str | Path | None = None,
           provision: bool = False, from_dir: Path | None = None,
           progress: Callable[[str], None] = print) -> Choice:
    """The toolkit for `need`: the best usable one found, else a provisioned pinned source.

    cuda_home (--cuda-home, or $KTENV_CUDA_HOME) is an explicit choice: when it
    is unusable the answer is no toolkit, with its problems, rather than a
    silent substitute. CUDA_HOME is only a candidate (the first one looked at).
    """
    env = dict(os.environ if environ is None else environ)
    cuda_home = cuda_home or env.get("KTENV_CUDA_HOME") or None
    found = candidates(env, prefix, cuda_home, policy)
    choice = Choice(need, None)
    usable = []
    for tk in found:
        problems = judge(tk, need)
        if problems:
            choice.rejected.append({"home": tk.home, "version": tk.version, "origin": tk.origin, "problems": problems})
        else:
            usable.append(tk)
    if cuda_home and (not found or found[0].origin != "--cuda-home" or judge(found[0], need)):
        usable = []
        if not found or found[0].origin != "--cuda-home":
            choice.rejected.insert(0, {"home": str(cuda_home), "version": None, "origin": "--cuda-home",
                                       "problems": [f"{cuda_home}/bin/nvcc does not exist or does not run"]})
    if not usable and provision and not cuda_home:
        for src in usable_sources(policy, need):
            try:
                home = cuda_fetch.provision(src, from_dir=from_dir, progress=progress)
            except KtenvError as e:
                choice.notes.append(f"provisioning {src.name} failed: {e}")
                continue
            tk = inspect(home, f"ktenv cache ({src.name})")
            if tk and not judge(tk, need):
                usable.append(tk)
                break
    if usable:
        tk = max(usable, key=lambda t: _rank(t, need)) if not cuda_home else usable[0]
        choice.toolkit = tk
        if tk.release != need.torch_cuda:
            choice.notes.append(f"nvcc {tk.version} is CUDA {tk.release}, torch is built for {need.torch_cuda}: "
                                "the same major works (torch warns of the minor mismatch)")
        cc, cxx, note = host_compiler(tk, policy, env)
        choice.host_cc, choice.host_cxx = cc, cxx
        choice.notes.append(note)
        return choice
    srcs = usable_sources(policy, need)
    choice.summary = (
        f"No CUDA {need.major} toolkit that can compile for {need.arch} (nvcc {need.major}.x >= {need.min_nvcc}) was found"
        + ("; passed over: " + _passed_over(choice.rejected) if choice.rejected else ""))
    choice.action = (
        "The env still works, but sglang-kt's first DeepSeek-V4 forward JIT-compiles kernels and will fail. "
        + (f"Let ktenv fetch a pinned toolkit (`python build.py toolchain --arch {need.arch} --provision`: "
           + ", ".join(f"{s.name}, {s.download_size / 1e9:.1f} GB" for s in srcs) + "), or " if srcs else "")
        + f"install the CUDA {need.torch_cuda} toolkit (nvcc and the runtime headers) and pass --cuda-home or set CUDA_HOME."
        + "".join(f" ({n})" for n in choice.notes))
    choice.remedy = f"{choice.summary}. {choice.action}"
    return choice


def build_env(choice: Choice | Toolkit | None, base: Mapping[str, str] | None = None,
              prefix: str | Path | None = None) -> dict[str, str]:
    """The environment for running a build or JIT with the chosen toolkit (see activate.activation)."""
    from .activate import activation

    return activation(prefix, choice, base)


def as_dict(choice: Choice) -> dict:
    d = choice.record()
    d["need"] = asdict(choice.need)
    d["remedy"] = choice.remedy
    return d


def env_record(envs_dir: str | Path, arch: str, torch_cuda: str, prefix: str | Path, *,
               cuda_home: str | None = None, progress: Callable[[str], None] = print) -> dict:
    """The toolchain entry of an env's stamp (what `env` records; activation reads it back).

    Never raises for want of a toolkit: the env still builds, and the record
    (and a progress line) says plainly that it cannot JIT and what to do.
    """
    policy = load(envs_dir)
    if not torch_cuda:  # a lock written before lock.toml recorded `cuda`: the stack's
        torch_cuda = str(tomllib.loads((Path(envs_dir) / "stack.toml").read_text())["stack"]["cuda"])
    choice = select(policy, need(policy, arch, torch_cuda), prefix=prefix, cuda_home=cuda_home)
    tk = choice.toolkit
    if tk:
        progress(f"toolchain: CUDA {tk.version} at {tk.home} ({tk.origin})"
                 + (f"; {choice.notes[0]}" if tk.release != torch_cuda else ""))
    else:
        progress(f"toolchain: none usable -- {choice.remedy}")
    return as_dict(choice)


def for_env(envs_dir: str | Path, arch: str, prefix: str | Path, environ: Mapping[str, str] | None = None) -> dict:
    """The toolchain record to run the env at `prefix` with: its stamp's, when that toolkit
    still judges usable, else what select() finds now (envs built before the stamp
    recorded a toolchain, or whose toolkit was removed). No provisioning."""
    from .activate import stamp_toolchain

    policy = load(envs_dir)
    rec = stamp_toolchain(prefix) or {}
    torch_cuda = torch_cuda_of(next(iter(sorted(Path(prefix).glob("lib/python3*/site-packages"))), prefix)) \
        or rec.get("torch_cuda") or str(tomllib.loads((Path(envs_dir) / "stack.toml").read_text())["stack"]["cuda"])
    nd = need(policy, arch, torch_cuda)
    if rec.get("cuda_home"):
        tk = inspect(rec["cuda_home"], str(rec.get("origin")))
        if tk and not judge(tk, nd):
            return rec
    return as_dict(select(policy, nd, environ=environ, prefix=prefix))


def record_in_stamp(prefix: str | Path, record: dict) -> bool:
    """Write `record` as the env stamp's "toolchain" entry (after `build.py toolchain`); False without a stamp."""
    import json

    from ..target import STAMP

    path = Path(prefix) / STAMP
    try:
        stamp = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    stamp["toolchain"] = record
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(stamp, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    return True
