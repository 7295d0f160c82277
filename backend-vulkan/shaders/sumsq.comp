// variants: subgroup
#version 450
// Sum of squares: each workgroup reduces a grid-stride share of the tensor
// to one partial (read back and summed in f64 on the host).
#define WG 256
layout(local_size_x = WG) in;
#include "common.glsl"
layout(std430, binding = 0) readonly buffer X { float x[]; };
layout(std430, binding = 1) writeonly buffer O { float o[]; };
layout(push_constant) uniform PC { uint n; } pc;
void main() {
    uint stride = gl_NumWorkGroups.x * WG;
    float acc = 0.0;
    for (uint i = gl_GlobalInvocationID.x; i < pc.n; i += stride) acc += x[i] * x[i];
    float t = wg_sum(acc);
    if (gl_LocalInvocationIndex == 0u) o[gl_WorkGroupID.x] = t;
}
