// variants: hd
#version 450
// Attention backward, pass over keys: for key j, dv_j = sum_i P_ij dO_i and
// dk_j = scale sum_i dS_ij q_i, streaming the segment's queries (q, dO, lse,
// D) through shared memory in tiles of 8 (2 x 8 x HDMAX floats + 16).
#include "attn_common.glsl"
#define TILE 8
layout(std430, binding = 0) readonly buffer QKV { float qkv[]; };
layout(std430, binding = 1) readonly buffer Blk { uint blk[]; };
layout(std430, binding = 2) readonly buffer G { float g[]; };
layout(std430, binding = 3) readonly buffer Lse { float lse[]; };
layout(std430, binding = 4) readonly buffer Dd { float dd[]; };
layout(std430, binding = 5) writeonly buffer Dqkv { float dqkv[]; };
shared float Qs[TILE * HDMAX];
shared float Gs[TILE * HDMAX];
shared float Ls[TILE];
shared float Ds[TILE];
void main() {
    uint b = gl_WorkGroupID.x, h = gl_WorkGroupID.y;
    uint s0 = blk[3u * b], s1 = blk[3u * b + 1u], r0 = blk[3u * b + 2u];
    uint lid = gl_LocalInvocationIndex;
    uint row = r0 + lid;
    bool live = row < s1;
    uint hd = pc.hd, c3 = 3u * pc.d;
    float k[HDMAX], v[HDMAX], dk[HDMAX], dv[HDMAX];
    FOR_E {
        bool ok = live && e < hd;
        k[e] = ok ? qkv[row * c3 + pc.d + h * hd + e] : 0.0;
        v[e] = ok ? qkv[row * c3 + 2u * pc.d + h * hd + e] : 0.0;
        dk[e] = 0.0; dv[e] = 0.0;
    }
    for (uint i0 = s0; i0 < s1; i0 += TILE) {
        uint ni = min(TILE, s1 - i0);
        [[unroll]] for (uint r = 0; r < (TILE * HDMAX + BR - 1) / BR; r++) {
            uint e = lid + r * BR;
            if (e < TILE * HDMAX) {
                uint i = e / HDMAX, f = e % HDMAX;
                bool ok = i < ni && f < hd;
                Qs[e] = ok ? qkv[(i0 + i) * c3 + h * hd + f] : 0.0;
                Gs[e] = ok ? g[(i0 + i) * pc.d + h * hd + f] : 0.0;
            }
        }
        if (lid < TILE) {
            bool ok = lid < ni;
            Ls[lid] = ok ? lse[(i0 + lid) * pc.heads + h] : 0.0;
            Ds[lid] = ok ? dd[(i0 + lid) * pc.heads + h] : 0.0;
        }
        barrier();
        [[unroll]] for (uint i = 0; i < TILE; i++) {
            float s = 0.0, dp = 0.0;
            FOR_E { s += Qs[i * HDMAX + e] * k[e]; dp += Gs[i * HDMAX + e] * v[e]; }
            float p = i < ni ? exp(s * pc.scale - Ls[i]) : 0.0;
            float ds = p * (dp - Ds[i]);
            FOR_E { dv[e] += p * Gs[i * HDMAX + e]; dk[e] += ds * Qs[i * HDMAX + e]; }
        }
        barrier();
    }
    if (live) FOR_E if (e < hd) {
        dqkv[row * c3 + pc.d + h * hd + e] = dk[e] * pc.scale;
        dqkv[row * c3 + 2u * pc.d + h * hd + e] = dv[e];
    }
}
