# The uv that pyproject.toml pins (uv==VERSION), for the shells.
#
# uv's version is part of what makes a lock byte-identical, and nixpkgs
# carries whatever uv its revision has. This is the pinned release from
# PyPI: the musllinux wheel, whose bin/uv is a static-pie executable (no
# program interpreter), so it runs unpatched on NixOS and on other hosts.
# nix/spec.nix refuses a pyproject.toml that pins another version; the test
# suite downloads this URL and checks the hash, the linking and the version.
{
  version = "0.13.9";
  url = "https://files.pythonhosted.org/packages/fe/fe/794884de0efd3ac77a427cab21aa72c0483e100c55a42cd5cbb02c141b84/uv-0.13.9-py3-none-musllinux_1_1_x86_64.whl";
  # PyPI's published sha256 of that file.
  sha256 = "2c45530751517d6c3bbc69a19473f6effe47cce047bede01ffd8af7ea7b36b25";
}
