"""Every Triton kernel specialisation the library launches, compiled for real GPUs
(sm_80 and sm_90) by Triton's own compiler, no GPU needed, on every test run, so a kernel
that only the interpreter accepts fails here and not on a user's GPU.

The specialisations come from the launchers themselves (`compile_specs()` in
kernels/triton_dema.py and cl_core/kernels/triton_fused.py: every dtype, ALIGNED on/off, every
optimizer kind; the formula is a runtime value of each kernel), so a new launch shape
cannot escape the check. Compiles run in subprocesses without TRITON_INTERPRET (under
the interpreter kernels are not compiled), in parallel, with a fresh Triton cache that
is deleted afterwards (nothing cached between runs can hide a failure). From the PTX and
the `ptxas -v` log Triton itself runs, the tests assert:

- every specialisation compiles for both targets;
- no spill bytes and at most 120 registers per thread (8 under the launches' 128 cap: a kernel
  at the cap spilled under another Triton) at the launch's warp count;
- IEEE arithmetic as torch's: sqrt.rn / div.rn (never sqrt.approx, div.full/approx, rcp.approx)
  in fp32, no flush-to-zero, and no fp32 FMA (every launch sets enable_fp_fusion=False, so
  products and sums round as in the interpreter); the Adam kernels do have sqrt.rn and div.rn;
- the fused step's ticket (its cross-tile reduction) is one `atom.global.gpu.acq_rel`
  integer add per program, and no kernel has any other atomic (no float atomics: fixed
  summation orders);
- with ALIGNED, every data stream of a sweeping kernel moves through vector global
  loads/stores: 4 elements per thread, one `ld/st.global.v4` per fp32 stream, one `.v2`
  (64-bit) per 16-bit stream (the fused step; the DEMA sweeps with a 16-bit EMA: 8 per
  thread, one v4) — the counts each spec declares (`expect_v4`);
- 16-bit aligned sweeps route nothing through shared memory between two vector layouts: no
  bar.sync or st.shared inside a loop, and no more than the float32 kernel's (reductions)
  in a loop-less sweep (issue 28: a 16-bit θ beside a float32 θ* cost 4 barriers per
  iteration).

The fused step's param-dtype-EMA specialisations (EMA_IN_PARAM_DTYPE) are a covering subset
by default: every kind, dtype and path plus the heaviest (register-wise) step kernel of each
dtype, 9 of 18; CL_CORE_COMPILE_EVERY_SPEC=1 compiles all of them.

The tests run with whichever Triton is importable: `make compat` runs them on Triton 3.6
too (a block shape from a plain module int fails to compile there; N_STAT/N_PART are
tl.constexpr for that).

Every pointer argument is compiled as 16-byte aligned, as Triton specialises a launch whose
tensor addresses are multiples of 16: the launchers allocate their tables so that every
slice they pass is (tests/kernels/test_triton_alignment.py checks it at odd table sizes).

Cost: 63 specialisations x 2 targets = 126 compiles, about 70 CPU-seconds in all (measured
with resource.getrusage of the workers), so about 40 s on 2 idle cores; far more wall time
on a loaded machine.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
from tests.helpers import ROOT as ROOT_PATH

ARCHS = (80, 90)
MAX_REGISTERS = 128  # the launches' maxnreg
# Every specialisation must stay this far under the cap: a kernel at exactly 128 spilled
# under another Triton/ptxas (issue 28: bf16 AdamW, Triton 3.6, 12 spill bytes).
HEADROOM = 8
ROOT = str(ROOT_PATH)


def _specs():
    from cl_core.kernels import triton_dema, triton_fused

    return triton_dema.compile_specs() + triton_fused.compile_specs()


def aligned_pointer_args(sig: dict) -> set:
    """The arguments of a compile signature compiled as 16-byte aligned pointers (every
    pointer: tests/kernels/test_triton_alignment.py checks the launchers pass exactly these
    aligned)."""
    return {a for a, t in sig.items() if t.startswith("*")}


def _loop_bodies(ptx: str) -> list:
    """The text of every loop in the PTX: from a label to a later branch back to it."""
    lines = ptx.splitlines()
    labels = {}
    for i, line in enumerate(lines):
        m = re.match(r"^(\$L__\w+):", line.strip())
        if m:
            labels[m.group(1)] = i
    bodies = []
    for i, line in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__\w+);", line)
        if m and labels.get(m.group(1), i) < i:
            bodies.append("\n".join(lines[labels[m.group(1)]:i + 1]))
    return bodies


def _ptx_counts(ptx: str) -> dict:
    ops = re.findall(r"\b((?:ld|st)\.global[\w.:]*)", ptx)
    atoms = re.findall(r"\b(atom\.[\w.]*)", ptx)
    fp = re.findall(r"\b((?:sqrt|div|rcp|fma|add|sub|mul)\.[\w.]*f32)\b", ptx)
    loops = _loop_bodies(ptx)
    return {
        "sqrt_rn": sum(op.startswith("sqrt.rn") for op in fp),
        "div_rn": sum(op.startswith("div.rn") for op in fp),
        "inexact": sorted({op for op in fp if ".approx" in op or ".full" in op or ".ftz" in op}),
        "fma_f32": sum(op.startswith("fma.") for op in fp),
        "ld": sum(op.startswith("ld.") for op in ops),
        "st": sum(op.startswith("st.") for op in ops),
        "ld_v4": sum(op.startswith("ld.") and ".v4." in op for op in ops),
        "st_v4": sum(op.startswith("st.") and ".v4." in op for op in ops),
        # 64-bit data accesses (4 16-bit elements); not the float64 hyper-parameter pairs
        # (.v2.b64) nor the partial rows a tensor's last program reads at L2 (.cg)
        "ld_v2": sum(op.startswith("ld.") and ".v2.b32" in op and ".cg." not in op for op in ops),
        "st_v2": sum(op.startswith("st.") and ".v2.b32" in op for op in ops),
        "atoms": sorted(atoms),
        # shared memory: a layout conversion between two vector widths is a st.shared, a
        # bar.sync and a ld.shared; a cross-warp reduction (tl.sum) uses it too
        "loops": len(loops),
        "loop_bar_sync": sum(len(re.findall(r"\b(?:bar|barrier)\.sync\b", b)) for b in loops),
        "loop_st_shared": sum(len(re.findall(r"\bst\.shared\b", b)) for b in loops),
        "st_shared": len(re.findall(r"\bst\.shared\b", ptx)),
        "bar_sync": len(re.findall(r"\b(?:bar|barrier)\.sync\b", ptx)),
    }


def _compile_job(spec, arch: int) -> dict:
    """Compile one specialisation (in a worker process) and read its machine code."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, fn, sig, constexprs, launch, _expect = spec
    signature = {a: ("constexpr" if a in constexprs else sig[a]) for a in fn.arg_names}
    # A real launch marks 16-byte aligned pointer arguments (every torch allocation is).
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned_pointer_args(sig)}
    knobs.nvidia.dump_ptxas_log = True  # Triton prints its own `ptxas -v` log
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            k = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                               target=GPUTarget("cuda", arch, 32), options=dict(launch))
    except Exception as exc:  # reported by the test, with the kernel's name
        return {"name": name, "arch": arch, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    log = out.getvalue()
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    res = {"name": name, "arch": arch, "num_warps": launch["num_warps"], **_ptx_counts(k.asm["ptx"])}
    res["registers"] = int(regs.group(1)) if regs else None
    res["spill"] = int(spill.group(1)) + int(spill.group(2)) if spill else None
    if regs is None or spill is None:
        res["error"] = "no ptxas -v report in Triton's log: " + log[-500:]
    return res


def _worker(jobs_json: str, out_path: str) -> None:
    specs = _specs()
    jobs = json.loads(jobs_json)
    results = [_compile_job(specs[i], arch) for i, arch in jobs]
    with open(out_path, "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module")
def compiled():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install triton): the GPU kernels cannot be compiled here")
    return compile_all()


def compile_all():
    """Compile every (specialisation, arch) in parallel worker processes: (results, specs)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("OMP_NUM_THREADS", "1")
    # Triton's default is FMA contraction on: the launches' own enable_fp_fusion=False must win
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    n_specs = len(_specs())
    jobs = [(i, arch) for i in range(n_specs) for arch in ARCHS]
    workers = max(1, min(4, os.cpu_count() or 1, len(jobs)))
    tmp = tempfile.mkdtemp(prefix="cl_core_triton_compile_")
    env["TRITON_CACHE_DIR"] = os.path.join(tmp, "cache")  # fresh: nothing from earlier runs
    try:
        procs = []
        for w in range(workers):
            out_path = os.path.join(tmp, f"results_{w}.json")
            code = (f"import sys; sys.path.insert(0, {ROOT!r}); from tests.kernels.test_triton_compile import _worker; "
                    f"_worker(sys.argv[1], sys.argv[2])")
            procs.append((subprocess.Popen([sys.executable, "-c", code, json.dumps(jobs[w::workers]), out_path],
                                           env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                           text=True), out_path))
        results = []
        for p, out_path in procs:
            output, _ = p.communicate(timeout=600)
            assert p.returncode == 0, f"compile worker failed:\n{output[-3000:]}"
            with open(out_path) as f:
                results.extend(json.load(f))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    specs = {s[0]: s for s in _specs()}
    assert len(results) == len(jobs)
    return results, specs


@pytest.mark.slow
def test_every_specialisation_compiles_for_sm80_and_sm90(compiled):
    results, specs = compiled
    errors = [f"{r['name']} sm_{r['arch']}: {r['error']}" for r in results if "error" in r]
    assert not errors, "\n".join(errors)
    assert {(r["name"], r["arch"]) for r in results} == {(n, a) for n in specs for a in ARCHS}
    names = set(specs)
    for kind in ("adam", "adamw", "sgd"):  # the brief's list: every kind and dtype, both paths
        for dt in ("float32", "bfloat16", "float16"):
            for path in ("aligned", "general"):
                assert f"fused_step/{kind}/{dt}/{path}" in names
                assert f"fused_flush/{dt}/{path}" in names
                assert f"dema_stats/{dt}/{path}" in names and f"dema_apply/{dt}/{path}" in names


@pytest.mark.slow
def test_no_spills_and_headroom_under_128_registers(compiled):
    results, _ = compiled
    bad = [f"{r['name']} sm_{r['arch']}: {r['registers']} registers, {r['spill']} spill bytes"
           for r in results if "error" not in r and (r["spill"] != 0 or r["registers"] > MAX_REGISTERS - HEADROOM)]
    assert not bad, f"Triton {_triton_version()}: at most {MAX_REGISTERS - HEADROOM} registers, no spills:\n" + "\n".join(bad)


def _triton_version() -> str:
    import triton

    return triton.__version__


@pytest.mark.slow
def test_16_bit_aligned_sweeps_have_no_shared_memory_round_trip(compiled):
    """16-bit parameters with a float32 (or 16-bit) EMA: no value goes through shared memory
    between two vector layouts. In a loop (the fused step, the flush) no bar.sync and no
    st.shared at all; in the loop-less DEMA sweeps no more shared stores and barriers than
    the float32 kernel of the same name (whose are its tl.sum reductions)."""
    results, _ = compiled
    ok = {(r["name"], r["arch"]): r for r in results if "error" not in r}
    checked, bad = 0, []
    for (name, arch), r in ok.items():
        if not name.endswith("/aligned") or not ("bfloat16" in name or "float16" in name):
            continue
        checked += 1
        if r["loops"]:
            if r["loop_bar_sync"] or r["loop_st_shared"]:
                bad.append(f"{name} sm_{arch}: {r['loop_bar_sync']} bar.sync, {r['loop_st_shared']} st.shared in its loops")
        else:
            fp32 = ok[(re.sub(r"b?float16", "float32", name).replace("ema=param/", ""), arch)]
            if r["st_shared"] > fp32["st_shared"] or r["bar_sync"] > fp32["bar_sync"]:
                bad.append(f"{name} sm_{arch}: {r['st_shared']} st.shared / {r['bar_sync']} bar.sync against the "
                           f"float32 kernel's {fp32['st_shared']} / {fp32['bar_sync']}")
    assert checked >= 2 * 16 and not bad, "\n".join(bad)


def test_the_shared_memory_reader_can_fail():
    """The loop reader finds a barrier and a shared store between a loop label and its back branch."""
    ptx = ("st.shared.b32 [%r1], %r2;\n$L__BB0_8:  // =>This Inner Loop Header\nld.global.v4.b32 {%r1,%r2,%r3,%r4}, [%rd1];\n"
           "bar.sync 0;\nst.shared.v4.b32 [%r20], {%r1,%r2,%r3,%r4};\n@%p70 bra $L__BB0_8;\nbar.sync 0;")
    c = _ptx_counts(ptx)
    assert (c["loops"], c["loop_bar_sync"], c["loop_st_shared"], c["st_shared"], c["bar_sync"]) == (1, 1, 1, 2, 2)


def test_ieee_sqrt_and_division_and_no_fma_contraction(compiled):
    results, _ = compiled
    ok = [r for r in results if "error" not in r]
    bad = [f"{r['name']} sm_{r['arch']}: {r['inexact']} (approximate or flush-to-zero fp32 arithmetic), "
           f"{r['fma_f32']} fp32 FMAs" for r in ok if r["inexact"] or r["fma_f32"]]
    assert not bad, "\n".join(bad)
    adam = [r for r in ok if r["name"].startswith(("fused_step/adam/", "fused_step/adamw/"))]
    assert adam and all(r["sqrt_rn"] > 0 and r["div_rn"] > 0 for r in adam)
    decide = [r for r in ok if r["name"].startswith(("dema_decide/", "fused_pending")) and "decide=0" not in r["name"]]
    assert decide and all(r["div_rn"] > 0 for r in decide)  # α's division


def test_the_ieee_check_can_fail():
    """The PTX reader sees the forms the check above forbids."""
    counts = _ptx_counts("sqrt.approx.ftz.f32 %f1, %f2;\ndiv.full.f32 %f3, %f1, %f2;\nfma.rn.f32 %f4, %f1, %f2, %f3;\n"
                         "sqrt.rn.f32 %f5, %f4;\ndiv.rn.f32 %f6, %f5, %f4;\nfma.rn.f64 %fd1, %fd2, %fd3, %fd4;")
    assert counts["inexact"] == ["div.full.f32", "sqrt.approx.ftz.f32"]
    assert counts["fma_f32"] == 1 and counts["sqrt_rn"] == 1 and counts["div_rn"] == 1


@pytest.mark.slow
def test_aligned_sweeps_use_vector_global_accesses(compiled):
    results, specs = compiled
    checked = 0
    for r in results:
        expect = specs[r["name"]][5]
        if "error" in r or expect is None:
            continue
        checked += 1
        got = {k: r[k] for k in expect}
        assert all(got[k] >= v for k, v in expect.items()), (
            f"{r['name']} sm_{r['arch']}: {got} vector accesses of {r['ld']} / {r['st']} global loads / stores; "
            f"expected at least {expect}"
        )
    assert checked >= 2 * 18  # every aligned sweep (3 dtypes x (3 kinds + flush + stats + apply)), both archs


@pytest.mark.slow
def test_the_general_path_is_really_unhinted(compiled):
    """The check above can fail: without ALIGNED the same kernels have no vector access."""
    results, _ = compiled
    general = [r for r in results if r["name"].endswith("/general") and "error" not in r]
    vector = [r["name"] for r in general if r["ld_v4"] or r["st_v4"] or r["ld_v2"] or r["st_v2"]]
    assert general and not vector, vector


def test_only_the_fused_step_takes_a_ticket_and_it_is_acq_rel(compiled):
    """The fused step's cross-tile reduction (triton_fused._close_tile): one integer atomic
    per program, acq_rel at GPU scope (it publishes the tile's partials to the program
    that takes the tensor's last ticket, and makes that one see them all); no kernel has a
    float atomic (every sum has a fixed order) or any other atomic."""
    results, _ = compiled
    ok = [r for r in results if "error" not in r]
    step = [r for r in ok if r["name"].startswith("fused_step/")]
    assert step and all(r["atoms"] == ["atom.global.gpu.acq_rel.add.u32"] for r in step), {
        r["name"]: r["atoms"] for r in step}
    others = {r["name"]: r["atoms"] for r in ok if not r["name"].startswith("fused_step/") and r["atoms"]}
    assert not others


def test_the_atomic_reader_can_fail():
    counts = _ptx_counts("@%p1 atom.global.gpu.acq_rel.add.u32 %r1, [ %rd1 + 0 ], %r2;\n"
                         "atom.global.gpu.relaxed.add.f32 %f1, [ %rd2 + 0 ], %f2;")
    assert counts["atoms"] == ["atom.global.gpu.acq_rel.add.u32", "atom.global.gpu.relaxed.add.f32"]


def test_layout_codes_agree_with_the_config():
    from cl_core.dema.config import FORMULA_CODE
    from cl_core.kernels import layouts

    assert layouts.FORMULA_CODE == FORMULA_CODE


if __name__ == "__main__":  # print the table (registers, spills, vector accesses) for bench/README.md
    import time

    t0 = time.time()
    all_specs = _specs()
    for i, spec in enumerate(all_specs):
        for arch in ARCHS:
            r = _compile_job(spec, arch)
            print(f"{r['name']:36s} sm_{arch} warps={spec[4]['num_warps']} regs={r.get('registers')} spill={r.get('spill')} "
                  f"ld.v4={r.get('ld_v4')}/{r.get('ld')} st.v4={r.get('st_v4')}/{r.get('st')} {r.get('error', '')}",
                  flush=True)
    print(f"{time.time() - t0:.0f} s")
