#version 450
// Element-wise kernels (one thread per element, grid-stride loop): unary
// functions and their gradients, binary ops, affine, fill, scale_rows,
// reduced-precision rounding, EMA. Memory-bound: 256 threads, coalesced.
#define WG 256
layout(local_size_x = WG) in;
#include "common.glsl"
layout(std430, binding = 0) readonly buffer A { float a[]; };
layout(std430, binding = 1) readonly buffer B { float b[]; };
layout(std430, binding = 2) buffer O { float o[]; };
layout(push_constant) uniform PC { uint n; uint mode; uint cols; float f0; float f1; } pc;

float bf16_round(float x) {
    uint u = floatBitsToUint(x);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x7fffffu) != 0u) return uintBitsToFloat(u | 0x400000u);
    u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    return uintBitsToFloat(u);
}

void main() {
    uint stride = gl_NumWorkGroups.x * WG;
    for (uint i = gl_GlobalInvocationID.x; i < pc.n; i += stride) {
        float x = a[i];
        float y;
        switch (pc.mode) {
        case 0u: y = x * sigmoid_f(x); break;
        case 1u: y = gelu_f(x); break;
        case 2u: y = sigmoid_f(x); break;
        case 3u: y = x + b[i]; break;
        case 4u: y = x - b[i]; break;
        case 5u: y = x * b[i]; break;
        case 6u: y = pc.f0 * x + pc.f1; break;
        case 7u: y = pc.f0; break;
        case 8u: y = x * b[i / pc.cols]; break;
        case 9u: y = unpackHalf2x16(packHalf2x16(vec2(x, 0.0))).x; break;
        case 10u: y = bf16_round(x); break;
        case 11u: case 12u: case 13u: y = b[i] * unary_grad(pc.mode - 11u, x); break;
        case 14u: y = x * pc.f0 + pc.f1 * b[i]; break;
        default: y = x; break;
        }
        o[i] = y;
    }
}
