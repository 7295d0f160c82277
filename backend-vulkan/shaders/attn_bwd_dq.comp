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
    for (uint e = 0; e < hd; e++) {
        q[e] = live ? qkv[row * c3 + h * hd + e] : 0.0;
        go[e] = live ? g[row * pc.d + h * hd + e] : 0.0;
        D += live ? go[e] * out_[row * pc.d + h * hd + e] : 0.0;
        dq[e] = 0.0;
    }
    float L = live ? lse[row * pc.heads + h] : 0.0;
    if (live) dd[row * pc.heads + h] = D;
    for (uint k0 = s0; k0 < s1; k0 += TILE) {
        uint nk = min(TILE, s1 - k0);
        for (uint e = lid; e < nk * hd; e += BR) {
            uint j = e / hd, f = e % hd;
            Ks[j * HDMAX + f] = qkv[(k0 + j) * c3 + pc.d + h * hd + f];
            Vs[j * HDMAX + f] = qkv[(k0 + j) * c3 + 2u * pc.d + h * hd + f];
        }
        barrier();
        if (live) {
            for (uint j = 0; j < nk; j++) {
                float s = 0.0, dp = 0.0;
                for (uint e = 0; e < hd; e++) { s += q[e] * Ks[j * HDMAX + e]; dp += go[e] * Vs[j * HDMAX + e]; }
                float p = exp(s * pc.scale - L);
                float ds = p * (dp - D);
                for (uint e = 0; e < hd; e++) dq[e] += ds * Ks[j * HDMAX + e];
            }
        }
        barrier();
    }
    if (live) for (uint e = 0; e < hd; e++) dqkv[row * c3 + h * hd + e] = dq[e] * pc.scale;
}
