# ktenv devShell for @arch@ (@title@); nix/hook.nix fills in the @-names from envs/.
# Runs inside the interactive shell `nix develop` starts, so it must never
# `exit`: everything sits in functions and failures only print.

# The NVIDIA driver's user-space libraries, and nothing else, as links in a
# private directory that goes on LD_LIBRARY_PATH. Nix's loader does not read
# the host's ld.so.cache; putting the host's library directory itself on
# LD_LIBRARY_PATH would put its libc and libstdc++ ahead of Nix's for every
# program in this shell. KTENV_DRIVER_DIR (a colon-separated list) replaces
# the places searched: NixOS's driver link, then the usual distribution ones.
ktenv_driver_links() {
  local -a dirs
  local dir="" d lib links
  IFS=: read -r -a dirs <<< "${KTENV_DRIVER_DIR:-/run/opengl-driver/lib:/usr/lib/x86_64-linux-gnu:/usr/lib64:/usr/lib}"
  for d in "${dirs[@]}"; do
    if [ -e "$d/libcuda.so.1" ]; then dir="$d"; break; fi
  done
  if [ -z "$dir" ]; then
    echo "ktenv: no libcuda.so.1 in ${dirs[*]}, so CUDA programs in this shell will not find the NVIDIA driver (fine for CPU-only work). On NixOS enable hardware.graphics and the nvidia driver; elsewhere set KTENV_DRIVER_DIR to the directory that holds libcuda.so.1 and enter the shell again." >&2
    return 0
  fi
  # Per host: a home directory shared between machines may see other drivers.
  links="${KTENV_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ktenv}/driver/$(uname -n)"
  if ! mkdir -p "$links" || ! rm -f "$links"/lib*; then
    echo "ktenv: could not prepare $links for the driver links, so CUDA programs in this shell will not find the NVIDIA driver. Make it writable (or set KTENV_CACHE_DIR) and enter the shell again." >&2
    return 0
  fi
  for lib in "$dir"/libcuda.so* "$dir"/libnvidia-ml.so* "$dir"/libnvidia-ptxjitcompiler.so* "$dir"/libnvidia-nvvm.so*; do
    if [ -e "$lib" ]; then ln -s "$lib" "$links/${lib##*/}"; fi
  done
  # Triton links its launcher with -lcuda, which needs the unversioned name.
  if [ ! -e "$links/libcuda.so" ]; then ln -s "$dir/libcuda.so.1" "$links/libcuda.so"; fi
  export LD_LIBRARY_PATH="$links${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export TRITON_LIBCUDA_PATH="${TRITON_LIBCUDA_PATH:-$links}"
}

ktenv_enter() {
  local arch=@arch@
  ktenv_driver_links

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
    # and for wrappers such as a scheduler prefix. The env is built with the
    # shell's interpreter (KTENV_ENV_PYTHON, set by nix/shell.nix), never one
    # uv finds elsewhere, and the env's stamp records it.
    local -a cmd args=(env --arch "$arch")
    read -r -a cmd <<< "${KTENV_BUILD_CMD:-python build.py}"
    if [ -n "${KTENV_ENV_PYTHON:-}" ]; then args+=(--python "$KTENV_ENV_PYTHON"); fi
    echo "ktenv: ${cmd[*]} ${args[*]}" >&2
    if ! "${cmd[@]}" "${args[@]}"; then
      echo "ktenv: \`${cmd[*]} ${args[*]}\` failed (its message is above), so .envs/$arch is not active. The toolchain is; fix the cause and run \`ktenv env --arch $arch && source .envs/$arch/bin/activate\`." >&2
      return 0
    fi
  fi

  if [ -f ".envs/$arch/bin/activate" ]; then
    # shellcheck disable=SC1090
    . ".envs/$arch/bin/activate"
    # The env's bin/ninja is the ninja wheel's binary, made for
    # /lib64/ld-linux-x86-64.so.2 (absent on NixOS); torch's and flashinfer's
    # JIT builds run whichever `ninja` is first on PATH, so Nix's goes first.
    if [ -n "${KTENV_NIX_FIRST:-}" ]; then export PATH="$KTENV_NIX_FIRST:$PATH"; fi
    echo "ktenv: .envs/$arch active; run ktenv's commands as \`ktenv smoke --arch $arch\`." >&2
  else
    echo "ktenv: .envs/$arch/bin/activate does not exist, so no environment was activated. Build it with \`ktenv env --arch $arch\`." >&2
  fi
}
ktenv_enter
unset -f ktenv_enter ktenv_driver_links
