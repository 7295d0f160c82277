#version 450
// Per-sample broadcasts over packed rows: add_segment, adaLN modulate,
// gated residual, and their element-wise gradients. The sample of a row is
// found by binary search over the segment offsets (S+1 words).
#define WG 256
layout(local_size_x = WG) in;
#include "common.glsl"
layout(std430, binding = 0) readonly buffer X { float x[]; };
layout(std430, binding = 1) readonly buffer Y { float y[]; };
layout(std430, binding = 2) readonly buffer Ada { float ada[]; };
layout(std430, binding = 3) readonly buffer Seg { uint seg[]; };
layout(std430, binding = 4) writeonly buffer O { float o[]; };
layout(push_constant) uniform PC { uint n; uint c; uint vc; uint nseg1; uint mode; uint at0; uint at1; } pc;

void main() {
    uint stride = gl_NumWorkGroups.x * WG;
    for (uint i = gl_GlobalInvocationID.x; i < pc.n; i += stride) {
        uint r = i / pc.c, col = i % pc.c;
        uint s;
        SAMPLE_OF(seg, pc.nseg1, r, s);
        uint base = s * pc.vc + col;
        float v = x[i];
        float res;
        switch (pc.mode) {
        case 0u: res = v + ada[base]; break;
        case 1u: res = v * (1.0 + ada[base + pc.at1 * pc.c]) + ada[base + pc.at0 * pc.c]; break;
        case 2u: res = v + ada[base + pc.at0 * pc.c] * y[i]; break;
        case 3u: res = v * (1.0 + ada[base + pc.at1 * pc.c]); break;
        default: res = v * ada[base + pc.at0 * pc.c]; break;
        }
        o[i] = res;
    }
}
