"""Run with an env's python: where does sgl_kernel's own loader find its CUDA payload?

Usage: python payload_probe.py <site-packages>
Prints one line `KTENV-RESULT {json}`: {"ok": bool, "root": path, "files": {...}, "error": str}.

sgl_kernel/__init__.py imports torch and loads CUDA ops (it fails without a
driver), so the package is stood up without running it: an empty module with
the real package path, from which the pure-Python payload_runtime and
_payload_manifest import normally. Extraction is forbidden here: the probe
must answer "the loader found the files already in place", never do the work
itself, so part lookup is replaced by an error.
"""

import json
import sys
import time
import types
from pathlib import Path


def main() -> int:
    site = Path(sys.argv[1])
    pkg = types.ModuleType("sgl_kernel")
    pkg.__path__ = [str(site / "sgl_kernel")]
    sys.modules["sgl_kernel"] = pkg
    out = {"ok": False}
    t0 = time.monotonic()
    try:
        import sgl_kernel._payload_manifest as manifest
        import sgl_kernel.payload_runtime as runtime

        def refuse(module_name):
            raise RuntimeError(f"the loader wanted to extract the payload again (it asked for part {module_name})")

        runtime._payload_part = refuse
        if hasattr(runtime, "_materialize_all"):
            root = runtime._materialize_all()
        else:  # only the public function: resolve one binary and walk up to the cache root
            name, rel = next(iter(manifest.BINARIES.items()))
            path = runtime.materialize_binary(name)
            root = Path(str(path)[: -len(rel)])
        root = Path(root)
        missing = [n for n in manifest.FILES if not (root / n).is_file()]
        out.update(ok=not missing, root=str(root), files=sorted(manifest.FILES), missing=missing)
        if missing:
            out["error"] = "files missing under " + str(root) + ": " + ", ".join(missing)
    except Exception as e:  # report, do not crash: the caller explains
        out.update(ok=False, error=f"{type(e).__name__}: {e}")
    out["seconds"] = round(time.monotonic() - t0, 2)
    print("KTENV-RESULT " + json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
