// variants: subgroup
#version 450
#ifdef SUBGROUP
#extension GL_KHR_shader_subgroup_basic : enable
#extension GL_KHR_shader_subgroup_shuffle : enable
#endif
#extension GL_EXT_control_flow_attributes : enable
// Stride-1 "same" convolution on NHWC rows as an implicit GEMM: the A
// operand (rows, k*k*cin) is the im2col matrix, formed on the fly while the
// tile loads (never materialised); B (k*k*cin, cout) is the OHWI weight read
// transposed. Same 64x64x16 tiling as gemm.comp.
layout(local_size_x = 256) in;
layout(std430, binding = 0) readonly buffer X { float x[]; };
layout(std430, binding = 1) readonly buffer W { float w[]; };
layout(std430, binding = 2) readonly buffer Bias { float bias[]; };
layout(std430, binding = 3) writeonly buffer C { float c[]; };
layout(push_constant) uniform PC { uint M; uint N; uint K; uint H; uint W; uint cin; uint k; uint has_bias; } pc;
float loadA(uint r, uint p) {
    uint hw = pc.H * pc.W;
    uint bi = r / hw, rem = r % hw;
    int y = int(rem / pc.W), xx = int(rem % pc.W);
    uint tap = p / pc.cin, ci = p % pc.cin;
    int pad = int(pc.k / 2u);
    int yy = y + int(tap / pc.k) - pad, xc = xx + int(tap % pc.k) - pad;
    if (yy < 0 || yy >= int(pc.H) || xc < 0 || xc >= int(pc.W)) return 0.0;
    return x[(bi * hw + uint(yy) * pc.W + uint(xc)) * pc.cin + ci];
}
float loadB(uint p, uint j) { return w[j * pc.K + p]; }
#include "gemm_body.glsl"
void main() {
    float acc[4][4];
    gemm_tile(pc.M, pc.N, pc.K, true, true, acc);
    uint lid = gemm_thread();
    uint tx = lid % 16u, ty = lid / 16u;
    uint m0 = gl_WorkGroupID.y * BM, n0 = gl_WorkGroupID.x * BN;
    [[unroll]] for (uint i = 0; i < 4; i++) {
        uint gi = m0 + ty + 16u * i;
        if (gi >= pc.M) continue;
        [[unroll]] for (uint j = 0; j < 4; j++) {
            uint gj = n0 + tx + 16u * j;
            if (gj >= pc.N) continue;
            float v = acc[i][j];
            if (pc.has_bias != 0u) v += bias[gj];
            c[gi * pc.N + gj] = v;
        }
    }
}
