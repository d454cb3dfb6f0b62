# What every ktenv shell is made of, by nixpkgs attribute name. Data only:
# nix/spec.nix checks it against pyproject.toml, nix/shell.nix looks the names
# up, and tests/fixtures/nix/nixpkgs records, per name, the nixpkgs file that
# defines it at the pinned revision (flake.lock).
{
  # In the arch's cudaPackages set. What the JIT paths (flashinfer, sglang's
  # jit kernels, kt-kernel's CUDA build) compile with: nvcc (ptxas ships in
  # it), and against: the runtime, CCCL (libcu++/CUB), NVRTC, cuBLAS headers
  # for flashinfer's GEMM modules, and the profiler API header that PyTorch's
  # CUDA headers include. cuobjdump and nvdisasm are the same 12.x tools that
  # Triton's wheel bundles (it runs ptxas and cuobjdump), here as Nix builds so
  # they start on NixOS; cuobjdump also serves `audit`.
  cuda = {
    native = [
      "cuda_nvcc"
      "cuda_cuobjdump"
      "cuda_nvdisasm"
    ];
    libraries = [
      "cuda_cudart"
      "cuda_cccl"
      "cuda_nvrtc"
      "cuda_profiler_api"
      "libcublas"
    ];
  };

  # The CUDA set's stdenv: a host compiler this nvcc accepts (gcc 14 at most
  # for CUDA 12.8). Only the compiler: run-time libstdc++ comes from the
  # default stdenv (see nix/shell.nix).
  stdenv = "backendStdenv";

  tools = [
    "cmake"
    "ninja"
    "pkg-config"
    "git"
  ];

  # Headers and pkg-config files for kt-kernel source builds (hwloc and
  # libnuma are hard requirements), and run-time libraries that PyPI wheels
  # expect to find on a regular distribution.
  libraries = [
    "hwloc"
    "numactl"
    "zlib"
  ];

  # ktenv's own dependencies (pyproject.toml [project].dependencies), so the
  # shell's Python runs build.py before any env exists. Each one is either a
  # nixpkgs Python package ...
  python = {
    packaging = "packaging";
    tomlkit = "tomlkit";
    nvidia-ml-py = "nvidia-ml-py";
    pyyaml = "pyyaml";
  };
  # ... or provided another way, for the reason given. nix/spec.nix refuses a
  # pyproject dependency that is in neither list, and a name in them that
  # pyproject no longer has.
  pythonOtherwise = {
    uv = "the exact pinned uv binary (nix/uv.nix) on PATH: nixpkgs' uv is another version, and uv's version is part of what makes a lock byte-identical";
    nvidia-cuda-cuobjdump = "cudaPackages' cuda_cuobjdump, handed to `audit` as KTENV_CUOBJDUMP: the PyPI wheel's binary needs /lib64/ld-linux-x86-64.so.2, which NixOS does not have";
    py-rattler = "not in nixpkgs: inside the shell the conda backend (env --backend conda, lock --conda) is unavailable and says so; the uv backend is unaffected";
  };
}
