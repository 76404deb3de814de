// Native forward and backward of the margin losses (AM-Softmax, ArcFace, L-Softmax) on CPU.
//
// The maths is the same as lossbank/_kernels.py's _CosineMarginCE and _LSoftmaxCE, which
// stay the reference and the fallback (GPU, no compiler at install time). Why C++ at all:
// at few classes a training step is a few dozen small tensor operations, and from Python
// each costs several µs of dispatch, which made these losses twice as slow as a plain
// linear layer + cross-entropy. Here the heavy parts are still ATen calls (norms, matrix
// products, log-softmax), but the per-sample target-column arithmetic is one loop and the
// whole step is one autograd node.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

namespace py = pybind11;
using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr double kEps = 1e-12;  // the norm floor of _kernels.EPS
constexpr int64_t kRowGrain = 64;
constexpr double kPi = 3.14159265358979323846;

enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };
const char* const kReductionNames[] = {"none", "mean", "sum"};

int64_t reduction_code(const std::string& reduction) {
  if (reduction == "none") return kNone;
  if (reduction == "mean") return kMean;
  if (reduction == "sum") return kSum;
  TORCH_CHECK(false, "reduction must be one of 'mean', 'sum', 'none'; got '", reduction, "'");
}

// backward(create_graph=True) — a gradient penalty, a meta-gradient — needs a gradient that can
// itself be differentiated. The written-out backwards below compute from values saved by the
// forward, so in that case the gradient is taken instead by autograd through the PyTorch forward of
// the same loss (lossbank._kernels._native_gradients_with_graph), which records its graph.
// The ordinary backward never comes here.
variable_list gradients_with_graph(AutogradContext* ctx, const char* kernel, const Tensor& grad_loss,
                                   const py::tuple& args) {
  auto saved = ctx->get_saved_variables();  // features, weight, target: the inputs, with their history
  py::object fn = py::module_::import("lossbank._kernels").attr("_native_gradients_with_graph");
  py::tuple grads = fn(kernel, saved[0], saved[1], saved[2], grad_loss,
                       py::make_tuple(ctx->needs_input_grad(0), ctx->needs_input_grad(1)), args);
  auto tensor_or_none = [](py::handle h) { return h.is_none() ? Tensor() : h.cast<Tensor>(); };
  return {tensor_or_none(grads[0]), tensor_or_none(grads[1]), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
}

// 1 / max(‖row‖, eps) for each row of a (rows, D) matrix, as a (rows, 1) column.
Tensor inverse_row_norms(const Tensor& m) {
  return at::linalg_vector_norm(m, 2, {1}, /*keepdim=*/true, c10::nullopt).clamp_min_(kEps).reciprocal_();
}

// d loss_i / d loss as one factor per row: grad_loss itself ('none'), or shared ('mean', 'sum').
template <typename scalar_t>
std::vector<scalar_t> row_factors(const Tensor& grad_loss, int64_t rows, int64_t reduction, double extra) {
  std::vector<scalar_t> g(rows);
  if (reduction == kNone) {
    auto acc = grad_loss.contiguous();
    const scalar_t* p = acc.data_ptr<scalar_t>();
    for (int64_t i = 0; i < rows; ++i) g[i] = p[i] * static_cast<scalar_t>(extra);
  } else {
    double v = grad_loss.item<double>() * extra;
    if (reduction == kMean && rows > 0) v /= static_cast<double>(rows);
    std::fill(g.begin(), g.end(), static_cast<scalar_t>(v));
  }
  return g;
}

// ---------------------------------------------------------------- AM-Softmax and ArcFace
// Cross-entropy over s·cos θ_j with the target's cos θ_y replaced by t(cos θ_y):
// AM-Softmax t(c) = c − m; ArcFace t(c) = cos(θ + m), or c − m·sin m where θ + m > π.
struct CosineMarginCE : public torch::autograd::Function<CosineMarginCE> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input_features, const Tensor& input_weight,
                               Tensor target, double scale, double margin, bool arc, int64_t reduction) {
    // The inputs themselves are saved (not contiguous copies): a create_graph backward differentiates through them.
    const Tensor features = input_features.contiguous(), weight = input_weight.contiguous();
    target = target.contiguous();
    const int64_t rows = features.size(0), classes = weight.size(0);
    Tensor rx = inverse_row_norms(features);
    Tensor rw = inverse_row_norms(weight);
    Tensor unit_w = weight * rw;
    Tensor cos = at::mm(features, unit_w.t()).mul_(rx);
    Tensor plain = cos * scale;  // margin-free logits, for prediction
    Tensor logits = plain.clone();
    Tensor slope = at::empty({rows}, features.options());  // dt / d cos θ_y
    const double cos_m = std::cos(margin), sin_m = std::sin(margin), threshold = std::cos(kPi - margin);
    AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "cosine_margin_ce_forward", [&] {
      const int64_t* y = target.data_ptr<int64_t>();
      const scalar_t* c = cos.data_ptr<scalar_t>();
      scalar_t* z = logits.data_ptr<scalar_t>();
      scalar_t* dt = slope.data_ptr<scalar_t>();
      at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          double cy = static_cast<double>(c[i * classes + y[i]]), t, d = 1.0;
          if (!arc) {
            t = cy - margin;
          } else {
            cy = std::min(1.0, std::max(-1.0, cy));
            const double sin_sq = 1.0 - cy * cy, sin = std::sqrt(std::max(sin_sq, kEps));
            if (cy > threshold) {
              t = cy * cos_m - sin * sin_m;
              // at cos θ = ±1 exactly sin θ = 0 and the slope of sin θ is taken as 0
              d = cos_m + (sin_sq > kEps ? sin_m * cy / sin : 0.0);
            } else {
              t = cy - margin * sin_m;
            }
          }
          z[i * classes + y[i]] = static_cast<scalar_t>(scale * t);
          dt[i] = static_cast<scalar_t>(d);
        }
      });
    });
    Tensor logp = at::log_softmax(logits, 1);
    Tensor loss = at::nll_loss(logp, target, {}, reduction, -100);
    ctx->save_for_backward({input_features, input_weight, target, unit_w, rx, rw, cos, logp, slope});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["margin"] = margin;
    ctx->saved_data["arc"] = arc;
    ctx->saved_data["reduction"] = reduction;
    ctx->mark_non_differentiable({plain});
    return {loss, plain};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const double scale = ctx->saved_data["scale"].toDouble();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    if (at::GradMode::is_enabled()) {
      py::gil_scoped_acquire gil;
      return gradients_with_graph(ctx, "cosine_margin_ce", grad_outputs[0],
                                  py::make_tuple(scale, ctx->saved_data["margin"].toDouble(),
                                                 ctx->saved_data["arc"].toBool(), kReductionNames[reduction]));
    }
    auto saved = ctx->get_saved_variables();
    Tensor features = saved[0], target = saved[2], unit_w = saved[3], rx = saved[4], rw = saved[5], cos = saved[6],
           logp = saved[7], slope = saved[8];
    const int64_t rows = cos.size(0), classes = cos.size(1);
    // g_ij = d loss / d cos_ij = s · grad_i · (softmax_ij − [j = y_i]), times dt/dc at j = y_i;
    // then cos_ij = x_i·ŵ_j / ‖x_i‖ gives, with one matrix product per input,
    //   dL/dx_i = (Σ_j g_ij ŵ_j − (Σ_j g_ij cos_ij) x_i / ‖x_i‖) / ‖x_i‖
    //   dL/dw_j = (Σ_i g_ij x_i / ‖x_i‖ − (Σ_i g_ij cos_ij) ŵ_j) / ‖w_j‖
    Tensor grad = logp.exp();
    Tensor weighted = at::empty_like(grad);
    Tensor row_coef = at::empty({rows, 1}, grad.options());
    AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "cosine_margin_ce_backward", [&] {
      const auto factor = row_factors<scalar_t>(grad_outputs[0], rows, reduction, scale);
      const int64_t* y = target.data_ptr<int64_t>();
      const scalar_t* c = cos.data_ptr<scalar_t>();
      const scalar_t* r = rx.data_ptr<scalar_t>();
      const scalar_t* dt = slope.data_ptr<scalar_t>();
      scalar_t* g = grad.data_ptr<scalar_t>();
      scalar_t* wgt = weighted.data_ptr<scalar_t>();
      scalar_t* coef = row_coef.data_ptr<scalar_t>();
      at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          scalar_t* gi = g + i * classes;
          const scalar_t* ci = c + i * classes;
          scalar_t* wi = wgt + i * classes;
          const scalar_t f = factor[i], ri = r[i];
          gi[y[i]] -= scalar_t(1);
          gi[y[i]] *= dt[i];
          scalar_t sum = 0;
          for (int64_t j = 0; j < classes; ++j) {
            const scalar_t v = gi[j] * f;
            wi[j] = v * ci[j];
            sum += wi[j];
            gi[j] = v * ri;
          }
          coef[i] = sum * ri * ri;
        }
      });
    });
    Tensor grad_features, grad_weight;
    if (ctx->needs_input_grad(0)) {
      grad_features = at::mm(grad, unit_w).addcmul_(features, row_coef, -1.0);
    }
    if (ctx->needs_input_grad(1)) {
      grad_weight = at::mm(grad.t(), features).addcmul_(unit_w, weighted.sum(0).unsqueeze(1), -1.0).mul_(rw);
    }
    return {grad_features, grad_weight, Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// ---------------------------------------------------------------- L-Softmax
// ψ(θ) = (−1)^k cos(mθ) − 2k and dψ/d cos θ, given c = cos θ: cos(mθ) = T_m(c) and
// dT_m/dc = m·U_{m−1}(c) (Chebyshev recurrences); the piece k from c against cos(jπ/m).
void psi_and_slope(double c, int64_t m, double* psi, double* slope) {
  if (m == 1) {
    *psi = c;
    *slope = 1.0;
    return;
  }
  double t_prev = 1.0, t_cur = c, u_prev = 1.0, u_cur = 2.0 * c;
  for (int64_t n = 1; n < m; ++n) {
    const double t_next = 2.0 * c * t_cur - t_prev;
    t_prev = t_cur;
    t_cur = t_next;
    if (n < m - 1) {
      const double u_next = 2.0 * c * u_cur - u_prev;
      u_prev = u_cur;
      u_cur = u_next;
    }
  }
  int64_t below = 0;  // how many of cos(jπ/m), j = 1 .. m−1, lie strictly below c
  for (int64_t j = 1; j < m; ++j) below += std::cos(j * kPi / m) < c;
  const int64_t k = m - 1 - below;
  const double sign = (k % 2) ? -1.0 : 1.0;
  *psi = sign * t_cur - 2.0 * k;
  *slope = sign * m * u_cur;
}

// ψ and its slope for each element of a tensor of cos θ in [−1, 1]: what the forward below computes
// per sample, exposed so that lossbank.functional.l_softmax_psi (and its tests) use this code on CPU.
std::vector<Tensor> l_softmax_psi(const Tensor& cos, int64_t margin) {
  TORCH_CHECK(cos.device().is_cpu(), "l_softmax_psi: the C++ kernels take CPU tensors");
  const Tensor c = cos.contiguous();
  Tensor psi = at::empty_like(c), slope = at::empty_like(c);
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "l_softmax_psi", [&] {
    const scalar_t* ci = c.data_ptr<scalar_t>();
    scalar_t *p = psi.data_ptr<scalar_t>(), *s = slope.data_ptr<scalar_t>();
    for (int64_t i = 0; i < c.numel(); ++i) {
      double ps, sl;
      psi_and_slope(static_cast<double>(ci[i]), margin, &ps, &sl);
      p[i] = static_cast<scalar_t>(ps);
      s[i] = static_cast<scalar_t>(sl);
    }
  });
  return {psi, slope};
}

// Cross-entropy over W x with the target logit (λ·W_y·x + ‖W_y‖‖x‖ψ(θ_y)) / (1 + λ).
struct LSoftmaxCE : public torch::autograd::Function<LSoftmaxCE> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input_features, const Tensor& input_weight,
                               Tensor target, int64_t margin, double lambda, int64_t reduction) {
    // The inputs themselves are saved (not contiguous copies): a create_graph backward differentiates through them.
    const Tensor features = input_features.contiguous(), weight = input_weight.contiguous();
    target = target.contiguous();
    const int64_t rows = features.size(0), classes = weight.size(0);
    Tensor x_norm = at::linalg_vector_norm(features, 2, {1}, false, c10::nullopt);
    Tensor w_norm = at::linalg_vector_norm(weight, 2, {1}, false, c10::nullopt);
    Tensor plain = at::mm(features, weight.t());  // margin-free logits W x, for prediction
    Tensor logits = plain.clone();
    Tensor cos = at::empty({rows}, features.options());
    Tensor psi = at::empty_like(cos), slope = at::empty_like(cos);
    AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "l_softmax_ce_forward", [&] {
      const int64_t* y = target.data_ptr<int64_t>();
      const scalar_t* xn = x_norm.data_ptr<scalar_t>();
      const scalar_t* wn = w_norm.data_ptr<scalar_t>();
      scalar_t* z = logits.data_ptr<scalar_t>();
      scalar_t *c = cos.data_ptr<scalar_t>(), *p = psi.data_ptr<scalar_t>(), *s = slope.data_ptr<scalar_t>();
      at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const double dot = z[i * classes + y[i]], n = static_cast<double>(xn[i]) * wn[y[i]];
          const double ci = std::min(1.0, std::max(-1.0, dot / std::max(n, kEps)));
          double ps, sl;
          psi_and_slope(ci, margin, &ps, &sl);
          z[i * classes + y[i]] = static_cast<scalar_t>((n * ps + lambda * dot) / (1.0 + lambda));
          c[i] = static_cast<scalar_t>(ci);
          p[i] = static_cast<scalar_t>(ps);
          s[i] = static_cast<scalar_t>(sl);
        }
      });
    });
    Tensor logp = at::log_softmax(logits, 1);
    Tensor loss = at::nll_loss(logp, target, {}, reduction, -100);
    ctx->save_for_backward({input_features, input_weight, target, x_norm, w_norm, cos, psi, slope, logp});
    ctx->saved_data["margin"] = margin;
    ctx->saved_data["lambda"] = lambda;
    ctx->saved_data["reduction"] = reduction;
    ctx->mark_non_differentiable({plain});
    return {loss, plain};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const double lambda = ctx->saved_data["lambda"].toDouble();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    if (at::GradMode::is_enabled()) {
      py::gil_scoped_acquire gil;
      return gradients_with_graph(ctx, "l_softmax_ce", grad_outputs[0],
                                  py::make_tuple(ctx->saved_data["margin"].toInt(), lambda, kReductionNames[reduction]));
    }
    auto saved = ctx->get_saved_variables();
    Tensor features = saved[0], weight = saved[1], target = saved[2], x_norm = saved[3], w_norm = saved[4],
           cos = saved[5], psi = saved[6], slope = saved[7], logp = saved[8];
    const int64_t rows = logp.size(0), classes = logp.size(1);
    // The target logit depends on d = W_y·x and n = ‖W_y‖‖x‖ (cos θ_y = d / n):
    //   ∂/∂d = (λ + ψ'(c)) / (1 + λ), ∂/∂n = (ψ(c) − c·ψ'(c)) / (1 + λ),
    // so the gradient is the linear layer's with the target column rescaled, plus ∂/∂n along
    // x (∂n/∂x = ‖W_y‖ x / ‖x‖) and along W_y (∂n/∂W_y = ‖x‖ W_y / ‖W_y‖).
    Tensor grad = logp.exp();
    Tensor x_coef = at::empty({rows, 1}, grad.options());
    Tensor w_coef = at::zeros({classes, 1}, grad.options());
    AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "l_softmax_ce_backward", [&] {
      const auto factor = row_factors<scalar_t>(grad_outputs[0], rows, reduction, 1.0);
      const int64_t* y = target.data_ptr<int64_t>();
      const scalar_t *xn = x_norm.data_ptr<scalar_t>(), *wn = w_norm.data_ptr<scalar_t>();
      const scalar_t *c = cos.data_ptr<scalar_t>(), *p = psi.data_ptr<scalar_t>(), *s = slope.data_ptr<scalar_t>();
      scalar_t* g = grad.data_ptr<scalar_t>();
      scalar_t* xc = x_coef.data_ptr<scalar_t>();
      std::vector<scalar_t> grad_n(rows);
      at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          scalar_t* gi = g + i * classes;
          const scalar_t f = factor[i];
          for (int64_t j = 0; j < classes; ++j) gi[j] *= f;
          const scalar_t grad_y = gi[y[i]] - f;
          gi[y[i]] = (s[i] + lambda) * grad_y / (1.0 + lambda);
          grad_n[i] = (p[i] - c[i] * s[i]) * grad_y / (1.0 + lambda);
          xc[i] = grad_n[i] * wn[y[i]] / std::max(static_cast<double>(xn[i]), kEps);
        }
      });
      scalar_t* wc = w_coef.data_ptr<scalar_t>();
      for (int64_t i = 0; i < rows; ++i) wc[y[i]] += grad_n[i] * xn[i];
      for (int64_t j = 0; j < classes; ++j) wc[j] /= std::max(static_cast<double>(wn[j]), kEps);
    });
    Tensor grad_features, grad_weight;
    if (ctx->needs_input_grad(0)) grad_features = at::mm(grad, weight).addcmul_(features, x_coef);
    if (ctx->needs_input_grad(1)) grad_weight = at::mm(grad.t(), features).addcmul_(weight, w_coef);
    return {grad_features, grad_weight, Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::vector<Tensor> cosine_margin_ce(const Tensor& features, const Tensor& weight, const Tensor& target, double scale,
                                     double margin, bool arc, const std::string& reduction) {
  return CosineMarginCE::apply(features, weight, target, scale, margin, arc, reduction_code(reduction));
}

std::vector<Tensor> l_softmax_ce(const Tensor& features, const Tensor& weight, const Tensor& target, int64_t margin,
                                 double lambda, const std::string& reduction) {
  return LSoftmaxCE::apply(features, weight, target, margin, lambda, reduction_code(reduction));
}

// λ as a 0-d tensor: under torch.compile LSoftmax computes it in the graph, since a Python float
// would be guarded on and λ changes every step.
std::vector<Tensor> l_softmax_ce_tensor_lambda(const Tensor& features, const Tensor& weight, const Tensor& target,
                                               int64_t margin, const Tensor& lambda, const std::string& reduction) {
  return l_softmax_ce(features, weight, target, margin, lambda.item<double>(), reduction);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Native CPU forward and backward of lossbank's margin losses (see lossbank/_kernels.py).";
  m.def("cosine_margin_ce", &cosine_margin_ce, "(loss, s·cos θ) of AM-Softmax (arc=False) or ArcFace (arc=True)");
  m.def("l_softmax_ce", &l_softmax_ce, "(loss, W x) of L-Softmax with the λ blend");
  m.def("l_softmax_ce", &l_softmax_ce_tensor_lambda, "(loss, W x) of L-Softmax with the λ blend, λ a 0-d tensor");
  m.def("l_softmax_psi", &l_softmax_psi, "(ψ, dψ/d cos θ) of L-Softmax for each cos θ in [−1, 1]");
}
