{
  description = "ktenv: per-GPU-arch development shells for sglang-kt + KT-Kernel";

  # A release branch that has cudaPackages_12_8 (Blackwell needs CUDA 12.8 or
  # newer); flake.lock pins one revision of it, so every user gets the same
  # nixpkgs. Move it with `nix flake update nixpkgs` and review the lock diff.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";

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
      perArch =
        f:
        builtins.listToAttrs (
          map (name: {
            inherit name;
            value = f name;
          }) spec.supported
        );
      shells = perArch shellFor;
      # Free packages only: the checks and the formatter need no CUDA.
      pkgs = import nixpkgs { inherit system; };
      lintHook =
        name:
        pkgs.runCommand "ktenv-hook-${name}-shellcheck"
          {
            nativeBuildInputs = [ pkgs.shellcheck ];
            hook = spec.archs.${name}.shellHook;
            passAsFile = [ "hook" ];
          }
          ''
            shellcheck -s bash "$hookPath"
            touch "$out"
          '';
    in
    {
      devShells.${system} = shells // {
        default = shells.${spec.default};
      };
      # `nix flake check` (without --no-build): each arch's shellHook, as
      # filled in from envs/, passes shellcheck. The shells themselves are
      # evaluated by `nix flake check` as devShells.
      checks.${system} = builtins.listToAttrs (
        map (name: {
          name = "hook-${name}";
          value = lintHook name;
        }) spec.supported
      );
      formatter.${system} = pkgs.nixfmt;
    };
}
