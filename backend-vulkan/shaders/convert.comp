#version 450
// 16-bit storage: f16/bf16 tensors live on the device packed two per 32-bit
// word (element 2i in the low half). Modes 0/1 widen f16/bf16 words to f32
// for a kernel's inputs, 2/3 narrow f32 results into packed f16/bf16 (round
// to nearest even, as the CPU backend's `half` conversions; NaN stays NaN).
// One thread per word, grid-stride loop; memory-bound.
#define WG 256
layout(local_size_x = WG) in;
layout(std430, binding = 0) readonly buffer In { uint src[]; };
layout(std430, binding = 1) writeonly buffer Out { uint dst[]; };
layout(push_constant) uniform PC { uint n; uint mode; } pc;

// f32 bits -> bf16 bits, round to nearest even; quiet NaN.
uint bf16_bits(uint u) {
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x7fffffu) != 0u) return (u | 0x400000u) >> 16;
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

void main() {
    uint words = (pc.n + 1u) / 2u;
    uint stride = gl_NumWorkGroups.x * WG;
    for (uint w = gl_GlobalInvocationID.x; w < words; w += stride) {
        uint i = 2u * w;
        bool pair = i + 1u < pc.n;
        if (pc.mode < 2u) {
            uint v = src[w];
            vec2 f = pc.mode == 0u
                ? unpackHalf2x16(v)
                : vec2(uintBitsToFloat(v << 16), uintBitsToFloat(v & 0xffff0000u));
            dst[i] = floatBitsToUint(f.x);
            if (pair) dst[i + 1u] = floatBitsToUint(f.y);
        } else {
            uint a = src[i];
            uint b = pair ? src[i + 1u] : 0u;
            dst[w] = pc.mode == 2u
                ? packHalf2x16(vec2(uintBitsToFloat(a), uintBitsToFloat(b)))
                : (bf16_bits(a) | (bf16_bits(b) << 16));
        }
    }
}
