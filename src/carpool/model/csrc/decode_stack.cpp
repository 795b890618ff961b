// A decode step's decoder layers in one call: carpool::decode_stack; with the embedding, the
// final norm and the head around them (every row sampling): carpool::decode_logits.
//
// Why: at batch 1 a decoder layer is ~20 operator calls from Python (norms, four linears,
// rotary, the cache write, the paged attention, the activation, views), each a few
// microseconds of interpreter and dispatcher work around a kernel of a few microseconds; on a
// 30-layer model (SmolLM2-135M) that was ~6.5 ms of a ~15 ms step on a 2-core AMD Zen 3
// (profile_step.py: 44% of the step outside matmuls and attention). Here the same operators
// run from C++, layer after layer, with no Python between them.
//
// It is a transcription, not a new algorithm: every layer calls the same operators with the
// same arguments, in the same order, as `DecoderLayer.forward` does for a pure decode step of
// at most 256 rows (the fused norms, rotary and SwiGLU of `fused_ops`, the paged decode kernel,
// the linears' own kernel choice by row count, see `linear` below), so the result is the same
// bits as the Python path's (tested), and a request's tokens do not depend on which path or
// which batch served it. The Python side (`carpool.model.decode_stack`) decides when it
// applies and lays the weights out once per model.
//
// Each layer's tensors, kTensorsPerLayer of them: input norm weight, post-attention norm
// weight, then for each linear (qkv, o, gate_up, down) three slots; its ints, kIntsPerLayer:
// for each linear (kind, out_features, group size). The kinds and their slots:
//   kPlain  (weight [N, K], bias?, -)            layers.Linear, plain weight
//   kOneDnn (packed weight, bias?, -)            layers.Linear, oneDNN's packed layout
//   kVnni   (packed weight, float32 bias?, -)    layers.Linear, the "vnni" layout
//   kInt8   (int8 codes [N, K], bf16 scales, bias?)           quant.Int8Linear
//   kInt4   (packed codes, bf16 scales_zeros, bias?)          quant.Int4Linear
// and for decode_logits' head of a float32 model also kInt8Logits and kInt4Logits (the same
// slots as kInt8 and kInt4: fused_ops' int8_logits and int4_logits, float32 logits).
// Other operators are reached through the dispatcher (they live in other libraries: fused_ops,
// paged_attention, vnni_linear, oneDNN's), looked up once.

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/_weight_int4pack_mm_for_cpu.h>
#include <ATen/ops/_weight_int8pack_mm.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mv.h>
#include <ATen/ops/silu.h>
#include <torch/library.h>

#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace {

constexpr int64_t kTensorsPerLayer = 14;
constexpr int64_t kIntsPerLayer = 12;
// decode_stack.MAX_ROWS: past it GatedMLP chunks its rows. A plan with a plain or oneDNN-packed
// weight goes to 32 (layers.bucket_rows pads nothing up to there; decode_stack.EXACT_ROWS).
constexpr int64_t kMaxRows = 256;
enum Kind : int64_t { kPlain = 0, kOneDnn = 1, kVnni = 2, kInt8 = 3, kInt4 = 4 };
// A quantized head of a float32 model: its float32 logits straight from the kernel
// (QuantizedLinear.logits' _kernel_logits; decode_logits only, within the kernel's rows).
enum HeadKind : int64_t { kInt8Logits = 5, kInt4Logits = 6 };

// Thresholds of quant.py and fused_ops.py, passed in by the caller (one source of truth).
struct Limits {
  int64_t int8_gemv_max_rows, int8_widen_above, int4_gemv_max_rows, int4_block;
  bool bf16_emulated;
  int64_t int8_large_codes, int8_large_max_rows;  // fused_ops.int8_gemv_max_rows
  int64_t int8_dot_max_rows;  // fused_ops.int8_dot_max_rows() (0: not here)
  bool silu_float32;          // fused_ops.silu_float32_fused(): torch's bits in the kernel

  int64_t int8_max_rows(int64_t codes) const {
    return codes >= int8_large_codes ? int8_large_max_rows : int8_gemv_max_rows;
  }

  // From the operator's `limits` argument (decode_stack.py's _limits, in that order).
  static Limits of(at::IntArrayRef l) {
    TORCH_CHECK(l.size() == 9, "decode_stack: 9 limits expected, got ", l.size());
    return {l[0], l[1], l[2], l[3], l[4] != 0, l[5], l[6], l[7], l[8] != 0};
  }
};

template <typename F>
c10::TypedOperatorHandle<F> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<F>();
}

// The operators of the other carpool libraries, with their kernels' exact C++ signatures.
struct Ops {
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, double)> rms_norm =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, double)>("carpool::rms_norm");
  c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>
      add_rms_norm = op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                            const at::Tensor&, double)>(
          "carpool::add_rms_norm");
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&)> silu_and_mul =
      op<at::Tensor(const at::Tensor&)>("carpool::silu_and_mul");
  c10::TypedOperatorHandle<void(at::Tensor, const at::Tensor&)> rotary =
      op<void(at::Tensor, const at::Tensor&)>("carpool::rotary_");
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>
      int8_gemv = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
          "carpool::int8_gemv");
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>
      int8_dot = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
          "carpool::int8_dot");
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&,
                                      const std::optional<at::Tensor>&)>
      bf16_linear = op<at::Tensor(const at::Tensor&, const at::Tensor&,
                                  const std::optional<at::Tensor>&)>("carpool::bf16_linear");
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t,
                                      const at::Tensor&, int64_t)>
      int4_gemv = op<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, const at::Tensor&,
                                int64_t)>("carpool::int4_gemv");
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const at::Tensor&, double)>
      paged_decode = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, double)>("carpool::paged_decode_attention");
  c10::TypedOperatorHandle<void(const at::Tensor&, at::Tensor, const at::Tensor&)> kv_store_int8 =
      op<void(const at::Tensor&, at::Tensor, const at::Tensor&)>("carpool::kv_store_int8");
  c10::TypedOperatorHandle<void(const at::Tensor&, at::Tensor, const at::Tensor&)> kv_store =
      op<void(const at::Tensor&, at::Tensor, const at::Tensor&)>("carpool::kv_store");
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>
      int8_logits = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
          "carpool::int8_logits");
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t,
                                      const at::Tensor&, int64_t)>
      int4_logits = op<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, const at::Tensor&,
                                  int64_t)>("carpool::int4_logits");
};

const Ops& ops() {
  static const Ops instance;  // after the first successful lookup; a failed one throws (retried)
  return instance;
}

// Operators only some layouts need (another library, or oneDNN's), looked up on first use and
// called boxed: their kernels' C++ signatures are not ours to restate.
at::Tensor call_boxed(const char* name, std::vector<c10::IValue> args) {
  static std::mutex mutex;
  static std::unordered_map<std::string, c10::OperatorHandle> handles;
  c10::OperatorHandle handle = [&] {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = handles.find(name);
    if (it == handles.end())
      it = handles.emplace(name, c10::Dispatcher::singleton().findSchemaOrThrow(name, "")).first;
    return it->second;
  }();
  torch::jit::Stack stack(std::make_move_iterator(args.begin()),
                          std::make_move_iterator(args.end()));
  handle.callBoxed(stack);
  return stack.back().toTensor();
}

at::Tensor opt(const c10::List<std::optional<at::Tensor>>& t, int64_t i) {
  const std::optional<at::Tensor> v = t.get(i);
  return v.has_value() ? *v : at::Tensor();
}

std::optional<at::Tensor> maybe(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// Whether a plain weight takes bf16_linear (fused_ops.bf16_linear's condition).
bool emulated_bf16(const at::Tensor& w, const Limits& lim) {
  return lim.bf16_emulated && w.scalar_type() == at::kBFloat16 && w.is_contiguous();
}

// layers._linear on a plain weight at <= 32 rows (no bucket padding: decode_stack.EXACT_ROWS):
// bf16_linear where bf16 is emulated, else F.linear.
at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                        const Limits& lim) {
  if (emulated_bf16(w, lim)) return ops().bf16_linear.call(x, w, maybe(b));
  return at::linear(x, w, maybe(b));
}

// QuantizedLinear._finish: the kernel's output back in x's dtype, plus the bias.
at::Tensor finish(at::Tensor y, const at::Tensor& x, const at::Tensor& bias) {
  if (y.scalar_type() != x.scalar_type()) y = y.to(x.scalar_type());
  return bias.defined() ? y.add(bias) : y;
}

// One linear layer of any kind, choosing its kernel by row count exactly as its forward does.
at::Tensor linear(const at::Tensor& x, int64_t kind, const at::Tensor& a, const at::Tensor& b,
                  const at::Tensor& c, int64_t n, int64_t group, const Limits& lim) {
  const int64_t rows = x.size(0);
  switch (kind) {
    case kPlain:  // layers.Linear.forward, plain layout: torch.mv for one row
      if (rows == 1 && !emulated_bf16(a, lim)) {
        at::Tensor out = at::mv(a, x[0]).unsqueeze(0);
        return b.defined() ? out.add(b) : out;
      }
      return dense_linear(x, a, b, lim);
    case kOneDnn:
      return call_boxed("mkldnn::_linear_pointwise",
                        {x, a, maybe(b), std::string("none"),
                         c10::List<std::optional<at::Scalar>>(), std::string("")});
    case kVnni:
      return call_boxed("carpool::vnni_linear",
                        {x, a, maybe(b), n, int64_t{0}});
    case kInt8: {  // quant.Int8Linear.forward; a = codes, b = scales, c = bias
      const bool f32 = x.scalar_type() == at::kFloat;
      if (rows <= lim.int8_max_rows(a.numel()) && (f32 || x.scalar_type() == at::kBFloat16) &&
          b.scalar_type() == at::kBFloat16)
        return finish(ops().int8_gemv.call(x, a, b), x, c);
      if (rows > lim.int8_max_rows(a.numel()) && rows <= lim.int8_dot_max_rows &&
          x.size(1) % 32 == 0 && (f32 || x.scalar_type() == at::kBFloat16) &&
          b.scalar_type() == at::kBFloat16)
        return finish(ops().int8_dot.call(x, a, b), x, c);
      const at::Tensor xk = x.to(b.scalar_type()).contiguous();
      at::Tensor y = rows <= lim.int8_widen_above
                         ? at::_weight_int8pack_mm(xk, a, b)
                         : dense_linear(xk, a.to(b.scalar_type()), at::Tensor(), lim).mul(b);
      return finish(y, x, c);
    }
    case kInt4: {  // quant.Int4Linear.forward; a = packed, b = scales_zeros, c = bias
      at::Tensor y;
      if (rows <= lim.int4_gemv_max_rows && b.scalar_type() == at::kBFloat16) {
        y = ops().int4_gemv.call(x, a, group, b, lim.int4_block);
      } else {  // up to quant.INT4_WIDEN_ABOVE_ROWS (128) rows: torch's kernel
        y = at::_weight_int4pack_mm_for_cpu(x.to(b.scalar_type()).contiguous(), a, group, b);
      }
      if (y.size(1) != n) y = y.narrow(1, 0, n);
      return finish(y, x, c);
    }
    default:
      TORCH_CHECK(false, "decode_stack: unknown linear kind ", kind);
  }
}

std::tuple<at::Tensor, at::Tensor> decode_stack(
    const at::Tensor& x_in,          // [T, hidden]: the embedding of the step's tokens
    const at::Tensor& rope,          // [T, 2, D]: cos and sign-folded sin, x's dtype
    const at::Tensor& slot_mapping,  // [T] int64
    const at::Tensor& block_tables,  // [T, max_blocks] int64
    const at::Tensor& context_lens,  // [T] int64
    at::TensorList kv_caches,        // per layer [blocks, block_size, 2, K, D (+4 int8)]
    const c10::List<std::optional<at::Tensor>>& tensors,  // kTensorsPerLayer per layer
    at::IntArrayRef ints,                                 // kIntsPerLayer per layer
    at::IntArrayRef limits,  // int8 gemv rows, int8 gemv codes, int8 widen, int4 gemv rows, int4
                             // block, bf16 emulated
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps, double scale) {
  const int64_t layers = static_cast<int64_t>(kv_caches.size());
  const int64_t t = x_in.size(0), h = num_heads, kvh = num_kv_heads, d = head_dim;
  TORCH_CHECK(x_in.dim() == 2 && x_in.is_contiguous() && t >= 1 && t <= kMaxRows,
              "decode_stack: x must be a contiguous [T, hidden] with 1 <= T <= ", kMaxRows,
              ", got ", x_in.sizes());
  TORCH_CHECK(static_cast<int64_t>(tensors.size()) == layers * kTensorsPerLayer &&
                  static_cast<int64_t>(ints.size()) == layers * kIntsPerLayer,
              "decode_stack: ", layers, " layers need ", layers * kTensorsPerLayer,
              " tensors and ", layers * kIntsPerLayer, " ints, got ", tensors.size(), " and ",
              ints.size());
  const Limits lim = Limits::of(limits);
  const Ops& o = ops();
  at::Tensor x = x_in, residual;
  for (int64_t l = 0; l < layers; ++l) {
    const int64_t tb = l * kTensorsPerLayer, ib = l * kIntsPerLayer;
    auto lin = [&](const at::Tensor& in, int64_t j) {
      const int64_t s = tb + 2 + 3 * j, k = ib + 3 * j;
      return linear(in, ints[k], opt(tensors, s), opt(tensors, s + 1), opt(tensors, s + 2),
                    ints[k + 1], ints[k + 2], lim);
    };
    // DecoderLayer.forward: the previous MLP output added into the residual stream by the norm.
    at::Tensor hs;
    if (!residual.defined()) {
      residual = x;
      hs = o.rms_norm.call(x, opt(tensors, tb), eps);
    } else {
      std::tie(hs, residual) = o.add_rms_norm.call(x, residual, opt(tensors, tb), eps);
    }
    // Attention.forward, pure decode.
    const at::Tensor qkv = lin(hs, 0).view({t, h + 2 * kvh, d});
    o.rotary.call(qkv.narrow(1, 0, h + kvh), rope);
    const at::Tensor new_kv = qkv.narrow(1, h, 2 * kvh).view({t, 2, kvh, d});
    const at::Tensor& cache = kv_caches[l];
    if (cache.scalar_type() == at::kChar)
      o.kv_store_int8.call(new_kv, cache, slot_mapping);
    else  // (a bfloat16 cache of a float32 model: K/V rounded to bfloat16 as stored)
      o.kv_store.call(new_kv, cache, slot_mapping);
    const at::Tensor att =
        o.paged_decode.call(qkv.narrow(1, 0, h), cache, block_tables, context_lens, scale);
    std::tie(hs, residual) =
        o.add_rms_norm.call(lin(att.view({t, h * d}), 1), residual, opt(tensors, tb + 1), eps);
    // GatedMLP.forward: SwiGLU fused (float32 where the kernel gives torch's bits, else torch's
    // ops: fused_ops.silu_and_mul).
    const at::Tensor gu = lin(hs, 2);
    at::Tensor act;
    if (gu.scalar_type() == at::kBFloat16 || lim.silu_float32) {
      act = o.silu_and_mul.call(gu);
    } else {
      const int64_t half = gu.size(1) / 2;
      act = at::silu(gu.narrow(1, 0, half)).mul(gu.narrow(1, half, half));
    }
    x = lin(act, 3);
  }
  return {x, residual};
}

// A pure decode step from token ids to float32 logits, every row sampling: the embedding and
// rotary lookups, decode_stack's layers, the final norm (the last residual add fused) and the
// vocabulary head, as LlamaForCausalLM.forward runs them (F.embedding is index_select of the
// rows; RotaryEmbedding.table of the positions; the head's linear chosen by row count as its
// forward does, then .float()): the same bits (tested). Why: after the layers and the head have
// streamed the weights through the caches, each of these Python-side calls ran through cold
// code (~5-20 us each at batch 1; issue 11, eighteenth pass).
at::Tensor decode_logits(
    const at::Tensor& input_ids,     // [T] int64
    const at::Tensor& positions,     // [T] int64
    const at::Tensor& embed,         // [vocab, hidden]: the embedding's weight, or int8 codes
    const std::optional<at::Tensor>& embed_scales,  // the int8 codes' row scales (None: plain)
    const at::Tensor& rope_table,    // [max_positions, 2, D]: RotaryEmbedding's table, x's dtype
    const at::Tensor& slot_mapping, const at::Tensor& block_tables,
    const at::Tensor& context_lens, at::TensorList kv_caches,
    const c10::List<std::optional<at::Tensor>>& tensors, at::IntArrayRef ints,
    at::IntArrayRef limits,
    const at::Tensor& norm,  // the final norm's weight
    const c10::List<std::optional<at::Tensor>>& head,  // the head's three slots
    at::IntArrayRef head_ints,                          // its kind, out_features, group
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps, double norm_eps,
    double scale) {
  TORCH_CHECK(input_ids.dim() == 1 && positions.sizes() == input_ids.sizes(),
              "decode_logits: input_ids and positions must be [T], got ", input_ids.sizes(),
              " and ", positions.sizes());
  TORCH_CHECK(head.size() == 3 && head_ints.size() == 3,
              "decode_logits: the head needs 3 tensors and 3 ints, got ", head.size(), " and ",
              head_ints.size());
  // quant.Int8Linear.rows for an int8 embedding (QuantizedEmbedding): codes times row scales in
  // float32, then the model's dtype.
  const at::Tensor x =
      embed_scales.has_value()
          ? embed.index_select(0, input_ids)
                .to(at::kFloat)
                .mul(embed_scales->index_select(0, input_ids).to(at::kFloat).unsqueeze(-1))
                .to(norm.scalar_type())
          : embed.index_select(0, input_ids);
  const at::Tensor rope = rope_table.index_select(0, positions);
  auto [out, residual] = decode_stack(x, rope, slot_mapping, block_tables, context_lens,
                                      kv_caches, tensors, ints, limits, num_heads, num_kv_heads,
                                      head_dim, eps, scale);
  const at::Tensor hs = std::get<0>(ops().add_rms_norm.call(out, residual, norm, norm_eps));
  const Limits lim = Limits::of(limits);
  const int64_t kind = head_ints[0], n = head_ints[1];
  if (kind == kInt8Logits || kind == kInt4Logits) {  // QuantizedLinear.logits, _kernel_logits
    at::Tensor y = kind == kInt8Logits
                       ? ops().int8_logits.call(hs, opt(head, 0), opt(head, 1))
                       : ops().int4_logits.call(hs, opt(head, 0), head_ints[2], opt(head, 1),
                                                lim.int4_block);
    if (y.size(1) != n) y = y.narrow(1, 0, n);
    const at::Tensor bias = opt(head, 2);
    return bias.defined() ? y.add(bias.to(at::kFloat)) : y;
  }
  return linear(hs, kind, opt(head, 0), opt(head, 1), opt(head, 2), n, head_ints[2], lim)
      .to(at::kFloat);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(carpool, m) {
  m.def(
      "decode_stack(Tensor x, Tensor rope, Tensor slot_mapping, Tensor block_tables, "
      "Tensor context_lens, Tensor(a!)[] kv_caches, Tensor?[] tensors, int[] ints, int[] limits, "
      "int num_heads, int num_kv_heads, int head_dim, float eps, float scale) -> (Tensor, Tensor)");
  m.def(
      "decode_logits(Tensor input_ids, Tensor positions, Tensor embed, Tensor? embed_scales, "
      "Tensor rope_table, "
      "Tensor slot_mapping, Tensor block_tables, Tensor context_lens, Tensor(a!)[] kv_caches, "
      "Tensor?[] tensors, int[] ints, int[] limits, Tensor norm, Tensor?[] head, int[] head_ints, "
      "int num_heads, int num_kv_heads, int head_dim, float eps, float norm_eps, float scale) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(carpool, CPU, m) {
  m.impl("decode_stack", &decode_stack);
  m.impl("decode_logits", &decode_logits);
}

// oneDNN-packed weights among the arguments make the dispatcher pick this key.
TORCH_LIBRARY_IMPL(carpool, MkldnnCPU, m) {
  m.impl("decode_stack", &decode_stack);
  m.impl("decode_logits", &decode_logits);
}
