"""Emulates csrc/cuda/lstm_glue.cpp + lstm.cu (standard path) step by step in float64 torch, against autograd.

Not a test of the CUDA code itself (it cannot run without a GPU): a check of the algorithm the code implements
(per-step active prefixes, n_prev / n_cprev bookkeeping, grad_hx at each sequence's first step, h_{t-1} gathering
for the W_hh gradient), and of lstm_layer_backward_multi (K cotangents interleaved into B*K gradient rows, the step
kernel's rows-per-forward-row divisor rep, the per-(cotangent, direction) weight GEMMs on strided views, the
de-interleaving) against K single backward calls. Run: python csrc/cuda/emulation/standard_path.py
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

def emu_bwd_loop(go, ghy, gcy, bs, hx, cx, W, D, out, res, rep):
    """standard_backward_loop + bwd_step_kernel / bwd_finish_kernel on R = B*rep gradient rows; gradient row b reads
    the forward values (reserve, c_{t-1}, h_{t-1}, hx, cx) of forward row b // rep, and row b*rep writes hprev."""
    T, B, H = out.shape[0], hx.shape[1], hx.shape[2]; G = 4*H; R = B*rep
    dG = torch.full((T,R,D*G), float('nan'),dtype=dt); hprev = torch.full((D,T,B,H), float('nan'),dtype=dt)
    ghx = torch.full((D,R,H), float('nan'),dtype=dt); gcx = torch.full((D,R,H), float('nan'),dtype=dt)
    for d in range(D):
        whh = W[d][1]; dcs = torch.full((R,H), float('nan'),dtype=dt); dhrec = torch.full((R,H), float('nan'),dtype=dt); n_prev=0
        for s in range(T):
            t = T-1-s if d==0 else s; tp = t-1 if d==0 else t+1
            n_cprev = rep*bs[tp] if 0<=tp<T else 0; bt = rep*bs[t]
            for b in range(R):
                fb = b if rep == 1 else b // rep; own_hp = rep == 1 or b % rep == 0
                if b >= bt:
                    if b < n_prev: ghx[d,b]=dhrec[b]; gcx[d,b]=dcs[b]
                    dG[t,b,d*G:(d+1)*G]=0
                    if own_hp: hprev[d,t,fb]=0
                    continue
                r = res[d,t,fb]; i,f,g,o,c = r.split(H)
                if b < n_cprev: cp = res[d,tp,fb,4*H:]; hp = out[tp,fb,d*H:(d+1)*H]
                else: cp = cx[d,fb]; hp = hx[d,fb]
                dh = go[t,b,d*H:(d+1)*H].clone()
                if b < n_prev: dh = dh + dhrec[b]; dc = dcs[b].clone()
                else: dh = dh + ghy[d,b]; dc = gcy[d,b].clone()
                tc = c.tanh(); do = dh*tc; dc = dc + dh*o*(1-tc*tc)
                di = dc*g; dgg = dc*i; df = dc*cp; dcs[b] = dc*f
                dG[t,b,d*G:(d+1)*G] = torch.cat([di*i*(1-i), df*f*(1-f), dgg*(1-g*g), do*o*(1-o)])
                if own_hp: hprev[d,t,fb] = hp
            if bt>0: dhrec[:bt] = dG[t,:bt,d*G:(d+1)*G] @ whh
            n_prev = bt
        for b in range(n_prev): ghx[d,b]=dhrec[b]; gcx[d,b]=dcs[b]
    return dG, hprev, ghx, gcx

def emu_bwd(go, ghy, gcy, x, bs, hx, cx, W, D, out, res):
    """lstm_layer_backward_cuda (standard path, rep = 1)."""
    T,B,I = x.shape; H = hx.shape[2]; G=4*H
    dG, hprev, ghx, gcx = emu_bwd_loop(go, ghy, gcy, bs, hx, cx, W, D, out, res, 1)
    dG2 = dG.reshape(T*B, D*G); wih_cat = torch.cat([W[d][0] for d in range(D)])
    gi = (dG2 @ wih_cat).reshape(T,B,I); gwih = dG2.T @ x.reshape(T*B,I); gb = dG2.sum(0)
    gw=[]
    for d in range(D):
        gw += [gwih[d*G:(d+1)*G], dG2[:, d*G:(d+1)*G].T @ hprev[d].reshape(T*B,H), gb[d*G:(d+1)*G], gb[d*G:(d+1)*G]]
    return gi, ghx, gcx, gw

def interleave_cotangents(t):  # (K, X, B, F) -> (X, B*K, F), row b*K + k = cotangent k of forward row b
    return t.permute(1, 2, 0, 3).contiguous().view(t.shape[1], t.shape[2]*t.shape[0], t.shape[3])

def deinterleave_rows(t, K):  # (X, B*K, F) -> (K, X, B, F)
    return t.view(t.shape[0], t.shape[1]//K, K, t.shape[2]).permute(2, 0, 1, 3).contiguous()

def emu_bwd_multi(go, ghy, gcy, x, bs, hx, cx, W, D, out, res):
    """lstm_layer_backward_multi_cuda: go (K, T, B, D*H), ghy/gcy (K, D, B, H); every result with the leading K."""
    K = go.shape[0]; T,B,I = x.shape; H = hx.shape[2]; G=4*H; ldg = D*G; R = B*K
    dG, hprev, ghx, gcx = emu_bwd_loop(interleave_cotangents(go), interleave_cotangents(ghy), interleave_cotangents(gcy),
                                       bs, hx, cx, W, D, out, res, K)
    wih_cat = torch.cat([W[d][0] for d in range(D)])
    gin = (dG.view(T*R, ldg) @ wih_cat).view(T, R, I)
    dG3 = dG.view(T*B, K, ldg); x2d = x.reshape(T*B, I); gbias = dG3.sum(0)  # (K, ldg)
    gw = []
    for d in range(D):
        hprev_d = hprev[d].reshape(T*B, H)
        gwih = torch.empty(K, G, I, dtype=dt); gwhh = torch.empty(K, G, H, dtype=dt)
        for k in range(K):
            dG_kd_t = dG3[:, k, d*G:(d+1)*G].T  # strided view, row stride K*ldg
            gwih[k] = dG_kd_t @ x2d; gwhh[k] = dG_kd_t @ hprev_d
        gw += [gwih, gwhh, gbias[:, d*G:(d+1)*G].clone(), gbias[:, d*G:(d+1)*G].clone()]
    return deinterleave_rows(gin, K), deinterleave_rows(ghx, K), deinterleave_rows(gcx, K), gw

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
        grads = torch.autograd.grad((o_r*go).sum() + (hy_r*ghy).sum() + (cy_r*gcy).sum(), params, retain_graph=True)
        with torch.no_grad():
            gi, ghx, gcx, gw = emu_bwd(go, ghy, gcy, x, bs, hx, cx, W, D, o_e, res)
        for a, b_, n in zip(grads, [gi, ghx, gcx] + gw, ["x","hx","cx"] + ["w%d"%k for k in range(len(gw))]):
            assert torch.allclose(a, b_), (n, (a-b_).abs().max())
        # K cotangents in one call == K single calls (each checked against autograd above), K = 1, 3, 5
        for K in (1, 3, 5):
            gos = torch.randn(K, *go.shape, dtype=dt); ghys = torch.randn(K, *ghy.shape, dtype=dt); gcys = torch.randn(K, *gcy.shape, dtype=dt)
            with torch.no_grad():
                multi = emu_bwd_multi(gos, ghys, gcys, x, bs, hx, cx, W, D, o_e, res)
                singles = [emu_bwd(gos[k], ghys[k], gcys[k], x, bs, hx, cx, W, D, o_e, res) for k in range(K)]
            flat = lambda r: [r[0], r[1], r[2]] + list(r[3])  # noqa: E731
            for n, m_ in enumerate(flat(multi)):
                ref_k = torch.stack([flat(sk)[n] for sk in singles])
                assert m_.shape == ref_k.shape, (n, m_.shape, ref_k.shape)
                assert torch.isfinite(m_).all(), (K, n)
                assert torch.allclose(m_, ref_k, rtol=1e-12, atol=1e-12), (K, n, (m_-ref_k).abs().max())
            # and cotangent k of the multi against autograd directly
            k = K - 1
            grads = torch.autograd.grad((o_r*gos[k]).sum() + (hy_r*ghys[k]).sum() + (cy_r*gcys[k]).sum(), params, retain_graph=True)
            for a, m_ in zip(grads, flat(multi)):
                assert torch.allclose(a, m_[k]), (K, (a-m_[k]).abs().max())
        print("trial", trial, "D", D, "lengths", lengths, "ok (single; multi K = 1, 3, 5)")


if __name__ == '__main__':
    main()
