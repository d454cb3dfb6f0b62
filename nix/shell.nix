# One devShell from one arch of nix/spec.nix. The only file that needs
# nixpkgs: every name it looks up comes from the spec (nix/packages.nix), so
# what the shell holds is decided, and tested, without it.
{
  nixpkgs,
  system,
  arch,
}:
let
  inherit (builtins)
    attrNames
    concatMap
    concatStringsSep
    isAttrs
    tryEval
    ;
  pkgs = import nixpkgs {
    inherit system;
    config = arch.nixpkgsConfig;
  };
  cuda = import ./cuda.nix;
  names = arch.packages;

  lookup =
    set: where: name:
    set.${name}
      or (throw "ktenv: this nixpkgs has no ${where}${name}, which the ${arch.name} shell needs (nix/packages.nix names it). Point the flake's nixpkgs input at a revision that has it (nix flake update nixpkgs).");

  cudaSetName = cuda.pick {
    wanted = arch.cudaVersion;
    available = attrNames pkgs;
    # A removed set is an alias that throws when evaluated.
    usable = n: (tryEval (isAttrs pkgs.${n})).value;
  };
  cudaSet = pkgs.${cudaSetName};
  inCuda = lookup cudaSet "${cudaSetName}.";
  cudaNative = map inCuda names.cuda.native;
  cudaLibraries = map inCuda names.cuda.libraries;
  # nvcc accepts only some host compiler versions; this stdenv's is one.
  backendStdenv = inCuda names.stdenv;

  basePython = lookup pkgs "" names.python;
  python = basePython.withPackages (ps: map (lookup ps "${names.python}.pkgs.") names.pythonPackages);
  tools = map (lookup pkgs "") names.tools;
  libraries = map (lookup pkgs "") names.libraries;

  # Every output of each package, for the joins below.
  allOutputs = concatMap (p: map (o: p.${o}) (p.outputs or [ "out" ]));
  libPath = ps: concatStringsSep ":" (map (p: "${p}/lib") ps);

  # torch's and flashinfer's extension builders want one CUDA_HOME with
  # bin/nvcc, include/ and lib64/; nixpkgs splits the toolkit into packages
  # and outputs, so join them (without their setup hooks, which the packages
  # themselves bring to the shell). The checks fail the build, not a JIT
  # compile minutes into a server start.
  cudaHome = pkgs.symlinkJoin {
    name = "ktenv-cuda-home-${arch.cudaVersion}";
    paths = allOutputs (cudaNative ++ cudaLibraries);
    postBuild = ''
      rm -rf "$out/nix-support"
      if [ ! -e "$out/lib64" ]; then ln -s lib "$out/lib64"; fi
      for f in bin/nvcc bin/ptxas bin/cuobjdump bin/nvdisasm include/cuda_runtime.h include/cublas_v2.h; do
        if [ ! -e "$out/$f" ]; then
          echo "ktenv: ${cudaSetName} has no $f, which CUDA_HOME must hold (nix/packages.nix)." >&2
          exit 1
        fi
      done
    '';
  };

  # The pinned uv (nix/uv.nix): PyPI's static musllinux build, unpatched.
  uv = pkgs.runCommand "uv-${arch.uv.version}" {
    src = pkgs.fetchurl { inherit (arch.uv) url sha256; };
    nativeBuildInputs = [ pkgs.unzip ];
  } ''
    unzip -q "$src" 'uv-*.data/scripts/*'
    install -Dm755 uv-*.data/scripts/uv "$out/bin/uv"
    install -Dm755 uv-*.data/scripts/uvx "$out/bin/uvx"
    "$out/bin/uv" --version | grep -qx 'uv ${arch.uv.version}.*'
  '';

  # Tools the activated env would otherwise shadow with wheel binaries that
  # need /lib64/ld-linux-x86-64.so.2 (the hook puts this first after
  # activating): the ninja wheel's, which torch's and flashinfer's JIT builds
  # run from PATH.
  nixFirst = pkgs.runCommand "ktenv-nix-first" { } ''
    mkdir -p "$out/bin"
    ln -s ${pkgs.ninja}/bin/ninja "$out/bin/ninja"
  '';
in
(pkgs.mkShell.override { stdenv = backendStdenv; }) {
  name = "ktenv-${arch.name}";
  # Build tools run here (nativeBuildInputs; PATH in this order, so the
  # shell's python and the pinned uv come first); libraries are linked
  # against (buildInputs), which is where pkg-config and the cc-wrapper look.
  packages = [
    python
    uv
  ]
  ++ cudaNative
  ++ tools;
  buildInputs = cudaLibraries ++ libraries;
  env = arch.shellEnv // {
    CUDA_HOME = "${cudaHome}";
    CUDA_PATH = "${cudaHome}";
    # Triton runs ptxas (and cuobjdump, nvdisasm) from its wheel unless told
    # otherwise; those are built for /lib64/ld-linux-x86-64.so.2. These are
    # the same CUDA 12.8 tools, built by Nix.
    TRITON_PTXAS_PATH = "${cudaHome}/bin/ptxas";
    TRITON_CUOBJDUMP_PATH = "${cudaHome}/bin/cuobjdump";
    TRITON_NVDISASM_PATH = "${cudaHome}/bin/nvdisasm";
    # `audit` takes its cuobjdump from here instead of installing the PyPI
    # wheel (whose binary NixOS cannot start).
    KTENV_CUOBJDUMP = "${cudaHome}/bin/cuobjdump";
    # PyPI wheels (torch, kt-kernel, tilelang) load libstdc++, libgomp, zlib,
    # hwloc and libnuma from the system library path, which Nix's loader does
    # not search. libstdc++ comes from the default stdenv, the newest one in
    # this nixpkgs: Nix's own cmake and ninja were linked against it, and it
    # serves older C++ code too (not backendStdenv's, which can be older).
    # The hook prepends the driver's link directory at entry.
    LD_LIBRARY_PATH = libPath ([ pkgs.stdenv.cc.cc.lib ] ++ map (p: p.lib or p.out or p) libraries);
    KTENV_NIX_FIRST = "${nixFirst}/bin";
    # The interpreter `build.py env` builds .envs/<arch> with (the hook passes
    # it as --python): Nix's plain CPython, not the wrapper that carries
    # ktenv's own dependencies.
    KTENV_ENV_PYTHON = basePython.interpreter;
    # A CPython that uv downloads is built for /lib64/ld-linux-x86-64.so.2.
    UV_PYTHON_DOWNLOADS = "never";
  };
  inherit (arch) shellHook;
  # `nix eval --json .#devShells.x86_64-linux.sm120.ktenv` shows what the
  # shell was made from (the arch as nix/spec.nix read it from envs/).
  passthru.ktenv = arch // {
    cudaPackages = cudaSetName;
  };
}
