# Choosing a nixpkgs CUDA package set from version strings alone.
#
# Pure (builtins only) so that nix/spec.nix can name the set without nixpkgs,
# and so that the choice is testable offline with a list of names.
let
  inherit (builtins)
    compareVersions
    concatStringsSep
    elemAt
    filter
    head
    match
    replaceStrings
    sort
    splitVersion
    ;
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
    if m == null then null else "${head m}.${elemAt m 1}";

  major = version: head (splitVersion version);

  newest = a: b: if compareVersions a b >= 0 then a else b;

  # The versioned sets among `available` (attribute names) that `usable`
  # accepts, oldest first. nixpkgs keeps a removed set's name as an alias that
  # throws ("CUDA 12.5 has been removed from Nixpkgs", pkgs/top-level/aliases.nix),
  # so a name alone does not make a set usable: nix/shell.nix passes a test
  # that evaluates it.
  versions =
    { available, usable }:
    sort (a: b: compareVersions a b < 0) (
      filter (v: v != null && usable (attrName v)) (map versionOf available)
    );

  # The set to take from a nixpkgs that offers `available`: `wanted` itself
  # when usable, else the oldest newer release of the same major version. The
  # major must not move: PyTorch's extension builder refuses an nvcc whose
  # major differs from the CUDA torch was built with, and the JIT paths
  # (flashinfer, sglang's jit kernels) compile through it. nixpkgs drops old
  # minors over time, hence the fallback.
  pick =
    {
      wanted,
      available,
      usable ? (_: true),
    }:
    let
      # Filter by name first: only candidates are ever evaluated by `usable`.
      candidates = filter (
        n:
        let
          v = versionOf n;
        in
        v != null && major v == major wanted && compareVersions v wanted >= 0
      ) available;
      found = versions {
        available = candidates;
        inherit usable;
      };
      offered = filter (n: versionOf n != null) available;
    in
    if found != [ ] then
      attrName (head found)
    else
      throw (
        "ktenv: this nixpkgs has no usable CUDA package set ${wanted} or a newer ${major wanted}.x "
        + "(it names: ${concatStringsSep ", " offered}; removed sets are aliases that throw). "
        + "The JIT kernels need an nvcc at least that new and of the same major version as "
        + "PyTorch's CUDA. Point the flake's nixpkgs input at a newer revision "
        + "(nix flake update nixpkgs) and enter the shell again."
      );
}
