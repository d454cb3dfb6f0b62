# envs/*.toml as Nix data: the pure half of ktenv's Nix support.
#
# builtins only, no nixpkgs, so `nix-instantiate --eval --strict --json` of
# this file works offline, and tests/test_nix.py checks it against what
# ktenv.spec (Python) reads from the same files. flake.nix hands each arch to
# nix/shell.nix, which is the only part that needs nixpkgs.
#
# The arch set is the directory listing (envs/smNN.toml) filtered by
# `[arch] supported`; nothing here lists archs, versions or env vars.
{
  envsDir,
  pyproject ? envsDir + "/../pyproject.toml",
}:
let
  inherit (builtins)
    addErrorContext
    all
    attrNames
    filter
    fromJSON
    fromTOML
    head
    isAttrs
    isBool
    isList
    isString
    listToAttrs
    match
    readDir
    readFile
    replaceStrings
    sort
    stringLength
    substring
    toJSON
    ;
  cuda = import ./cuda.nix;
  hook = import ./hook.nix;

  label = file: "${baseNameOf (toString envsDir)}/${file}";
  fail = file: msg: throw "ktenv: ${label file}: ${msg}";
  readToml =
    file: addErrorContext "while reading ${label file}" (fromTOML (readFile (envsDir + "/${file}")));

  isVersion = v: isString v && match "[0-9]+\\.[0-9]+" v != null;

  # One key of a table, checked; `where` is how the message names the table.
  need =
    file: where: table: key: ok: what:
    if !(table ? ${key}) then
      fail file "${where} is missing the required key `${key}`."
    else if !(ok table.${key}) then
      fail file "${where}.${key} must be ${what}, got ${toJSON table.${key}}."
    else
      table.${key};

  envTable =
    file: data:
    let
      env = data.env or { };
      bad = filter (k: !(isString env.${k})) (attrNames env);
    in
    if !(isAttrs env) then
      fail file "[env] must be a table of NAME = \"value\" strings."
    else if bad != [ ] then
      fail file "[env].${head bad} must be a string (environment variables are text), got ${toJSON env.${head bad}}."
    else
      env;

  stackData = readToml "stack.toml";
  st =
    if stackData ? stack && isAttrs stackData.stack then
      stackData.stack
    else
      fail "stack.toml" "has no [stack] table.";
  stackCuda = need "stack.toml" "[stack]" st "cuda" isVersion "a MAJOR.MINOR string such as \"12.8\"";
  pythons = need "stack.toml" "[stack]" st "python" (
    l: isList l && l != [ ] && all (v: isString v && match "3\\.[0-9]+" v != null) l
  ) "a non-empty list of Python versions such as [\"3.11\"]";
  # The first listed Python is the one the shell offers (and uv builds with).
  python = head pythons;
  pythonAttr = "python" + replaceStrings [ "." ] [ "" ] python;
  stackEnv = envTable "stack.toml" stackData;

  # ktenv's own Python dependencies, by name, from pyproject.toml: the shell's
  # Python must run build.py before any env exists.
  pythonPackages =
    let
      project = (fromTOML (readFile pyproject)).project or { };
      deps = project.dependencies or [ ];
      upper = [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ];
      lower = [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ];
      # PEP 503 normalisation, which is also how nixpkgs names Python packages.
      squash = s: let t = replaceStrings [ "--" ] [ "-" ] s; in if t == s then s else squash t;
      canonical = n: squash (replaceStrings ([ "_" "." ] ++ upper) ([ "-" "-" ] ++ lower) n);
      nameOf =
        d:
        let
          m = match "[[:space:]]*([A-Za-z0-9][A-Za-z0-9._-]*).*" d;
        in
        if m == null then
          throw "ktenv: pyproject.toml: dependency ${toJSON d} does not start with a package name."
        else
          canonical (head m);
    in
    map nameOf deps;

  smNumber = name: fromJSON (substring 2 (stringLength name - 2) name);
  bySm = a: b: smNumber a < smNumber b;

  archFiles = sort bySm (
    map (f: substring 0 (stringLength f - 5) f) (
      filter (f: match "sm[0-9]+\\.toml" f != null) (attrNames (readDir envsDir))
    )
  );

  loadArch =
    stem:
    let
      file = "${stem}.toml";
      data = readToml file;
      a =
        if data ? arch && isAttrs data.arch then data.arch else fail file "has no [arch] table.";
      req = need file "[arch]" a;
      name = req "name" isString "a string";
      supported = req "supported" isBool "true or false";
    in
    if name != stem then
      fail file "[arch].name is ${toJSON name} but the file is named ${file}; they must agree."
    else
      {
        inherit name supported file;
        reason = a.reason or "";
        body = mkArch file data a name;
      };

  mkArch =
    file: data: a: name:
    let
      req = need file "[arch]" a;
      title = req "title" isString "a string";
      computeCapability = req "compute_capability" isVersion "a MAJOR.MINOR string such as \"12.0\"";
      minCuda = req "min_cuda" isVersion "a MAJOR.MINOR string such as \"12.8\"";
      validated = if a ? validated then req "validated" isBool "true or false" else false;
      # The toolkit must be new enough for the arch (Blackwell needs 12.8) and
      # for the stack's torch; the newer of the two is the one to take.
      cudaVersion = cuda.newest stackCuda minCuda;
      env = stackEnv // envTable file data;
      shellEnv = env // {
        # Left on: kt-kernel source builds pass explicit ISA flags, and the
        # cc-wrapper then strips any -march=native that slips in, so a binary
        # built here never encodes this host's CPU by accident.
        NIX_ENFORCE_NO_NATIVE = "1";
      };
      enforced = env.NIX_ENFORCE_NO_NATIVE or "1";
    in
    if cuda.major cudaVersion != cuda.major stackCuda then
      fail file "min_cuda = \"${minCuda}\" needs CUDA ${cuda.major minCuda}.x, but the stack's torch is built for CUDA ${stackCuda} (envs/stack.toml). PyTorch's extension builder refuses an nvcc of another major version, so the JIT kernels could not build. Raise the stack's cuda/torch_cuda together, or lower min_cuda."
    else if enforced != "1" then
      fail file "[env] sets NIX_ENFORCE_NO_NATIVE = ${toJSON enforced}. ktenv keeps it at 1 so that a source build under Nix never bakes -march=native (this host's CPU) into kt-kernel; choose the CPU with `--target-isa` instead."
    else
      {
        inherit
          name
          title
          validated
          minCuda
          cudaVersion
          env
          shellEnv
          ;
        inherit computeCapability;
        cudaPackages = cuda.attrName cudaVersion;
        nixpkgsConfig = {
          allowUnfree = true;
          cudaSupport = true;
          cudaCapabilities = [ computeCapability ];
        };
        # Attribute names only; nix/shell.nix looks them up in nixpkgs.
        packages = {
          # In the arch's cudaPackages set. What the JIT paths (flashinfer,
          # sglang's jit kernels, kt-kernel's CUDA build) compile with: nvcc, and
          # against: the runtime, CCCL (libcu++/CUB), NVRTC, cuBLAS headers for
          # flashinfer's GEMM modules, and the profiler API header that
          # PyTorch's CUDA headers include.
          cuda = {
            native = [ "cuda_nvcc" ];
            libraries = [
              "cuda_cudart"
              "cuda_cccl"
              "cuda_nvrtc"
              "cuda_profiler_api"
              "libcublas"
            ];
          };
          # The CUDA set's stdenv: a host compiler this nvcc accepts.
          stdenv = "backendStdenv";
          tools = [
            "cmake"
            "ninja"
            "pkg-config"
            "git"
            "uv"
          ];
          # Headers and pkg-config files for kt-kernel source builds (hwloc and
          # libnuma are hard requirements), and runtime libraries that PyPI
          # wheels expect to find on a regular distribution.
          libraries = [
            "hwloc"
            "numactl"
            "zlib"
          ];
          python = pythonAttr;
          inherit pythonPackages;
        };
        shellHook = hook { inherit name title; };
      };

  loaded = map loadArch archFiles;
  supportedList = filter (x: x.supported) loaded;
  supported = map (x: x.name) supportedList;
  validatedArchs = map (x: x.name) (filter (x: x.body.validated) supportedList);
in
if loaded == [ ] then
  throw "ktenv: ${toString envsDir}: no arch files (sm89.toml, ...) found."
else if supported == [ ] then
  throw "ktenv: ${toString envsDir}: no arch is marked supported = true, so there is no shell to offer."
else
  {
    stack = {
      cuda = stackCuda;
      inherit python pythonAttr;
      env = stackEnv;
    };
    inherit supported;
    # Why each refused arch is refused, as the TOML says.
    unsupported = listToAttrs (
      map (x: {
        inherit (x) name;
        value = x.reason;
      }) (filter (x: !x.supported) loaded)
    );
    # The newest arch the tutorial validated; else the newest supported one.
    default = if validatedArchs != [ ] then head (sort (a: b: bySm b a) validatedArchs) else head (sort (a: b: bySm b a) supported);
    archs = listToAttrs (
      map (x: {
        inherit (x) name;
        value = x.body;
      }) supportedList
    );
  }
