// variants: subgroup
#version 450
// Row-wise norm gradients, one workgroup per row: 0 LayerNorm dx, 1 RMSNorm
// dx, 2 L2-normalise dx, 3 RMSNorm per-element dw terms g * x * inv (summed
// over rows by colred).
#define WG 128
layout(local_size_x = WG) in;
#include "common.glsl"
layout(std430, binding = 0) readonly buffer X { float x[]; };
layout(std430, binding = 1) readonly buffer G { float g[]; };
layout(std430, binding = 2) readonly buffer W { float w[]; };
layout(std430, binding = 3) writeonly buffer O { float o[]; };
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
        float sg = 0.0, sgx = 0.0;
        for (uint j = lid; j < pc.c; j += WG) {
            float gv = g[base + j];
            sg += gv;
            sgx += gv * (x[base + j] - mean) * inv;
        }
        float mg = wg_sum(sg) / n;
        float mgx = wg_sum(sgx) / n;
        for (uint j = lid; j < pc.c; j += WG) {
            float xh = (x[base + j] - mean) * inv;
            o[base + j] = inv * (g[base + j] - mg - xh * mgx);
        }
    } else {
        float q = 0.0;
        for (uint j = lid; j < pc.c; j += WG) { float v = x[base + j]; q += v * v; }
        float ss = wg_sum(q);
        if (pc.mode == 1u) {
            float s = 1.0 / sqrt(ss / n + pc.eps);
            float d = 0.0;
            for (uint j = lid; j < pc.c; j += WG) d += g[base + j] * w[j] * x[base + j];
            float m = wg_sum(d) / n;
            float k = s * s * s * m;
            for (uint j = lid; j < pc.c; j += WG) o[base + j] = s * (g[base + j] * w[j]) - x[base + j] * k;
        } else if (pc.mode == 2u) {
            float norm = sqrt(ss);
            float d = 0.0;
            for (uint j = lid; j < pc.c; j += WG) d += x[base + j] * g[base + j];
            float dot_xg = wg_sum(d);
            if (norm >= 1e-12) {
                float inv = 1.0 / norm;
                float yg = dot_xg * inv;
                for (uint j = lid; j < pc.c; j += WG) o[base + j] = (g[base + j] - x[base + j] * inv * yg) * inv;
            } else {
                for (uint j = lid; j < pc.c; j += WG) o[base + j] = g[base + j] * 1e12;
            }
        } else {
            float s = 1.0 / sqrt(ss / n + pc.eps);
            for (uint j = lid; j < pc.c; j += WG) o[base + j] = g[base + j] * x[base + j] * s;
        }
    }
}
