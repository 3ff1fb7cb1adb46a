// The cast_s8 / transpose_s8 test cases shared by the CPU and CUDA convert_s8 tests.
#pragma once
#include <cstdint>
#include <sstream>
#include <string>

#include "lowbit/kernels/common.h"

namespace lowbit_test {

// One cast_s8 call: output dtype, shape, strides, and base offsets that move q / out off alignment.
struct CastCase {
  lowbit::DType t;
  int64_t M, N, ldq, ldo;
  int64_t q_off;    // bytes the q base is moved by
  int64_t out_off;  // elements the out base is moved by
  std::string str() const {
    std::ostringstream os;
    os << lowbit::dtype_name(t) << " M=" << M << " N=" << N << " ldq=" << ldq << " ldo=" << ldo << " q_off=" << q_off
       << " out_off=" << out_off;
    return os.str();
  }
};

// One transpose_s8 call: shape, strides, and base offsets.
struct TransposeCase {
  int64_t M, N, ldq, ldo;
  int64_t q_off, out_off;  // bytes the bases are moved by
  std::string str() const {
    std::ostringstream os;
    os << "M=" << M << " N=" << N << " ldq=" << ldq << " ldo=" << ldo << " q_off=" << q_off << " out_off=" << out_off;
    return os.str();
  }
};

}  // namespace lowbit_test
