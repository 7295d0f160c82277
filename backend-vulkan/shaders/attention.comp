#version 450
// Fused attention forward with a streaming (online) softmax: per key tile the
// thread computes TILE scores, rescales its running max / sum / output once,
// and accumulates p * v. Writes out (T, d) and the log-sum-exp per (row, head)
// for the backward. Shared: K and V tiles, 2 x 16 x 128 floats = 16 KiB.
#include "attn_common.glsl"
#define TILE 16
layout(std430, binding = 0) readonly buffer QKV { float qkv[]; };
layout(std430, binding = 1) readonly buffer Blk { uint blk[]; };
layout(std430, binding = 2) writeonly buffer O { float o[]; };
layout(std430, binding = 3) writeonly buffer Lse { float lse[]; };
shared float Ks[TILE * HDMAX];
shared float Vs[TILE * HDMAX];
void main() {
    uint b = gl_WorkGroupID.x, h = gl_WorkGroupID.y;
    uint s0 = blk[3u * b], s1 = blk[3u * b + 1u], q0 = blk[3u * b + 2u];
    uint lid = gl_LocalInvocationIndex;
    uint row = q0 + lid;
    bool live = row < s1;
    uint hd = pc.hd, c3 = 3u * pc.d;
    float q[HDMAX], acc[HDMAX];
    for (uint e = 0; e < hd; e++) { q[e] = live ? qkv[row * c3 + h * hd + e] : 0.0; acc[e] = 0.0; }
    float m = -1.0 / 0.0, l = 0.0;
    for (uint k0 = s0; k0 < s1; k0 += TILE) {
        uint nk = min(TILE, s1 - k0);
        for (uint e = lid; e < nk * hd; e += BR) {
            uint j = e / hd, f = e % hd;
            Ks[j * HDMAX + f] = qkv[(k0 + j) * c3 + pc.d + h * hd + f];
            Vs[j * HDMAX + f] = qkv[(k0 + j) * c3 + 2u * pc.d + h * hd + f];
        }
        barrier();
        if (live) {
            float sc[TILE];
            float tmax = m;
            for (uint j = 0; j < nk; j++) {
                float dot = 0.0;
                for (uint e = 0; e < hd; e++) dot += q[e] * Ks[j * HDMAX + e];
                sc[j] = dot * pc.scale;
                tmax = max(tmax, sc[j]);
            }
            float corr = exp(m - tmax);
            l *= corr;
            for (uint e = 0; e < hd; e++) acc[e] *= corr;
            for (uint j = 0; j < nk; j++) {
                float p = exp(sc[j] - tmax);
                l += p;
                for (uint e = 0; e < hd; e++) acc[e] += p * Vs[j * HDMAX + e];
            }
            m = tmax;
        }
        barrier();
    }
    if (live) {
        float il = 1.0 / l;
        for (uint e = 0; e < hd; e++) o[row * pc.d + h * hd + e] = acc[e] * il;
        lse[row * pc.heads + h] = m + log(l);
    }
}
