// variants: subgroup
#version 450
#ifdef SUBGROUP
#extension GL_KHR_shader_subgroup_basic : enable
#extension GL_KHR_shader_subgroup_shuffle : enable
#endif
#extension GL_EXT_control_flow_attributes : enable
// General strided matmul (linear, matmul with transposes, conv weight grads).
layout(local_size_x = 256) in;
layout(std430, binding = 0) readonly buffer A { float a[]; };
layout(std430, binding = 1) readonly buffer B { float b[]; };
layout(std430, binding = 2) readonly buffer Bias { float bias[]; };
layout(std430, binding = 3) writeonly buffer C { float c[]; };
layout(push_constant) uniform PC {
    uint M; uint N; uint K; uint a_rs; uint a_cs; uint b_rs; uint b_cs; uint has_bias; float alpha;
} pc;
float loadA(uint i, uint p) { return a[i * pc.a_rs + p * pc.a_cs]; }
float loadB(uint p, uint j) { return b[p * pc.b_rs + j * pc.b_cs]; }
#include "gemm_body.glsl"
void main() {
    float acc[4][4];
    gemm_tile(pc.M, pc.N, pc.K, pc.a_cs == 1u, pc.b_rs == 1u, acc);
    uint lid = gemm_thread();
    uint tx = lid % 16u, ty = lid / 16u;
    uint m0 = gl_WorkGroupID.y * BM, n0 = gl_WorkGroupID.x * BN;
    [[unroll]] for (uint i = 0; i < 4; i++) {
        uint gi = m0 + ty + 16u * i;
        if (gi >= pc.M) continue;
        [[unroll]] for (uint j = 0; j < 4; j++) {
            uint gj = n0 + tx + 16u * j;
            if (gj >= pc.N) continue;
            float v = pc.alpha * acc[i][j];
            if (pc.has_bias != 0u) v += bias[gj];
            c[gi * pc.N + gj] = v;
        }
    }
}
