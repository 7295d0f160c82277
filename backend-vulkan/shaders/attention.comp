// variants: hd
#version 450
// Fused attention forward with a streaming (online) softmax: per key tile the
// thread computes TILE scores, rescales its running max / sum / output once,
// and accumulates p * v. Writes out (T, d) and the log-sum-exp per (row, head)
// for the backward. Shared: K and V tiles, 2 x 16 x HDMAX floats (16 KiB at 128).
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
    FOR_E { q[e] = (live && e < hd) ? qkv[row * c3 + h * hd + e] : 0.0; acc[e] = 0.0; }
    float m = -3.0e38, l = 0.0;
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
        float sc[TILE];
        float tmax = m;
        [[unroll]] for (uint j = 0; j < TILE; j++) {
            float dot = 0.0;
            FOR_E dot += q[e] * Ks[j * HDMAX + e];
            sc[j] = j < nk ? dot * pc.scale : -3.0e38;
            tmax = max(tmax, sc[j]);
        }
        float corr = exp(m - tmax);
        l *= corr;
        FOR_E acc[e] *= corr;
        [[unroll]] for (uint j = 0; j < TILE; j++) {
            float p = j < nk ? exp(sc[j] - tmax) : 0.0;
            l += p;
            FOR_E acc[e] += p * Vs[j * HDMAX + e];
        }
        m = tmax;
        barrier();
    }
    if (live) {
        float il = 1.0 / l;
        FOR_E if (e < hd) o[row * pc.d + h * hd + e] = acc[e] * il;
        lse[row * pc.heads + h] = m + log(l);
    }
}
