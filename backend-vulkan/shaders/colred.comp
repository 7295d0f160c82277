#version 450
// Column reductions over the rows of each segment: out[s * ostride + ooff + j]
// = sum over rows r of segment s of x[r, j] (mode 0) or x[r, j] * y[r, j]
// (mode 1), added to what is there with `accum` (blocks that coincide). Workgroup = 64 columns x 4 row lanes (coalesced along columns),
// grid = (column blocks, segments); lanes combined in shared memory.
layout(local_size_x = 64, local_size_y = 4) in;
layout(std430, binding = 0) readonly buffer X { float x[]; };
layout(std430, binding = 1) readonly buffer Y { float y[]; };
layout(std430, binding = 2) readonly buffer Seg { uint seg[]; };
layout(std430, binding = 3) buffer O { float o[]; };
layout(push_constant) uniform PC { uint c; uint mode; uint ostride; uint ooff; uint accum; } pc;
shared float part[4][64];

void main() {
    uint j = gl_WorkGroupID.x * 64u + gl_LocalInvocationID.x;
    uint s = gl_WorkGroupID.y;
    uint lane = gl_LocalInvocationID.y;
    float acc = 0.0;
    if (j < pc.c) {
        uint r1 = seg[s + 1u];
        for (uint r = seg[s] + lane; r < r1; r += 4u) {
            float v = x[r * pc.c + j];
            if (pc.mode == 1u) v *= y[r * pc.c + j];
            acc += v;
        }
    }
    part[lane][gl_LocalInvocationID.x] = acc;
    barrier();
    if (lane == 0u && j < pc.c) {
        float t = (part[0][gl_LocalInvocationID.x] + part[1][gl_LocalInvocationID.x])
            + (part[2][gl_LocalInvocationID.x] + part[3][gl_LocalInvocationID.x]);
        uint oi = s * pc.ostride + pc.ooff + j;
        o[oi] = pc.accum != 0u ? o[oi] + t : t;
    }
}
