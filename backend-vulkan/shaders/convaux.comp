#version 450
// Convolution helpers: mode 0 im2col (cols[r, p] for the weight gradient),
// mode 1 weight flip-transpose w'[ci, ky, kx, co] = w[co, k-1-ky, k-1-kx, ci]
// (the input gradient is the convolution of g with w').
layout(local_size_x = 256) in;
layout(std430, binding = 0) readonly buffer X { float x[]; };
layout(std430, binding = 1) writeonly buffer O { float o[]; };
layout(push_constant) uniform PC { uint n; uint mode; uint H; uint W; uint cin; uint k; uint cout; } pc;
void main() {
    uint stride = gl_NumWorkGroups.x * 256u;
    uint kk = pc.k * pc.k;
    for (uint e = gl_GlobalInvocationID.x; e < pc.n; e += stride) {
        if (pc.mode == 0u) {
            uint K = kk * pc.cin;
            uint r = e / K, p = e % K;
            uint hw = pc.H * pc.W;
            uint bi = r / hw, rem = r % hw;
            int y = int(rem / pc.W), xx = int(rem % pc.W);
            uint tap = p / pc.cin, ci = p % pc.cin;
            int pad = int(pc.k / 2u);
            int yy = y + int(tap / pc.k) - pad, xc = xx + int(tap % pc.k) - pad;
            float v = 0.0;
            if (yy >= 0 && yy < int(pc.H) && xc >= 0 && xc < int(pc.W))
                v = x[(bi * hw + uint(yy) * pc.W + uint(xc)) * pc.cin + ci];
            o[e] = v;
        } else {
            // e indexes w' (cin, k, k, cout)
            uint co = e % pc.cout;
            uint t = (e / pc.cout) % kk;
            uint ci = e / (pc.cout * kk);
            uint ft = kk - 1u - t;
            o[e] = x[(co * kk + ft) * pc.cin + ci];
        }
    }
}
