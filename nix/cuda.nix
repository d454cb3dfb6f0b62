# Choosing a nixpkgs CUDA package set from version strings alone.
#
# Pure (builtins only) so that nix/spec.nix can name the set without nixpkgs,
# and so that the fallback below is testable offline with a list of names.
let
  inherit (builtins) compareVersions filter head length match replaceStrings sort splitVersion;
in
rec {
  # "12.8" -> "cudaPackages_12_8", the attribute nixpkgs uses for that release.
  attrName = version: "cudaPackages_" + replaceStrings [ "." ] [ "_" ] version;

  # "cudaPackages_12_8" -> "12.8"; null for anything that is not major_minor.
  versionOf =
    name:
    let
      m = match "cudaPackages_([0-9]+)_([0-9]+)" name;
    in
    if m == null then null else "${head m}.${builtins.elemAt m 1}";

  major = version: head (splitVersion version);

  newest = a: b: if compareVersions a b >= 0 then a else b;

  # The set to take from a nixpkgs that offers `available` (attribute names):
  # `wanted` itself when present, else the oldest newer release of the same
  # major version. The major must not move: PyTorch's extension builder
  # refuses an nvcc whose major differs from the CUDA torch was built with,
  # and the JIT paths (flashinfer, sglang's jit kernels) compile through it.
  # nixpkgs drops old minors over time, hence the fallback.
  pick =
    { wanted, available }:
    let
      candidates = filter (
        v: v != null && major v == major wanted && compareVersions v wanted >= 0
      ) (map versionOf available);
      sorted = sort (a: b: compareVersions a b < 0) candidates;
    in
    if builtins.elem (attrName wanted) available then
      attrName wanted
    else if length sorted > 0 then
      attrName (head sorted)
    else
      throw (
        "ktenv: this nixpkgs has no CUDA package set ${wanted} or a newer ${major wanted}.x "
        + "(it offers: ${builtins.concatStringsSep ", " (filter (n: versionOf n != null) available)}). "
        + "The JIT kernels need an nvcc at least that new and of the same major version as "
        + "PyTorch's CUDA. Point the flake's nixpkgs input at a newer revision "
        + "(nix flake update nixpkgs) and enter the shell again."
      );
}
