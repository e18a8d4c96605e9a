// Instruction sequences of plan programs that the CPU executor evaluates fused, in one pass per
// segment instead of one pass per instruction, with the same float32 operations in the same
// order per element (so the same bits). Header-only: the executor and the Python module's test
// hook (`_gelu_tanh_starts`) find the same sequences.
#pragma once

#include <cstdint>
#include <vector>

#include "jax_ark/plan_check.hpp"
#include "jax_ark/plan_format.hpp"

namespace jax_ark::cpu {

// jax.nn.gelu's tanh form (approximate=True, the default), as jax traces it and the planner
// compiles it: x * (h * (o + tanh(c2 * (x + c1 * x^3)))) in eight float32 instructions from
// INTEGER_POW(x, 3) at program index i on, each reading the one before and a CONST (c1, c2, o, h:
// any values) or x. Interpreted, each instruction is a pass over the segment loading and storing
// its registers; perf of a 512 x 128 gelu, one core: tanh_loop 32% of the samples, the other
// seven passes (eval_binary, eval_program) 29%. Fused only when nothing else reads the seven
// intermediate registers (no later instruction, not the window store's offset register).
inline bool gelu_tanh_at(const plan::PlanView& plan, int at, int len, int i, int store_reg) {
  using namespace jax_ark::plan;
  if (i + 8 > len) return false;
  const auto ins = [&](int k) -> const Instruction& { return plan.instruction(at + k); };
  const auto is = [&](int k, int32_t code) {
    return opcode_of(ins(k)) == code && dtype_of(ins(k)) == kF32;
  };
  const auto is_const = [&](int32_t reg) { return reg >= 0 && reg < i && is(reg, kConst); };
  const int32_t x = ins(i).a;
  const bool chain = is(i, kIntegerPow) && ins(i).b == 3 && x >= 0 && x < i &&
                     is(i + 1, kMul) && is_const(ins(i + 1).a) && ins(i + 1).b == i &&
                     is(i + 2, kAdd) && ins(i + 2).a == x && ins(i + 2).b == i + 1 &&
                     is(i + 3, kMul) && is_const(ins(i + 3).a) && ins(i + 3).b == i + 2 &&
                     is(i + 4, kTanh) && ins(i + 4).a == i + 3 &&
                     is(i + 5, kAdd) && is_const(ins(i + 5).a) && ins(i + 5).b == i + 4 &&
                     is(i + 6, kMul) && is_const(ins(i + 6).a) && ins(i + 6).b == i + 5 &&
                     is(i + 7, kMul) && ins(i + 7).a == x && ins(i + 7).b == i + 6;
  if (!chain || (store_reg >= i && store_reg < i + 7)) return false;
  for (int k = i + 8; k < len; ++k) {
    const OpcodeInfo info = opcode_info(opcode_of(ins(k)));
    const int32_t regs[3] = {ins(k).a, ins(k).b, ins(k).c};
    for (int j = 0; j < info.registers; ++j)
      if (regs[j] >= i && regs[j] < i + 7) return false;
    if (info.moved && ins(k).b >= i && ins(k).b < i + 7) return false;
  }
  return true;
}

// The absolute instruction indices where a gelu_tanh_at sequence starts, over every program of a
// plan that check_plan accepted.
inline std::vector<int32_t> gelu_tanh_starts(const plan::PlanView& plan) {
  std::vector<int32_t> starts;
  for (int o = 0; o < plan.header().num_ops; ++o) {
    const plan::OpRecord& op = plan.op(o);
    const int programs[2][3] = {{op.prologue_at, op.prologue_len, -1},
                                {op.epilogue_at, op.epilogue_len, op.store_at_plus1 - 1}};
    for (const auto& [at, len, store_reg] : programs)
      for (int i = 0; i + 8 <= len; ++i)
        if (gelu_tanh_at(plan, at, len, i, store_reg)) starts.push_back(at + i);
  }
  return starts;
}

}  // namespace jax_ark::cpu
