// The row ABI in C/C++: the column layout of the coefficient table and the row flags, the mirror
// of fastdiff/program/layout.py (the declaration; same names, same values). Used by the CPU
// kernels (csrc/cpu) and the CUDA kernels (csrc/cuda) alike: no other file in csrc/ writes a
// column offset. tests/test_row_abi.py compiles this header against the Python module for
// several K and fails on any difference.
//
// A table has table_width(K) float64 columns, K being the number of history slots:
//   [ g, g0, g1, q_y, q_d,  x-out block,  y-out block,  h-out block of slot 0 .. of slot K-1,  s_in ]
//   an out block: [ x, y, h, hu, z, H_0 .. H_{K-1} ]   (out_width(K) = 5 + K columns)
// D = u + g (c - u), h = q_y E + q_d D, hu = q_y E + q_d u; each output (new x, new y, the value
// of each history slot the row writes: bit j of hist_writes) = a_x x + a_y E + a_h h + a_hu hu +
// a_z z + sum_j a_j H_j, where a history term with a zero coefficient is absent (the slot is not
// read); g = COL_G, or g0 + g1 * s[b] with a per-sample scale vector s.
//
// Plain C++11 constexpr, host and device (no torch, no CUDA headers).
#pragma once

#ifndef FASTDIFF_HD
#if defined(__CUDACC__)
#define FASTDIFF_HD __host__ __device__
#else
#define FASTDIFF_HD
#endif
#endif

namespace fastdiff {
namespace layout {

// ---- table columns ----
constexpr int COL_G = 0;      // CFG scale g of D = uncond + g (cond - uncond) (no per-sample scale)
constexpr int COL_G0 = 1;     // with a per-sample scale s[b]: g_b = g0 + g1 * s[b]
constexpr int COL_G1 = 2;
constexpr int COL_QY = 3;     // h = q_y E + q_d D,  hu = q_y E + q_d u
constexpr int COL_QD = 4;
constexpr int OUT_BASE = 5;   // first column of the x-out block; the y-out and the K h-out blocks follow it
// offsets inside an out block
constexpr int OUT_X = 0;      // the state x
constexpr int OUT_Y = 1;      // E, the point the model was evaluated at
constexpr int OUT_H = 2;      // h (from the guided output D)
constexpr int OUT_HU = 3;     // hu (from the unconditional output u)
constexpr int OUT_Z = 4;      // noise
constexpr int OUT_FIXED = 5;  // the history coefficients H_0 .. H_{K-1} start here

FASTDIFF_HD constexpr int out_width(int K) { return OUT_FIXED + K; }
FASTDIFF_HD constexpr int table_width(int K) { return OUT_BASE + (2 + K) * out_width(K) + 1; }
FASTDIFF_HD constexpr int col_out_x(int /*K*/) { return OUT_BASE; }
FASTDIFF_HD constexpr int col_out_y(int K) { return OUT_BASE + out_width(K); }
FASTDIFF_HD constexpr int col_out_h(int K) { return OUT_BASE + 2 * out_width(K); }   // slot 0's block
FASTDIFF_HD constexpr int col_out_slot(int K, int j) { return col_out_h(K) + j * out_width(K); }
FASTDIFF_HD constexpr int col_s_in(int K) { return OUT_BASE + (2 + K) * out_width(K); }

// hist_writes: bit j set = the row writes history slot j (from col_out_slot(K, j)); valid masks
// are 0 <= hist_writes < 2^K.
FASTDIFF_HD constexpr bool hist_writes_valid(long long mask, int K) {
  return mask >= 0 && (K >= 62 || mask < (1LL << K));
}

// ---- row flags (one bitmask per row) ----
constexpr unsigned FLAG_EVAL_Y = 1u << 0;           // E (the point the model was evaluated at) is y, else x
constexpr unsigned FLAG_WRITE_X = 1u << 1;          // the row writes x
constexpr unsigned FLAG_WRITE_Y = 1u << 2;          // the row writes y
constexpr unsigned FLAG_MODEL_IN_FROM_Y = 1u << 3;  // the next model input is s_in * new y, else s_in * new x
constexpr unsigned FLAG_ALL = FLAG_EVAL_Y | FLAG_WRITE_X | FLAG_WRITE_Y | FLAG_MODEL_IN_FROM_Y;

// Every column of a row with K slots, for code that reads them all (derived from the above).
struct Columns {
  int g, g0, g1, qy, qd, out_x, out_y, out_h, s_in, width;
};

FASTDIFF_HD constexpr Columns columns(int K) {
  return Columns{COL_G, COL_G0, COL_G1, COL_QY, COL_QD, col_out_x(K), col_out_y(K), col_out_h(K), col_s_in(K),
                 table_width(K)};
}

}  // namespace layout
}  // namespace fastdiff
