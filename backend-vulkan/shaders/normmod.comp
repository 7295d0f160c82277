// variants: subgroup
#version 450
// Fused LayerNorm (no affine, two-pass mean/variance as rownorm.comp) and
// adaLN modulation `ln(x) * (1 + scale[s]) + shift[s]`, one workgroup of 128
// threads per row. The pair is memory-bound and runs twice per DiT block:
// fused, each row is read from global memory twice (statistics, then output;
// the second read hits cache for rows up to a few KiB) and written once,
// instead of read three times and written twice through an intermediate.
// The sample of the row (for its shift/scale block) is a binary search over
// the S+1 segment offsets, done once per workgroup.
#define WG 128
layout(local_size_x = WG) in;
#include "common.glsl"
layout(std430, binding = 0) readonly buffer X { float x[]; };
layout(std430, binding = 1) readonly buffer Ada { float ada[]; };
layout(std430, binding = 2) readonly buffer Seg { uint seg[]; };
layout(std430, binding = 3) writeonly buffer O { float o[]; };
layout(push_constant) uniform PC { uint rows; uint c; uint vc; uint nseg1; uint at_shift; uint at_scale; float eps; } pc;

void main() {
    uint r = group_index();
    if (r >= pc.rows) return;
    uint lid = gl_LocalInvocationIndex;
    uint base = r * pc.c;
    float n = float(pc.c);
    float s = 0.0;
    for (uint j = lid; j < pc.c; j += WG) s += x[base + j];
    float mean = wg_sum(s) / n;
    float q = 0.0;
    for (uint j = lid; j < pc.c; j += WG) { float d = x[base + j] - mean; q += d * d; }
    float inv = 1.0 / sqrt(wg_sum(q) / n + pc.eps);
    uint smp;
    SAMPLE_OF(seg, pc.nseg1, r, smp);
    uint sh = smp * pc.vc + pc.at_shift * pc.c;
    uint sc = smp * pc.vc + pc.at_scale * pc.c;
    for (uint j = lid; j < pc.c; j += WG) {
        float h = (x[base + j] - mean) * inv;
        o[base + j] = h * (1.0 + ada[sc + j]) + ada[sh + j];
    }
}
