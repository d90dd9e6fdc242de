// The staged engine's schedule (csrc/exchange/schedule.cpp) on random segment sizes, for every rank of a
// group at once: every rank sends each of its rows exactly once, what rank r sends to q in stage s is what q
// expects from r in stage s, and the per-expert rows and regroup order follow. No process group involved.
#include <catch2/catch.hpp>

#include <ATen/ATen.h>

#include <algorithm>
#include <random>
#include <vector>

#include "csrc/exchange/schedule.h"

using moeflux::parse_schedule;
using moeflux::plan_stages;
using moeflux::Schedule;
using moeflux::Stage;

namespace {

// counts[src][dst][j]: rows rank src routes to local expert j of rank dst.
using Counts = std::vector<std::vector<std::vector<int64_t>>>;

Counts random_counts(int64_t world, int64_t local, std::mt19937& gen) {
  std::uniform_int_distribution<int64_t> rows(0, 5);
  Counts c(world, std::vector<std::vector<int64_t>>(world, std::vector<int64_t>(local)));
  for (auto& src : c)
    for (auto& dst : src)
      for (auto& n : dst) n = rows(gen) == 0 ? 0 : rows(gen);  // some empty segments
  return c;
}

std::vector<Stage> plan_for(const Schedule& schedule, const Counts& c, int64_t rank) {
  const int64_t world = static_cast<int64_t>(c.size()), local = static_cast<int64_t>(c[0][0].size());
  at::Tensor sent = at::empty({world, local}, at::kLong), received = at::empty({world, local}, at::kLong);
  std::vector<int64_t> start(world * local);
  int64_t offset = 0;
  for (int64_t q = 0; q < world; ++q) {
    for (int64_t j = 0; j < local; ++j) {
      sent[q][j] = c[rank][q][j];
      received[q][j] = c[q][rank][j];
      start[q * local + j] = offset;
      offset += c[rank][q][j];
    }
  }
  return plan_stages(schedule, rank, sent, received, start, at::Device(at::kCPU));
}

std::vector<int64_t> values(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kLong).contiguous();
  return {c.const_data_ptr<int64_t>(), c.const_data_ptr<int64_t>() + c.numel()};
}

void check_schedule(const Schedule& schedule, const Counts& c) {
  const int64_t world = static_cast<int64_t>(c.size()), local = static_cast<int64_t>(c[0][0].size());
  std::vector<std::vector<Stage>> plans;
  for (int64_t r = 0; r < world; ++r) plans.push_back(plan_for(schedule, c, r));
  for (int64_t r = 0; r < world; ++r) {
    REQUIRE(static_cast<int64_t>(plans[r].size()) == schedule.stages);
    int64_t rows = 0;
    for (int64_t q = 0; q < world; ++q)
      for (int64_t j = 0; j < local; ++j) rows += c[r][q][j];
    std::vector<int64_t> sent_rows;
    std::vector<int64_t> expert_rows(local, 0);
    for (int64_t s = 0; s < schedule.stages; ++s) {
      const Stage& st = plans[r][s];
      const std::vector<int64_t> index = values(st.send_index);
      sent_rows.insert(sent_rows.end(), index.begin(), index.end());
      int64_t sent = 0, received = 0;
      for (int64_t q = 0; q < world; ++q) {
        CHECK(st.send_splits[q] == plans[q][s].recv_splits[r]);  // what r sends q is what q expects from r
        sent += st.send_splits[q];
        received += st.recv_splits[q];
      }
      CHECK(static_cast<int64_t>(index.size()) == sent);
      // The regroup is a permutation of the stage's received rows; its per-expert sizes are expert_rows.
      std::vector<int64_t> regroup = values(st.regroup);
      const std::vector<int64_t> per_expert = values(st.expert_rows);
      int64_t total = 0;
      for (int64_t j = 0; j < local; ++j) {
        total += per_expert[j];
        expert_rows[j] += per_expert[j];
      }
      CHECK(total == received);
      std::sort(regroup.begin(), regroup.end());
      for (int64_t i = 0; i < static_cast<int64_t>(regroup.size()); ++i) CHECK(regroup[i] == i);
    }
    // Every row of the permuted block leaves exactly once over the stages.
    std::sort(sent_rows.begin(), sent_rows.end());
    REQUIRE(static_cast<int64_t>(sent_rows.size()) == rows);
    for (int64_t i = 0; i < rows; ++i) CHECK(sent_rows[i] == i);
    for (int64_t j = 0; j < local; ++j) {
      int64_t arriving = 0;
      for (int64_t q = 0; q < world; ++q) arriving += c[q][r][j];
      CHECK(expert_rows[j] == arriving);
    }
  }
}

}  // namespace

TEST_CASE("every schedule moves every row once, and peers agree stage by stage", "[schedule]") {
  std::mt19937 gen(7);
  for (int64_t world : {1, 2, 3, 4, 6}) {
    for (int64_t local : {1, 3}) {
      const Counts c = random_counts(world, local, gen);
      check_schedule(parse_schedule("bulk", 2, 1, world, "test"), c);
      for (int64_t chunks : {1, 2, 5}) check_schedule(parse_schedule("chunked", chunks, 1, world, "test"), c);
      for (int64_t g = 1; g <= world; ++g) {
        if (world % g == 0) check_schedule(parse_schedule("pairwise", 2, g, world, "test"), c);
      }
    }
  }
}

TEST_CASE("bulk is one stage that sends the block in order", "[schedule]") {
  std::mt19937 gen(3);
  const Counts c = random_counts(3, 2, gen);
  const std::vector<Stage> stages = plan_for(parse_schedule("bulk", 4, 1, 3, "test"), c, 1);
  REQUIRE(stages.size() == 1);
  const std::vector<int64_t> index = values(stages[0].send_index);
  for (int64_t i = 0; i < static_cast<int64_t>(index.size()); ++i) CHECK(index[i] == i);
}

TEST_CASE("bad schedules raise, naming the op", "[schedule]") {
  CHECK_THROWS_WITH(parse_schedule("zigzag", 2, 1, 4, "op"), Catch::Contains("moeflux.op: schedule must be"));
  CHECK_THROWS_WITH(parse_schedule("chunked", 0, 1, 4, "op"), Catch::Contains("chunks must be >= 1"));
  CHECK_THROWS_WITH(parse_schedule("pairwise", 2, 3, 4, "op"), Catch::Contains("group_size must divide"));
}
