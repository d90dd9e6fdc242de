// moeflux._C: importing it runs the static registrations of the ops
// (registration.cpp) linked into this module; the ops are reached as
// torch.ops.moeflux.*. The module also binds the gradient bucketer (a C++
// class with Python communication hooks) and the collective counters.
#include <optional>
#include <tuple>

#include <torch/csrc/distributed/c10d/python_comm_hook.h>
#include <torch/csrc/utils/pybind.h>

#include "csrc/bucketer/bucketer.h"
#include "csrc/distributed/agreement.h"
#include "csrc/distributed/all_to_all.h"
#include "csrc/distributed/comm_scheduler.h"
#include "csrc/cpu/workspace.h"
#include "csrc/experts/grouped_gemm.h"
#include "csrc/host_sync.h"
#include "csrc/profiling/comm_stats.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "moeflux C++/CUDA ops (torch.ops.moeflux) and the gradient bucketer";
#ifdef MOEFLUX_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif

  m.def("collective_counts", [] {
    const moeflux::CollectiveCounts counts = moeflux::collective_counts();
    return py::dict(py::arg("token_all_to_alls") = counts.token_all_to_alls,
                    py::arg("count_exchanges") = counts.count_exchanges,
                    py::arg("host_count_reads") = moeflux::host_count_reads());
  });
  m.def("set_cpu_grouped_mm_backend", [](const std::string& backend) {
    TORCH_CHECK(backend == "aten" || backend == "segments", "set_cpu_grouped_mm_backend: backend must be 'aten' ",
                "or 'segments', got '", backend, "'");
    moeflux::set_cpu_grouped_mm_backend(backend == "aten");
  }, py::arg("backend"));
  m.def("cpu_workspace_cached_bytes", &moeflux::cpu::workspace_cached_bytes);
  m.def("release_cpu_workspace", &moeflux::cpu::workspace_release);
  m.def("reset_collective_counts", [] {
    moeflux::reset_collective_counts();
    moeflux::reset_host_reads();
  });
  // The one funnel of device->host reads (host_sync.h), for the Python ones, and its counts by site.
  m.def("to_host", &moeflux::to_host, py::arg("tensor"), py::arg("site"));
  m.def("host_reads", &moeflux::host_reads);

  namespace stats = moeflux::comm_stats;
  m.def("comm_stats_enabled", &stats::enabled);
  m.def("set_comm_stats_enabled", &stats::set_enabled, py::arg("enabled"));
  m.def("exchange_comm_stats_layer", &stats::exchange_current_layer, py::arg("layer"));
  m.def("drain_comm_stats", [] {
    py::list out;
    for (const stats::Record& r : stats::drain()) {
      out.append(py::dict(py::arg("layer") = r.layer, py::arg("phase") = r.phase, py::arg("group") = r.group,
                          py::arg("rank") = r.rank, py::arg("start_s") = r.start_s, py::arg("seconds") = r.seconds, py::arg("wait_seconds") = r.wait_seconds,
                          py::arg("bytes_to_rank") = r.bytes_to_rank, py::arg("stage") = r.stage));
    }
    return out;
  });

  // The communication scheduler of this process (all-to-all priority), for tests and benchmarks.
  namespace sched = moeflux::comm_scheduler;
  m.def("comm_scheduler_stats", [] {
    const sched::Stats s = sched::instance().stats();
    return py::dict(py::arg("all_to_alls_in_flight") = s.all_to_alls_in_flight,
                    py::arg("micro_ops_queued") = s.micro_ops_queued,
                    py::arg("micro_ops_in_flight") = s.micro_ops_in_flight, py::arg("all_to_alls") = s.all_to_alls,
                    py::arg("micro_ops_launched") = s.micro_ops_launched,
                    py::arg("micro_ops_held") = s.micro_ops_held, py::arg("micro_ops_flushed") = s.micro_ops_flushed,
                    py::arg("max_micro_ops_in_flight") = s.max_micro_ops_in_flight);
  });
  m.def("reset_comm_scheduler_stats", [] { sched::instance().reset_stats(); });
  m.def("set_comm_scheduler_tracing", [](bool on) { sched::instance().set_tracing(on); }, py::arg("on"));
  // The trace as (kind, begins, id, t_ns) tuples, oldest first, and how many older events the ring dropped.
  m.def("comm_scheduler_trace", [] {
    static const char* const kinds[] = {"all_to_all", "micro_op", "flushed_micro_op", "unscheduled"};
    py::list events;
    for (const sched::TraceEvent& e : sched::instance().trace()) {
      events.append(py::make_tuple(kinds[static_cast<int>(e.kind)], e.begins, e.id, e.t_ns));
    }
    return py::make_tuple(events, sched::instance().trace_dropped());
  });

  // An all-reduce (sum, in place) submitted as scheduled micro-ops, as the bucketer does with priority.
  struct ScheduledAllReduce {
    std::vector<c10::intrusive_ptr<c10::ivalue::Future>> parts;
  };
  py::class_<ScheduledAllReduce>(m, "ScheduledAllReduce")
      .def(
          "wait",
          [](ScheduledAllReduce& self) {
            for (const auto& part : self.parts) part->waitAndThrow();
          },
          py::call_guard<py::gil_scoped_release>());
  m.def("group_timeout_ms", &moeflux::group_timeout_ms, py::arg("group_name"));
  // The ops' agreement exchange (agreement.h), for moeflux.distributed.exchange_checked: every rank's fields
  // and the error this rank must raise (None: every rank's checks passed).
  m.def(
      "exchange_checks",
      [](const std::string& group_name, const std::vector<int64_t>& fields, const std::string& op,
         const std::string& device, const std::string& error) {
        const auto group = moeflux::resolve_group(group_name, op.c_str());
        moeflux::CheckedFields checked = moeflux::exchange_checks(
            *group, fields, op.c_str(), moeflux::exchange_device(c10::Device(device)), error);
        return std::make_tuple(checked.fields,
                               checked.error.empty() ? std::nullopt : std::optional<std::string>(checked.error));
      },
      py::arg("group_name"), py::arg("fields"), py::arg("op"), py::arg("device"), py::arg("error"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "scheduled_all_reduce",
      [](const at::Tensor& flat, const std::string& group_name, int64_t micro_op_bytes) {
        return ScheduledAllReduce{moeflux::scheduled_all_reduce(
            flat, moeflux::resolve_group(group_name, "scheduled_all_reduce"), micro_op_bytes)};
      },
      py::arg("flat"), py::arg("group_name"), py::arg("micro_op_bytes"), py::call_guard<py::gil_scoped_release>());

  py::class_<moeflux::GradientBucketer>(m, "GradientBucketer")
      .def(py::init([](std::vector<at::Tensor> params, std::vector<std::string> names,
                       std::vector<int64_t> param_group, std::vector<std::string> group_names,
                       std::vector<double> divisors, int64_t first_bucket_bytes, int64_t bucket_bytes,
                       bool gradient_as_bucket_view, bool find_unused_parameters, bool priority,
                       int64_t micro_op_bytes) {
             TORCH_CHECK(micro_op_bytes > 0, "moeflux bucketer: micro_op_bytes must be > 0, got ", micro_op_bytes);
             moeflux::BucketerOptions options{first_bucket_bytes, bucket_bytes, gradient_as_bucket_view,
                                              find_unused_parameters, priority, micro_op_bytes};
             return std::make_unique<moeflux::GradientBucketer>(std::move(params), std::move(names),
                                                                std::move(param_group), std::move(group_names),
                                                                std::move(divisors), options);
           }),
           py::arg("params"), py::arg("names"), py::arg("param_group"), py::arg("group_names"), py::arg("divisors"),
           py::arg("first_bucket_bytes"), py::arg("bucket_bytes"), py::arg("gradient_as_bucket_view"),
           py::arg("find_unused_parameters"), py::arg("priority") = false,
           py::arg("micro_op_bytes") = int64_t{1} << 20)
      .def("set_builtin_comm_hook", &moeflux::GradientBucketer::set_builtin_comm_hook, py::arg("name"))
      .def(
          "set_python_comm_hook",
          [](moeflux::GradientBucketer& self, std::vector<py::object> states, py::object hook) {
            std::vector<std::unique_ptr<c10d::CommHookInterface>> hooks;
            for (auto& state : states) hooks.push_back(std::make_unique<c10d::PythonCommHook>(state, hook));
            self.set_comm_hooks(std::move(hooks));
          },
          py::arg("states"), py::arg("hook"))
      .def("set_require_sync", &moeflux::GradientBucketer::set_require_sync, py::arg("require_sync"))
      .def("bucket_indices", &moeflux::GradientBucketer::bucket_indices)
      .def("ready_order", &moeflux::GradientBucketer::ready_order)
      .def("buckets_rebuilt", &moeflux::GradientBucketer::buckets_rebuilt)
      .def("launch_log", [](const moeflux::GradientBucketer& self) {
        py::list out;
        for (const auto& record : self.launch_log()) out.append(py::make_tuple(record.bucket, record.gradients_pending));
        return out;
      });
}
