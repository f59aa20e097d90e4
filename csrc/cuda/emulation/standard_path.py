"""Emulates csrc/cuda/lstm_glue.cpp + lstm.cu (standard path) step by step in float64 torch, against autograd.

Not a test of the CUDA code itself (it cannot run without a GPU): a check of the algorithm the code implements
(per-step active prefixes, n_prev / n_cprev bookkeeping, grad_hx at each sequence's first step, h_{t-1} gathering
for the W_hh gradient). Run: python csrc/cuda/emulation/standard_path.py
"""
import torch
torch.manual_seed(0)
dt = torch.float64

def ref(x, lengths, hx, cx, W, D):
    T, B, I = x.shape; H = hx.shape[2]
    out = torch.zeros(T, B, D*H, dtype=dt); hys=[]; cys=[]
    outs = [[None]*T for _ in range(B)]
    hy = torch.zeros(D,B,H,dtype=dt); cy = torch.zeros(D,B,H,dtype=dt)
    rows_out = {}
    hyl=[[None]*B for _ in range(D)]; cyl=[[None]*B for _ in range(D)]
    for d in range(D):
        wih, whh, bih, bhh = W[d]
        for b in range(B):
            L = int(lengths[b]); h = hx[d,b]; c = cx[d,b]
            ts = range(L) if d == 0 else range(L-1, -1, -1)
            for t in ts:
                z = x[t,b] @ wih.T + bih + h @ whh.T + bhh
                i,f,g,o = z.split(H)
                i,f,g,o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
                c = f*c + i*g; h = o*c.tanh()
                rows_out[(t,b,d)] = h
            hyl[d][b]=h; cyl[d][b]=c
    rows=[]
    for t in range(T):
        rb=[]
        for b in range(B):
            rb.append(torch.cat([rows_out.get((t,b,d), torch.zeros(H,dtype=dt)) for d in range(D)]))
        rows.append(torch.stack(rb))
    out = torch.stack(rows)
    hy = torch.stack([torch.stack(hyl[d]) for d in range(D)]); cy = torch.stack([torch.stack(cyl[d]) for d in range(D)])
    return out, hy, cy

def emu_fwd(x, bs, hx, cx, W, D):
    T,B,I = x.shape; H = hx.shape[2]; G=4*H
    wih_cat = torch.cat([W[d][0] for d in range(D)]); bias = torch.cat([W[d][2]+W[d][3] for d in range(D)])
    xproj = (x.reshape(T*B,I) @ wih_cat.T + bias).reshape(T,B,D*G)
    out = torch.full((T,B,D*H), float('nan'),dtype=dt); res = torch.full((D,T,B,5*H), float('nan'),dtype=dt)
    hy = torch.empty(D,B,H,dtype=dt); cy=torch.empty(D,B,H,dtype=dt)
    for d in range(D):
        whh = W[d][1]; h = hx[d].clone(); c = cx[d].clone(); rec = torch.full((B,G), float('nan'),dtype=dt)
        for s in range(T):
            t = s if d==0 else T-1-s; bt = bs[t]
            if bt>0: rec[:bt] = h[:bt] @ whh.T
            for b in range(B):
                if b >= bt:
                    out[t,b,d*H:(d+1)*H]=0; res[d,t,b]=0; continue
                z = xproj[t,b,d*G:(d+1)*G] + rec[b]
                i,f,g,o = z.split(H); i,f,g,o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
                c[b] = f*c[b]+i*g; h[b] = o*c[b].tanh()
                out[t,b,d*H:(d+1)*H] = h[b]; res[d,t,b] = torch.cat([i,f,g,o,c[b]])
        hy[d]=h; cy[d]=c
    return out, hy, cy, res

def emu_bwd(go, ghy, gcy, x, bs, hx, cx, W, D, out, res):
    T,B,I = x.shape; H = hx.shape[2]; G=4*H
    dG = torch.full((T,B,D*G), float('nan'),dtype=dt); hprev = torch.full((D,T,B,H), float('nan'),dtype=dt)
    ghx = torch.full((D,B,H), float('nan'),dtype=dt); gcx = torch.full((D,B,H), float('nan'),dtype=dt)
    for d in range(D):
        whh = W[d][1]; dcs = torch.full((B,H), float('nan'),dtype=dt); dhrec = torch.full((B,H), float('nan'),dtype=dt); n_prev=0
        for s in range(T):
            t = T-1-s if d==0 else s; tp = t-1 if d==0 else t+1
            n_cprev = bs[tp] if 0<=tp<T else 0; bt = bs[t]
            for b in range(B):
                if b >= bt:
                    if b < n_prev: ghx[d,b]=dhrec[b]; gcx[d,b]=dcs[b]
                    dG[t,b,d*G:(d+1)*G]=0; hprev[d,t,b]=0; continue
                r = res[d,t,b]; i,f,g,o,c = r.split(H)
                if b < n_cprev: cp = res[d,tp,b,4*H:]; hp = out[tp,b,d*H:(d+1)*H]
                else: cp = cx[d,b]; hp = hx[d,b]
                dh = go[t,b,d*H:(d+1)*H].clone()
                if b < n_prev: dh = dh + dhrec[b]; dc = dcs[b].clone()
                else: dh = dh + ghy[d,b]; dc = gcy[d,b].clone()
                tc = c.tanh(); do = dh*tc; dc = dc + dh*o*(1-tc*tc)
                di = dc*g; dgg = dc*i; df = dc*cp; dcs[b] = dc*f
                dG[t,b,d*G:(d+1)*G] = torch.cat([di*i*(1-i), df*f*(1-f), dgg*(1-g*g), do*o*(1-o)])
                hprev[d,t,b] = hp
            if bt>0: dhrec[:bt] = dG[t,:bt,d*G:(d+1)*G] @ whh
            n_prev = bt
        for b in range(n_prev): ghx[d,b]=dhrec[b]; gcx[d,b]=dcs[b]
    dG2 = dG.reshape(T*B, D*G); wih_cat = torch.cat([W[d][0] for d in range(D)])
    gi = (dG2 @ wih_cat).reshape(T,B,I); gwih = dG2.T @ x.reshape(T*B,I); gb = dG2.sum(0)
    gw=[]
    for d in range(D):
        gw += [gwih[d*G:(d+1)*G], dG2[:, d*G:(d+1)*G].T @ hprev[d].reshape(T*B,H), gb[d*G:(d+1)*G], gb[d*G:(d+1)*G]]
    return gi, ghx, gcx, gw

def main():
    for trial in range(6):
        D = 1 + trial % 2; T, B, I, H = 5, 4, 3, 2
        lengths = sorted([torch.randint(1, T+1, ()).item() for _ in range(B)], reverse=True)
        if trial < 2: lengths = [T]*B
        bs = [sum(1 for L in lengths if L > t) for t in range(T)]
        x = torch.randn(T,B,I,dtype=dt, requires_grad=True); hx = torch.randn(D,B,H,dtype=dt, requires_grad=True); cx = torch.randn(D,B,H,dtype=dt, requires_grad=True)
        W = [[torch.randn(4*H,I,dtype=dt,requires_grad=True), torch.randn(4*H,H,dtype=dt,requires_grad=True), torch.randn(4*H,dtype=dt,requires_grad=True), torch.randn(4*H,dtype=dt,requires_grad=True)] for d in range(D)]
        o_r, hy_r, cy_r = ref(x, lengths, hx, cx, W, D)
        with torch.no_grad():
            o_e, hy_e, cy_e, res = emu_fwd(x, bs, hx, cx, W, D)
        assert torch.allclose(o_r, o_e), (o_r-o_e).abs().max()
        assert torch.allclose(hy_r, hy_e) and torch.allclose(cy_r, cy_e)
        go = torch.randn_like(o_r); ghy = torch.randn_like(hy_r); gcy = torch.randn_like(cy_r)
        params = [x, hx, cx] + [p for w in W for p in w]
        grads = torch.autograd.grad((o_r*go).sum() + (hy_r*ghy).sum() + (cy_r*gcy).sum(), params)
        with torch.no_grad():
            gi, ghx, gcx, gw = emu_bwd(go, ghy, gcy, x, bs, hx, cx, W, D, o_e, res)
        for a, b_, n in zip(grads, [gi, ghx, gcx] + gw, ["x","hx","cx"] + ["w%d"%k for k in range(len(gw))]):
            assert torch.allclose(a, b_), (n, (a-b_).abs().max())
        print("trial", trial, "D", D, "lengths", lengths, "ok")


if __name__ == '__main__':
    main()
