"""AdamW8bit (minicustom/train/adamw8bit.py) against bitsandbytes 0.50.2 and torch.optim.AdamW.

What of bitsandbytes runs here, and what each test takes from it:
- `create_dynamic_map` is pure Python/torch: the maps must be equal bit for bit.
- The quantizer: bitsandbytes' CPU C kernel (`cquantize_blockwise_cpu_fp32`, used for fp32 input) does not
  round to the nearest code: it snaps x / absmax to a 65536-point grid first, so ~0.1% of m and ~3% of v
  values get another code (a v below 1.5e-5 of its block's absmax gets code 7, 1.6e-5, instead of code 0..6).
  Its pure-torch fallback (the same registered CPU op, taken for any other input dtype: we give it the
  fp32 values as float64, which it casts back exactly) scales by 1/absmax and takes the argmin distance, the
  same on every machine: codes and absmax must be equal bit for bit. Its C dequantization is one fp32
  multiply per value, also machine-independent: equal bit for bit.
- The optimizer: `bitsandbytes.optim.AdamW8bit` runs on CPU (backends/cpu/ops.py: dequantize, the fp32
  update in torch ops, re-quantize with the C kernel above). Run in lock step (before each step its 8-bit
  state is set to ours), its parameters and new absmax must equal ours bit for bit (the update reads the
  states only through exact dequantization, and the fp32 ops are the same torch ops in the same order, so
  this holds on any CPU). Its new codes must equal ours wherever its search found the nearest code; where
  they differ, ours must be strictly nearer to the unquantized state, recomputed here from the formula
  (and checked through its block absmax, which must equal bitsandbytes' bit for bit).

Derived tolerances:
- Round trip: nearest rounding puts x within half the gap to the neighbouring code on its side, so
  |x - Q[q] * absmax| <= max(half gaps around q) * absmax (`spacing_bound`), plus the fp32 rounding of
  the scale x * (1/absmax) and of the product: 2 ulps of |x|, 2**-22 * |x|.
- Against fp32 AdamW (K steps, no lock step): let T_k be our pre-quantization moment at step k, M_k fp32
  AdamW's, dq_k the round-trip bound of the stored state. T_k - M_k = beta * (stored_{k-1} - M_{k-1}),
  so E_k = beta * (E_{k-1} + dq_{k-1}) bounds |T_k - M_k| (E_1 = 0: step 1 is exact), plus 2**-22 * |T_k| for
  fp32 rounding. With b = sqrt(v) / c2 + eps and |sqrt(a) - sqrt(b)| <= sqrt(|a - b|):
      |m/b - m'/b'| <= E_m / b_min + |m'| * sqrt(E_v) / c2 / (b_min * b'),  b_min = sqrt(max(v' - E_v, 0)) / c2 + eps
  and the parameters drift apart by at most the sum over steps of lr / c1 times that (decay only shrinks a
  difference), plus 2**-21 * (|p| + lr / c1 * |update|) per step for the two runs' fp32 rounding.
- bitsandbytes' 32-bit path (parameters under min_8bit_size) computes the same AdamW as
  m / (sqrt(v) + eps * c2) * (-lr * c2 / c1); ours computes torch's m / (sqrt(v) / c2 + eps) * (-lr / c1) and
  lerp for m: in lock step the results differ by the rounding of a handful of fp32 ops, bounded by
  rtol 2**-20 (8 ulps).
- A parameter under min_8bit_size must equal torch.optim.AdamW (foreach=False) bit for bit: same ops.
"""

import copy
import io

import pytest
import torch

import minicustom as mc
from minicustom.data import load_examples
from minicustom.methods import apply_method
from minicustom.train import TrainConfig, TrainingError, train
from minicustom.train.adamw8bit import (
    AdamW8bit,
    dequantize_blockwise,
    dynamic_map,
    quantize_blockwise,
    spacing_bound,
)

bnb = pytest.importorskip("bitsandbytes")
bnbF = pytest.importorskip("bitsandbytes.functional")

LR, BETAS, EPS, WD = 1e-2, (0.9, 0.999), 1e-8, 0.1
BIG, SMALL = (37, 131), (5, 7)  # 4847 = 18 blocks of 256 + 239; 35 < min_8bit_size


def grads(shape, steps, seed=0, zero_block_first=True):
    """Gradients whose scale varies over four decades from row to row (so blocks have different absmax);
    at step 1 the first 256 values are zero (an all-zero block of m and v)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(steps):
        scale = 10 ** (torch.rand(shape[0], *[1] * (len(shape) - 1), generator=g) * 3 - 3)
        x = (torch.randn(shape, generator=g) * scale).contiguous()
        if k == 0 and zero_block_first:
            x.view(-1)[:256] = 0
        out.append(x)
    return out


def nearest(xn, code):
    """Brute force: the index of the nearest code, the first of equals (argmin over all 256)."""
    return (xn[:, None] - code[None]).abs().argmin(dim=1)


def block_absmax(x, bs=256):
    flat = x.reshape(-1)
    return torch.nn.functional.pad(flat, (0, -flat.numel() % bs)).view(-1, bs).abs().amax(1)


# -- (a) the maps -------------------------------------------------------------------------------------

@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_maps_equal_bitsandbytes(signed):
    ours, theirs = dynamic_map(signed), bnbF.create_dynamic_map(signed=signed)
    assert ours.dtype == torch.float32 and ours.shape == (256,)
    assert torch.equal(ours, theirs)
    assert (ours.diff() > 0).all() and ours[-1] == 1 and (ours == 0).sum() == 1  # sorted, distinct, 0 and 1
    assert (ours[0] < 0) == signed and (ours[0] > -1)


# -- (b) quantize / dequantize ------------------------------------------------------------------------

def awkward(signed, n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 10 ** (torch.rand(n, generator=g) * 7 - 6)
    x = x if signed else x.square()
    if n > 300:
        x[256:512] = 0  # an all-zero block
        x[600] = 1e4 if n > 600 else x[600]  # an outlier coarsens its own block only
    return x


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", [1, 100, 256, 4847, 9 * 256])
def test_quantize_equals_bitsandbytes_pure_torch(signed, n):
    from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib

    if isinstance(lib, ErrorHandlerMockBNBNativeLibrary):
        pytest.skip("bitsandbytes' CPU library is not loaded: its CPU op (and pure-torch fallback) is absent")
    code, x = dynamic_map(signed), awkward(signed, n, n)
    q, absmax = quantize_blockwise(x, code)
    q_bnb, absmax_bnb = torch.ops.bitsandbytes.quantize_blockwise(x.double(), code, 256)  # the torch fallback
    assert q.dtype == torch.uint8 and q.shape == x.shape and absmax.shape == (-(-n // 256),)
    assert torch.equal(absmax, absmax_bnb)
    live = torch.repeat_interleave(absmax > 0, 256)[:n]  # an all-zero block: any code dequantizes to 0
    assert torch.equal(q[live], q_bnb[live])
    assert torch.equal(q[~live], torch.full_like(q[~live], int((code == 0).nonzero()[0])))
    ours = dequantize_blockwise(q, absmax, code)
    assert torch.equal(ours, torch.ops.bitsandbytes.dequantize_blockwise(q, absmax, code, 256, torch.float32))


@pytest.mark.parametrize("signed", [True, False])
def test_round_trip_within_the_maps_spacing(signed):
    code, x = dynamic_map(signed), awkward(signed, 4847, 1)
    q, absmax = quantize_blockwise(x, code)
    xn = (torch.nn.functional.pad(x, (0, -x.numel() % 256)).view(-1, 256) * (1 / absmax.clamp(min=1e-38))[:, None])
    assert torch.equal(q.long(), nearest(xn.reshape(-1)[:x.numel()].clamp(-1, 1), code))  # nearest, ties low
    err = (dequantize_blockwise(q, absmax, code) - x).abs()
    assert (err <= spacing_bound(q, absmax, code) + 2 ** -22 * x.abs()).all()
    top = absmax.repeat_interleave(256)[:x.numel()]
    upper = x.abs() >= 0.1 * top  # the top decade: 64 (signed) or 128 (unsigned) steps of 0.9 / parts
    step = 0.9 / (64 if signed else 128)
    assert (err[upper] <= (step / 2 + 2 ** -22) * top[upper]).all()


# -- (c) bitsandbytes' optimizer, in lock step --------------------------------------------------------

def test_lock_step_parity_with_bitsandbytes_adamw8bit():
    torch.manual_seed(0)
    big, small = torch.randn(BIG), torch.randn(SMALL)
    ours_p = [torch.nn.Parameter(big.clone()), torch.nn.Parameter(small.clone())]
    bnb_p = [torch.nn.Parameter(big.clone()), torch.nn.Parameter(small.clone())]
    ours = AdamW8bit(ours_p, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    theirs = bnb.optim.AdamW8bit(bnb_p, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    signed, unsigned = dynamic_map(True), dynamic_map(False)
    G, g_small = grads(BIG, 5), grads(SMALL, 5, seed=1, zero_block_first=False)
    for k in range(5):
        st = ours.state[ours_p[0]]
        if k:  # bitsandbytes starts from our state (its own search may have picked other codes)
            tb = theirs.state[bnb_p[0]]
            for mine, its in (("m_codes", "state1"), ("m_absmax", "absmax1"), ("v_codes", "state2"),
                              ("v_absmax", "absmax2")):
                tb[its].copy_(st[mine])
            ts, os_ = theirs.state[bnb_p[1]], ours.state[ours_p[1]]
            ts["state1"].copy_(os_["m"]), ts["state2"].copy_(os_["v"])
            bnb_p[1].data.copy_(ours_p[1].data)
            m_prev = dequantize_blockwise(st["m_codes"], st["m_absmax"], signed)
            v_prev = dequantize_blockwise(st["v_codes"], st["v_absmax"], unsigned)
        else:
            m_prev, v_prev = torch.zeros(BIG), torch.zeros(BIG)
        for p, g in ((ours_p[0], G[k]), (bnb_p[0], G[k]), (ours_p[1], g_small[k]), (bnb_p[1], g_small[k])):
            p.grad = g.clone()
        ours.step(), theirs.step()
        tb = theirs.state[bnb_p[0]]
        assert tb["state1"].dtype == torch.uint8 and theirs.state[bnb_p[1]]["state1"].dtype == torch.float32
        assert torch.equal(ours_p[0], bnb_p[0]), f"step {k + 1}: parameters differ"
        # the unquantized moments, from the formula (bitsandbytes' ops), checked through bnb's absmax
        m_new = m_prev.mul(BETAS[0]).add_(G[k], alpha=1 - BETAS[0])
        v_new = v_prev.mul(BETAS[1]).addcmul_(G[k], G[k], value=1 - BETAS[1])
        for name, new, code, codes, absmax, its_codes, its_absmax in (
                ("m", m_new, signed, st["m_codes"], st["m_absmax"], tb["state1"], tb["absmax1"]),
                ("v", v_new, unsigned, st["v_codes"], st["v_absmax"], tb["state2"], tb["absmax2"])):
            assert torch.equal(block_absmax(new), its_absmax) and torch.equal(absmax, its_absmax)
            live = torch.repeat_interleave(absmax > 0, 256)[:new.numel()]
            xn = (new.reshape(-1) * (1 / absmax.clamp(min=1e-38)).repeat_interleave(256)[:new.numel()])[live]
            mine, its = codes.reshape(-1)[live].long(), its_codes.reshape(-1)[live].long()
            assert torch.equal(mine, nearest(xn.clamp(-1, 1), code)), f"step {k + 1}: {name} not nearest"
            differ = mine != its
            assert ((xn - code[its]).abs() > (xn - code[mine]).abs())[differ].all()  # bnb's is strictly farther
        torch.testing.assert_close(ours_p[1], bnb_p[1], rtol=2 ** -20, atol=0)
        for mine, its in (("m", "state1"), ("v", "state2")):
            torch.testing.assert_close(ours.state[ours_p[1]][mine], theirs.state[bnb_p[1]][its], rtol=2 ** -20,
                                       atol=0)


# -- (c) fp32 AdamW, free-running, within the derived bound -------------------------------------------

def test_tracks_fp32_adamw_within_the_derived_bound():
    torch.manual_seed(1)
    start = torch.randn(BIG)
    p8, p32 = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    ours = AdamW8bit([p8], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    ref = torch.optim.AdamW([p32], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, foreach=False)
    signed, unsigned = dynamic_map(True), dynamic_map(False)
    (b1, b2), d = BETAS, torch.float64
    E_m = E_v = E_p = dq_m = dq_v = torch.zeros(BIG, dtype=d)
    H_m = H_v = torch.zeros(BIG, dtype=d)
    for k, g in enumerate(grads(BIG, 6, seed=2), start=1):
        g = g.double()
        T_m, T_v = b1 * H_m + (1 - b1) * g, b2 * H_v + (1 - b2) * g * g  # our pre-quantization moments
        E_m = b1 * (E_m + dq_m) + 2 ** -22 * T_m.abs()
        E_v = b2 * (E_v + dq_v) + 2 ** -22 * T_v
        c1, c2 = 1 - b1 ** k, (1 - b2 ** k) ** 0.5
        b = T_v.sqrt() / c2 + EPS
        b_min = (T_v - E_v).clamp(min=0).sqrt() / c2 + EPS
        du = E_m / b_min + T_m.abs() * E_v.sqrt() / c2 / (b_min * b)
        E_p = E_p + LR / c1 * du + 2 ** -21 * (p32.detach().double().abs() + LR / c1 * (T_m / b).abs())
        p8.grad, p32.grad = g.float(), g.float()
        ours.step(), ref.step()
        assert ((p8.double() - p32.double()).abs() <= E_p).all(), f"step {k}: beyond the bound"
        st = ours.state[p8]
        H_m = dequantize_blockwise(st["m_codes"], st["m_absmax"], signed).double()
        H_v = dequantize_blockwise(st["v_codes"], st["v_absmax"], unsigned).double()
        dq_m = spacing_bound(st["m_codes"], st["m_absmax"], signed).double() + 2 ** -22 * H_m.abs()
        dq_v = spacing_bound(st["v_codes"], st["v_absmax"], unsigned).double() + 2 ** -22 * H_v
        assert ((H_m - ref.state[p32]["exp_avg"].double()).abs() <= E_m + dq_m).all()
        assert ((H_v - ref.state[p32]["exp_avg_sq"].double()).abs() <= E_v + dq_v).all()
        if k == 1:  # step 1 reads no stored state: AdamW itself, to fp32 rounding
            torch.testing.assert_close(p8, p32, rtol=2 ** -21, atol=0)
    assert (p8 != p32).any()  # the quantization did act


# -- (d) small parameters are torch.optim.AdamW -------------------------------------------------------

@pytest.mark.parametrize("shape", [(7,), (33, 17), (4095,)])
def test_small_parameters_step_as_torch_adamw_bit_for_bit(shape):
    torch.manual_seed(2)
    start = torch.randn(shape)
    a, b = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    ours = AdamW8bit([a], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    ref = torch.optim.AdamW([b], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, foreach=False)
    for k, g in enumerate(grads(shape, 5, seed=3, zero_block_first=False)):
        for opt in (ours, ref):
            opt.param_groups[0]["lr"] = LR * (1 - k / 10)  # a schedule, as the trainer sets it
        a.grad, b.grad = g.clone(), g.clone()
        ours.step(), ref.step()
        assert torch.equal(a, b)
        assert torch.equal(ours.state[a]["m"], ref.state[b]["exp_avg"])
        assert torch.equal(ours.state[a]["v"], ref.state[b]["exp_avg_sq"])
    assert set(ours.state[a]) == {"step", "m", "v"}


def test_min_8bit_size_boundary():
    under, at = torch.nn.Parameter(torch.randn(4095)), torch.nn.Parameter(torch.randn(4096))
    opt = AdamW8bit([under, at])
    under.grad, at.grad = torch.randn(4095), torch.randn(4096)
    opt.step()
    assert set(opt.state[under]) == {"step", "m", "v"}
    assert opt.state[at]["m_codes"].dtype == torch.uint8 and opt.state[at]["m_absmax"].shape == (16,)


# -- (e) state_dict: save, load, resume bit for bit ---------------------------------------------------

def test_state_dict_round_trip_resumes_bit_for_bit():
    torch.manual_seed(3)
    shapes = [(BIG, torch.float32), (SMALL, torch.float32), ((64, 80), torch.bfloat16), ((10,), torch.bfloat16)]
    params = [torch.nn.Parameter(torch.randn(s).to(dt)) for s, dt in shapes]
    steps = [grads(s, 6, seed=i) for i, (s, _) in enumerate(shapes)]
    opt = AdamW8bit(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)

    def advance(o, ps, ks):
        for k in ks:
            for p, g in zip(ps, steps):
                p.grad = g[k].to(p.dtype)
            o.step()
    advance(opt, params, range(3))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = AdamW8bit(copies, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    resumed.load_state_dict(copy.deepcopy(saved))
    bf16_big = resumed.state[copies[2]]
    assert bf16_big["m_absmax"].dtype == torch.float32 and bf16_big["m_codes"].dtype == torch.uint8
    assert resumed.state[copies[3]]["m"].dtype == torch.float32  # not cast to the bf16 parameter's dtype
    advance(opt, params, range(3, 6))
    advance(resumed, copies, range(3, 6))
    for p, c in zip(params, copies):
        assert torch.equal(p, c)
        a, b = opt.state[p], resumed.state[c]
        assert a.keys() == b.keys() and a["step"] == b["step"] == 6
        assert all(torch.equal(a[k], b[k]) for k in a if k != "step")


def test_loading_another_optimizers_state_is_refused():
    p = torch.nn.Parameter(torch.randn(BIG))
    torch_opt = torch.optim.AdamW([p])
    p.grad = torch.randn(BIG)
    torch_opt.step()
    with pytest.raises(ValueError, match="expected step, m_codes, m_absmax, v_codes, v_absmax"):
        AdamW8bit([p]).load_state_dict(torch_opt.state_dict())


# -- (f) errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-1e-3), "lr must be a finite number >= 0, got -0.001"),
    (dict(betas=(1.0, 0.999)), r"betas must be two numbers in \[0, 1\), got \(1.0, 0.999\)"),
    (dict(betas=(0.9, -0.1)), r"betas must be two numbers in \[0, 1\)"),
    (dict(eps=-1.0), "eps must be"),
    (dict(weight_decay=-0.1), "weight_decay must be"),
    (dict(block_size=0), "block_size must be an integer >= 1"),
    (dict(min_8bit_size=-1), "min_8bit_size must be an integer >= 0"),
])
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        AdamW8bit([torch.nn.Parameter(torch.zeros(3))], **kwargs)
    assert "\n" not in str(info.value)


def test_bad_groups_parameters_and_gradients():
    with pytest.raises(ValueError, match="parameter 1 of group 0 is torch.int64") as info:
        AdamW8bit([torch.nn.Parameter(torch.zeros(3)), torch.zeros(3, dtype=torch.long)])
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="lr must be"):
        AdamW8bit([{"params": [torch.nn.Parameter(torch.zeros(3))], "lr": -1.0}])
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="parameter 0 of group 0 has a sparse gradient") as info:
        AdamW8bit(emb.parameters()).step()
    assert "\n" not in str(info.value)


# -- 3. the trainer ------------------------------------------------------------------------------------

def test_trainer_runs_adamw8bit_and_resumes_exactly(setup, tmp_path):
    root, path = setup
    tok = mc.load_tokenizer(path)
    examples = load_examples(root / "train.jsonl", tok, max_length=128)

    def model():
        m = mc.load_model(path)
        apply_method(m, "full")  # its matrices (72 x 72 and larger) take the 8-bit path, k/v (24 x 72) fp32
        return m
    config = TrainConfig(optim="adamw8bit", lr=1e-3, batch_size=2, max_steps=4, save_every=2, max_length=128,
                         weight_decay=0.01, exact_match=0)
    straight_model = model()
    straight = train(straight_model, examples, config, tmp_path / "a", tokenizer=tok)

    def stop(step, record):
        if step == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(model(), examples, config, tmp_path / "b", tokenizer=tok, on_step=stop)
    resumed_model = model()
    resumed = train(resumed_model, examples, config, tmp_path / "b", tokenizer=tok, resume=True)
    drop = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert drop(resumed) == drop(straight) and len(straight) == 4
    assert all(torch.equal(a, b) for a, b in zip(straight_model.parameters(), resumed_model.parameters()))
    from safetensors import safe_open

    with safe_open(tmp_path / "a" / "checkpoints" / "checkpoint-000004" / "optimizer.safetensors", "pt") as f:
        dtypes = {k.split("\x1f")[-1]: f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes["m_codes"] == torch.uint8 and dtypes["m_absmax"] == torch.float32 and "m" in dtypes
    with pytest.raises(TrainingError, match="holds adamw8bit's optimizer state, this run asks for adamw"):
        train(model(), examples, TrainConfig(**{**config.__dict__, "optim": "adamw", "max_steps": 6}),
              tmp_path / "b", tokenizer=tok, resume=True)
    with pytest.raises(ValueError, match="optim must be one of adamw, adamw8bit, got 'sgd'"):
        TrainConfig(optim="sgd")
