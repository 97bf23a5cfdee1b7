"""Named layouts of the DEMA and fused-step kernels: the one list of codes, table rows,
hyper-parameter slots and flag rows that the Triton kernels (triton_dema.py,
triton_fused.py), the engine code that fills their tables (cl_core/dema/onepass/step.py,
onepass/cpu_driver.py, onepass/triton_driver.py, twopass/triton_backend.py) and the C kernels (csrc/, which
mirror these numbers) share.

Plain Python ints (and `aligned_count`, the padding rule of the tables): a Triton kernel
reads them as module attributes (`L.P_A`), which
Triton folds into compile-time constants; the host uses them as indices. Change a number
here and in the C mirror together (tests/kernels/test_triton_compile.py checks the formula codes
against DEMAConfig).

Who uses what: FORMULA_*, KIND_*, PEND_*, the hyper-parameter slots H_* (one row per
optimizer param group) and the per-step dynamic table D_*/DF_* are the interface of every
fused group (cl_core/dema/onepass/step.py hands them to the Triton and the CPU group alike);
S_*, F_*, P_* are the Triton fused kernel's own tables; DT_*, ST_*, DS_*, MODE_* belong to
the Triton DEMA backend (DS_* is also the layout a `reduce_stats` hook receives).
"""
from __future__ import annotations

# ---- alignment of what a launcher passes
ALIGN_BYTES = 16  # every pointer argument of a launch is a multiple of this (the compile tests' tt.divisibility)


def aligned_count(n: int, elem_size: int) -> int:
    """n rounded up to whole ALIGN_BYTES: the element count that keeps the next slice of
    a table (its second half, the rows after it) 16-byte aligned when the first is."""
    per = ALIGN_BYTES // elem_size
    return -(-n // per) * per


# ---- α formula (DEMAConfig.formula), docs/design.md §2
FORMULA_OFFICIAL = 0  # α = scale·(1+b)/(a·c)
FORMULA_PAPER = 1  # α = d·(1+b)/(a·c)
FORMULA_FIXED = 2  # α = 1 − β
FORMULA_CODE = {"official": FORMULA_OFFICIAL, "paper": FORMULA_PAPER, "fixed": FORMULA_FIXED}

# ---- optimizer kinds of the fused step
KIND_ADAM = 0  # torch.optim.Adam (L2 weight decay folded into the gradient)
KIND_ADAMW = 1  # torch.optim.AdamW, or Adam(decoupled_weight_decay=True)
KIND_SGD = 2  # torch.optim.SGD (momentum, dampening, nesterov)

# ---- what one DEMA update does to a tensor (triton_dema: decide -> apply)
MODE_SKIP = 0  # θ or g held NaN/inf: EMA and g_prev untouched
MODE_INIT = 1  # first finite update: θ* ← θ
MODE_EMA = 2  # θ* ← (1−α)θ* + αθ

# ---- the EMA update a fused step leaves pending for the next launch (or flush)
PEND_NONE = 0  # nothing pending (before the first step)
PEND_INIT = 1  # θ* was set to θ this step; becomes "started" if the probe was finite
PEND_EMA = 2  # θ* ← (1−α)θ* + αθ once α is known from this step's statistics

# ---- hyper-parameters: one float64 row of N_HYPER per optimizer param group,
# written once per group per step (never per tensor). Slot names per optimizer kind;
# a slot index means one value for one kind.
N_HYPER = 8
H_LR = 0  # every kind: learning rate
H_WEIGHT_DECAY = 1  # every kind: weight decay (L2 for Adam/SGD, decoupled for AdamW)
# Adam / AdamW
H_BETA1 = 2
H_BETA2 = 3
H_EPS = 4
H_LOG_BETA1 = 5  # log(β1): the kernel forms β1^step as exp(step·log β1) in float64
H_LOG_BETA2 = 6  # log(β2)
# SGD
H_MOMENTUM = 2
H_DAMPENING = 3
H_NESTEROV = 4  # 1.0 or 0.0

# ---- per-tensor static table of a fused group: int64 [N_STATIC, T], built when the
# tables are (re)built, never per step
N_STATIC = 8
S_PARAM = 0  # data_ptr of θ
S_EXP_AVG = 1  # Adam exp_avg / SGD momentum_buffer (θ's address when absent: never read)
S_EXP_AVG_SQ = 2  # Adam exp_avg_sq (θ's address when absent)
S_EMA = 3  # θ* (view of the engine's flat EMA buffer: fp32, or the parameter dtype with ema_dtype="param")
S_GRAD_PREV = 4  # g_prev (θ*'s dtype; θ*'s address for the "fixed" formula: never read)
S_NUMEL = 5
S_GROUP = 6  # optimizer param group index: row of the hyper-parameter table
S_TILE0 = 7  # index of the tensor's first tile (tiles of a tensor are consecutive)

# ---- per-tensor dynamic table: int64 [N_DYNAMIC, T], uploaded once per step
N_DYNAMIC = 3
D_GRAD = 0  # data_ptr of the gradient (θ's address when None: never read)
D_STEP = 1  # optimizer step count after this step (torch's state["step"])
D_FLAGS = 2  # bit set of DF_*
DF_HAS_GRAD = 1  # the tensor has a gradient this step (otherwise torch skips it)
DF_FIRST = 2  # SGD: the momentum buffer starts this step (torch clones the gradient)

# ---- per-tensor flags carried between fused launches: int32 [2, N_FLAGS, T],
# double-buffered by step parity (a launch reads [r], the tensor's first tile writes
# [w]), so no program reads what another program of the same launch writes
N_FLAGS = 6
F_STARTED = 0  # the EMA exists (lazy start)
F_HAS_PREV = 1  # g_prev holds the previous step's gradient
F_PEND = 2  # PEND_* left by the launch for the next one
F_PEND_HAS_GRAD = 3  # the pending step had a gradient
F_PEND_HAS_PREV = 4  # ... and a previous gradient (the dynamic formulas can apply)
F_APPLIED = 5  # the launch applied an EMA update (its tiles' d partials are current)

# ---- per-tile partial sums of a fused launch: fp32 [2, tiles, N_PART], by parity
N_PART = 4
P_A = 0  # Σ|θ − θ*|
P_B = 1  # Σ|g|, plus (θ−θ)+(g−g): NaN exactly when θ or g held NaN/inf (the probe)
P_C = 2  # Σ|g − g_prev|
P_D = 3  # Σ|θ − θ*| after the EMA update finished in this launch (the paper formula's d)

# ---- triton DEMA backend (triton_dema.py): per-tensor address table int64 [N_DT, T]
N_DT = 3
DT_PARAM = 0  # data_ptr of θ
DT_GRAD = 1  # data_ptr of g (θ's address when None: never read)
DT_HAS_GRAD = 2  # 1 when the tensor has a gradient this update

# per-block partials of the stats kernel: fp32 [blocks, N_STAT]
N_STAT = 4
ST_A = 0  # Σ|θ − θ*|
ST_B = 1  # Σ|g|
ST_C = 2  # Σ|g − g_prev|
ST_PROBE = 3  # Σ(θ−θ) + Σ(g−g): NaN exactly when θ or g held NaN/inf

# per-tensor statistics after decide's reduction: fp32 [T, N_DSTAT]; this is the tensor a
# `reduce_stats` hook receives and sums across ranks (so a NaN-flag column, not a probe)
N_DSTAT = 5
DS_A = 0
DS_B = 1
DS_C = 2
DS_NONFINITE = 3  # 1.0 when θ or g held NaN/inf on this rank (summed: > 0 on any rank)
DS_D = 4  # ‖θ − θ*‖₁ after the previous update (the paper formula's d)
