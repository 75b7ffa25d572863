// patch_pixel_loss on CPU: the per-patch normalized pixel MSE and the border term, forward and
// backward, as torch.ops.pacofr_native.patch_pixel_loss_{forward,forward_with_grad,backward}.
//
// Both terms depend on a patch only through r = pred - (target - mean) / std (the normalized
// residual): the MSE is mean(r^2), and a border pair's error is u_b - u_a on the shared line,
// u = std * r. So each patch is read once (phase 1): its target statistics, r, its MSE and, when
// asked, the pixel term of the gradient, keeping r on its four border lines. Phase 2 then works
// on those lines only: the border errors, the border term's loss and its gradient added on the
// lines. Threads take (batch, patch row) ranges; every per-patch value is computed the same way
// whatever the split and the sums over patches are serial, so results do not depend on threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

// The per-patch loops are built for x86-64-v4 (AVX-512) and v3 (AVX2, FMA) beside the portable
// baseline, and the loader picks one for the CPU (the build itself stays -march free). The
// helpers are inlined into each so that they get its instruction set too.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PER_ISA __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PER_ISA
#endif
#define INLINE inline __attribute__((always_inline))

struct Geometry {
  int64_t B, C, H, W, p, gh, gw;
  int64_t L() const { return gh * gw; }
  int64_t line() const { return p * C; }          // pixels of one border line
  int64_t P() const { return p * p * C; }          // pixels of one patch
  int64_t rows() const { return B * gh; }          // the units threads share
};

Geometry geometry(const at::Tensor& pred, const at::Tensor& images, const at::Tensor& weight, int64_t p) {
  TORCH_CHECK(images.dim() == 4 && p >= 1 && images.size(2) % p == 0 && images.size(3) % p == 0,
              "patch_pixel_loss: images must be [B, C, H, W] with H, W divisible by ", p);
  Geometry g{images.size(0), images.size(1), images.size(2), images.size(3), p, images.size(2) / p,
             images.size(3) / p};
  TORCH_CHECK(pred.dim() == 3 && pred.size(0) == g.B && pred.size(1) == g.L() && pred.size(2) == g.P(),
              "patch_pixel_loss: pred must be [B, L, p*p*C]");
  TORCH_CHECK(weight.numel() == g.B * g.L(), "patch_pixel_loss: weight must be [B, L]");
  return g;
}

// What a pass computes besides the losses: the gradient's factors (d/dr of the pixel term is
// pix * w * r; a border pair adds sc * pw * (u_b - u_a) * std to b's line and takes it from a's)
struct Grad {
  float pix = 0.f, sc = 0.f;
};

INLINE float sum(const float* a, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) s += a[k];
  return s;
}

INLINE float sum_sq_dev(const float* a, float m, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) s += (a[k] - m) * (a[k] - m);
  return s;
}

// r = x - (t - m) / s into `r`; returns sum(r^2)
INLINE float residual(const float* x, const float* t, float m, float inv_s, float* r, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) {
    r[k] = x[k] - (t[k] - m) * inv_s;
    s += r[k] * r[k];
  }
  return s;
}

template <typename T>
INLINE void scaled_store(const float* r, float f, T* out, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) out[k] = static_cast<T>(r[k] * f);
}

// The image patch (gr, gc) of sample b in pred's (row, column, channel) order, as floats.
template <typename I>
INLINE void gather_target(const I* img, const Geometry& g, int64_t b, int64_t gr, int64_t gc, float* t) {
  const int64_t C = g.C, p = g.p, plane = g.H * g.W;
  const I* origin = img + (b * C * g.H + gr * p) * g.W + gc * p;
  if (C == 3) {  // RGB: the interleaving with a constant stride, which the compiler vectorizes
    for (int64_t i = 0; i < p; ++i) {
      const I* r0 = origin + i * g.W;
      const I* r1 = r0 + plane;
      const I* r2 = r1 + plane;
      float* dst = t + i * p * 3;
      for (int64_t j = 0; j < p; ++j) {
        dst[3 * j] = static_cast<float>(r0[j]);
        dst[3 * j + 1] = static_cast<float>(r1[j]);
        dst[3 * j + 2] = static_cast<float>(r2[j]);
      }
    }
    return;
  }
  for (int64_t ch = 0; ch < C; ++ch)
    for (int64_t i = 0; i < p; ++i) {
      const I* row = origin + ch * plane + i * g.W;
      float* dst = t + i * p * C + ch;
      for (int64_t j = 0; j < p; ++j) dst[j * C] = static_cast<float>(row[j]);
    }
}

// Border lines of a patch, kept per patch as [4][p*C]: the top and bottom rows (by column,
// channel), the left and right columns (by row, channel).
enum Line { kTop = 0, kBottom = 1, kLeft = 2, kRight = 3 };

template <typename F>
INLINE void for_line(const Geometry& g, Line e, F f) {  // f(index along the line, offset in the patch)
  const int64_t C = g.C, p = g.p;
  // along a row, or down a column
  const int64_t first = e == kBottom ? (p - 1) * p * C : e == kRight ? (p - 1) * C : 0;
  const int64_t step = e == kTop || e == kBottom ? C : p * C;
  for (int64_t pos = 0; pos < p; ++pos)
    for (int64_t ch = 0; ch < C; ++ch) f(pos * C + ch, first + pos * step + ch);
}

struct Pass {
  Geometry g;
  bool norm_pix;
  float eps;
  const float* w;         // [B*L]
  const float* stats_in;  // [2, B*L] or null: computed here, into stats_out
  float* stats_out;
  float* mse;             // [B*L] mean(r^2) per patch
  float* sc;              // [B*L] weighted border error of the pairs with the left and the upper neighbour
  float* lines;           // [B*L, 4, p*C] r on the border lines
  Grad grad;
};

// Phase 1 over the patches of rows [begin, end) of (batch, patch row).
template <typename P, typename I, typename O>
PER_ISA void patches(const Pass& s, const P* pred, const I* img, O* out, int64_t begin, int64_t end) {
  const Geometry& g = s.g;
  const int64_t n = g.P(), BL = g.B * g.L(), line = g.line();
  std::vector<float> t(n), r(n), xbuf(std::is_same_v<P, float> ? 0 : n);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t b = row / g.gh, gr = row % g.gh;
    for (int64_t gc = 0; gc < g.gw; ++gc) {
      const int64_t q = row * g.gw + gc;
      gather_target(img, g, b, gr, gc, t.data());
      float m = 0.f, sd = 1.f;
      if (s.stats_in) {
        m = s.stats_in[q];
        sd = s.stats_in[BL + q];
      } else if (s.norm_pix) {
        m = sum(t.data(), n) / n;
        // unbiased variance (n - 1), as the reference
        sd = std::sqrt(sum_sq_dev(t.data(), m, n) / (n - 1) + s.eps);
      }
      if (s.stats_out) {
        s.stats_out[q] = m;
        s.stats_out[BL + q] = sd;
      }
      const float* x;
      if constexpr (std::is_same_v<P, float>) {
        x = pred + q * n;
      } else {
        for (int64_t k = 0; k < n; ++k) xbuf[k] = static_cast<float>(pred[q * n + k]);
        x = xbuf.data();
      }
      s.mse[q] = residual(x, t.data(), m, 1.f / sd, r.data(), n) / n;
      if (out) scaled_store(r.data(), s.grad.pix * s.w[q], out + q * n, n);
      float* lq = s.lines + q * 4 * line;
      for (int e = 0; e < 4; ++e)
        for_line(g, Line(e), [&](int64_t k, int64_t off) { lq[e * line + k] = r[off]; });
    }
  }
}

// sum over a pair's line of (u_b - u_a)^2, u = std * r; with `c`, also adds f * (u_b - u_a)
// to c (a line of border terms)
INLINE float pair(const float* rb, float sb, const float* ra, float sa, float* c, float f, int64_t line) {
  float sum = 0.f;
  if (c) {
#pragma omp simd reduction(+ : sum)
    for (int64_t k = 0; k < line; ++k) {
      const float d = rb[k] * sb - ra[k] * sa;
      sum += d * d;
      c[k] += f * d;
    }
  } else {
#pragma omp simd reduction(+ : sum)
    for (int64_t k = 0; k < line; ++k) {
      const float d = rb[k] * sb - ra[k] * sa;
      sum += d * d;
    }
  }
  return sum;
}

// A patch's four lines of the gradient: the pixel term f * r plus the border terms c (both
// [4, p*C]), a corner taking those of its row and of its column, rounded to O once. `row`: p*C
// floats of scratch.
template <typename O>
INLINE void write_lines(const Geometry& g, float f, const float* r, float* c, O* out, float* row) {
  const int64_t C = g.C, p = g.p, line = g.line();
  const float* c_left = c + kLeft * line;
  const float* c_right = c + kRight * line;
  if (p == 1)  // one row, the top and the bottom one
    for (int64_t k = 0; k < line; ++k) c[kTop * line + k] += c[kBottom * line + k];
  for (const Line e : {kTop, kBottom}) {
    if (e == kBottom && p == 1) break;
    const int64_t i = e == kTop ? 0 : p - 1;
    const float* re = r + e * line;
    const float* ce = c + e * line;
#pragma omp simd
    for (int64_t k = 0; k < line; ++k) row[k] = f * re[k] + ce[k];
    for (int64_t ch = 0; ch < C; ++ch) {
      row[ch] += c_left[i * C + ch];
      row[(p - 1) * C + ch] += c_right[i * C + ch];
    }
    O* o = out + i * line;
#pragma omp simd
    for (int64_t k = 0; k < line; ++k) o[k] = static_cast<O>(row[k]);
  }
  for (const Line e : {kLeft, kRight}) {
    const int64_t j = e == kLeft ? 0 : p - 1;
    for (int64_t i = 1; i < p - 1; ++i)
      for (int64_t ch = 0; ch < C; ++ch)
        out[(i * p + j) * C + ch] = static_cast<O>(f * r[e * line + i * C + ch] + c[e * line + i * C + ch]);
  }
}

// Phase 2 over the patches of rows [begin, end): each patch's pairs with its left and upper
// neighbour (the border loss, stored with the patch), and with `out` the gradient on its four
// lines (write_lines).
template <typename O>
PER_ISA void borders(const Pass& s, O* out, int64_t begin, int64_t end) {
  const Geometry& g = s.g;
  const int64_t BL = g.B * g.L(), line = g.line(), n = g.P();
  const float* sd = s.stats_out ? s.stats_out + BL : s.stats_in + BL;
  auto lines = [&](int64_t q) { return s.lines + q * 4 * line; };
  std::vector<float> terms(out ? 4 * line : 0), scratch(line);
  float* c = out ? terms.data() : nullptr;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t gr = row % g.gh;
    for (int64_t gc = 0; gc < g.gw; ++gc) {
      const int64_t q = row * g.gw + gc;
      if (c) std::fill(terms.begin(), terms.end(), 0.f);
      // a pair's error is u_b - u_a, b right of or below a: its gradient adds on b's line and
      // takes from a's; the loss counts each pair once, with b
      float part = 0.f;
      auto with = [&](int64_t b, Line eb, int64_t a, Line ea, bool q_is_b) {
        const float pw = std::max(s.w[a], s.w[b]);
        float* cq = c ? c + (q_is_b ? eb : ea) * line : nullptr;
        const float e2 = pair(lines(b) + eb * line, sd[b], lines(a) + ea * line, sd[a], cq,
                              (q_is_b ? 1.f : -1.f) * s.grad.sc * pw * sd[q], line);
        if (q_is_b) part += pw * e2 / line;
      };
      if (gc > 0) with(q, kLeft, q - 1, kRight, true);
      if (gr > 0) with(q, kTop, q - g.gw, kBottom, true);
      if (c && gc + 1 < g.gw) with(q + 1, kLeft, q, kRight, false);
      if (c && gr + 1 < g.gh) with(q + g.gw, kTop, q, kBottom, false);
      s.sc[q] = part;
      if (c) write_lines(g, s.grad.pix * s.w[q], lines(q), c, out + q * n, scratch.data());
    }
  }
}

// (sum of weights, sum of border-pair weights max(w_a, w_b)), in double
std::pair<double, double> normalizers(const float* w, const Geometry& g) {
  double sw = 0.0, spw = 0.0;
  for (int64_t b = 0; b < g.B; ++b)
    for (int64_t r = 0; r < g.gh; ++r)
      for (int64_t c = 0; c < g.gw; ++c) {
        const int64_t q = (b * g.gh + r) * g.gw + c;
        sw += w[q];
        if (c > 0) spw += std::max(w[q], w[q - 1]);
        if (r > 0) spw += std::max(w[q], w[q - g.gw]);
      }
  return {sw, spw};
}

double safe_div(double num, double den) { return den > 0 ? num / den : 0.0; }

template <typename P, typename I>
void run_typed(Pass& s, const at::Tensor& pred, const at::Tensor& images, at::Tensor* grad) {
  const P* x = pred.const_data_ptr<P>();
  const I* img = images.const_data_ptr<I>();
  P* out = grad ? grad->mutable_data_ptr<P>() : nullptr;
  at::parallel_for(0, s.g.rows(), 1, [&](int64_t begin, int64_t end) { patches(s, x, img, out, begin, end); });
  at::parallel_for(0, s.g.rows(), 1, [&](int64_t begin, int64_t end) { borders(s, out, begin, end); });
}

// Both phases; the per-patch parts stay in `mse` and `sc`.
void run(Pass& s, const at::Tensor& pred, const at::Tensor& images, at::Tensor* grad) {
  const auto pt = pred.scalar_type(), it = images.scalar_type();
  TORCH_CHECK(it == at::kFloat || it == pt, "patch_pixel_loss: images must be float32 or pred's dtype");
  auto same = [&](auto tag) {
    using P = decltype(tag);
    if (it == at::kFloat) run_typed<P, float>(s, pred, images, grad);
    else run_typed<P, P>(s, pred, images, grad);
  };
  if (pt == at::kFloat) same(float{});
  else if (pt == at::kBFloat16) same(at::BFloat16{});
  else if (pt == at::kHalf) same(at::Half{});
  else TORCH_CHECK(false, "patch_pixel_loss: the native backend takes float32, bfloat16 or float16 pred, got ", pt);
}

struct Buffers {
  at::Tensor mse, sc, lines;
};

Buffers buffers(const Geometry& g, const at::TensorOptions& f32) {
  const int64_t BL = g.B * g.L();
  return {at::empty({BL}, f32), at::empty({BL}, f32), at::empty({BL, 4, g.line()}, f32)};
}

Pass make_pass(const Geometry& g, const at::Tensor& w, Buffers& buf, bool norm_pix, double eps) {
  Pass s{g, norm_pix, static_cast<float>(eps), w.const_data_ptr<float>(), nullptr, nullptr,
         buf.mse.mutable_data_ptr<float>(), buf.sc.mutable_data_ptr<float>(), buf.lines.mutable_data_ptr<float>(), {}};
  return s;
}

using Forward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// the losses from the per-patch parts, in double in a fixed order
Forward losses(const Pass& s, const at::Tensor& w, const at::Tensor& stats, double sw, double spw) {
  const int64_t BL = s.g.B * s.g.L();
  double pix = 0.0, sc = 0.0;
  for (int64_t q = 0; q < BL; ++q) {
    pix += static_cast<double>(s.w[q]) * s.mse[q];
    sc += s.sc[q];
  }
  auto f32 = w.options().dtype(at::kFloat);
  return {at::scalar_tensor(safe_div(pix, sw), f32), at::scalar_tensor(safe_div(sc, spw), f32), stats,
          at::tensor({static_cast<float>(sw), static_cast<float>(spw)}, f32)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const at::Tensor& pred_in, const at::Tensor& images_in, const at::Tensor& weight_in, int64_t p, bool norm_pix,
    double eps, const c10::optional<double>& sc_weight) {
  const at::Tensor pred = pred_in.contiguous(), images = images_in.contiguous();
  const at::Tensor w = weight_in.to(at::kFloat).contiguous();
  const Geometry g = geometry(pred, images, w, p);
  auto f32 = pred.options().dtype(at::kFloat);
  Buffers buf = buffers(g, f32);
  at::Tensor stats = at::empty({2, g.B * g.L()}, f32);
  Pass s = make_pass(g, w, buf, norm_pix, eps);
  s.stats_out = stats.mutable_data_ptr<float>();
  const auto [sw, spw] = normalizers(s.w, g);
  at::Tensor grad;
  if (sc_weight) {  // the gradient of l_pix + sc_weight * l_sc
    grad = at::empty_like(pred);
    s.grad.pix = static_cast<float>(safe_div(2.0, sw) / g.P());
    s.grad.sc = static_cast<float>(safe_div(2.0 * *sc_weight, spw) / g.line());
  }
  run(s, pred, images, sc_weight ? &grad : nullptr);
  auto [l_pix, l_sc, st, norms] = losses(s, w, stats, sw, spw);
  return {l_pix, l_sc, st, norms, grad};
}

Forward forward(const at::Tensor& pred, const at::Tensor& images, const at::Tensor& weight, int64_t p, bool norm_pix,
                double eps) {
  auto [l_pix, l_sc, stats, norms, _] = forward_impl(pred, images, weight, p, norm_pix, eps, c10::nullopt);
  return {l_pix, l_sc, stats, norms};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_with_grad(
    const at::Tensor& pred, const at::Tensor& images, const at::Tensor& weight, int64_t p, bool norm_pix, double eps,
    double sc_weight) {
  return forward_impl(pred, images, weight, p, norm_pix, eps, sc_weight);
}

// The gradient w.r.t. pred from the forward's statistics and normalizers (so norm_pix and eps
// are already in them).
at::Tensor backward(const at::Tensor& grad_pix, const at::Tensor& grad_sc, const at::Tensor& pred_in,
                    const at::Tensor& images_in, const at::Tensor& weight_in, const at::Tensor& stats_in,
                    const at::Tensor& norms, int64_t p) {
  const at::Tensor pred = pred_in.contiguous(), images = images_in.contiguous();
  const at::Tensor w = weight_in.to(at::kFloat).contiguous(), stats = stats_in.to(at::kFloat).contiguous();
  const Geometry g = geometry(pred, images, w, p);
  auto f32 = pred.options().dtype(at::kFloat);
  Buffers buf = buffers(g, f32);
  Pass s = make_pass(g, w, buf, true, 0.0);  // (norm_pix and eps unused: the statistics are given)
  s.stats_in = stats.const_data_ptr<float>();
  const at::Tensor n = norms.to(at::kDouble).cpu();
  const double sw = n[0].item<double>(), spw = n[1].item<double>();
  s.grad.pix = static_cast<float>(safe_div(2.0 * grad_pix.item<double>(), sw) / g.P());
  s.grad.sc = static_cast<float>(safe_div(2.0 * grad_sc.item<double>(), spw) / g.line());
  at::Tensor grad = at::empty_like(pred);
  run(s, pred, images, &grad);
  return grad;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pacofr_native, m) {
  m.def("patch_pixel_loss_forward(Tensor pred, Tensor images, Tensor weight, int patch_size, bool norm_pix, "
        "float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("patch_pixel_loss_forward_with_grad(Tensor pred, Tensor images, Tensor weight, int patch_size, "
        "bool norm_pix, float eps, float sc_weight) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("patch_pixel_loss_backward(Tensor grad_pix, Tensor grad_sc, Tensor pred, Tensor images, Tensor weight, "
        "Tensor stats, Tensor norms, int patch_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(pacofr_native, CPU, m) {
  m.impl("patch_pixel_loss_forward", &forward);
  m.impl("patch_pixel_loss_forward_with_grad", &forward_with_grad);
  m.impl("patch_pixel_loss_backward", &backward);
}
