"""Line-by-line transliteration (per CTA, per step; barrier = end of phase) of persistent_fwd_kernel and
persistent_bwd_kernel (mma replaced by the exact product it computes; its index math is checked in
persistent_fragments.py), followed by the glue's weight-gradient GEMMs; compared with autograd on float64.
Run: python csrc/cuda/emulation/persistent_kernels.py
"""
import torch
import os
import sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from standard_path import ref  # noqa: E402
dt = torch.float64

def pfwd(x, bs, hx, cx, W, D, hc):
    T, B, I = x.shape; H = hx.shape[2]; G = 4*H
    wih_cat = torch.cat([W[d][0] for d in range(D)]); bias = torch.cat([W[d][2]+W[d][3] for d in range(D)])
    xproj = (x.reshape(T*B, I) @ wih_cat.T + bias).reshape(T, B, D*G)
    out = torch.full((T, B, D*H), float('nan'), dtype=dt); res = torch.full((D, T, B, 5*H), float('nan'), dtype=dt)
    hy = torch.full((D, B, H), float('nan'), dtype=dt); cy = hy.clone()
    hbuf = torch.full((D, 2, B, H), float('nan'), dtype=dt); hbuf[:, 0] = hx
    ctas = (H + hc - 1)//hc
    cst = {}
    for dir in range(D):
        for cta in range(ctas):
            j0 = cta*hc
            cst[dir, cta] = {e: (cx[dir, e//hc, j0 + e % hc].item() if j0 + e % hc < H else 0.) for e in range(hc*B)}
    for s in range(T):
        new = {}
        for dir in range(D):
            t = s if dir == 0 else T-1-s; bt = bs[t]
            hcur = hbuf[dir, s & 1].clone(); nxt = (s & 1) ^ 1
            whh = W[dir][1]
            for cta in range(ctas):
                j0 = cta*hc
                for e in range(hc*B):
                    b, u = divmod(e, hc); j = j0+u
                    if j >= H: continue
                    if b < bt:
                        z = [xproj[t, b, dir*G + k*H + j] + whh[k*H + j] @ hcur[b] for k in range(4)]
                        ig, fg, gg, og = torch.sigmoid(z[0]), torch.sigmoid(z[1]), torch.tanh(z[2]), torch.sigmoid(z[3])
                        c = fg*cst[dir, cta][e] + ig*gg; cst[dir, cta][e] = c
                        h = og*torch.tanh(c)
                        hbuf[dir, nxt, b, j] = h; out[t, b, dir*H+j] = h
                        res[dir, t, b, j], res[dir, t, b, H+j], res[dir, t, b, 2*H+j], res[dir, t, b, 3*H+j], res[dir, t, b, 4*H+j] = ig, fg, gg, og, c
                    else:
                        hbuf[dir, nxt, b, j] = hcur[b, j]; out[t, b, dir*H+j] = 0
                        for k in range(5): res[dir, t, b, k*H+j] = 0
    for dir in range(D):
        for cta in range(ctas):
            j0 = cta*hc
            for e in range(hc*B):
                b, u = divmod(e, hc); j = j0+u
                if j >= H: continue
                hy[dir, b, j] = hbuf[dir, T & 1, b, j]; cy[dir, b, j] = cst[dir, cta][e]
    return out, hy, cy, res

def pbwd(go, ghy, gcy, x, bs, hx, cx, W, D, out, res, hc):
    T, B, I = x.shape; H = hx.shape[2]; G = 4*H; ldg = D*G
    dG = torch.full((T, B, ldg), float('nan'), dtype=dt); hprev = torch.full((D, T, B, H), float('nan'), dtype=dt)
    ghx = torch.full((D, B, H), float('nan'), dtype=dt); gcx = ghx.clone()
    ctas = (H + hc - 1)//hc
    dcs = {(d, c): {} for d in range(D) for c in range(ctas)}; dhs = {(d, c): {} for d in range(D) for c in range(ctas)}
    n_prev = {d: 0 for d in range(D)}
    for s in range(T):
        for dir in range(D):   # phase 1 for every CTA, then barrier
            t = T-1-s if dir == 0 else s; tp = t-1 if dir == 0 else t+1
            bt = bs[t]; n_cprev = bs[tp] if 0 <= tp < T else 0; npv = n_prev[dir]
            for cta in range(ctas):
                j0 = cta*hc; DC = dcs[dir, cta]; DH = dhs[dir, cta]
                for e in range(hc*B):
                    b, u = divmod(e, hc); j = j0+u
                    if j >= H: continue
                    if b < bt:
                        r = res[dir, t, b]; ig, fg, gg, og, c = r[j], r[H+j], r[2*H+j], r[3*H+j], r[4*H+j]
                        if b < n_cprev: c_prev = res[dir, tp, b, 4*H+j]; h_prev = out[tp, b, dir*H+j]
                        else: c_prev = cx[dir, b, j]; h_prev = hx[dir, b, j]
                        dh = go[t, b, dir*H+j].clone()
                        if b < npv: dh = dh + DH[e]; dc = DC[e]
                        else: dh = dh + ghy[dir, b, j]; dc = gcy[dir, b, j]
                        tc = torch.tanh(c); d_o = dh*tc; dc = dc + dh*og*(1-tc*tc)
                        d_i, d_g, d_f = dc*gg, dc*ig, dc*c_prev; DC[e] = dc*fg
                        base = dir*G + j
                        dG[t, b, base], dG[t, b, base+H], dG[t, b, base+2*H], dG[t, b, base+3*H] = d_i*ig*(1-ig), d_f*fg*(1-fg), d_g*(1-gg*gg), d_o*og*(1-og)
                        hprev[dir, t, b, j] = h_prev
                    else:
                        if b < npv: ghx[dir, b, j] = DH[e]; gcx[dir, b, j] = DC[e]
                        for k in range(4): dG[t, b, dir*G + k*H + j] = 0
                        hprev[dir, t, b, j] = 0
        for dir in range(D):   # phase 2 after the barrier
            t = T-1-s if dir == 0 else s; bt = bs[t]; whh = W[dir][1]
            for cta in range(ctas):
                j0 = cta*hc; DH = dhs[dir, cta]
                for e in range(hc*B):
                    b, u = divmod(e, hc)
                    if b < bt and j0+u < H:
                        DH[e] = dG[t, b, dir*G:(dir+1)*G] @ whh[:, j0+u]
            n_prev[dir] = bt
    for dir in range(D):
        for cta in range(ctas):
            j0 = cta*hc
            for e in range(hc*B):
                b, u = divmod(e, hc); j = j0+u
                if j >= H or b >= n_prev[dir]: continue
                ghx[dir, b, j] = dhs[dir, cta][e]; gcx[dir, b, j] = dcs[dir, cta][e]
    dG2 = dG.reshape(T*B, ldg); wih_cat = torch.cat([W[d][0] for d in range(D)])
    gi = (dG2 @ wih_cat).reshape(T, B, I); gwih = dG2.T @ x.reshape(T*B, I); gb = dG2.sum(0)
    gw = []
    for d in range(D):
        gw += [gwih[d*G:(d+1)*G], dG2[:, d*G:(d+1)*G].T @ hprev[d].reshape(T*B, H), gb[d*G:(d+1)*G], gb[d*G:(d+1)*G]]
    return gi, ghx, gcx, gw

torch.manual_seed(1)
for trial in range(6):
    D = 1 + trial % 2; T, B, I, H = 5, 5, 3, 6; hc = 4   # H not a multiple of hc: partial last CTA
    lengths = sorted([torch.randint(1, T+1, ()).item() for _ in range(B)], reverse=True)
    if trial < 2: lengths = [T]*B
    if trial == 5: lengths = [3, 3, 2, 1, 1]   # max length < T: steps with no active row
    bs = [sum(1 for L in lengths if L > t) for t in range(T)]
    x = torch.randn(T, B, I, dtype=dt, requires_grad=True); hx = torch.randn(D, B, H, dtype=dt, requires_grad=True); cx = torch.randn(D, B, H, dtype=dt, requires_grad=True)
    W = [[torch.randn(4*H, I, dtype=dt, requires_grad=True), torch.randn(4*H, H, dtype=dt, requires_grad=True), torch.randn(4*H, dtype=dt, requires_grad=True), torch.randn(4*H, dtype=dt, requires_grad=True)] for d in range(D)]
    o_r, hy_r, cy_r = ref(x, lengths, hx, cx, W, D)
    with torch.no_grad():
        o_e, hy_e, cy_e, res = pfwd(x, bs, hx, cx, W, D, hc)
    assert torch.allclose(o_r, o_e), (o_r-o_e).abs().max()
    assert torch.allclose(hy_r, hy_e) and torch.allclose(cy_r, cy_e), ((hy_r-hy_e).abs().max(), (cy_r-cy_e).abs().max())
    go = torch.randn_like(o_r); ghy = torch.randn_like(hy_r); gcy = torch.randn_like(cy_r)
    params = [x, hx, cx] + [p for w in W for p in w]
    grads = torch.autograd.grad((o_r*go).sum() + (hy_r*ghy).sum() + (cy_r*gcy).sum(), params)
    with torch.no_grad():
        gi, ghx, gcx, gw = pbwd(go, ghy, gcy, x, bs, hx, cx, W, D, o_e, res, hc)
    for a, b_, n in zip(grads, [gi, ghx, gcx] + gw, ["x", "hx", "cx"] + ["w%d" % k for k in range(len(gw))]):
        assert torch.allclose(a, b_), (n, (a-b_).abs().max())
    print("trial", trial, "D", D, "lengths", lengths, "ok")
