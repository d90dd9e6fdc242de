// The communication scheduler's ordering rules, with fake collectives: every
// launch function records that it ran and returns a future that the test
// completes by hand. No process group involved.
#include <catch2/catch.hpp>

#include <algorithm>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "csrc/distributed/comm_scheduler.h"

using moeflux::comm_scheduler::AllToAllInFlight;
using moeflux::comm_scheduler::FuturePtr;
using moeflux::comm_scheduler::Scheduler;
using moeflux::comm_scheduler::TraceEvent;

namespace {

// Fake micro-ops: launch i appends i to `launched` and parks its collective's future in `wire`.
struct FakeCollectives {
  std::mutex mutex;
  std::vector<int> launched;
  std::vector<FuturePtr> wire;

  moeflux::comm_scheduler::LaunchFn op(int id) {
    return [this, id] {
      auto future = c10::make_intrusive<c10::ivalue::Future>(c10::IntType::get());
      std::lock_guard<std::mutex> lock(mutex);
      launched.push_back(id);
      wire.push_back(future);
      return future;
    };
  }
  std::vector<int> order() {
    std::lock_guard<std::mutex> lock(mutex);
    return launched;
  }
  // Completes the i-th launched collective (its value: 100 + its id).
  void complete(size_t i) {
    FuturePtr future;
    int id;
    {
      std::lock_guard<std::mutex> lock(mutex);
      future = wire.at(i);
      id = launched.at(i);
    }
    future->markCompleted(c10::IValue(int64_t{100 + id}));
  }
};

using Order = std::vector<int>;

// The rules, judged from the trace's stamps alone (not from the scheduler's counters): how many micro-ops of
// `kind` were launched while another of that kind was in flight, and while an all-to-all was.
struct Judged {
  int overlapping = 0, past_all_to_all = 0, open = 0;
};
Judged judge(const Scheduler& scheduler, TraceEvent::Kind kind = TraceEvent::Kind::micro_op) {
  std::vector<TraceEvent> events = scheduler.trace();
  std::sort(events.begin(), events.end(), [](const TraceEvent& a, const TraceEvent& b) { return a.t_ns < b.t_ns; });
  Judged judged;
  std::set<uint64_t> in_flight;
  int all_to_alls = 0;
  for (const TraceEvent& e : events) {
    if (e.kind == TraceEvent::Kind::all_to_all) {
      all_to_alls += e.begins ? 1 : -1;
    } else if (e.kind == kind && e.begins) {
      judged.overlapping += !in_flight.empty();
      judged.past_all_to_all += all_to_alls > 0;
      in_flight.insert(e.id);
    } else if (e.kind == kind) {
      in_flight.erase(e.id);
    }
  }
  judged.open = static_cast<int>(in_flight.size());
  return judged;
}

// Every micro-op of the trace done, none launched past another or past an all-to-all.
void check_rules_kept(const Scheduler& scheduler) {
  const Judged judged = judge(scheduler);
  CHECK(judged.overlapping == 0);
  CHECK(judged.past_all_to_all == 0);
  CHECK(judged.open == 0);
  CHECK(scheduler.trace_dropped() == 0);
}

}  // namespace

TEST_CASE("micro-ops launch one at a time, in submission order", "[comm_scheduler]") {
  Scheduler scheduler;
  scheduler.set_tracing(true);
  FakeCollectives fake;
  std::vector<FuturePtr> results;
  for (int i = 0; i < 3; ++i) results.push_back(scheduler.submit(fake.op(i)));
  CHECK(fake.order() == Order({0}));  // the way was free: the first one went at once, the others wait for it
  CHECK(scheduler.stats().micro_ops_queued == 2);
  CHECK_FALSE(results[0]->completed());
  fake.complete(0);
  CHECK(results[0]->completed());
  CHECK(results[0]->value().toInt() == 100);
  CHECK(fake.order() == Order({0, 1}));
  fake.complete(1);
  fake.complete(2);
  CHECK(fake.order() == Order({0, 1, 2}));
  for (const auto& r : results) CHECK(r->completed());
  const auto stats = scheduler.stats();
  CHECK(stats.micro_ops_launched == 3);
  CHECK(stats.max_micro_ops_in_flight == 1);
  CHECK(stats.micro_ops_in_flight == 0);
  CHECK(stats.micro_ops_held == 0);
  check_rules_kept(scheduler);
  CHECK(scheduler.trace().size() == 6);  // a launch and a completion each
}

TEST_CASE("no micro-op starts while an all-to-all is queued or running", "[comm_scheduler]") {
  Scheduler scheduler;
  scheduler.set_tracing(true);
  FakeCollectives fake;
  scheduler.all_to_all_enqueued();
  scheduler.submit(fake.op(0));
  scheduler.submit(fake.op(1));
  CHECK(fake.order().empty());
  scheduler.all_to_all_enqueued();  // two in flight (e.g. an asynchronous pipeline)
  scheduler.all_to_all_completed();
  CHECK(fake.order().empty());
  scheduler.all_to_all_completed();  // the last one done: the way is free
  CHECK(fake.order() == Order({0}));

  // An all-to-all that arrives while a micro-op is on the wire lets it finish
  // (at most one micro-op ahead of it), but holds the next one until it is done.
  scheduler.all_to_all_enqueued();
  fake.complete(0);
  CHECK(fake.order() == Order({0}));
  scheduler.all_to_all_completed();
  CHECK(fake.order() == Order({0, 1}));
  fake.complete(1);
  const auto stats = scheduler.stats();
  CHECK(stats.micro_ops_held == 2);  // each waited for an all-to-all once
  CHECK(stats.all_to_alls == 3);
  CHECK(stats.all_to_alls_in_flight == 0);
  check_rules_kept(scheduler);
}

TEST_CASE("flush launches everything queued, in order, whatever is in flight", "[comm_scheduler]") {
  Scheduler scheduler;
  scheduler.set_tracing(true);
  FakeCollectives fake;
  std::vector<FuturePtr> results;
  results.push_back(scheduler.submit(fake.op(0)));  // on the wire
  scheduler.all_to_all_enqueued();                   // and an all-to-all that never ends here
  for (int i = 1; i < 4; ++i) results.push_back(scheduler.submit(fake.op(i)));
  CHECK(fake.order() == Order({0}));
  scheduler.flush();
  CHECK(fake.order() == Order({0, 1, 2, 3}));
  CHECK(scheduler.stats().micro_ops_flushed == 3);
  CHECK(scheduler.stats().max_micro_ops_in_flight == 4);
  for (size_t i = 0; i < 4; ++i) fake.complete(i);
  // The trace tells flushed micro-ops apart, and the judge sees what they broke (so it can fail).
  const Judged flushed = judge(scheduler, TraceEvent::Kind::flushed_micro_op);
  CHECK(flushed.overlapping == 2);     // 2 and 3 went while the one before them was in flight
  CHECK(flushed.past_all_to_all == 3);
  check_rules_kept(scheduler);         // op 0, the one launched with the way free
  for (const auto& r : results) CHECK(r->completed());

  // What is submitted after the flush obeys the rules again.
  scheduler.submit(fake.op(4));
  CHECK(fake.order().size() == 4);
  scheduler.all_to_all_completed();
  CHECK(fake.order() == Order({0, 1, 2, 3, 4}));
  fake.complete(4);
  check_rules_kept(scheduler);
}

TEST_CASE("a failing launch fails its future and frees the way", "[comm_scheduler]") {
  Scheduler scheduler;
  FakeCollectives fake;
  std::vector<FuturePtr> results;
  results.push_back(scheduler.submit(fake.op(0)));
  results.push_back(scheduler.submit([]() -> FuturePtr {
    TORCH_CHECK(false, "backend is gone");
    return {};
  }));
  results.push_back(scheduler.submit(fake.op(2)));
  fake.complete(0);
  CHECK(results[1]->completed());
  CHECK(results[1]->hasError());
  CHECK_THROWS_WITH(results[1]->waitAndThrow(), Catch::Contains("backend is gone"));
  CHECK(fake.order() == Order({0, 2}));

  // An error of the collective itself reaches the result, and the next one still goes.
  results.push_back(scheduler.submit(fake.op(3)));
  fake.wire.at(1)->setError(std::make_exception_ptr(std::runtime_error("peer hung up")));
  CHECK(results[2]->hasError());
  CHECK(fake.order() == Order({0, 2, 3}));
  fake.complete(2);
  CHECK(results[3]->completed());
}

TEST_CASE("micro-ops already complete at launch do not stall the queue", "[comm_scheduler]") {
  Scheduler scheduler;
  scheduler.set_tracing(true);
  std::vector<int> launched;
  for (int i = 0; i < 5; ++i) {
    scheduler.submit([&launched, i] {
      launched.push_back(i);
      auto future = c10::make_intrusive<c10::ivalue::Future>(c10::IntType::get());
      future->markCompleted(c10::IValue(int64_t{i}));  // e.g. a backend that finishes inline
      return future;
    });
  }
  CHECK(launched == std::vector<int>({0, 1, 2, 3, 4}));
  CHECK(scheduler.stats().max_micro_ops_in_flight == 1);
  check_rules_kept(scheduler);
}

TEST_CASE("completions on other threads launch the next micro-op", "[comm_scheduler]") {
  Scheduler scheduler;
  scheduler.set_tracing(true);
  FakeCollectives fake;
  std::vector<FuturePtr> results;
  for (int i = 0; i < 20; ++i) results.push_back(scheduler.submit(fake.op(i)));
  // A "backend thread" completes whatever is on the wire while this thread
  // registers all-to-alls; the order of launches stays the order of submission.
  std::thread backend([&] {
    for (size_t i = 0; i < 20; ++i) {
      while (fake.order().size() <= i) std::this_thread::yield();
      fake.complete(i);
    }
  });
  for (int i = 0; i < 200; ++i) {
    AllToAllInFlight in_flight(scheduler);
    std::this_thread::yield();
  }
  backend.join();
  std::vector<int> expected(20);
  for (int i = 0; i < 20; ++i) expected[i] = i;
  CHECK(fake.order() == expected);
  for (const auto& r : results) CHECK(r->completed());
  CHECK(scheduler.stats().max_micro_ops_in_flight == 1);
  check_rules_kept(scheduler);  // the 200 all-to-alls interleaved with the 20 micro-ops by stamps
}

TEST_CASE("the trace: off until asked, unscheduled all-reduces, a bounded ring", "[comm_scheduler]") {
  Scheduler scheduler;
  scheduler.all_to_all_enqueued();
  scheduler.all_to_all_completed();
  CHECK(scheduler.trace().empty());
  scheduler.set_tracing(true);
  // Two all-reduces issued past the scheduler, in flight together: what priority prevents, and the judge sees.
  FuturePtr a = c10::make_intrusive<c10::ivalue::Future>(c10::IntType::get()), b = a->createInstance(a->elementType());
  scheduler.trace_unscheduled(a);
  scheduler.trace_unscheduled(b);
  a->markCompleted(c10::IValue(int64_t{0}));
  b->markCompleted(c10::IValue(int64_t{0}));
  const Judged unscheduled = judge(scheduler, TraceEvent::Kind::unscheduled);
  CHECK(unscheduled.overlapping == 1);
  CHECK(unscheduled.open == 0);
  // Full, the ring keeps the newest events, oldest first.
  const size_t capacity = Scheduler::kTraceCapacity;
  for (size_t i = 0; i < capacity; ++i) {
    scheduler.all_to_all_enqueued();
    scheduler.all_to_all_completed();
  }
  const std::vector<TraceEvent> trace = scheduler.trace();
  CHECK(trace.size() == capacity);
  CHECK(scheduler.trace_dropped() == static_cast<int64_t>(4 + capacity));
  const auto out_of_order = [](const TraceEvent& x, const TraceEvent& y) { return x.t_ns >= y.t_ns; };
  CHECK(std::adjacent_find(trace.begin(), trace.end(), out_of_order) == trace.end());  // strictly increasing
  CHECK((trace.front().kind == TraceEvent::Kind::all_to_all && trace.front().begins));
}

namespace {
// A Work whose future the test completes (as a backend would).
struct FakeWork : c10d::Work {
  FuturePtr future = c10::make_intrusive<c10::ivalue::Future>(c10::IntType::get());
  c10::intrusive_ptr<c10::ivalue::Future> getFuture() override { return future; }
};
struct NoFutureWork : c10d::Work {};  // Work::getFuture() throws: a backend without futures
}  // namespace

TEST_CASE("AllToAllInFlight: for its scope, or until its Work is done", "[comm_scheduler]") {
  Scheduler scheduler;
  FakeCollectives fake;
  {
    AllToAllInFlight in_flight(scheduler);
    scheduler.submit(fake.op(0));
    CHECK(fake.order().empty());
  }
  CHECK(fake.order() == Order({0}));
  fake.complete(0);

  auto work = c10::make_intrusive<FakeWork>();
  {
    AllToAllInFlight in_flight(scheduler);
    in_flight.until_done(work);
  }
  scheduler.submit(fake.op(1));
  CHECK(scheduler.stats().all_to_alls_in_flight == 1);  // the guard is gone, the collective is not
  CHECK(fake.order() == Order({0}));
  work->future->markCompleted(c10::IValue(int64_t{0}));
  CHECK(scheduler.stats().all_to_alls_in_flight == 0);
  CHECK(fake.order() == Order({0, 1}));
  fake.complete(1);

  auto plain = c10::make_intrusive<NoFutureWork>();
  {
    AllToAllInFlight in_flight(scheduler);
    in_flight.until_done(plain);
    CHECK(scheduler.stats().all_to_alls_in_flight == 1);
  }
  CHECK(scheduler.stats().all_to_alls_in_flight == 0);
}
