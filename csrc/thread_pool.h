// A small persistent thread pool. run(threads, fn) calls fn() on the calling thread and on up to
// threads - 1 workers, and returns when every call that started has returned. fn must claim its
// work dynamically (an atomic counter): a worker that wakes up after the caller has finished all
// the work does not join the call at all, so on a busy machine the caller never waits for a
// thread that the OS has not scheduled yet. Waits spin briefly, then sleep: a decode step is
// ~1 ms, so a futex round trip per call is visible, but a spinning thread could keep the CPU from
// the very thread it waits for.
#ifndef QUANTLAB_THREAD_POOL_H_
#define QUANTLAB_THREAD_POOL_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace ql {

class ThreadPool {
 public:
  ThreadPool() = default;
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // Calls from several host threads are serialized.
  void run(int threads, const std::function<void()>& fn);

  static ThreadPool& global();

 private:
  void worker();
  void grow(int workers);
  void reset_after_fork();

  static constexpr uint64_t kClosed = uint64_t{1} << 31;

  long owner_pid_ = 0;    // the process whose threads workers_ holds (fork leaves them behind)
  std::mutex run_mutex_;  // one run() at a time
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  std::vector<std::thread> workers_;
  const std::function<void()>* job_ = nullptr;
  int job_workers_ = 0;  // workers wanted by the current job
  std::atomic<uint64_t> generation_{0};
  // (generation << 32) | kClosed once the caller is done | number of workers that joined.
  std::atomic<uint64_t> entry_{0};
  std::atomic<uint32_t> finished_{0};  // joined workers that returned
  bool stop_ = false;
};

}  // namespace ql

#endif  // QUANTLAB_THREAD_POOL_H_
