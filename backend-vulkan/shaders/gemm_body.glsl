// Tiled GEMM body: C (M, N) = alpha * A (M, K) B (K, N) [+ bias (N)].
// 64x64 output tile per workgroup of 256 threads, K in slices of 16 staged in
// shared memory (As 16x65, Bs 16x65 floats: 8.3 KiB, so several workgroups fit
// per compute unit), each thread accumulating a 4x4 register block with rows
// ty + 16 i and columns tx + 16 j (conflict-free shared reads: a half-warp
// reads 16 consecutive Bs words and one broadcast As word). The including
// shader defines loadA(i, p), loadB(p, j), A_K_FAST / B_K_FAST (operand
// contiguous along K, chooses the cooperative load order for coalescing).
// With SUBGROUP (pipeline variant `_sg`, chosen when the device has subgroup
// arithmetic and shuffles): each lane reads one of the four A values of its
// row group per k step from shared memory and gets the other three from the
// lanes beside it by subgroupShuffle, so the inner loop does 5 shared-memory
// reads per 16 FMAs instead of 8 (shared-memory bandwidth, not FMAs, bounds
// a 4x4 register block). Threads are numbered by subgroup coordinates
// (gemm_thread()), so "the lanes beside it" hold the same tile row on any
// device whose subgroups are full (256 threads, power-of-two subgroup size).
#define BM 64
#define BN 64
#define BK 16
shared float As[BK][BM + 1];
shared float Bs[BK][BN + 1];

// The thread's index in the tile: subgroup-major under SUBGROUP, so lanes
// 4q..4q+3 of a subgroup are threads tx = 4q'..4q'+3 of one tile row.
uint gemm_thread() {
#ifdef SUBGROUP
    return gl_SubgroupID * gl_SubgroupSize + gl_SubgroupInvocationID;
#else
    return gl_LocalInvocationIndex;
#endif
}

void gemm_tile(uint M, uint N, uint K, bool a_kfast, bool b_kfast, out float acc[4][4]) {
    uint lid = gemm_thread();
    uint tx = lid % 16u, ty = lid / 16u;
    uint m0 = gl_WorkGroupID.y * BM, n0 = gl_WorkGroupID.x * BN;
    [[unroll]] for (uint i = 0; i < 4; i++) [[unroll]] for (uint j = 0; j < 4; j++) acc[i][j] = 0.0;
    for (uint k0 = 0; k0 < K; k0 += BK) {
        [[unroll]] for (uint q = 0; q < 4; q++) {
            uint e = lid + 256u * q;
            uint p, i;
            if (a_kfast) { p = e % BK; i = e / BK; } else { i = e % BM; p = e / BM; }
            uint gi = m0 + i, gp = k0 + p;
            As[p][i] = (gi < M && gp < K) ? loadA(gi, gp) : 0.0;
            uint jj;
            if (b_kfast) { p = e % BK; jj = e / BK; } else { jj = e % BN; p = e / BN; }
            uint gj = n0 + jj; gp = k0 + p;
            Bs[p][jj] = (gj < N && gp < K) ? loadB(gp, gj) : 0.0;
        }
        barrier();
        [[unroll]] for (uint p = 0; p < BK; p++) {
            float av[4], bv[4];
#ifdef SUBGROUP
            float mine = As[p][ty + 16u * (tx & 3u)];
            uint base = gl_SubgroupInvocationID & ~3u;
            [[unroll]] for (uint i = 0; i < 4; i++) av[i] = subgroupShuffle(mine, base | i);
#else
            [[unroll]] for (uint i = 0; i < 4; i++) av[i] = As[p][ty + 16u * i];
#endif
            [[unroll]] for (uint j = 0; j < 4; j++) bv[j] = Bs[p][tx + 16u * j];
            [[unroll]] for (uint i = 0; i < 4; i++) [[unroll]] for (uint j = 0; j < 4; j++) acc[i][j] += av[i] * bv[j];
        }
        barrier();
    }
}
