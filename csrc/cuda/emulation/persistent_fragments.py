"""Emulates the index arithmetic of csrc/cuda/lstm_persistent.cu (fragment packing, chunked staging, k-splits,
reduction) with the PTX fragment layouts (as in CUTLASS's SM80 MMA traits), for one CTA and one step, and checks
G = W_slice @ h^T. Run: python csrc/cuda/emulation/persistent_fragments.py
"""
import numpy as np
rng = np.random.default_rng(0)
kWarps=8; kChunkWords=128; kKStepWords=8; kStepsPerChunk=16; kRowWords=132
def run(epw, H, B, hc, j0, bwd=False):
    # forward: A = W_hh rows {i,f,g,o} x slice, K = H, operand h (B x H); backward: A = W_hh[:, slice]^T padded to
    # >= 16 rows, K = 4H, operand dG (B x 4H); both give red rows that the gate phase / reduction read.
    K = 4*H if bwd else H
    M=max(16, hc) if bwd else 4*hc; Mt=M//16; NKS=kWarps//Mt; Kwords=(K+epw-1)//epw; nchunks=(Kwords+kChunkWords-1)//kChunkWords
    Ksteps=nchunks*kStepsPerChunk; Npad=(B+7)&~7; RP=Npad+1
    W = rng.standard_normal((4*H, H)); h = rng.standard_normal((B, K))
    # fragment words: store as tuples of element values (1 or 2 per word)
    def w_at(row, col):  # w_index<kBwd> of the kernel
        if not bwd:
            gate, u = divmod(row, hc)
            return W[gate*H + j0 + u, col] if (j0 + u < H and col < H) else 0.
        return W[col, j0 + row] if (row < hc and j0 + row < H and col < 4*H) else 0.
    def a_word(row, kk, q, r):
        if epw == 2:
            col = kk*16 + 2*q + (8 if r&2 else 0)
            return (w_at(row, col), w_at(row, col+1))
        col = kk*8 + q + (4 if r&2 else 0)
        return (w_at(row, col),)
    wf = {}
    for idx in range(Mt*Ksteps*32*4):
        r = idx&3; ln=(idx>>2)&31; frag=idx>>7; kk=frag%Ksteps; mt=frag//Ksteps
        row = mt*16 + (ln>>2) + (8 if r&1 else 0)
        wf[idx] = a_word(row, kk, ln&3, r)
    # h global as words per row
    hwords = [[tuple(h[b, w*epw + e] if w*epw+e < K else 0. for e in range(epw)) for w in range(Kwords)] for b in range(B)]
    bt = B; nt_act=(bt+7)>>3; rows=nt_act*8
    red = np.full((NKS*M*RP,), np.nan)
    accs = {}
    for c in range(nchunks):
        stage = {}
        for idx in range(rows*(kChunkWords//4)):
            row, gr = divmod(idx, kChunkWords//4); word = c*kChunkWords + gr*4
            valid = row < B and word < Kwords
            for k in range(4):
                stage[row*kRowWords + gr*4 + k] = hwords[row][word+k] if valid else (0.,)*epw
        for warp in range(kWarps):
            mt = warp % Mt; ks = warp // Mt
            for kl in range(ks, kStepsPerChunk, NKS):
                kk = c*kStepsPerChunk + kl
                # A regs of all lanes
                A = np.zeros((16, 8*epw)); Bm = np.zeros((8*epw, 8))
                for lane in range(32):
                    g, q = lane>>2, lane&3
                    for r in range(4):
                        vals = wf[((mt*Ksteps + kk)*32 + lane)*4 + r]
                        m = g + (8 if r&1 else 0)
                        if epw == 2:
                            k0 = 2*q + (8 if r&2 else 0); A[m,k0]=vals[0]; A[m,k0+1]=vals[1]
                        else:
                            A[m, q + (4 if r&2 else 0)] = vals[0]
                for nt in range(nt_act):
                    for lane in range(32):
                        g, q = lane>>2, lane&3
                        base = (nt*8+g)*kRowWords + kl*kKStepWords + q
                        b0 = stage[base]; b1 = stage[base+4]
                        if epw == 2:
                            Bm[2*q,g], Bm[2*q+1,g] = b0; Bm[2*q+8,g], Bm[2*q+9,g] = b1
                        else:
                            Bm[q,g] = b0[0]; Bm[q+4,g] = b1[0]
                    Cb = A @ Bm
                    key=(warp,nt); accs[key] = accs.get(key, 0) + Cb
    for (warp, nt), C in accs.items():
        mt = warp % Mt; ks = warp // Mt
        for lane in range(32):
            g, q = lane>>2, lane&3; r0 = mt*16+g; n0 = nt*8+2*q
            red[(ks*M+r0)*RP+n0]=C[g,2*q]; red[(ks*M+r0)*RP+n0+1]=C[g,2*q+1]
            red[(ks*M+r0+8)*RP+n0]=C[g+8,2*q]; red[(ks*M+r0+8)*RP+n0+1]=C[g+8,2*q+1]
    for b in range(B):
        for u in range(hc):
            j = j0+u
            if j >= H: continue
            if bwd:
                v = sum(red[(kss*M + u)*RP + b] for kss in range(NKS))
                ref = W[:, j] @ h[b]
                assert abs(v-ref) < 1e-9, (epw,H,B,hc,j0,b,u,v,ref)
                continue
            for k in range(4):
                v = sum(red[(kss*M + k*hc + u)*RP + b] for kss in range(NKS))
                ref = W[k*H + j] @ h[b]
                assert abs(v-ref) < 1e-9, (epw,H,B,hc,j0,b,u,k,v,ref)
    print("ok", "bwd" if bwd else "fwd", epw, H, B, hc, j0)
run(2, 264, 13, 8, 256)  # last CTA partial, K not multiple of chunk
run(1, 136, 9, 4, 132)
run(2, 512, 32, 16, 0)
run(1, 256, 5, 32, 0)
run(2, 72, 11, 8, 64, bwd=True)
run(1, 40, 9, 4, 36, bwd=True)
run(2, 64, 16, 32, 32, bwd=True)
