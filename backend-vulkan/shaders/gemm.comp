// variants: subgroup
#version 450
#ifdef SUBGROUP
#extension GL_KHR_shader_subgroup_basic : enable
#extension GL_KHR_shader_subgroup_shuffle : enable
#endif
#extension GL_EXT_control_flow_attributes : enable
// General strided matmul (linear, matmul with transposes, conv weight grads).
layout(local_size_x = 256) in;
// A and B are read in their storage format (a_fmt / b_fmt: 0 f32, 1 f16,
// 2 bf16 packed two per 32-bit word, element 2i in the low half), so 16-bit
// weights and activations reach the tiles without a widened copy; the format
// is uniform per dispatch, so the branch costs nothing per load.
layout(std430, binding = 0) readonly buffer A { uint a[]; };
layout(std430, binding = 1) readonly buffer B { uint b[]; };
layout(std430, binding = 2) readonly buffer Bias { float bias[]; };
layout(std430, binding = 3) writeonly buffer C { float c[]; };
layout(push_constant) uniform PC {
    uint M; uint N; uint K; uint a_rs; uint a_cs; uint b_rs; uint b_cs; uint has_bias; float alpha;
    uint a_fmt; uint b_fmt;
} pc;
// Element `idx` of a buffer of words in format `fmt`.
float decode(uint word, uint idx, uint fmt) {
    if (fmt == 0u) return uintBitsToFloat(word);
    uint h = (idx & 1u) == 0u ? (word & 0xffffu) : (word >> 16);
    return fmt == 1u ? unpackHalf2x16(h).x : uintBitsToFloat(h << 16);
}
float loadA(uint i, uint p) {
    uint idx = i * pc.a_rs + p * pc.a_cs;
    return decode(a[pc.a_fmt == 0u ? idx : idx >> 1], idx, pc.a_fmt);
}
float loadB(uint p, uint j) {
    uint idx = p * pc.b_rs + j * pc.b_cs;
    return decode(b[pc.b_fmt == 0u ? idx : idx >> 1], idx, pc.b_fmt);
}
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
