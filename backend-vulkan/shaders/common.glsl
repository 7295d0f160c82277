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

// The CPU reference's exp (Cephes expf polynomial, same f32 operations in the
// same order, `precise` so nothing is contracted into an fma): unary ops then
// match the reference to the last bit instead of to the driver's exp accuracy.
float exp_ref(float x) {
    precise float xc = clamp(x, -87.33655, 88.37626);
    precise float t = xc * 1.44269504088896 + 12582912.0;
    precise float n = t - 12582912.0;
    precise float r = (xc - n * 0.6933594) - n * -2.1219444e-4;
    precise float y = 1.9875691e-4;
    y = y * r + 1.3981999e-3;
    y = y * r + 8.333452e-3;
    y = y * r + 4.1665796e-2;
    y = y * r + 0.16666665;
    y = y * r + 0.5;
    y = ((y * r) * r + r) + 1.0;
    int ni = floatBitsToInt(t) - floatBitsToInt(12582912.0);
    precise float pow2 = intBitsToFloat((ni + 127) << 23);
    precise float res = y * pow2;
    return x < -87.33655 ? 0.0 : res;
}
float sigmoid_f(float x) { precise float r = 1.0 / (1.0 + exp_ref(-x)); return r; }
const float GELU_K = 0.7978846;
float gelu_f(float x) {
    precise float z = GELU_K * (x + ((0.044715 * x) * x) * x);
    precise float e = exp_ref(2.0 * z);
    precise float r = (0.5 * x) * (2.0 - 2.0 / (e + 1.0));
    return r;
}
float unary_grad(uint op, float x) {
    if (op == 0u) { float s = sigmoid_f(x); precise float r = s * (1.0 + x * (1.0 - s)); return r; }
    if (op == 2u) { float s = sigmoid_f(x); precise float r = s * (1.0 - s); return r; }
    precise float z = GELU_K * (x + ((0.044715 * x) * x) * x);
    precise float e = exp_ref(2.0 * z);
    precise float r = 2.0 / (e + 1.0);
    precise float opt = 2.0 - r;
    precise float sech2 = r * opt;
    precise float res = 0.5 * opt + ((((0.5 * x) * sech2) * GELU_K) * (1.0 + ((3.0 * 0.044715) * x) * x));
    return res;
}

// Sample owning packed row r: the last s with seg[s] <= r (segments in `segs`).
#define SAMPLE_OF(segs, nseg, r, out_s) { uint lo_ = 0u, hi_ = nseg; \
    while (lo_ + 1u < hi_) { uint mid_ = (lo_ + hi_) / 2u; if (segs[mid_] <= r) lo_ = mid_; else hi_ = mid_; } \
    while (lo_ + 1u < nseg && segs[lo_ + 1u] <= r) lo_++; out_s = lo_; }
