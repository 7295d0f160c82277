// variants: subgroup
#version 450
// GroupNorm, one workgroup (256 threads) per (sample, group): two-pass mean
// and variance over the group's L x C/G elements, then the affine output.
// Mode 1 is the backward: dx = inv (gamma g - mean(gamma g) - xhat
// mean(gamma g xhat)), and t[r, ch] = g xhat (dgamma = column sums of t).
#define WG 256
layout(local_size_x = WG) in;
#include "common.glsl"
layout(std430, binding = 0) readonly buffer X { float x[]; };
layout(std430, binding = 1) readonly buffer G { float g[]; };
layout(std430, binding = 2) readonly buffer Gamma { float gamma[]; };
layout(std430, binding = 3) readonly buffer Beta { float beta[]; };
layout(std430, binding = 4) writeonly buffer O { float o[]; };
layout(std430, binding = 5) writeonly buffer T { float t[]; };
layout(push_constant) uniform PC { uint L; uint c; uint groups; float eps; uint mode; } pc;
void main() {
    uint bg = gl_WorkGroupID.x;
    uint b = bg / pc.groups, gr = bg % pc.groups;
    uint cg = pc.c / pc.groups;
    uint n = pc.L * cg;
    uint lid = gl_LocalInvocationIndex;
    float cnt = max(float(n), 1.0);
    float s = 0.0;
    for (uint e = lid; e < n; e += WG) s += x[(b * pc.L + e / cg) * pc.c + gr * cg + e % cg];
    float mean = wg_sum(s) / cnt;
    float q = 0.0;
    for (uint e = lid; e < n; e += WG) { float d = x[(b * pc.L + e / cg) * pc.c + gr * cg + e % cg] - mean; q += d * d; }
    float inv = 1.0 / sqrt(wg_sum(q) / cnt + pc.eps);
    if (pc.mode == 0u) {
        for (uint e = lid; e < n; e += WG) {
            uint ch = gr * cg + e % cg;
            uint i = (b * pc.L + e / cg) * pc.c + ch;
            o[i] = (x[i] - mean) * (inv * gamma[ch]) + beta[ch];
        }
    } else {
        float s1 = 0.0, s2 = 0.0;
        for (uint e = lid; e < n; e += WG) {
            uint ch = gr * cg + e % cg;
            uint i = (b * pc.L + e / cg) * pc.c + ch;
            float gg = gamma[ch] * g[i];
            s1 += gg;
            s2 += gg * (x[i] - mean) * inv;
        }
        float k1 = wg_sum(s1) / cnt;
        float k2 = wg_sum(s2) / cnt;
        for (uint e = lid; e < n; e += WG) {
            uint ch = gr * cg + e % cg;
            uint i = (b * pc.L + e / cg) * pc.c + ch;
            float xh = (x[i] - mean) * inv;
            o[i] = inv * (gamma[ch] * g[i] - k1 - xh * k2);
            t[i] = g[i] * xh;
        }
    }
}
