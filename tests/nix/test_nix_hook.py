"""nix/shell-hook.sh, as nix/spec.nix fills it in per arch, run for real in bash.

What the hook does at `nix develop`: expose the NVIDIA driver's libraries (and
only those) through a private link directory, build .envs/<arch> with the
shell's interpreter, activate it, and keep Nix's ninja ahead of the env's.
The driver here is a fake one: real shared libraries compiled by the test
with the driver's file names, next to a libc and a libstdc++ that would break
every program if they were exposed. A real GPU driver is not on this machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ktenv.tools import uv_bin
from nixtools import REPO, edit, eval_spec, tool

HOOK_STATE = r"""
eval "$KTENV_TEST_HOOK"
echo "after-hook"
printf 'VIRTUAL_ENV=%s\n' "${VIRTUAL_ENV:-}"
printf 'PYTHON=%s\n' "$(command -v python)"
printf 'NINJA=%s\n' "$(command -v ninja || true)"
printf 'PATH=%s\n' "$PATH"
printf 'LD_LIBRARY_PATH=%s\n' "${LD_LIBRARY_PATH:-}"
printf 'TRITON_LIBCUDA_PATH=%s\n' "${TRITON_LIBCUDA_PATH:-}"
printf 'ktenv=%s\n' "$(type -t ktenv || true)"
printf 'ktenv_enter=%s\n' "$(type -t ktenv_enter || true)"
printf 'ktenv_driver_links=%s\n' "$(type -t ktenv_driver_links || true)"
"""

# What KTENV_BUILD_CMD runs in place of the 10 GB build: it records how it
# was called and makes a real (empty) venv where `build.py env` would, with a
# bin/ninja like the ninja wheel's.
RECORDER = r"""
import json, os, subprocess, sys
with open(os.environ["KTENV_TEST_RECORD"], "w") as f:
    json.dump({"argv": sys.argv[1:], "cwd": os.getcwd()}, f)
arch = sys.argv[sys.argv.index("--arch") + 1]
env = os.path.join(".envs", arch)
subprocess.run(["uv", "venv", "--quiet", "--python", sys.executable, env], check=True)
with open(os.path.join(env, "bin", "ninja"), "w") as f:
    f.write("#!/bin/sh\necho wheel-ninja\n")
os.chmod(os.path.join(env, "bin", "ninja"), 0o755)
"""

DRIVER_LIBS = {  # file -> soname, as an NVIDIA driver installs them
    "libcuda.so.570.1": "libcuda.so.1",
    "libnvidia-ml.so.570.1": "libnvidia-ml.so.1",
    "libnvidia-ptxjitcompiler.so.570.1": "libnvidia-ptxjitcompiler.so.1",
    "libnvidia-nvvm.so.570.1": "libnvidia-nvvm.so.4",
}
# In the same directory on a real host, and never to be exposed.
NOT_DRIVER = ["libc.so.6", "libstdc++.so.6", "libGL.so.1"]


@pytest.fixture(scope="module")
def nixspec() -> dict:
    return eval_spec()


def hook_text(nixspec: dict, arch: str) -> str:
    return nixspec["archs"][arch]["shellHook"]


@pytest.fixture(scope="module")
def fake_driver(tmp_path_factory) -> Path:
    """A driver directory: real shared objects under the driver's names
    (libcuda exports cuInit), plus a garbage libc and libstdc++."""
    d = tmp_path_factory.mktemp("driver")
    src = d / "cuda.c"
    src.write_text("int cuInit(unsigned int flags) { return flags == 0 ? 0 : 1; }\n")
    for name, soname in DRIVER_LIBS.items():
        subprocess.run([tool("gcc"), "-shared", "-fPIC", f"-Wl,-soname,{soname}", "-o", str(d / name), str(src)], check=True)
        (d / soname).symlink_to(name)
    src.unlink()
    for name in NOT_DRIVER:
        (d / name).write_bytes(b"not a library: loading this would break the program\n")
    return d


def checkout_copy(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(REPO / "build.py", root)
    shutil.copy(REPO / "pyproject.toml", root)
    shutil.copytree(REPO / "envs", root / "envs")
    shutil.copytree(REPO / "ktenv", root / "ktenv", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def hook_env(hook: str, cwd: Path, **env: str) -> dict:
    return {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "HOME": os.environ.get("HOME", "/root"),
        "KTENV_CACHE_DIR": str(cwd.parent / "ktenv-cache"),
        "KTENV_TEST_HOOK": hook,
        "UV_OFFLINE": "1",
        **env,
    }


def run_hook(hook: str, cwd: Path, then: str = "", **env: str) -> tuple[dict, str]:
    proc = subprocess.run(["bash", "--norc", "--noprofile", "-c", HOOK_STATE + then], cwd=cwd,
                          env=hook_env(hook, cwd, **env), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("after-hook\n", 1)[1].splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line), proc.stderr


def links_dir(cwd: Path) -> Path:
    return cwd.parent / "ktenv-cache" / "driver" / os.uname().nodename


# ---------------------------------------------------------------- the text


def test_hook_text_is_filled_in_and_lints(nixspec):
    for name in nixspec["supported"]:
        text = hook_text(nixspec, name)
        assert "@arch@" not in text and "@title@" not in text
        assert f"local arch={name}\n" in text
        # The real command, and its override.
        assert '"${KTENV_BUILD_CMD:-python build.py}"' in text
        assert '. ".envs/$arch/bin/activate"' in text
        proc = subprocess.run([tool("shellcheck"), "-s", "bash", "-"], input=text, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout


def test_shellcheck_catches_a_broken_hook(nixspec):
    # The lint above can fail: an unquoted expansion is reported.
    broken = hook_text(nixspec, "sm120").replace('[ -e "$d/libcuda.so.1" ]', "[ -e $d/libcuda.so.1 ]")
    proc = subprocess.run([tool("shellcheck"), "-s", "bash", "-"], input=broken, capture_output=True, text=True)
    assert proc.returncode != 0 and "SC2086" in proc.stdout


# ---------------------------------------------------------------- the driver's libraries


def test_driver_links_expose_the_driver_and_nothing_else(tmp_path, nixspec, fake_driver):
    root = checkout_copy(tmp_path)
    state, err = run_hook(hook_text(nixspec, "sm120"), root, KTENV_SKIP_BUILD="1",
                          KTENV_DRIVER_DIR=str(fake_driver), LD_LIBRARY_PATH="/nix/store/x-gcc-lib/lib")
    links = links_dir(root)
    assert state["LD_LIBRARY_PATH"] == f"{links}:/nix/store/x-gcc-lib/lib"
    assert state["TRITON_LIBCUDA_PATH"] == str(links)
    names = sorted(p.name for p in links.iterdir())
    assert names == sorted([*DRIVER_LIBS, *DRIVER_LIBS.values(), "libcuda.so"])
    for name in NOT_DRIVER:
        assert not (links / name).exists()
    # Each link resolves into the driver directory; libcuda.so (for -lcuda)
    # was missing there and points at libcuda.so.1.
    assert all(Path(os.path.realpath(links / n)).parent == fake_driver for n in names)
    assert os.readlink(links / "libcuda.so") == str(fake_driver / "libcuda.so.1")
    assert state["ktenv_driver_links"] == ""  # the helper does not linger in the user's shell
    assert "no libcuda.so.1" not in err


def test_driver_links_load_and_link_for_real(tmp_path, nixspec, fake_driver):
    # Through the hook's LD_LIBRARY_PATH: libcuda loads (and its cuInit runs),
    # while libstdc++ still comes from the system, not the garbage file next
    # to the driver; and `cc -lcuda -L$TRITON_LIBCUDA_PATH`, which is how
    # Triton links its launcher, succeeds.
    root = checkout_copy(tmp_path)
    (tmp_path / "use.c").write_text("int cuInit(unsigned int); int main(void) { return cuInit(0); }\n")
    then = r"""
python -c '
import ctypes
assert ctypes.CDLL("libcuda.so.1").cuInit(0) == 0
ctypes.CDLL("libstdc++.so.6")
ctypes.CDLL("libnvidia-ml.so.1")
print("LOADED=" + " ".join(sorted(l.split()[-1] for l in open("/proc/self/maps") if "libstdc++" in l or "libcuda" in l)))
'
cc -o ../use ../use.c -L"$TRITON_LIBCUDA_PATH" -lcuda && ../use && echo LINKED=yes
"""
    state, err = run_hook(hook_text(nixspec, "sm120"), root, then=then, KTENV_SKIP_BUILD="1", KTENV_DRIVER_DIR=str(fake_driver))
    loaded = state["LOADED"].split()
    assert str(fake_driver / "libcuda.so.570.1") in loaded
    assert not any(p.startswith(str(fake_driver)) and "libstdc++" in p for p in loaded), loaded
    assert state["LINKED"] == "yes", err


def test_driver_links_replace_an_older_drivers(tmp_path, nixspec, fake_driver):
    root = checkout_copy(tmp_path)
    links = links_dir(root)
    links.mkdir(parents=True)
    (links / "libcuda.so.1").symlink_to("/old-driver/libcuda.so.1")
    (links / "libnvidia-nvvm.so.3").symlink_to("/old-driver/libnvidia-nvvm.so.3")
    run_hook(hook_text(nixspec, "sm120"), root, KTENV_SKIP_BUILD="1", KTENV_DRIVER_DIR=str(fake_driver))
    assert os.readlink(links / "libcuda.so.1") == str(fake_driver / "libcuda.so.1")
    assert not (links / "libnvidia-nvvm.so.3").is_symlink()


def test_driver_dir_is_searched_in_order(tmp_path, nixspec, fake_driver):
    root = checkout_copy(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "libnvidia-ml.so.1").write_bytes(b"")  # no libcuda.so.1: not a driver directory
    state, _ = run_hook(hook_text(nixspec, "sm120"), root, KTENV_SKIP_BUILD="1", KTENV_DRIVER_DIR=f"{empty}:{fake_driver}")
    assert os.readlink(links_dir(root) / "libnvidia-ml.so.1") == str(fake_driver / "libnvidia-ml.so.1")


def test_driver_default_places_nixos_first(tmp_path, nixspec):
    # Without KTENV_DRIVER_DIR the hook looks where drivers live: NixOS's
    # /run/opengl-driver/lib, then the distributions' directories.
    default = ["/run/opengl-driver/lib", "/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib"]
    assert f'"${{KTENV_DRIVER_DIR:-{":".join(default)}}}"' in hook_text(nixspec, "sm120")
    root = checkout_copy(tmp_path)
    state, err = run_hook(hook_text(nixspec, "sm120"), root, KTENV_SKIP_BUILD="1")
    host = next((d for d in default if Path(d, "libcuda.so.1").exists()), None)
    if host is None:  # this machine: no NVIDIA driver anywhere
        assert f"ktenv: no libcuda.so.1 in {' '.join(default)}" in err
        assert state["TRITON_LIBCUDA_PATH"] == ""
    else:
        assert os.path.realpath(links_dir(root) / "libcuda.so.1") == os.path.realpath(Path(host, "libcuda.so.1"))


def test_hook_without_a_driver_says_so_and_leaves_paths_alone(tmp_path, nixspec):
    root = checkout_copy(tmp_path)
    state, err = run_hook(hook_text(nixspec, "sm120"), root, KTENV_SKIP_BUILD="1",
                          KTENV_DRIVER_DIR=str(tmp_path / "no-driver"), LD_LIBRARY_PATH="/keep")
    assert f"ktenv: no libcuda.so.1 in {tmp_path / 'no-driver'}" in err
    assert state["LD_LIBRARY_PATH"] == "/keep"
    assert state["TRITON_LIBCUDA_PATH"] == ""
    # Nothing built, nothing there to activate: said plainly.
    assert ".envs/sm120/bin/activate does not exist" in err


def test_hook_with_an_unusable_cache_dir_says_so(tmp_path, nixspec, fake_driver):
    root = checkout_copy(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    state, err = run_hook(hook_text(nixspec, "sm120"), root, KTENV_SKIP_BUILD="1", KTENV_DRIVER_DIR=str(fake_driver),
                          KTENV_CACHE_DIR=str(blocker), LD_LIBRARY_PATH="/keep")
    assert f"ktenv: could not prepare {blocker}/driver/" in err
    assert state["LD_LIBRARY_PATH"] == "/keep"


# ---------------------------------------------------------------- build and activate


@pytest.mark.parametrize("arch", ["sm89", "sm90", "sm100", "sm120"])
def test_hook_builds_then_activates_the_arch_env(tmp_path, nixspec, fake_driver, arch):
    assert arch in nixspec["archs"], f"{arch} is not supported in envs/"
    root = checkout_copy(tmp_path)
    recorder = tmp_path / "recorder.py"
    recorder.write_text(RECORDER)
    record = tmp_path / "record.json"
    nix_first = tmp_path / "nix-first"
    nix_first.mkdir()
    (nix_first / "ninja").write_text("#!/bin/sh\necho nix-ninja\n")
    (nix_first / "ninja").chmod(0o755)
    state, err = run_hook(
        hook_text(nixspec, arch),
        root,
        KTENV_BUILD_CMD=f"{sys.executable} {recorder}",
        KTENV_TEST_RECORD=str(record),
        KTENV_DRIVER_DIR=str(fake_driver),
        KTENV_ENV_PYTHON=sys.executable,
        KTENV_NIX_FIRST=str(nix_first),
    )
    called = json.loads(record.read_text())
    # Built with the shell's interpreter, never one uv finds elsewhere.
    assert called == {"argv": ["env", "--arch", arch, "--python", sys.executable], "cwd": str(root)}
    assert f"ktenv: {sys.executable} {recorder} env --arch {arch} --python {sys.executable}" in err
    venv_bin = root / ".envs" / arch / "bin"
    assert state["VIRTUAL_ENV"] == str(root / ".envs" / arch)
    assert state["PYTHON"] == str(venv_bin / "python")
    # The env has a bin/ninja (the wheel's); Nix's is found first.
    assert (venv_bin / "ninja").exists()
    assert state["NINJA"] == str(nix_first / "ninja")
    assert state["PATH"].startswith(f"{nix_first}:{venv_bin}:")
    assert state["ktenv"] == "function" and state["ktenv_enter"] == ""
    assert f".envs/{arch} active" in err


def test_hook_without_nix_first_leaves_the_env_first(tmp_path, nixspec):
    root = checkout_copy(tmp_path)
    recorder = tmp_path / "recorder.py"
    recorder.write_text(RECORDER)
    state, _ = run_hook(hook_text(nixspec, "sm120"), root, KTENV_BUILD_CMD=f"{sys.executable} {recorder}",
                        KTENV_TEST_RECORD=str(tmp_path / "record.json"), KTENV_DRIVER_DIR=str(tmp_path / "none"))
    assert json.loads((tmp_path / "record.json").read_text())["argv"] == ["env", "--arch", "sm120"]
    assert state["NINJA"] == str(root / ".envs" / "sm120" / "bin" / "ninja")


def test_hook_ktenv_function_runs_build_py_with_the_shell_python(tmp_path, nixspec):
    root = checkout_copy(tmp_path)
    env = hook_env(hook_text(nixspec, "sm120"), root, KTENV_SKIP_BUILD="1", KTENV_DRIVER_DIR=str(tmp_path / "none"))
    proc = subprocess.run(["bash", "--norc", "--noprofile", "-c", 'eval "$KTENV_TEST_HOOK"; ktenv lock --help'],
                          cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage: build.py lock" in proc.stdout
    assert "KTENV_SKIP_BUILD is set" in proc.stderr


def test_hook_runs_python_build_py_by_default(tmp_path, nixspec):
    # No override: the real `python build.py env --arch sm120` runs. A broken
    # envs/sm120.toml makes it fail fast (no 10 GB build), which must leave the
    # shell usable and nothing activated.
    root = checkout_copy(tmp_path)
    edit(root / "envs" / "sm120.toml", "[arch]\n", "[arch\n")
    state, err = run_hook(hook_text(nixspec, "sm120"), root, KTENV_DRIVER_DIR=str(tmp_path / "none"))
    assert "ktenv: python build.py env --arch sm120\n" in err
    assert "envs/sm120.toml: malformed TOML" in err
    assert "ktenv: `python build.py env --arch sm120` failed" in err
    assert state["VIRTUAL_ENV"] == ""


def test_hook_failed_build_does_not_activate_a_stale_env(tmp_path, nixspec):
    root = checkout_copy(tmp_path)
    subprocess.run([uv_bin(), "venv", "--quiet", "--python", sys.executable, str(root / ".envs" / "sm120")], check=True)
    state, err = run_hook(hook_text(nixspec, "sm120"), root, KTENV_BUILD_CMD="false", KTENV_DRIVER_DIR=str(tmp_path / "none"))
    assert "ktenv: `false env --arch sm120` failed (its message is above), so .envs/sm120 is not active." in err
    assert state["VIRTUAL_ENV"] == ""


def test_hook_outside_a_checkout_builds_nothing(tmp_path, nixspec):
    work = tmp_path / "elsewhere"
    work.mkdir()
    state, err = run_hook(hook_text(nixspec, "sm120"), work, KTENV_BUILD_CMD=f"{sys.executable} -c pass",
                          KTENV_DRIVER_DIR=str(tmp_path / "none"))
    assert f"ktenv: {work} is not a ktenv checkout (no build.py or envs/sm120.toml)" in err
    assert "env --arch" not in err
    # No shell function; a `ktenv` console script on PATH (pip install -e .) is not the hook's doing.
    assert state["VIRTUAL_ENV"] == "" and state["ktenv"] != "function"
