// variants: hd
#version 450
// Attention backward, pass over queries: dS_ij = P_ij (dO_i . v_j - D_i) with
// P_ij = exp(s_ij - lse_i) recomputed per key tile; dq_i = scale sum_j dS_ij k_j.
// D_i = dO_i . O_i is computed by this thread first and stored for the key pass.
#include "attn_common.glsl"
#define TILE 16
layout(std430, binding = 0) readonly buffer QKV { float qkv[]; };
layout(std430, binding = 1) readonly buffer Blk { uint blk[]; };
layout(std430, binding = 2) readonly buffer Out { float out_[]; };
layout(std430, binding = 3) readonly buffer G { float g[]; };
layout(std430, binding = 4) readonly buffer Lse { float lse[]; };
layout(std430, binding = 5) writeonly buffer Dd { float dd[]; };
layout(std430, binding = 6) writeonly buffer Dqkv { float dqkv[]; };
shared float Ks[TILE * HDMAX];
shared float Vs[TILE * HDMAX];
void main() {
    uint b = gl_WorkGroupID.x, h = gl_WorkGroupID.y;
    uint s0 = blk[3u * b], s1 = blk[3u * b + 1u], q0 = blk[3u * b + 2u];
    uint lid = gl_LocalInvocationIndex;
    uint row = q0 + lid;
    bool live = row < s1;
    uint hd = pc.hd, c3 = 3u * pc.d;
    float q[HDMAX], go[HDMAX], dq[HDMAX];
    float D = 0.0;
    FOR_E {
        bool ok = live && e < hd;
        q[e] = ok ? qkv[row * c3 + h * hd + e] : 0.0;
        go[e] = ok ? g[row * pc.d + h * hd + e] : 0.0;
        D += ok ? go[e] * out_[row * pc.d + h * hd + e] : 0.0;
        dq[e] = 0.0;
    }
    float L = live ? lse[row * pc.heads + h] : 0.0;
    if (live) dd[row * pc.heads + h] = D;
    for (uint k0 = s0; k0 < s1; k0 += TILE) {
        uint nk = min(TILE, s1 - k0);
        [[unroll]] for (uint r = 0; r < TILE * HDMAX / BR; r++) {
            uint e = lid + r * BR;
            uint j = e / HDMAX, f = e % HDMAX;
            bool ok = j < nk && f < hd;
            Ks[e] = ok ? qkv[(k0 + j) * c3 + pc.d + h * hd + f] : 0.0;
            Vs[e] = ok ? qkv[(k0 + j) * c3 + 2u * pc.d + h * hd + f] : 0.0;
        }
        barrier();
        [[unroll]] for (uint j = 0; j < TILE; j++) {
            float s = 0.0, dp = 0.0;
            FOR_E { s += q[e] * Ks[j * HDMAX + e]; dp += go[e] * Vs[j * HDMAX + e]; }
            float p = j < nk ? exp(s * pc.scale - L) : 0.0;
            float ds = p * (dp - D);
            FOR_E dq[e] += ds * Ks[j * HDMAX + e];
        }
        barrier();
    }
    if (live) FOR_E if (e < hd) dqkv[row * c3 + h * hd + e] = dq[e] * pc.scale;
}
