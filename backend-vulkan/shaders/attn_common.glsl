// Packed variable-length attention, shared declarations. Work is split into
// blocks of up to 64 rows that never cross a segment; blk[3 b + 0..3] =
// (segment start, segment end, first row of the block). One thread owns one
// row (query in the forward and dq, key in dk/dv) of one head (grid.y = head)
// and streams over the segment's other rows in tiles of TILE rows staged in
// shared memory, so the L x L score matrix never exists. Head dim <= 128
// (per-thread vectors of HDMAX floats).
#define HDMAX 128
#define BR 64
layout(local_size_x = BR) in;
layout(push_constant) uniform PC { uint d; uint heads; uint hd; float scale; uint nblk; } pc;
