// Shared definitions of the atlas_kernels extension: the block description, the partition index
// (bit for bit atlas_kernels/partitions.py), and dtype codes. Host and device.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define ATLAS_HD __host__ __device__ __forceinline__
#else
#define ATLAS_HD inline
#endif

namespace atlas_ext {

// Partition mode codes, the same as atlas_kernels/kernels/_common.py mode_code.
constexpr int kModeNone = 0;        // k == 1: every element in part 0
constexpr int kModeContiguous = 1;  // part(e) = (e * K) // numel (int64)
constexpr int kModeHash = 2;        // part(e) = lowbias32((e ^ key) mod 2**32) mod K

// One block: where its elements, coefficient columns and scale rows start, and how its elements
// map to parts and scale rows.
struct Seg {
  int64_t start;    // first element in the flat buffers (theta0/out/grad and every slab row)
  int64_t numel;    // elements of the block
  int64_t col;      // first coefficient column
  int64_t k;        // parts
  int64_t mode;     // kMode*
  uint32_t key;     // hash key (mode 2)
  int64_t row_off;  // first scale row (scaled storage)
  int64_t row_len;  // elements per scale row
};

// The lowbias32 hash (C. Wellons) on uint32 (products modulo 2**32 by unsigned wrap-around).
ATLAS_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// Part of element e (block-local, 0 <= e < numel). For the hash, (e XOR key) mod 2**32 equals
// uint32(e) XOR key since XOR acts bitwise.
ATLAS_HD int64_t part_of(int64_t e, const Seg& s) {
  if (s.mode == kModeContiguous) return (e * s.k) / s.numel;
  if (s.mode == kModeHash) return static_cast<int64_t>(mix32(static_cast<uint32_t>(e) ^ s.key) % static_cast<uint32_t>(s.k));
  return 0;
}

// First element after e that may belong to another part (contiguous mode; numel otherwise).
// Part p covers [ceil(p * numel / K), ceil((p + 1) * numel / K)).
ATLAS_HD int64_t part_end(int64_t e, const Seg& s) {
  if (s.mode != kModeContiguous) return s.numel;
  const int64_t p = (e * s.k) / s.numel;
  return ((p + 1) * s.numel + s.k - 1) / s.k;
}

}  // namespace atlas_ext
