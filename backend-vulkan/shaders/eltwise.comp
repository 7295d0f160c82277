#version 450
// Element-wise kernels (one thread per element, grid-stride loop): unary
// functions and their gradients, binary ops, affine, fill, scale_rows,
// EMA. Memory-bound: 256 threads, coalesced.
#define WG 256
layout(local_size_x = WG) in;
#include "common.glsl"
layout(std430, binding = 0) readonly buffer A { float a[]; };
layout(std430, binding = 1) readonly buffer B { float b[]; };
layout(std430, binding = 2) buffer O { float o[]; };
layout(push_constant) uniform PC { uint n; uint mode; uint cols; float f0; float f1; } pc;

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
        case 11u: case 12u: case 13u: y = b[i] * unary_grad(pc.mode - 11u, x); break;
        case 14u: y = x * pc.f0 + pc.f1 * b[i]; break;
        default: y = x; break;
        }
        o[i] = y;
    }
}
