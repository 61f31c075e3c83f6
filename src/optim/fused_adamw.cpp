// libtorch's fused AdamW (at::_fused_adamw_) for one parameter buffer, which tch does not
// bind (its generator leaves out every _fused_adam* operator). The tensors are tch's:
// a tch Tensor wraps a pointer to an at::Tensor.
//
// Errors do not cross into Rust as C++ exceptions: the call returns 1 and writes the
// message (cut to fit, NUL-terminated) into the caller's buffer; 0 on success.
#include <ATen/core/Tensor.h>
#include <ATen/ops/_fused_adamw.h>

#include <cstddef>
#include <cstring>
#include <exception>
#include <optional>

namespace {
int failed(const char* what, char* error, std::size_t error_len) {
    if (error_len > 0) {
        std::strncpy(error, what, error_len - 1);
        error[error_len - 1] = '\0';
    }
    return 1;
}

std::optional<at::Tensor> maybe(const at::Tensor* t) {
    return t == nullptr ? std::nullopt : std::optional<at::Tensor>(*t);
}
}  // namespace

// One AdamW update of `param` in place (amsgrad and maximize off), libtorch's fused
// kernel for the tensors' device. `step` (f32) holds the 1-based step the bias correction
// uses and is only read. `grad_scale` (f32, may be null) divides the gradient, which is
// then stored back; when `found_inf` (f32, may be null) holds 1 nothing is written.
extern "C" int algpt2_fused_adamw(const at::Tensor* param, const at::Tensor* grad, const at::Tensor* exp_avg,
                                    const at::Tensor* exp_avg_sq, const at::Tensor* step, double lr, double beta1,
                                    double beta2, double weight_decay, double eps, const at::Tensor* grad_scale,
                                    const at::Tensor* found_inf, char* error, std::size_t error_len) {
    try {
        at::_fused_adamw_({*param}, {*grad}, {*exp_avg}, {*exp_avg_sq}, {}, {*step}, lr, beta1, beta2, weight_decay, eps,
                          /*amsgrad=*/false, /*maximize=*/false, maybe(grad_scale), maybe(found_inf));
        return 0;
    } catch (const std::exception& e) {
        return failed(e.what(), error, error_len);
    } catch (...) {
        return failed("at::_fused_adamw_ threw a non-standard exception", error, error_len);
    }
}
