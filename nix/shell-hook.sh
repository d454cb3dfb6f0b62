# ktenv devShell for @arch@ (@title@); nix/hook.nix fills in the @-names from envs/.
# Runs inside the interactive shell `nix develop` starts, so it must never
# `exit`: everything sits in a function and failures only print.

ktenv_enter() {
  local arch=@arch@
  local driver="${KTENV_DRIVER_DIR:-/run/opengl-driver/lib}"
  # Nix's glibc does not read the host's ld.so.cache, so libcuda must be on
  # LD_LIBRARY_PATH; Triton finds it through ldconfig unless told where.
  if [ -e "$driver/libcuda.so.1" ]; then
    export LD_LIBRARY_PATH="$driver${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export TRITON_LIBCUDA_PATH="${TRITON_LIBCUDA_PATH:-$driver}"
  else
    echo "ktenv: no libcuda.so.1 in $driver, so CUDA programs in this shell will not find the NVIDIA driver (fine for CPU-only work). On NixOS enable hardware.graphics and the nvidia driver; elsewhere set KTENV_DRIVER_DIR to the directory that holds libcuda.so.1 and enter the shell again." >&2
  fi

  if [ ! -f build.py ] || [ ! -f "envs/$arch.toml" ]; then
    echo "ktenv: $PWD is not a ktenv checkout (no build.py or envs/$arch.toml), so .envs/$arch was neither built nor activated. Enter the shell from the repository root: cd ktenv && nix develop .#$arch" >&2
    return 0
  fi
  KTENV_ROOT="$PWD"
  KTENV_PYTHON="$(command -v python)"
  # Keeps working after .envs/$arch is activated (whose python lacks ktenv's
  # own dependencies): ktenv commands run with the shell's Nix python.
  ktenv() { "$KTENV_PYTHON" "$KTENV_ROOT/build.py" "$@"; }

  if [ -n "${KTENV_SKIP_BUILD:-}" ]; then
    echo "ktenv: KTENV_SKIP_BUILD is set; not running the env build." >&2
  else
    # KTENV_BUILD_CMD replaces "python build.py" (split on spaces), for tests
    # and for wrappers such as a scheduler prefix.
    local -a cmd
    read -r -a cmd <<< "${KTENV_BUILD_CMD:-python build.py}"
    echo "ktenv: ${cmd[*]} env --arch $arch" >&2
    if ! "${cmd[@]}" env --arch "$arch"; then
      echo "ktenv: \`${cmd[*]} env --arch $arch\` failed (its message is above), so .envs/$arch is not active. The toolchain is; fix the cause and run \`ktenv env --arch $arch && source .envs/$arch/bin/activate\`." >&2
      return 0
    fi
  fi

  if [ -f ".envs/$arch/bin/activate" ]; then
    # shellcheck disable=SC1090
    . ".envs/$arch/bin/activate"
    echo "ktenv: .envs/$arch active; run ktenv's commands as \`ktenv smoke --arch $arch\`." >&2
  else
    echo "ktenv: .envs/$arch/bin/activate does not exist, so no environment was activated. Build it with \`ktenv env --arch $arch\`." >&2
  fi
}
ktenv_enter
unset -f ktenv_enter
