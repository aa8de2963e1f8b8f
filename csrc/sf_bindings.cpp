// Python bindings of sparsefast._C: tensor checks, allocation through torch's caching allocator, the
// current stream, then the launchers of sf24.cu / csr.cu.  No host synchronisation anywhere (CUDA-graph
// safe); every output is allocated with at::empty / at::zeros.
// (ATen/cuda/CUDAContext.h is avoided on purpose: it pulls cuSPARSE/cuBLAS headers that minimal CUDA
// toolkits lack; the stream and guard come from c10/cuda.)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
// Lean includes (not <torch/extension.h>): this file compiles in ~8 s instead of ~40 s.
#include <ATen/core/Tensor.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/utils/pybind.h>

#include "sf_kernels.h"

namespace {

sf::DType to_dt(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return sf::kF16;
    case at::kBFloat16: return sf::kBF16;
    case at::kFloat: return sf::kF32;
    default: TORCH_CHECK(false, "sparsefast._C: unsupported dtype ", t.scalar_type());
  }
  return sf::kF32;
}

void check(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, "sparsefast._C: ", what, " failed: ", cudaGetErrorString(e));
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "sparsefast._C: ", name, " must be a CUDA tensor");
}

// every tensor argument must live on the device of the call's reference tensor (the guard is set
// from it; a tensor on another GPU would be read through the wrong context: illegal address)
void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "sparsefast._C: ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device(), "; all tensors of a call must be on the same device");
}

void check_same_device(const c10::optional<at::Tensor>& t, const at::Tensor& ref, const char* name,
                       const char* ref_name) {
  if (t.has_value()) check_same_device(*t, ref, name, ref_name);
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

int num_sms() {
  static int cache[64] = {};
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  if (dev >= 0 && dev < 64 && cache[dev] > 0) return cache[dev];
  int n = 0;
  check(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  if (dev >= 0 && dev < 64) cache[dev] = n;
  return n;
}

// ---------------------------------------------------------------------------------------------
// SF24
// ---------------------------------------------------------------------------------------------
std::vector<at::Tensor> sf24_pack(const at::Tensor& w_in, const at::Tensor& keep_in) {
  check_cuda(w_in, "weight");
  TORCH_CHECK(w_in.dim() == 2 && keep_in.sizes() == w_in.sizes(), "sf24_pack: weight/mask must be 2-D, same shape");
  TORCH_CHECK(w_in.scalar_type() == at::kHalf || w_in.scalar_type() == at::kBFloat16,
              "sf24_pack: weight must be float16 or bfloat16");
  TORCH_CHECK(w_in.size(1) % 4 == 0, "sf24_pack: columns must be a multiple of 4");
  check_same_device(keep_in, w_in, "keep", "weight");
  c10::cuda::CUDAGuard guard(w_in.device());
  const auto w = w_in.contiguous();
  const auto keep = keep_in.to(at::kBool).contiguous();
  const int64_t R = w.size(0), C = w.size(1);
  auto vals = at::empty({sf::sf24_rows_padded(R), sf::sf24_cols_padded(C) / 2}, w.options());
  auto meta = at::empty({sf::sf24_meta_words(R, C)}, w.options().dtype(at::kInt));
  check(sf::sf24_pack(to_dt(w), w.data_ptr(), reinterpret_cast<const uint8_t*>(keep.data_ptr<bool>()), R, C,
                      vals.data_ptr(), reinterpret_cast<uint32_t*>(meta.data_ptr<int32_t>()),
                      c10::cuda::getCurrentCUDAStream().stream()),
        "sf24_pack");
  return {vals, meta};
}

at::Tensor sf24_unpack(const at::Tensor& vals, const at::Tensor& meta, int64_t R, int64_t C) {
  check_cuda(vals, "vals");
  check_same_device(meta, vals, "meta", "vals");
  TORCH_CHECK(vals.is_contiguous() && meta.is_contiguous(), "sf24_unpack: packed buffers must be contiguous");
  TORCH_CHECK(vals.size(0) == sf::sf24_rows_padded(R) && vals.size(1) == sf::sf24_cols_padded(C) / 2 &&
                  meta.numel() == sf::sf24_meta_words(R, C) && C % 4 == 0,
              "sf24_unpack: packed buffers do not match R=", R, " C=", C);
  c10::cuda::CUDAGuard guard(vals.device());
  auto w = at::empty({R, C}, vals.options());
  check(sf::sf24_unpack(to_dt(vals), vals.data_ptr(), reinterpret_cast<const uint32_t*>(meta.data_ptr<int32_t>()), R,
                        C, w.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()),
        "sf24_unpack");
  return w;
}

void check_packed(const at::Tensor& vals, const at::Tensor& meta, int64_t R, int64_t Kred) {
  check_cuda(vals, "vals");
  TORCH_CHECK(vals.is_contiguous() && meta.is_contiguous() && meta.scalar_type() == at::kInt,
              "sparsefast._C: packed buffers must be contiguous (meta int32)");
  TORCH_CHECK(vals.dim() == 2 && vals.size(0) == sf::sf24_rows_padded(R) &&
                  vals.size(1) == sf::sf24_cols_padded(Kred) / 2 && meta.numel() == sf::sf24_meta_words(R, Kred),
              "sparsefast._C: packed weight of shape ", vals.sizes(), " does not match R=", R, " K=", Kred);
}

// Runs the GEMM for bf16/f16 inputs directly, and for float32 as three bf16 products
// (x_hi*w_hi + x_lo*w_hi + x_hi*w_lo, fp32 accumulation; error ~1e-5 relative, see cuda.py).
// path: 0 = mma.sp (sm_80+), 1 = wgmma.sp (sm_90a; the caller checks the device)
void run_gemm(sf::Sf24GemmArgs a, const at::Tensor& x, const at::Tensor& vals, const c10::optional<at::Tensor>& vals_lo,
              const at::Tensor& out, const c10::optional<at::Tensor>& bias, int64_t path, cudaStream_t stream) {
  auto gemm = path == 1 ? &sf::sf24_gemm_sm90 : &sf::sf24_gemm;
  a.out = out.data_ptr();
  a.num_sms = num_sms();
  // mid-size M whose tiles leave SMs idle: K split over more blocks, fp32 partials added atomically
  const int split = path == 1 ? 1 : sf::sf24_split_k(a);
  if (x.scalar_type() != at::kFloat) {
    TORCH_CHECK(vals.scalar_type() == x.scalar_type(), "sparsefast._C: packed dtype ", vals.scalar_type(),
                " != input dtype ", x.scalar_type());
    a.x = x.data_ptr();
    a.vals = vals.data_ptr();
    if (split == 1) {
      a.bias = bias ? bias->data_ptr() : nullptr;
      check(gemm(to_dt(x), to_dt(x), a, stream), "sf24_gemm");
      return;
    }
    // fp32 partial sums in a zeroed buffer of the output's layout (conv: channels_last), then one cast;
    // the kernel's output type is fp32 there, so it reads the bias as fp32 too
    const auto acc = at::zeros_like(out, out.options().dtype(at::kFloat));
    TORCH_CHECK(acc.strides() == out.strides(), "sparsefast._C: internal k-split buffer layout mismatch");
    const auto bias32 = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
    a.bias = bias ? bias32.data_ptr() : nullptr;
    a.out = acc.data_ptr();
    a.accumulate = 2;
    a.split = split;
    check(gemm(to_dt(x), sf::kF32, a, stream), "sf24_gemm (k-split)");
    out.copy_(acc);
    return;
  }
  TORCH_CHECK(vals_lo.has_value() && vals.scalar_type() == at::kBFloat16 && vals_lo->scalar_type() == at::kBFloat16,
              "sparsefast._C: float32 needs the bf16 hi/lo packed pair");
  const auto fmt = a.is_conv ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const auto x_hi = x.to(at::kBFloat16).contiguous(fmt);
  const auto x_lo = x.sub(x_hi.to(at::kFloat)).to(at::kBFloat16).contiguous(fmt);
  if (!a.is_conv) {
    TORCH_CHECK(x_hi.stride(0) == x_lo.stride(0), "sparsefast._C: internal stride mismatch");
    a.ldx = x_hi.stride(0);
  }
  const at::Tensor* xs[3] = {&x_hi, &x_lo, &x_hi};
  const at::Tensor* ws[3] = {&vals, &vals, &vals_lo.value()};
  if (split > 1) {  // all three products add their k-split partials atomically into the zeroed output
    out.zero_();
    a.split = split;
  }
  for (int i = 0; i < 3; ++i) {
    a.x = xs[i]->data_ptr();
    a.vals = ws[i]->data_ptr();
    a.bias = (i == 0 && bias) ? bias->data_ptr() : nullptr;
    a.accumulate = split > 1 ? 2 : i > 0;
    check(gemm(sf::kBF16, sf::kF32, a, stream), "sf24_gemm (fp32 split)");
  }
}

// y (M x R) = x (M x K) @ W^T (+ bias), W given as SF24 of an R x K matrix
at::Tensor sf24_linear(const at::Tensor& x_in, const at::Tensor& vals, const c10::optional<at::Tensor>& vals_lo,
                       const at::Tensor& meta, int64_t R, const c10::optional<at::Tensor>& bias, int64_t path) {
  check_cuda(x_in, "x");
  TORCH_CHECK(x_in.dim() == 2, "sf24_linear: x must be 2-D");
  const int64_t K = x_in.size(1);
  check_same_device(vals, x_in, "vals", "x");
  check_same_device(vals_lo, x_in, "vals_lo", "x");
  check_same_device(meta, x_in, "meta", "x");
  check_same_device(bias, x_in, "bias", "x");
  check_packed(vals, meta, R, K);
  c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = x_in;
  // the kernel streams 16-byte rows: pad K to a multiple of 8 and realign when needed (odd shapes only)
  const int64_t K8 = (K + 7) / 8 * 8;
  if (K8 != K) x = at::constant_pad_nd(x, {0, K8 - K});
  if (x.stride(1) != 1 || x.stride(0) % 8 != 0 || !aligned16(x)) x = x.contiguous();
  if (!aligned16(x)) x = x.clone();
  if (bias) TORCH_CHECK(bias->numel() == R && bias->scalar_type() == x_in.scalar_type(), "sf24_linear: bad bias");
  const auto b = bias ? c10::optional<at::Tensor>(bias->contiguous()) : c10::nullopt;
  auto y = at::empty({x.size(0), R}, x_in.options());
  sf::Sf24GemmArgs a;
  a.meta = reinterpret_cast<const uint32_t*>(meta.data_ptr<int32_t>());
  a.R = R;
  a.Rp = vals.size(0);
  a.Cp = vals.size(1) * 2;
  a.ldx = x.stride(0);
  a.M = x.size(0);
  a.K = K8;
  a.ldo = R;
  run_gemm(a, x, vals, vals_lo, y, b, path, c10::cuda::getCurrentCUDAStream().stream());
  return y;
}

// 2:4 conv2d forward as an implicit GEMM over the NHWC input. x: (N, C, H, W) any memory format,
// C % 8 == 0, groups == 1; W given as SF24 of its (O, KH*KW*C) reduction view ((kh, kw, c) order).
// Returns (N, O, HO, WO) in channels_last memory format.
at::Tensor sf24_conv2d(const at::Tensor& x_in, const at::Tensor& vals, const c10::optional<at::Tensor>& vals_lo,
                       const at::Tensor& meta, int64_t O, int64_t KH, int64_t KW, std::vector<int64_t> stride,
                       std::vector<int64_t> padding, std::vector<int64_t> dilation,
                       const c10::optional<at::Tensor>& bias, int64_t path) {
  check_cuda(x_in, "x");
  TORCH_CHECK(x_in.dim() == 4, "sf24_conv2d: x must be 4-D");
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  TORCH_CHECK(C % 8 == 0, "sf24_conv2d: in_channels must be a multiple of 8, got ", C);
  check_same_device(vals, x_in, "vals", "x");
  check_same_device(vals_lo, x_in, "vals_lo", "x");
  check_same_device(meta, x_in, "meta", "x");
  check_same_device(bias, x_in, "bias", "x");
  check_packed(vals, meta, O, KH * KW * C);
  c10::cuda::CUDAGuard guard(x_in.device());
  auto x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  if (!aligned16(x)) x = x.clone(at::MemoryFormat::ChannelsLast);
  sf::ConvShape s;
  s.N = (int)N; s.H = (int)H; s.W = (int)W; s.C = (int)C;
  s.O = (int)O; s.KH = (int)KH; s.KW = (int)KW;
  s.SH = (int)stride[0]; s.SW = (int)stride[1];
  s.PH = (int)padding[0]; s.PW = (int)padding[1];
  s.DH = (int)dilation[0]; s.DW = (int)dilation[1];
  s.HO = (int)((H + 2 * s.PH - s.DH * (KH - 1) - 1) / s.SH + 1);
  s.WO = (int)((W + 2 * s.PW - s.DW * (KW - 1) - 1) / s.SW + 1);
  TORCH_CHECK(s.HO > 0 && s.WO > 0, "sf24_conv2d: empty output");
  TORCH_CHECK(x.numel() < (int64_t(1) << 31), "sf24_conv2d: input too large for 32-bit spatial indices");
  if (bias) TORCH_CHECK(bias->numel() == O && bias->scalar_type() == x_in.scalar_type(), "sf24_conv2d: bad bias");
  const auto b = bias ? c10::optional<at::Tensor>(bias->contiguous()) : c10::nullopt;
  auto y = at::empty({N, O, s.HO, s.WO}, x_in.options().memory_format(at::MemoryFormat::ChannelsLast));
  sf::Sf24GemmArgs a;
  a.meta = reinterpret_cast<const uint32_t*>(meta.data_ptr<int32_t>());
  a.R = O;
  a.Rp = vals.size(0);
  a.Cp = vals.size(1) * 2;
  a.M = N * s.HO * s.WO;
  a.K = KH * KW * C;
  a.is_conv = 1;
  a.conv = s;
  a.ldo = O;
  run_gemm(a, x, vals, vals_lo, y, b, path, c10::cuda::getCurrentCUDAStream().stream());
  return y;
}

// ---------------------------------------------------------------------------------------------
// SFCSR
// ---------------------------------------------------------------------------------------------
// yT (R x ldm) = W_csr (R x C) @ xT (C x ldm)[:, :M] (+ bias)
at::Tensor csr_spmm(const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& vals,
                    const at::Tensor& row_order, int64_t C, const at::Tensor& xT, int64_t M,
                    const c10::optional<at::Tensor>& bias) {
  check_cuda(xT, "xT");
  check_same_device(row_ptr, xT, "row_ptr", "xT");
  check_same_device(col, xT, "col", "xT");
  check_same_device(vals, xT, "vals", "xT");
  check_same_device(row_order, xT, "row_order", "xT");
  check_same_device(bias, xT, "bias", "xT");
  const int64_t R = row_order.numel();
  TORCH_CHECK(row_ptr.numel() == R + 1 && row_ptr.scalar_type() == at::kInt && row_order.scalar_type() == at::kInt &&
                  col.scalar_type() == at::kShort && vals.scalar_type() == xT.scalar_type(),
              "csr_spmm: bad CSR buffers");
  TORCH_CHECK(xT.dim() == 2 && xT.size(0) == C && xT.is_contiguous() && xT.size(1) % 8 == 0 && xT.size(1) >= M &&
                  aligned16(xT),
              "csr_spmm: xT must be a contiguous (C x ldm) tensor with ldm % 8 == 0");
  if (bias) TORCH_CHECK(bias->numel() == R && bias->scalar_type() == xT.scalar_type(), "csr_spmm: bad bias");
  // csr.cu launches ceil(M / (32 lanes * one 16-byte vector)) blocks along grid.y (at most 65535)
  const int64_t cols_per_block = 32 * (16 / xT.element_size());
  TORCH_CHECK(M >= 0 && (M + cols_per_block - 1) / cols_per_block <= 65535, "csr_spmm: M = ", M,
              " dense columns exceed the kernel's grid limit of ", 65535 * cols_per_block, " for ", xT.scalar_type());
  c10::cuda::CUDAGuard guard(xT.device());
  const auto b = bias ? c10::optional<at::Tensor>(bias->contiguous()) : c10::nullopt;
  auto yT = at::empty({R, xT.size(1)}, xT.options());
  check(sf::csr_spmm(to_dt(xT), row_ptr.data_ptr<int32_t>(), reinterpret_cast<const uint16_t*>(col.data_ptr<int16_t>()),
                     vals.data_ptr(), row_order.data_ptr<int32_t>(), R, C, xT.data_ptr(), M, xT.size(1),
                     b ? b->data_ptr() : nullptr, yT.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()),
        "csr_spmm");
  return yT;
}

// out (R x C) dense, zero except at the stored positions: out[r, c] = aT[r, :M] . bT[c, :M]
at::Tensor csr_sddmm(const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& row_order, int64_t C,
                     const at::Tensor& aT, const at::Tensor& bT, int64_t M) {
  check_cuda(aT, "aT");
  check_same_device(row_ptr, aT, "row_ptr", "aT");
  check_same_device(col, aT, "col", "aT");
  check_same_device(row_order, aT, "row_order", "aT");
  check_same_device(bT, aT, "bT", "aT");
  const int64_t R = row_order.numel();
  TORCH_CHECK(row_ptr.numel() == R + 1 && col.scalar_type() == at::kShort, "csr_sddmm: bad CSR buffers");
  TORCH_CHECK(aT.dim() == 2 && bT.dim() == 2 && aT.size(0) == R && bT.size(0) == C && aT.size(1) == bT.size(1) &&
                  aT.is_contiguous() && bT.is_contiguous() && aT.size(1) % 8 == 0 && aligned16(aT) && aligned16(bT) &&
                  aT.scalar_type() == bT.scalar_type(),
              "csr_sddmm: aT (R x ldm) and bT (C x ldm) must be contiguous with ldm % 8 == 0");
  c10::cuda::CUDAGuard guard(aT.device());
  auto out = at::zeros({R, C}, aT.options());
  check(sf::csr_sddmm(to_dt(aT), row_ptr.data_ptr<int32_t>(), reinterpret_cast<const uint16_t*>(col.data_ptr<int16_t>()),
                      row_order.data_ptr<int32_t>(), R, C, aT.data_ptr(), bT.data_ptr(), M, aT.size(1), out.data_ptr(),
                      c10::cuda::getCurrentCUDAStream().stream()),
        "csr_sddmm");
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparsefast CUDA kernels (2:4 sparse tensor cores, unstructured SpMM/SDDMM)";
  m.def("sf24_pack", &sf24_pack, "dense (R, C) + bool mask -> (vals (Rp, Cp/2), meta int32) SF24");
  m.def("sf24_unpack", &sf24_unpack, "SF24 -> dense (R, C)");
  m.def("sf24_linear", &sf24_linear, "y = x @ W^T (+ bias) with W in SF24; path 0 = mma.sp, 1 = wgmma.sp (sm_90a)",
        py::arg("x"), py::arg("vals"), py::arg("vals_lo"), py::arg("meta"), py::arg("R"), py::arg("bias"),
        py::arg("path") = 0);
  m.def("sf24_conv2d", &sf24_conv2d, "2:4 conv2d forward (NHWC implicit GEMM); path as sf24_linear", py::arg("x"),
        py::arg("vals"), py::arg("vals_lo"), py::arg("meta"), py::arg("O"), py::arg("KH"), py::arg("KW"),
        py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::arg("bias"), py::arg("path") = 0);
  m.def("csr_spmm", &csr_spmm, "yT = W_csr @ xT (+ bias)");
  m.def("csr_sddmm", &csr_sddmm, "masked dense dW at the CSR positions");
  m.attr("ABI_VERSION") = 1;  // must equal ABI_VERSION in sparsefast/_build_cuda.py
  m.attr("META_ROW_PAD") = sf::kRowPad;
  m.attr("META_COL_PAD") = sf::kColPad;
}
