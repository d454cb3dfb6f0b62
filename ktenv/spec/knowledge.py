"""Stack knowledge from envs/: the model (model.toml), what the stack's code
loads (loaders.toml), CUDA driver floors (cuda.toml), KT-Kernel's variants
and build facts (ktkernel.toml), how the server places weights (serve.toml)
and how `tune` measures (tune.toml).

These are facts about upstream code and hardware, read from sources and
measurements; each carries the stack range it was read for (and a reason
where one is needed), so that a newer stack can say where it differs.
"""

from __future__ import annotations

import re
from pathlib import Path

from packaging.version import InvalidVersion, Version

from ..errors import SpecError
from .model import SELFCHECK_KINDS, ExpertShape, Knowledge, Known, KtKernel, Loaders, Model, PathNeed, SelfCheckNote
from .toml import check_keys, need, read, specifier
from .toolchain import load as load_toolchain


def _known(path: Path, table: dict, where: str, reason: bool = True) -> Known:
    stack = specifier(path, need(path, table, "stack", str, where), f"{where}.stack")
    text = " ".join(str(table.get("reason", "")).split())
    if reason and not text:
        raise SpecError(f"{path}: {where} has no reason; every piece of stack knowledge says why it holds.")
    return Known(stack, text, tuple(table.get("evidence", ())))


def _version_tuple(path: Path, text: str, where: str) -> tuple[int, ...]:
    try:
        return Version(text).release
    except InvalidVersion:
        raise SpecError(f"{path}: {where}: {text!r} is not a version.") from None


def _model(root: Path) -> Model:
    path = root / "model.toml"
    data = read(path)
    check_keys(path, data, {"model"}, "the top level")
    m = need(path, data, "model", dict, "the file")
    check_keys(path, m, {"name", "weights_bytes", "ram_bytes", "ram_slack", "experts", "bad_tp"}, "[model]")
    e = need(path, m, "experts", dict, "[model]")
    fields = ("layers", "routed", "shared", "top_k", "hidden", "intermediate")
    check_keys(path, e, set(fields), "[model.experts]")
    bad_tp = {}
    for n, t in enumerate(m.get("bad_tp", [])):
        where = f"[[model.bad_tp]] #{n + 1}"
        check_keys(path, t, {"size", "stack", "reason", "evidence"}, where)
        bad_tp[need(path, t, "size", int, where)] = _known(path, t, where)
    return Model(
        name=need(path, m, "name", str, "[model]"),
        weights_bytes=need(path, m, "weights_bytes", int, "[model]"),
        ram_bytes=need(path, m, "ram_bytes", int, "[model]"),
        ram_slack=float(need(path, m, "ram_slack", float, "[model]")),
        experts=ExpertShape(**{f: need(path, e, f, int, "[model.experts]") for f in fields}),
        bad_tp=bad_tp,
    )


def _loaders(root: Path) -> Loaders:
    path = root / "loaders.toml"
    data = read(path)
    check_keys(path, data, {"import_exempt", "paths", "sgl_kernel", "audit", "smoke", "selfcheck"}, "the top level")
    exempt = {}
    for module, t in data.get("import_exempt", {}).items():
        where = f"[import_exempt.{module}]"
        check_keys(path, t, {"stack", "reason", "evidence"}, where)
        exempt[module] = _known(path, t, where)
    paths = {}
    for kind, choices in data.get("paths", {}).items():
        for choice, t in choices.items():
            where = f"[paths.{kind}.{choice}]"
            check_keys(path, t, {"stack", "required", "symbols", "fallback", "min_flashinfer", "remedy", "reason", "evidence"},
                       where)
            required = need(path, t, "required", bool, where)
            if not required and not t.get("fallback"):
                raise SpecError(f"{path}: {where} is not required but names no `fallback`: say what sglang runs instead.")
            paths[(kind, choice)] = PathNeed(_known(path, t, where, reason=False), required,
                                             tuple(need(path, t, "symbols", list, where)),
                                             t.get("fallback", ""), t.get("min_flashinfer", ""),
                                             " ".join(str(t.get("remedy", "")).split()))
    sk = need(path, data, "sgl_kernel", dict, "the file")
    check_keys(path, sk, {"stack", "common_ops", "common_ops_default"}, "[sgl_kernel]")
    audit = data.get("audit", {})
    check_keys(path, audit, {"loaded", "blind"}, "[audit]")

    def patterns(key: str) -> tuple[tuple[str, str], ...]:
        out = []
        for n, t in enumerate(audit.get(key, [])):
            where = f"[[audit.{key}]] #{n + 1}"
            check_keys(path, t, {"pattern", "why"}, where)
            out.append((need(path, t, "pattern", str, where), " ".join(need(path, t, "why", str, where).split())))
        return tuple(out)

    preload = None
    if "smoke" in data:
        sm = need(path, data, "smoke", dict, "the file")
        check_keys(path, sm, {"stack", "preload", "reason", "evidence"}, "[smoke]")
        preload = (tuple(need(path, sm, "preload", list, "[smoke]")), _known(path, sm, "[smoke]"))
    return Loaders(exempt, paths, dict(need(path, sk, "common_ops", dict, "[sgl_kernel]")),
                   need(path, sk, "common_ops_default", str, "[sgl_kernel]"), patterns("loaded"), patterns("blind"),
                   preload, _selfcheck(path, data.get("selfcheck", [])))


def _selfcheck(path: Path, entries: list) -> tuple[SelfCheckNote, ...]:
    out = []
    for n, t in enumerate(entries):
        where = f"[[selfcheck]] #{n + 1}"
        check_keys(path, t, {"tool", "item", "says", "kind", "stack", "reason", "evidence"}, where)
        kind = need(path, t, "kind", str, where)
        if kind not in SELFCHECK_KINDS:
            raise SpecError(f"{path}: {where}.kind is {kind!r}; it must be one of {', '.join(SELFCHECK_KINDS)}.")
        says = need(path, t, "says", str, where)
        try:
            re.compile(says)
        except re.error as e:
            raise SpecError(f"{path}: {where}.says is not a regular expression ({e}).") from None
        out.append(SelfCheckNote(need(path, t, "tool", str, where), need(path, t, "item", str, where), says, kind,
                                 _known(path, t, where)))
    return tuple(out)


def _min_driver(root: Path) -> dict[str, str]:
    path = root / "cuda.toml"
    data = read(path)
    check_keys(path, data, {"driver"}, "the top level")
    driver = need(path, data, "driver", dict, "the file")
    check_keys(path, driver, {"min_linux"}, "[driver]")
    return dict(need(path, driver, "min_linux", dict, "[driver]"))


def _kt_kernel(root: Path) -> KtKernel:
    path = root / "ktkernel.toml"
    data = read(path)
    check_keys(path, data, {"variants", "build"}, "the top level")
    v = need(path, data, "variants", dict, "the file")
    check_keys(path, v, {"stack", "order", "requires", "toggles"}, "[variants]")
    order = tuple(need(path, v, "order", list, "[variants]"))
    requires = need(path, v, "requires", dict, "[variants]")
    toggles = need(path, v, "toggles", dict, "[variants]")
    for table, where in ((requires, "[variants.requires]"), (toggles, "[variants.toggles]")):
        if set(table) != set(order):
            raise SpecError(f"{path}: {where} must name exactly the variants of [variants].order "
                            f"({', '.join(order)}); it names {', '.join(table)}.")
    b = need(path, data, "build", dict, "the file")
    check_keys(path, b, {"stack", "default_cuda_archs", "min_setuptools", "min_cmake"}, "[build]")
    return KtKernel(
        variants=order,
        requires={k: tuple(x) for k, x in requires.items()},
        toggles={k: dict(x) for k, x in toggles.items()},
        default_cuda_archs=need(path, b, "default_cuda_archs", str, "[build]"),
        min_setuptools=_version_tuple(path, need(path, b, "min_setuptools", str, "[build]"), "[build].min_setuptools"),
        min_cmake=_version_tuple(path, need(path, b, "min_cmake", str, "[build]"), "[build].min_cmake"),
    )


# envs/serve.toml: how sglang-kt places weights on the GPUs and the few
# calibrated numbers launch sizing and convert use (ktenv/serve/ interprets them).
SERVE_KEYS = {
    "sizing": {"stack", "reserve_gib", "reserve_per_peer_gib", "mem_fraction_max", "mem_fraction_step",
               "margin_fraction", "kv_tokens", "requests_per_gpu", "graph_bs_per_gpu", "gpu_experts_per_layer",
               "mxfp4_group", "layerwise_reserved_on", "layerwise_max_share", "draft_experts_on_gpu", "speculative_min_gpus", "kv_fp8"},
    "convert": {"script", "method", "merged", "decode_tok_s", "prefill32_tok_s", "lossy_rel_diff",
                "emulation_tolerance"},
}


def _serve(root: Path) -> dict:
    path = root / "serve.toml"
    data = read(path)
    check_keys(path, data, set(SERVE_KEYS), "the top level")
    for table, keys in SERVE_KEYS.items():
        t = need(path, data, table, dict, "the file")
        check_keys(path, t, keys, f"[{table}]")
        missing = sorted(keys - set(t))
        if missing:
            raise SpecError(f"{path}: [{table}] is missing {', '.join(missing)}.")
    return data


# envs/tune.toml: how `tune` measures kt-kernel's variants and decides (ktenv/serve/tune*.py).
_NUM = (int, float)
TUNE_KEYS = {
    "bench": {"min_experts": int, "llc_multiple": _NUM, "decode_tokens": int, "prefill_chunk_fallback": int,
              "rounds": int, "decode_seconds": _NUM, "decode_min_iters": int, "prefill_seconds": _NUM,
              "prefill_min_iters": int, "reason": str, "evidence": list},
    "decide": {"tie_margin": float, "advice_factor": float, "reason": str, "evidence": list},
    "amxint4": {"stack": str, "kernel_vs_int4_emulation": float, "swiglu_clamp_dropped": bool, "reason": str,
                "evidence": list},
}


def _tune(root: Path) -> dict:
    """Every table and key known and typed, each table with its reason."""
    path = root / "tune.toml"
    data = read(path)
    check_keys(path, data, set(TUNE_KEYS), "the top level")
    for table, keys in TUNE_KEYS.items():
        t = need(path, data, table, dict, "the file")
        check_keys(path, t, set(keys), f"[{table}]")
        for k, kind in keys.items():
            v = need(path, t, k, kind, f"[{table}]")
            if isinstance(v, bool) and kind is not bool:
                raise SpecError(f"{path}: [{table}].{k} must be a number, got {v!r}.")
    specifier(path, data["amxint4"]["stack"], "[amxint4].stack")
    return data


def load_knowledge(root: Path) -> Knowledge:
    return Knowledge(_model(root), _loaders(root), _min_driver(root), _kt_kernel(root), _serve(root), _tune(root),
                     load_toolchain(root))
