// Work items shared out over XLA's intra-op thread pool, claimed one at a time.
//
// The caller works too (it is not one of the pool's threads, so it takes one helper's place:
// the pool's size is the number of threads that work), and waits only for helpers that have
// started; a helper that starts after the caller returned finds no item left and touches
// nothing but the shared state, which it co-owns. Items must be independent: which thread
// runs one never changes its result.

#ifndef LIGERJAX_KERNELS_NATIVE_SHARE_OUT_H_
#define LIGERJAX_KERNELS_NATIVE_SHARE_OUT_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace ligerjax {

// Runs task.Run(i) for i in [0, count), each once, on the caller and up to
// pool.num_threads() - 1 helpers. Task is moved into the shared state.
template <typename Task>
void ShareOut(xla::ffi::ThreadPool& pool, int64_t count, Task task) {
  struct State {
    explicit State(Task t) : task(std::move(t)) {}
    void Work(int64_t count) {
      for (int64_t i; (i = next.fetch_add(1)) < count;) task.Run(i);
    }
    const Task task;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> active{0};
  };
  auto state = std::make_shared<State>(std::move(task));
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, count - 1);
  for (int64_t h = 0; h < helpers; ++h) {
    pool.Schedule([state, count] {
      state->active.fetch_add(1);
      state->Work(count);
      state->active.fetch_sub(1);
    });
  }
  state->Work(count);
  while (state->active.load() != 0) std::this_thread::yield();
}

}  // namespace ligerjax

#endif  // LIGERJAX_KERNELS_NATIVE_SHARE_OUT_H_
