#version 450
// AdamW step (PyTorch's formula and scalar rounding), one thread per element.
layout(local_size_x = 256) in;
layout(std430, binding = 0) readonly buffer P { float p[]; };
layout(std430, binding = 1) readonly buffer G { float g[]; };
layout(std430, binding = 2) readonly buffer M { float m[]; };
layout(std430, binding = 3) readonly buffer V { float v[]; };
layout(std430, binding = 4) writeonly buffer Po { float po[]; };
layout(std430, binding = 5) writeonly buffer Mo { float mo[]; };
layout(std430, binding = 6) writeonly buffer Vo { float vo[]; };
layout(push_constant) uniform PC { uint n; float decay; float w1; float b2; float w2; float neg_step; float bc2s; float eps; float gscale; } pc;
void main() {
    uint stride = gl_NumWorkGroups.x * 256u;
    for (uint j = gl_GlobalInvocationID.x; j < pc.n; j += stride) {
        float gv = g[j] * pc.gscale;
        float pv = p[j] * pc.decay;
        float m0 = m[j];
        float m1 = pc.w1 < 0.5 ? m0 + pc.w1 * (gv - m0) : gv - (gv - m0) * (1.0 - pc.w1);
        float v1 = v[j] * pc.b2 + pc.w2 * gv * gv;
        float den = sqrt(v1) / pc.bc2s + pc.eps;
        po[j] = pv + pc.neg_step * m1 / den;
        mo[j] = m1;
        vo[j] = v1;
    }
}
