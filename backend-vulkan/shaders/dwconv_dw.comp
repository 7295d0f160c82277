#version 450
// Depthwise 3x3 weight gradient dw[ch, t] = sum_r g[r, ch] x[r + off(t), ch]:
// workgroup = 64 channels x 4 row lanes for one tap (grid: channel blocks x 9).
layout(local_size_x = 64, local_size_y = 4) in;
layout(std430, binding = 0) readonly buffer X { float x[]; };
layout(std430, binding = 1) readonly buffer G { float g[]; };
layout(std430, binding = 2) writeonly buffer O { float o[]; };
layout(push_constant) uniform PC { uint rows; uint H; uint W; uint c; } pc;
shared float part[4][64];
void main() {
    uint ch = gl_WorkGroupID.x * 64u + gl_LocalInvocationID.x;
    uint t = gl_WorkGroupID.y;
    uint lane = gl_LocalInvocationID.y;
    int dy = int(t / 3u) - 1, dx = int(t % 3u) - 1;
    uint hw = pc.H * pc.W;
    float acc = 0.0;
    if (ch < pc.c) {
        for (uint r = lane; r < pc.rows; r += 4u) {
            uint bi = r / hw, rem = r % hw;
            int sy = int(rem / pc.W) + dy, sx = int(rem % pc.W) + dx;
            if (sy < 0 || sy >= int(pc.H) || sx < 0 || sx >= int(pc.W)) continue;
            acc += g[r * pc.c + ch] * x[(bi * hw + uint(sy) * pc.W + uint(sx)) * pc.c + ch];
        }
    }
    part[lane][gl_LocalInvocationID.x] = acc;
    barrier();
    if (lane == 0u && ch < pc.c) {
        uint l = gl_LocalInvocationID.x;
        o[ch * 9u + t] = (part[0][l] + part[1][l]) + (part[2][l] + part[3][l]);
    }
}
