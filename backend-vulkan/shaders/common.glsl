// Shared helpers. Define WG (threads per workgroup) before including.
#extension GL_EXT_control_flow_attributes : enable
#ifdef SUBGROUP
#extension GL_KHR_shader_subgroup_basic : enable
#extension GL_KHR_shader_subgroup_arithmetic : enable
#endif

// Linear workgroup index over a 2-D dispatch (x capped at 65535 groups).
uint group_index() { return gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x; }

shared float red_sh[WG];

// Sum of `v` over the workgroup (every invocation must call it). With
// SUBGROUP the subgroup reduces in registers first, so only one value per
// subgroup goes through shared memory.
float wg_sum(float v) {
#ifdef SUBGROUP
    v = subgroupAdd(v);
    if (subgroupElect()) red_sh[gl_SubgroupID] = v;
    barrier();
    float t = 0.0;
    for (uint i = 0; i < gl_NumSubgroups; i++) t += red_sh[i];
    barrier();
    return t;
#else
    uint lid = gl_LocalInvocationIndex;
    red_sh[lid] = v;
    barrier();
    [[unroll]] for (uint s = WG / 2; s > 0; s >>= 1) {
        if (lid < s) red_sh[lid] += red_sh[lid + s];
        barrier();
    }
    float t = red_sh[0];
    barrier();
    return t;
#endif
}

float sigmoid_f(float x) { return 1.0 / (1.0 + exp(-x)); }
const float GELU_K = 0.7978846;
float gelu_f(float x) {
    float z = GELU_K * (x + 0.044715 * x * x * x);
    float e = exp(2.0 * z);
    return 0.5 * x * (2.0 - 2.0 / (e + 1.0));
}
float unary_grad(uint op, float x) {
    if (op == 0u) { float s = sigmoid_f(x); return s * (1.0 + x * (1.0 - s)); }
    if (op == 2u) { float s = sigmoid_f(x); return s * (1.0 - s); }
    float z = GELU_K * (x + 0.044715 * x * x * x);
    float e = exp(2.0 * z);
    float r = 2.0 / (e + 1.0);
    float opt = 2.0 - r;
    float sech2 = r * opt;
    return 0.5 * opt + 0.5 * x * sech2 * GELU_K * (1.0 + 3.0 * 0.044715 * x * x);
}

// Sample owning packed row r: the last s with seg[s] <= r (segments in `segs`).
#define SAMPLE_OF(segs, nseg, r, out_s) { uint lo_ = 0u, hi_ = nseg; \
    while (lo_ + 1u < hi_) { uint mid_ = (lo_ + hi_) / 2u; if (segs[mid_] <= r) lo_ = mid_; else hi_ = mid_; } \
    while (lo_ + 1u < nseg && segs[lo_ + 1u] <= r) lo_++; out_s = lo_; }
