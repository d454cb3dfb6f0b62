# One devShell from one arch of nix/spec.nix. The only file that needs
# nixpkgs: every name it looks up comes from the spec, so what the shell holds
# is decided (and tested) without it.
{
  nixpkgs,
  system,
  arch,
}:
let
  pkgs = import nixpkgs {
    inherit system;
    config = arch.nixpkgsConfig;
  };
  inherit (pkgs) lib;
  cuda = import ./cuda.nix;
  names = arch.packages;

  lookup =
    set: where: name:
    set.${name}
      or (throw "ktenv: this nixpkgs has no ${where}${name}, which the ${arch.name} shell needs (nix/spec.nix names it). Point the flake's nixpkgs input at a revision that has it (nix flake update nixpkgs).");

  cudaSetName = cuda.pick {
    wanted = arch.cudaVersion;
    available = builtins.attrNames pkgs;
  };
  cudaSet = pkgs.${cudaSetName};
  cudaNative = map (lookup cudaSet "${cudaSetName}.") names.cuda.native;
  cudaLibraries = map (lookup cudaSet "${cudaSetName}.") names.cuda.libraries;
  cudaPkgs = cudaNative ++ cudaLibraries;
  # nvcc accepts only some host compiler versions; this stdenv's is one.
  stdenv = lookup cudaSet "${cudaSetName}." names.stdenv;

  basePython = lookup pkgs "" names.python;
  python = basePython.withPackages (
    ps: map (lookup ps "${names.python}.pkgs.") names.pythonPackages
  );
  tools = map (lookup pkgs "") names.tools;
  libraries = map (lookup pkgs "") names.libraries;

  # torch's and flashinfer's extension builders want one CUDA_HOME with
  # bin/nvcc, include/ and lib64/; nixpkgs splits the toolkit into packages
  # and outputs, so join them (without their setup hooks, which the real
  # packages below already bring).
  cudaHome = pkgs.symlinkJoin {
    name = "ktenv-cuda-home-${arch.cudaVersion}";
    paths = lib.concatMap (p: map (o: p.${o}) (p.outputs or [ "out" ])) cudaPkgs;
    postBuild = ''
      rm -rf "$out/nix-support"
      if [ ! -e "$out/lib64" ]; then ln -s lib "$out/lib64"; fi
    '';
  };
in
(pkgs.mkShell.override { inherit stdenv; }) {
  name = "ktenv-${arch.name}";
  # Build tools run here (nativeBuildInputs); libraries are linked against
  # (buildInputs), which is where pkg-config and the cc-wrapper look.
  packages = [ python ] ++ cudaNative ++ tools;
  buildInputs = cudaLibraries ++ libraries;
  env = arch.shellEnv // {
    CUDA_HOME = "${cudaHome}";
    CUDA_PATH = "${cudaHome}";
    # PyPI wheels (torch, kt-kernel) load libstdc++ and zlib from the system
    # library path, which Nix's loader does not search. The hook prepends the
    # driver directory at entry.
    LD_LIBRARY_PATH = lib.makeLibraryPath ([ stdenv.cc.cc.lib ] ++ libraries);
  };
  inherit (arch) shellHook;
}
