#version 450
// Row gathers and scatters (one thread per element, coalesced along
// columns). Mode 0: out[i] = x[idx[i]]. Mode 1: scatter-add as a gather over
// the inverse index (CSR built on the host: rows list[start[o]..start[o+1]]
// land in output row o, in input order), so it needs no atomics and sums in
// the same order as the CPU reference.
layout(local_size_x = 256) in;
layout(std430, binding = 0) readonly buffer X { float x[]; };
layout(std430, binding = 1) readonly buffer I { uint idx[]; };
layout(std430, binding = 2) writeonly buffer O { float o[]; };
layout(push_constant) uniform PC { uint n; uint c; uint mode; uint rows; } pc;
void main() {
    uint stride = gl_NumWorkGroups.x * 256u;
    for (uint e = gl_GlobalInvocationID.x; e < pc.n; e += stride) {
        uint r = e / pc.c, j = e % pc.c;
        if (pc.mode == 0u) {
            o[e] = x[idx[r] * pc.c + j];
        } else {
            float acc = 0.0;
            uint k1 = idx[r + 1u];
            for (uint k = idx[r]; k < k1; k++) acc += x[idx[pc.rows + 1u + k] * pc.c + j];
            o[e] = acc;
        }
    }
}
