#version 450
// Depthwise 3x3 convolution on NHWC rows, one thread per output element
// (coalesced along channels): mode 0 forward (taps t = ky*3+kx at offset
// (ky-1, kx-1)), mode 1 input gradient (the same with the taps mirrored).
layout(local_size_x = 256) in;
layout(std430, binding = 0) readonly buffer X { float x[]; };
layout(std430, binding = 1) readonly buffer W { float w[]; };
layout(std430, binding = 2) writeonly buffer O { float o[]; };
layout(push_constant) uniform PC { uint n; uint mode; uint H; uint W; uint c; } pc;
void main() {
    uint stride = gl_NumWorkGroups.x * 256u;
    for (uint e = gl_GlobalInvocationID.x; e < pc.n; e += stride) {
        uint r = e / pc.c, ch = e % pc.c;
        uint hw = pc.H * pc.W;
        uint bi = r / hw, rem = r % hw;
        int y = int(rem / pc.W), xx = int(rem % pc.W);
        float acc = 0.0;
        for (int ky = 0; ky < 3; ky++) {
            int dy = pc.mode == 0u ? ky - 1 : 1 - ky;
            int sy = y + dy;
            if (sy < 0 || sy >= int(pc.H)) continue;
            for (int kx = 0; kx < 3; kx++) {
                int dx = pc.mode == 0u ? kx - 1 : 1 - kx;
                int sx = xx + dx;
                if (sx < 0 || sx >= int(pc.W)) continue;
                acc += w[ch * 9u + uint(ky * 3 + kx)] * x[(bi * hw + uint(sy) * pc.W + uint(sx)) * pc.c + ch];
            }
        }
        o[e] = acc;
    }
}
