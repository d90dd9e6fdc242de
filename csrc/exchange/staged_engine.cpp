// The staged exchange engine (op pipelined_moe): one expert-parallel MoE layer
// (dispatch -> experts -> combine) over the flat transport of one process
// group, in the stages of a schedule (schedule.h: bulk is the one-stage case),
// so that a stage's all-to-alls are on the wire while another stage's experts
// compute, forward and backward:
//
//   forward:  start dispatch(0); for s: start dispatch(s+1); wait dispatch(s);
//             experts(s); start combine(s)   ... wait combines; unpermute
//   backward: start combine-grad(0); for s: start combine-grad(s+1); wait;
//             experts backward(s); start dispatch-grad(s) ... wait; gather
//
// Each stage's experts are the one expert op (expert_ffn_forward / _backward:
// grouped GEMMs, every activation, per-expert biases), called through the
// dispatcher from this C++ autograd function so that backward can interleave
// them with the gradient all-to-alls; autograd would otherwise run the stages
// back to back. Dropless mode needs the same single count exchange (and host
// synchronisation) as dispatch, or none when the caller already holds every
// rank's routing counts (shadowing exchanged them to choose its shadows);
// every stage's splits and per-expert row counts follow from those counts on
// every rank without another exchange or read.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "csrc/autograd_function.h"
#include "csrc/checks.h"
#include "csrc/distributed/all_to_all.h"
#include "csrc/distributed/counts.h"
#include "csrc/exchange/schedule.h"
#include "csrc/experts/activation.h"
#include "csrc/ops.h"

namespace moeflux {
namespace {

constexpr const char* kOp = "pipelined_moe";

// ---- the experts: the expert op, on each stage's rows

struct ExpertWeights {
  at::Tensor w_in, w_out;                 // [E_local, H, F_in], [E_local, F, H]
  std::optional<at::Tensor> b_in, b_out;  // [E_local, F_in], [E_local, H] (GPT-OSS), or none
  std::string activation;
  Activation act;
  bool biased() const { return b_in.has_value() || b_out.has_value(); }
};

// What a stage's experts leave for their backward.
struct StageActivations {
  at::Tensor input, pre, activated;
};

// The expert weights' gradients, summed stage by stage.
struct ExpertGrads {
  at::Tensor w_in, w_out, b_in, b_out;
};

void accumulate(at::Tensor& total, const at::Tensor& part) { total = total.defined() ? total.add_(part) : part; }

// Rows grouped by local expert (counts on the host) -> output rows. The stage's rows are packed by expert
// (a capacity's padding travels as rows), so the op runs dropless on them.
at::Tensor experts_forward(const at::Tensor& x, const at::Tensor& counts, const ExpertWeights& w,
                           std::vector<StageActivations>& saved) {
  static const auto op = find_op<decltype(expert_ffn_forward)>("moeflux::expert_ffn_forward");
  auto [y, h, a] = op.call(x, w.w_in, w.w_out, counts, w.activation, std::nullopt, w.b_in, w.b_out);
  saved.push_back({x, h, a});
  return y;
}

// Adds this stage's weight gradients to `grads`; returns d x.
at::Tensor experts_backward(const at::Tensor& dy, const StageActivations& s, const at::Tensor& counts,
                            const ExpertWeights& w, ExpertGrads& grads) {
  static const auto op = find_op<decltype(expert_ffn_backward)>("moeflux::expert_ffn_backward");
  auto [dx, d_w_in, d_w_out, d_b_in, d_b_out] =
      op.call(dy, s.input, w.w_in, w.w_out, counts, s.pre, s.activated, w.activation, std::nullopt, w.biased());
  accumulate(grads.w_in, d_w_in);
  accumulate(grads.w_out, d_w_out);
  if (w.b_in) accumulate(grads.b_in, d_b_in);
  if (w.b_out) accumulate(grads.b_out, d_b_out);
  return dx;
}

// ---- the layer

struct Layer {
  c10::intrusive_ptr<c10d::ProcessGroup> group;
  std::vector<Stage> stages;
  at::Tensor row_map, tokens_per_local_expert;
  int64_t num_rows = 0;  // rows of the permuted block
};

// Everything forward leaves for backward.
struct Saved {
  Layer layer;
  at::Tensor returned;                    // [N, H] expert outputs back home, permuted layout
  std::vector<StageActivations> experts;  // per stage
};

// The stage pipeline both directions share. Stage s + 1's outgoing all-to-all is on the wire while stage s
// computes; each stage's returning all-to-all is collected at the end:
//   start out(0); for s: start out(s+1) | wait out(s) -> compute(s) -> start back(s);  wait every back(s)
// `rows` are in the permuted layout; back(s) lands in `landed` at the rows stage s sent.
template <typename Compute>
void run_stages(const Layer& layer, const at::Tensor& rows, at::Tensor& landed, const char* out_phase,
                const char* back_phase, Compute&& compute) {
  const int64_t num_stages = static_cast<int64_t>(layer.stages.size()), rank = layer.group->getRank();
  std::vector<PendingExchange> out, back;
  auto start_out = [&](int64_t s) {
    const comm_stats::StageScope stage(s);
    const Stage& st = layer.stages[s];
    count_token_all_to_all();
    out.push_back(start_exchange(rows.index_select(0, st.send_index), st.recv_splits, st.send_splits, *layer.group,
                                 kOp, out_phase));
  };
  start_out(0);
  for (int64_t s = 0; s < num_stages; ++s) {
    if (s + 1 < num_stages) start_out(s + 1);
    const comm_stats::StageScope stage(s);  // the records of this stage's experts and returning all-to-all
    const Stage& st = layer.stages[s];
    const at::Tensor arrived = out[s].finish().index_select(0, st.regroup);  // by local expert
    comm_stats::CollectiveTimer timer("experts", layer.group->getGroupName(), rank, arrived, {});
    const at::Tensor result = compute(s, arrived);
    timer.done();
    at::Tensor by_source = at::empty_like(result);
    by_source.index_copy_(0, st.regroup, result);
    count_token_all_to_all();
    back.push_back(start_exchange(by_source, st.send_splits, st.recv_splits, *layer.group, kOp, back_phase));
  }
  for (int64_t s = 0; s < num_stages; ++s) landed.index_copy_(0, layer.stages[s].send_index, back[s].finish());
}

void check_args(const at::Tensor& tokens, const at::Tensor& expert_ids, const std::optional<at::Tensor>& weights,
                const ExpertWeights& w, int64_t num_experts, int64_t world) {
  check_device_supported(tokens, kOp, "tokens");
  check_dim(tokens, 2, kOp, "tokens", "[num_tokens, hidden]");
  check_float(tokens, kOp, "tokens");
  TORCH_CHECK(num_experts >= 1 && num_experts % world == 0, "moeflux.pipelined_moe: num_experts must be a ",
              "positive multiple of the expert-parallel group size ", world, ", got ", num_experts);
  const int64_t local = num_experts / world;
  check_dim(w.w_in, 3, kOp, "w_in", "[local_experts, hidden, ffn_in]");
  check_dim(w.w_out, 3, kOp, "w_out", "[local_experts, ffn, hidden]");
  for (const auto* t : {&w.w_in, &w.w_out}) {
    check_same_device(*t, tokens, kOp, t == &w.w_in ? "w_in" : "w_out", "tokens");
    TORCH_CHECK(t->scalar_type() == tokens.scalar_type(), "moeflux.pipelined_moe: expert weights must have the ",
                "dtype of tokens (", tokens.scalar_type(), "), got ", t->scalar_type());
  }
  check_size(w.w_in, 0, local, kOp, "w_in", "num_experts / group size");
  check_size(w.w_out, 0, local, kOp, "w_out", "num_experts / group size");
  check_size(w.w_in, 1, tokens.size(1), kOp, "w_in", "tokens.size(1)");
  check_size(w.w_out, 2, tokens.size(1), kOp, "w_out", "tokens.size(1)");
  check_size(w.w_in, 2, (w.act.gated() ? 2 : 1) * w.w_out.size(1), kOp, "w_in",
             w.act.gated() ? "2 * w_out.size(1) (gated: gate and up)" : "w_out.size(1)");
  // Checked before any all-to-all starts (expert_ffn checks them again, but mid-pipeline).
  for (const auto& [bias, weight, name] :
       {std::tuple{&w.b_in, &w.w_in, "b_in"}, std::tuple{&w.b_out, &w.w_out, "b_out"}}) {
    if (!bias->has_value()) continue;
    const at::Tensor& b = **bias;
    TORCH_CHECK(b.dim() == 2 && b.size(0) == local && b.size(1) == weight->size(2), "moeflux.pipelined_moe: ", name,
                " must have shape [", local, ", ", weight->size(2), "], got ", b.sizes());
    check_same_device(b, tokens, kOp, name, "tokens");
    TORCH_CHECK(b.scalar_type() == tokens.scalar_type(), "moeflux.pipelined_moe: expert biases must have the dtype ",
                "of tokens (", tokens.scalar_type(), "), got ", b.scalar_type());
  }
  if (weights.has_value() && weights->defined()) {
    TORCH_CHECK(weights->sizes() == expert_ids.sizes(), "moeflux.pipelined_moe: weights must have the shape of ",
                "expert_ids ", expert_ids.sizes(), ", got ", weights->sizes());
  }
}

Saved run_forward(const at::Tensor& tokens, const at::Tensor& expert_ids, const std::optional<at::Tensor>& weights,
                  const ExpertWeights& w, int64_t num_experts, std::optional<int64_t> capacity,
                  const std::string& group_name, c10::string_view schedule_name, int64_t chunks,
                  int64_t group_size, const std::optional<at::Tensor>& routing_counts, at::Tensor& output) {
  Saved saved;
  Layer& layer = saved.layer;
  layer.group = resolve_group(group_name, kOp);
  const int64_t world = layer.group->getSize(), rank = layer.group->getRank();
  check_args(tokens, expert_ids, weights, w, num_experts, world);
  const Schedule schedule = parse_schedule(schedule_name, chunks, group_size, world, kOp);
  const int64_t local = num_experts / world;
  const DeviceKernels& kernels = kernels_for(tokens);

  auto [permuted, tokens_per_expert, row_map] = permute(kernels, tokens, expert_ids, num_experts, capacity);
  layer.row_map = row_map;
  layer.num_rows = permuted.size(0);
  at::Tensor sent, received;
  TORCH_CHECK(!(capacity.has_value() && routing_counts.has_value()), "moeflux.pipelined_moe: routing_counts are ",
              "for dropless routing (with a capacity the segments are fixed), got both");
  if (capacity.has_value()) {  // fixed segments: capacity rows per expert, padding included
    sent = at::full({world, local}, *capacity, at::kLong);
    received = sent.clone();
    layer.tokens_per_local_expert = at::full({local}, world * *capacity, tokens.options().dtype(at::kInt));
  } else {
    const ExchangedCounts counts =
        routing_counts.has_value() ? counts_from_routing(*routing_counts, rank, world, tokens.device(), kOp)
                                   : exchange_counts(tokens, tokens_per_expert, num_experts, *layer.group, kOp);
    sent = counts.sent;
    received = counts.received;
    layer.tokens_per_local_expert = counts.received_on_device.sum(0).to(at::kInt);
  }
  std::vector<int64_t> start(world * local);  // where each (rank, expert) segment begins in `permuted`
  const int64_t* segment = sent.const_data_ptr<int64_t>();
  for (int64_t e = 0, offset = 0; e < world * local; offset += segment[e++]) start[e] = offset;
  layer.stages = plan_stages(schedule, rank, sent, received, start, tokens.device());

  // Forward: rows go out (dispatch), the experts run, rows come back (combine).
  saved.returned = at::zeros_like(permuted);  // rows never sent (dropped slots) are never read
  run_stages(layer, permuted, saved.returned, "dispatch", "combine", [&](int64_t s, const at::Tensor& x) {
    return experts_forward(x, layer.stages[s].expert_rows, w, saved.experts);
  });
  output = unpermute(kernels, saved.returned, row_map, weights);
  return saved;
}

// -> grad tokens, grad weights, the expert weights' grads
std::tuple<at::Tensor, at::Tensor, ExpertGrads> run_backward(const at::Tensor& grad_output, const Saved& saved,
                                                             const std::optional<at::Tensor>& weights,
                                                             const ExpertWeights& w) {
  const Layer& layer = saved.layer;
  const DeviceKernels& kernels = kernels_for(grad_output);
  auto [grad_returned, grad_weights] =
      unpermute_backward(kernels, grad_output, saved.returned, layer.row_map, weights);
  ExpertGrads grads;
  at::Tensor grad_permuted = at::zeros({layer.num_rows, grad_output.size(1)}, grad_returned.options());
  // Backward: output gradients go out the way the rows did (combine's gradient), the experts' backward runs,
  // the input gradients come back (dispatch's gradient).
  run_stages(layer, grad_returned, grad_permuted, "combine_backward", "dispatch_backward",
             [&](int64_t s, const at::Tensor& dy) {
               return experts_backward(dy, saved.experts[s], layer.stages[s].expert_rows, w, grads);
             });
  at::Tensor grad_tokens = gather_rows(kernels, grad_permuted, layer.row_map, at::Tensor());
  return {grad_tokens, grad_weights, grads};
}

std::optional<at::Tensor> defined_or_none(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t : std::nullopt;
}

ExpertWeights expert_weights(const at::Tensor& w_in, const at::Tensor& w_out, const std::optional<at::Tensor>& b_in,
                             const std::optional<at::Tensor>& b_out, c10::string_view activation) {
  return {w_in, w_out, defined_or_none(b_in), defined_or_none(b_out), std::string(activation),
          parse_activation(activation, kOp)};
}


// The saved state lives in a C++ object owned by the autograd node: stages' index tensors and
// activations, never visible as graph inputs.
struct SavedHolder : torch::CustomClassHolder {
  Saved saved;
};

class PipelinedMoEFunction : public torch::autograd::Function<PipelinedMoEFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& tokens, const at::Tensor& expert_ids,
                               const std::optional<at::Tensor>& weights, const at::Tensor& w_in,
                               const at::Tensor& w_out, c10::string_view activation, int64_t num_experts,
                               std::optional<int64_t> capacity, const std::string& group_name,
                               c10::string_view schedule, int64_t chunks, int64_t group_size,
                               const std::optional<at::Tensor>& b_in, const std::optional<at::Tensor>& b_out,
                               const std::optional<at::Tensor>& routing_counts) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const ExpertWeights w = expert_weights(w_in, w_out, b_in, b_out, activation);
    auto holder = c10::make_intrusive<SavedHolder>();
    at::Tensor output;
    holder->saved = run_forward(tokens, expert_ids, weights, w, num_experts, capacity, group_name, schedule, chunks,
                                group_size, routing_counts, output);
    const bool weighted = weights.has_value() && weights->defined();
    ctx->save_for_backward({w_in, w_out, weighted ? *weights : at::Tensor(), w.b_in.value_or(at::Tensor()),
                            w.b_out.value_or(at::Tensor())});
    ctx->saved_data["state"] = c10::IValue::make_capsule(holder);
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["layer"] = comm_stats::current_layer();
    at::Tensor counts = holder->saved.layer.tokens_per_local_expert;
    ctx->mark_non_differentiable({counts});
    return {output, counts};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto vars = ctx->get_saved_variables();
    const ExpertWeights w =
        expert_weights(vars[0], vars[1], vars[3], vars[4], ctx->saved_data["activation"].toStringRef());
    const std::optional<at::Tensor> weights = vars[2].defined() ? std::optional(vars[2]) : std::nullopt;
    auto holder = c10::static_intrusive_pointer_cast<SavedHolder>(ctx->saved_data["state"].toCapsule());
    const comm_stats::LayerScope layer(ctx->saved_data["layer"].toStringRef());
    const Saved& saved = holder->saved;
    const at::Tensor grad_output = grads[0].defined() ? grads[0]
                                                      : at::zeros({saved.layer.row_map.size(0), saved.returned.size(1)},
                                                                  saved.returned.options());
    auto [grad_tokens, grad_weights, g] = run_backward(grad_output, saved, weights, w);
    const at::Tensor none;
    return {grad_tokens, none, weights ? grad_weights : none, g.w_in, g.w_out, none, none, none, none, none, none,
            none, g.b_in, g.b_out, none};
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> pipelined_moe(const at::Tensor& tokens, const at::Tensor& expert_ids,
                                                 const std::optional<at::Tensor>& weights, const at::Tensor& w_in,
                                                 const at::Tensor& w_out, c10::string_view activation,
                                                 int64_t num_experts, std::optional<int64_t> capacity,
                                                 const std::string& group_name, c10::string_view schedule,
                                                 int64_t chunks, int64_t group_size,
                                                 const std::optional<at::Tensor>& b_in,
                                                 const std::optional<at::Tensor>& b_out,
                                                 const std::optional<at::Tensor>& routing_counts) {
  at::Tensor output;
  const Saved saved = run_forward(tokens, expert_ids, weights, expert_weights(w_in, w_out, b_in, b_out, activation),
                                  num_experts, capacity, group_name, schedule, chunks, group_size, routing_counts,
                                  output);
  return {output, saved.layer.tokens_per_local_expert};
}

std::tuple<at::Tensor, at::Tensor> pipelined_moe_autograd(const at::Tensor& tokens, const at::Tensor& expert_ids,
                                                          const std::optional<at::Tensor>& weights,
                                                          const at::Tensor& w_in, const at::Tensor& w_out,
                                                          c10::string_view activation, int64_t num_experts,
                                                          std::optional<int64_t> capacity,
                                                          const std::string& group_name, c10::string_view schedule,
                                                          int64_t chunks, int64_t group_size,
                                                          const std::optional<at::Tensor>& b_in,
                                                          const std::optional<at::Tensor>& b_out,
                                                          const std::optional<at::Tensor>& routing_counts) {
  auto out = PipelinedMoEFunction::apply(tokens, expert_ids, weights, w_in, w_out, activation, num_experts, capacity,
                                         group_name, schedule, chunks, group_size, b_in, b_out, routing_counts);
  return {out[0], out[1]};
}

}  // namespace moeflux
