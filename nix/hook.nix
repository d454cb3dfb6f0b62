# The devShell's shellHook for one arch: nix/shell-hook.sh with the arch filled in.
# Kept as a real bash file so it can be linted and run by the tests as is.
arch:
let
  text = builtins.replaceStrings [ "@arch@" "@title@" ] [ arch.name arch.title ] (
    builtins.readFile ./shell-hook.sh
  );
in
# A title carrying "@" would leave a placeholder-looking word behind; refuse
# rather than emit a hook that says something other than the TOML.
if builtins.match ".*@[a-z]+@.*" (builtins.replaceStrings [ "\n" ] [ " " ] text) != null then
  throw "ktenv: nix/shell-hook.sh still has an @placeholder@ after filling in ${arch.name}; nix/hook.nix and the hook disagree on the names."
else
  text
