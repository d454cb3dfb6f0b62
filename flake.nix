{
  description = "ktenv: per-GPU-arch development shells for sglang-kt + KT-Kernel";

  # A fresh checkout has no flake.lock: the first `nix develop` writes one that
  # pins this branch; commit it.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      system = "x86_64-linux";
      # Pure: evaluates from envs/*.toml alone (tests/test_nix.py runs it offline).
      spec = import ./nix/spec.nix {
        envsDir = ./envs;
        pyproject = ./pyproject.toml;
      };
      shellFor =
        name:
        import ./nix/shell.nix {
          inherit nixpkgs system;
          arch = spec.archs.${name};
        };
      shells = builtins.listToAttrs (
        map (name: {
          inherit name;
          value = shellFor name;
        }) spec.supported
      );
    in
    {
      # `nix eval .#lib.spec --json` shows what each shell is made of.
      lib = { inherit spec; };
      devShells.${system} = shells // {
        default = shells.${spec.default};
      };
    };
}
