// variants: subgroup
#version 450
// Row-wise normalisations and reductions, one workgroup (128 threads) per
// row: 0 LayerNorm (no affine, two-pass mean/variance), 1 RMSNorm (weight w),
// 2 L2 normalisation, 3 row sum into o[r]. The reductions use subgroupAdd
// when the device has subgroup arithmetic (then one shared-memory slot per
// subgroup), a shared-memory tree otherwise.
#define WG 128
layout(local_size_x = WG) in;
#include "common.glsl"
layout(std430, binding = 0) readonly buffer X { float x[]; };
layout(std430, binding = 1) readonly buffer W { float w[]; };
layout(std430, binding = 2) writeonly buffer O { float o[]; };
layout(push_constant) uniform PC { uint rows; uint c; uint mode; float eps; } pc;

void main() {
    uint r = group_index();
    if (r >= pc.rows) return;
    uint lid = gl_LocalInvocationIndex;
    uint base = r * pc.c;
    float n = float(pc.c);
    if (pc.mode == 0u) {
        float s = 0.0;
        for (uint j = lid; j < pc.c; j += WG) s += x[base + j];
        float mean = wg_sum(s) / n;
        float q = 0.0;
        for (uint j = lid; j < pc.c; j += WG) { float d = x[base + j] - mean; q += d * d; }
        float inv = 1.0 / sqrt(wg_sum(q) / n + pc.eps);
        for (uint j = lid; j < pc.c; j += WG) o[base + j] = (x[base + j] - mean) * inv;
    } else if (pc.mode == 1u || pc.mode == 2u) {
        float q = 0.0;
        for (uint j = lid; j < pc.c; j += WG) { float v = x[base + j]; q += v * v; }
        float ss = wg_sum(q);
        if (pc.mode == 1u) {
            float inv = 1.0 / sqrt(ss / n + pc.eps);
            for (uint j = lid; j < pc.c; j += WG) o[base + j] = x[base + j] * inv * w[j];
        } else {
            float inv = 1.0 / max(sqrt(ss), 1e-12);
            for (uint j = lid; j < pc.c; j += WG) o[base + j] = x[base + j] * inv;
        }
    } else {
        float s = 0.0;
        for (uint j = lid; j < pc.c; j += WG) s += x[base + j];
        float t = wg_sum(s);
        if (lid == 0u) o[r] = t;
    }
}
