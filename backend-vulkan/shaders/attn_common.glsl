// Packed variable-length attention, shared declarations. Work is split into
// blocks of up to 64 rows that never cross a segment; blk[3 b + 0..3] =
// (segment start, segment end, first row of the block). One thread owns one
// row (query in the forward and dq, key in dk/dv) of one head (grid.y = head)
// and streams over the segment's other rows in tiles of TILE rows staged in
// shared memory, so the L x L score matrix never exists.
//
// HDMAX (16, 32, 64 or 128; one pipeline per variant, the smallest that holds
// the head dim) sizes the per-thread vectors; every loop over the head dim
// and over a tile is unrolled at compile time, so the vectors live in
// registers on a GPU, and the only run-time loops are over tiles (this also
// keeps lavapipe under its 65535 loop iterations per invocation). Tiles and
// vectors are zero-padded beyond the head dim; padded keys get probability 0.
#extension GL_EXT_control_flow_attributes : enable
#define BR 64
layout(local_size_x = BR) in;
layout(push_constant) uniform PC { uint d; uint heads; uint hd; float scale; uint nblk; } pc;
#define FOR_E [[unroll]] for (uint e = 0; e < HDMAX; e++)
