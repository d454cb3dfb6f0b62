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
    elem
    elemAt
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
  packageNames = import ./packages.nix;
  uvRelease = import ./uv.nix;

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

  # ktenv's own Python dependencies, from pyproject.toml: the shell's Python
  # must run build.py before any env exists. nix/packages.nix says how the
  # shell provides each one; a dependency it does not know (or a name it
  # lists that pyproject no longer has) fails here, not at `nix develop` time.
  pyprojectDeps =
    let
      project = (fromTOML (readFile pyproject)).project or { };
      upper = [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ];
      lower = [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ];
      # PEP 503 normalisation, which is also how nixpkgs names Python packages.
      squash = s: let t = replaceStrings [ "--" ] [ "-" ] s; in if t == s then s else squash t;
      canonical = n: squash (replaceStrings ([ "_" "." ] ++ upper) ([ "-" "-" ] ++ lower) n);
      parse =
        d:
        let
          m = match "[[:space:]]*([A-Za-z0-9][A-Za-z0-9._-]*)[[:space:]]*(==[[:space:]]*([^;[:space:]]+))?.*" d;
        in
        if m == null then
          throw "ktenv: pyproject.toml: dependency ${toJSON d} does not start with a package name."
        else
          {
            name = canonical (head m);
            pinned = elemAt m 2;
          };
    in
    map parse (project.dependencies or [ ]);

  pythonPackages =
    let
      names = map (d: d.name) pyprojectDeps;
      known = attrNames packageNames.python ++ attrNames packageNames.pythonOtherwise;
      unknown = filter (n: !(elem n known)) names;
      stale = filter (n: !(elem n names)) known;
    in
    if unknown != [ ] then
      throw "ktenv: pyproject.toml depends on ${head unknown}, which nix/packages.nix neither maps to a nixpkgs Python package (`python`) nor lists as provided otherwise (`pythonOtherwise`, with the reason). Add it to one of them, checking that the nixpkgs attribute exists at the revision flake.lock pins."
    else if stale != [ ] then
      throw "ktenv: nix/packages.nix lists the Python dependency ${head stale}, which pyproject.toml no longer has. Remove it from nix/packages.nix."
    else
      map (n: packageNames.python.${n}) (filter (n: packageNames.python ? ${n}) names);

  # The uv the shells put on PATH must be the one pyproject.toml pins.
  uvPin =
    let
      pins = map (d: d.pinned) (filter (d: d.name == "uv") pyprojectDeps);
      want = if pins == [ ] then null else head pins;
    in
    if want != null && want != uvRelease.version then
      throw "ktenv: pyproject.toml pins uv==${want}, but nix/uv.nix fetches uv ${uvRelease.version}. Point nix/uv.nix at uv-${want}-py3-none-musllinux_1_1_x86_64.whl on PyPI (its URL and published sha256), so that the shells run the uv that makes byte-identical locks."
    else
      uvRelease;

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
        # allowUnfree is all the CUDA packages need. cudaSupport (and
        # cudaCapabilities) would change how every CUDA-capable package in
        # the closure is built (hwloc, for one, gains a CUDA build), so none
        # of them would come from a binary cache; the arch reaches the JIT
        # compilers through TORCH_CUDA_ARCH_LIST and friends ([env]) instead.
        nixpkgsConfig = {
          allowUnfree = true;
        };
        # Attribute names only; nix/shell.nix looks them up in nixpkgs.
        packages = removeAttrs packageNames [ "python" "pythonOtherwise" ] // {
          python = pythonAttr;
          inherit pythonPackages;
        };
        uv = uvPin;
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
