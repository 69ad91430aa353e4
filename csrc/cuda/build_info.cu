// What the CUDA half of the extension was really compiled with: the CUDA runtime version
// and the real architectures nvcc generated code for (__CUDA_ARCH_LIST__ is defined by
// nvcc in host code too, e.g. 800,900).
#include <cuda_runtime_api.h>

#include <string>

#define RMSNORM_EXT_STR2(...) #__VA_ARGS__
#define RMSNORM_EXT_STR(...) RMSNORM_EXT_STR2(__VA_ARGS__)

namespace rmsnorm_ext {

std::string cuda_build_info() {
  std::string s = "cuda_runtime=" + std::to_string(CUDART_VERSION);
#ifdef __CUDA_ARCH_LIST__
  s += ";archs=" RMSNORM_EXT_STR(__CUDA_ARCH_LIST__);
#else
  s += ";archs=unknown";
#endif
  return s;
}

}  // namespace rmsnorm_ext
