// A token ring shared between processes: the runtime's process releases an answer's tokens
// into a named POSIX shared-memory segment, and a separate process — a C++ control loop that
// includes this header and nothing of Python — maps it by name and reads them.
//
// The same contract as SpscRing / TokenRecord (spsc_ring.hpp, token.hpp): one producer, one
// consumer, 128-byte TokenRecords, free-running 64-bit indices published with release and read
// with acquire, a full ring reported to the producer and never overwritten, each answer ended
// by its end record. Here the indices and the futex doorbell live in the segment, and the
// doorbell is a shared futex (FUTEX_WAIT/WAKE without _PRIVATE), so a consumer blocked in
// another process is woken by a push.
//
// Segment layout (version kShmRingLayoutVersion): a 256-byte ShmRingHeader, then `capacity`
// slots of TokenRecord. `magic` and `layout_version` keep their offsets (0 and 8) in every
// version, so any build can recognise a ring it cannot read and refuse it with a clear error.
//
// Liveness: the producer holds an open-file-description lock (F_OFD_SETLK) on byte 0 of the
// segment for as long as it lives; the kernel drops it the moment the process dies, whatever
// killed it. A consumer asks (F_OFD_GETLK, one syscall) when it finds the ring empty, at most
// every `liveness_interval_ns`, and while it waits it sleeps in slices of that length. Chosen
// over pid polling: a killed process stays a zombie (kill(pid, 0) succeeds) until its parent
// reaps it, and pids are reused. Caveat: a child forked (not exec'd) by the producer inherits
// the lock; the runtime does not fork. The consumer holds byte 1, so a second consumer is
// refused instead of silently corrupting the read index.
//
// Restart: a new producer refuses a name whose producer is alive, and otherwise replaces the
// segment (unlink, create anew) with generation = old generation + 1. A consumer attached to
// the old segment reads everything the dead producer published, learns it is gone, and
// re-attaches by name (ShmRingReader does all of this in a non-blocking poll()).
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>

#include "clock.hpp"
#include "futex.hpp"
#include "token.hpp"

namespace pydisco {

inline constexpr std::uint64_t kShmRingMagic = 0x3172'6d68'7364'7970ULL;  // "pydshmr1" in memory
// Version 2 added the producer's announcement of its next push (the doorbell's line).
inline constexpr std::uint32_t kShmRingLayoutVersion = 2;
inline constexpr std::size_t kShmRingMaxCapacity = std::size_t{1} << 24;
inline constexpr std::int64_t kShmDefaultLivenessIntervalNs = 10'000'000;  // 10 ms

// A ring that cannot be created or attached: a bad name, a live producer already owning the
// name, a segment of another layout version or of something else.
class ShmRingError : public std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct ShmRingHeader {
  // ---- identity: written by the producer before it publishes `magic`, then constant ----
  std::atomic<std::uint64_t> magic{0};  // 0 while the producer initialises the segment
  std::uint32_t layout_version = 0;
  std::uint32_t header_size = 0;
  std::uint32_t record_size = 0;
  std::int32_t producer_pid = 0;
  std::uint64_t capacity = 0;
  std::uint64_t generation = 0;  // 1 for the first producer of a name, +1 per restart
  std::int64_t created_ns = 0;   // CLOCK_MONOTONIC, comparable across processes

  // ---- producer's line ----
  alignas(kCacheLine) std::atomic<std::uint64_t> write{0};
  std::atomic<std::uint64_t> rejected{0};
  std::atomic<std::uint64_t> high_water{0};
  std::atomic<std::int64_t> heartbeat_ns{0};  // last push or heartbeat(): informative only
  std::atomic<std::uint32_t> closed{0};       // 1 once the producer closed cleanly

  // ---- consumer's line ----
  alignas(kCacheLine) std::atomic<std::uint64_t> read{0};
  std::atomic<std::uint32_t> consumer_waiting{0};
  std::atomic<std::int32_t> consumer_pid{0};

  // ---- the doorbell, a futex shared between the processes ----
  alignas(kCacheLine) std::atomic<std::uint32_t> doorbell{0};
  // The producer's announcement of its next push (ShmRingView::announce_push): the write
  // index it will fill, and when. ~0 (no read index reaches it) until the first.
  std::atomic<std::uint64_t> announced_index{~std::uint64_t{0}};
  std::atomic<std::int64_t> announced_ns{0};
};

static_assert(sizeof(ShmRingHeader) == 4 * kCacheLine, "the header is four cache lines");
static_assert(std::atomic<std::uint64_t>::is_always_lock_free &&
                  std::atomic<std::uint32_t>::is_always_lock_free,
              "atomics in shared memory must be lock-free (hence address-free)");
static_assert(offsetof(ShmRingHeader, magic) == 0 && offsetof(ShmRingHeader, layout_version) == 8,
              "magic and layout_version keep their offsets in every layout version");

namespace shm_detail {

inline constexpr off_t kProducerLockByte = 0;
inline constexpr off_t kConsumerLockByte = 1;

// A write lock on one byte of the file.
inline struct flock byte_lock(off_t byte) noexcept {
  struct flock fl{};
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = byte;
  fl.l_len = 1;
  return fl;
}

// Takes a write lock on one byte without waiting; false when another holder has it.
inline bool try_lock_byte(int fd, off_t byte) noexcept {
  struct flock fl = byte_lock(byte);
  return ::fcntl(fd, F_OFD_SETLK, &fl) == 0;
}

// Whether another open file description (another process, or another open in this one)
// holds a lock on `byte`.
inline bool byte_locked_elsewhere(int fd, off_t byte) noexcept {
  struct flock fl = byte_lock(byte);
  if (::fcntl(fd, F_OFD_GETLK, &fl) != 0) return true;  // cannot tell: assume alive
  return fl.l_type != F_UNLCK;
}

class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) noexcept : fd_(fd) {}
  Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) {
      reset();
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  ~Fd() { reset(); }
  int get() const noexcept { return fd_; }
  explicit operator bool() const noexcept { return fd_ >= 0; }
  void reset() noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

class Mapping {
 public:
  Mapping() = default;
  Mapping(int fd, std::size_t size) : size_(size) {
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) throw std::system_error(errno, std::generic_category(), "mmap shm ring");
    addr_ = p;
  }
  Mapping(Mapping&& o) noexcept
      : addr_(std::exchange(o.addr_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  Mapping& operator=(Mapping&& o) noexcept {
    if (this != &o) {
      reset();
      addr_ = std::exchange(o.addr_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  ~Mapping() { reset(); }
  void* get() const noexcept { return addr_; }
  void reset() noexcept {
    if (addr_ != nullptr) ::munmap(addr_, size_);
    addr_ = nullptr;
  }

 private:
  void* addr_ = nullptr;
  std::size_t size_ = 0;
};

// "robot-answers" (or "/robot-answers") -> "/robot-answers". Letters, digits, '.', '_', '-'.
inline std::string shm_path(std::string_view name) {
  if (!name.empty() && name.front() == '/') name.remove_prefix(1);
  const bool ok = !name.empty() && name.size() <= 200 && name.front() != '.' &&
                  std::all_of(name.begin(), name.end(), [](char c) {
                    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                           (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
                  });
  if (!ok)
    throw ShmRingError("shm ring name '" + std::string(name) +
                       "' is invalid: use 1-200 letters, digits, '.', '_' or '-', not starting "
                       "with '.'");
  std::string path(1, '/');  // appended, not "/" + string: GCC 12 warns falsely on that
  path.append(name);
  return path;
}

inline std::size_t segment_size(std::size_t capacity) {
  return sizeof(ShmRingHeader) + capacity * sizeof(TokenRecord);
}

inline ShmRingHeader* header_at(void* addr) noexcept {
  return std::launder(reinterpret_cast<ShmRingHeader*>(addr));
}

inline TokenRecord* slots_at(void* addr) noexcept {
  return std::launder(
      reinterpret_cast<TokenRecord*>(static_cast<char*>(addr) + sizeof(ShmRingHeader)));
}

// Why a mapped header cannot be read by this build; empty when it can.
inline std::string incompatibility(const ShmRingHeader& h, std::string_view path,
                                   std::size_t file_size) {
  const std::uint64_t magic = h.magic.load(std::memory_order_acquire);
  const std::string ring = "shm ring '" + std::string(path) + "'";
  if (magic != kShmRingMagic) return ring + " is not a pydisco token ring (bad magic)";
  if (h.layout_version != kShmRingLayoutVersion)
    return ring + " has layout version " + std::to_string(h.layout_version) +
           "; this build reads version " + std::to_string(kShmRingLayoutVersion) +
           " (rebuild the consumer against the producer's pydisco)";
  if (h.header_size != sizeof(ShmRingHeader) || h.record_size != sizeof(TokenRecord))
    return ring + " has " + std::to_string(h.header_size) + "-byte header and " +
           std::to_string(h.record_size) + "-byte records; this build uses " +
           std::to_string(sizeof(ShmRingHeader)) + " and " + std::to_string(sizeof(TokenRecord));
  if (h.capacity < 2 || h.capacity > kShmRingMaxCapacity || (h.capacity & (h.capacity - 1)) != 0 ||
      segment_size(h.capacity) > file_size)
    return ring + " is truncated or has a bad capacity (" + std::to_string(h.capacity) + ")";
  return {};
}

}  // namespace shm_detail

// The ring algorithm over a mapped segment: SpscRing's, with the indices in the header. Each
// side keeps its own cached view of the other's index. Producer and consumer each use their
// own view (usually in different processes, over different mappings of the same segment).
class ShmRingView {
 public:
  ShmRingView(ShmRingHeader* header, TokenRecord* slots) noexcept
      : h_(header), slots_(slots), capacity_(header->capacity), mask_(header->capacity - 1),
        read_cache_(header->read.load(std::memory_order_acquire)),
        write_cache_(header->write.load(std::memory_order_acquire)) {}

  std::size_t capacity() const noexcept { return static_cast<std::size_t>(capacity_); }
  ShmRingHeader& header() const noexcept { return *h_; }

  // ---- producer side ----

  // Pushes and wakes a consumer that announced it is waiting (the fence pairs with the
  // consumer's, as in SpscRing::try_push_notify). False when full (counted), never overwrites.
  [[nodiscard]] bool try_push(const TokenRecord& value) noexcept {
    const std::uint64_t w = h_->write.load(std::memory_order_relaxed);
    // ">=": a read index past the write index (a corrupted segment) also counts as full.
    if (w - read_cache_ >= capacity_) {
      read_cache_ = h_->read.load(std::memory_order_acquire);
      if (w - read_cache_ >= capacity_) {
        h_->rejected.store(h_->rejected.load(std::memory_order_relaxed) + 1,
                           std::memory_order_relaxed);
        return false;
      }
    }
    slots_[w & mask_] = value;
    h_->write.store(w + 1, std::memory_order_release);
    const std::uint64_t size = w + 1 - h_->read.load(std::memory_order_relaxed);
    if (size <= capacity_ && size > h_->high_water.load(std::memory_order_relaxed))
      h_->high_water.store(size, std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (h_->consumer_waiting.load(std::memory_order_relaxed) != 0) wake_consumer();
    return true;
  }

  void wake_consumer() noexcept {
    h_->doorbell.fetch_add(1, std::memory_order_release);
    futex_wake_all(h_->doorbell, FutexScope::shared);
  }

  // The next push is expected at `at_ns`: wake a blocked consumer now, so it spins for it
  // (as SpscRing::announce_push: a hand-over instead of a cross-process futex wake-up).
  void announce_push(std::int64_t at_ns) noexcept {
    h_->announced_ns.store(at_ns, std::memory_order_relaxed);
    h_->announced_index.store(h_->write.load(std::memory_order_relaxed), std::memory_order_release);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (h_->consumer_waiting.load(std::memory_order_relaxed) != 0) wake_consumer();
  }

  // ---- consumer side ----

  [[nodiscard]] bool try_pop(TokenRecord& out) noexcept {
    const std::uint64_t r = h_->read.load(std::memory_order_relaxed);
    if (write_cache_ - r == 0 || write_cache_ - r > capacity_) {
      write_cache_ = h_->write.load(std::memory_order_acquire);
      // More than a ring's worth ahead cannot happen with an honest producer: read nothing.
      if (write_cache_ - r == 0 || write_cache_ - r > capacity_) return false;
    }
    out = slots_[r & mask_];
    // Another process wrote this record: never let its length reach past the text.
    out.text_len = static_cast<std::uint8_t>(std::min<std::size_t>(out.text_len, TokenRecord::kTextCapacity));
    h_->read.store(r + 1, std::memory_order_release);
    return true;
  }

  bool empty_for_consumer() noexcept {
    const std::uint64_t r = h_->read.load(std::memory_order_relaxed);
    if (write_cache_ != r) return false;
    write_cache_ = h_->write.load(std::memory_order_acquire);
    return write_cache_ == r;
  }

  // When the next record to read was announced and is not here: spin for it (no syscall)
  // until it lands, 0.2 ms past the announced time, the deadline or a close. Whether the ring
  // is non-empty.
  bool spin_for_announced(std::int64_t deadline_ns) noexcept {
    const std::uint64_t index = h_->announced_index.load(std::memory_order_acquire);
    if (index != h_->read.load(std::memory_order_relaxed)) return !empty_for_consumer();
    std::int64_t until = h_->announced_ns.load(std::memory_order_relaxed) + kAnnouncedSlackNs;
    if (deadline_ns >= 0 && deadline_ns < until) until = deadline_ns;
    return spin_until([&] { return !empty_for_consumer(); },
                      [&] { return h_->closed.load(std::memory_order_acquire) != 0; }, until);
  }

  // Blocks until the ring is non-empty, the deadline passes (deadline_ns < 0: none) or the
  // doorbell rings (a push, a close, wake_consumer; an announcement is waited for spinning).
  // Returns whether it is non-empty.
  bool wait_nonempty(std::int64_t deadline_ns) noexcept {
    for (;;) {
      if (!empty_for_consumer()) return true;
      if (spin_for_announced(deadline_ns)) return true;
      const std::uint32_t bell = h_->doorbell.load(std::memory_order_acquire);
      h_->consumer_waiting.store(1, std::memory_order_relaxed);
      std::atomic_thread_fence(std::memory_order_seq_cst);
      // Look again after taking the bell: a push or a close before it rang a bell this wait
      // would otherwise sleep on (a closed ring gets no more pushes to ring it again).
      if (!empty_for_consumer() || h_->closed.load(std::memory_order_acquire) != 0) {
        h_->consumer_waiting.store(0, std::memory_order_relaxed);
        return !empty_for_consumer();
      }
      const bool woken = futex_wait_until(h_->doorbell, bell, deadline_ns, FutexScope::shared);
      h_->consumer_waiting.store(0, std::memory_order_relaxed);
      if (h_->doorbell.load(std::memory_order_acquire) != bell)
        return !empty_for_consumer() || spin_for_announced(deadline_ns);
      if (!woken && deadline_ns >= 0 && now_ns() >= deadline_ns) return !empty_for_consumer();
    }
  }

  // ---- anyone ----

  RingStatistics statistics() const noexcept {
    RingStatistics s;
    s.capacity = capacity();
    s.popped = h_->read.load(std::memory_order_acquire);
    s.pushed = h_->write.load(std::memory_order_acquire);
    s.size = static_cast<std::size_t>(s.pushed - s.popped);
    s.rejected = h_->rejected.load(std::memory_order_relaxed);
    s.high_water = static_cast<std::size_t>(h_->high_water.load(std::memory_order_relaxed));
    return s;
  }

 private:
  ShmRingHeader* h_;
  TokenRecord* slots_;
  std::uint64_t capacity_;
  std::uint64_t mask_;
  std::uint64_t read_cache_;   // producer's view of the consumer's index
  std::uint64_t write_cache_;  // consumer's view of the producer's index
};

// The producer: creates the named segment and owns it while it lives. One thread pushes.
class ShmRingProducer {
 public:
  // `capacity` is rounded up to a power of two (2 .. 2^24). Throws ShmRingError when the
  // name is invalid or a live producer owns it; std::system_error when the OS refuses.
  explicit ShmRingProducer(std::string_view name, std::size_t capacity = 1024, mode_t mode = 0600)
      : path_(shm_detail::shm_path(name)) {
    if (capacity > kShmRingMaxCapacity)
      throw ShmRingError("shm ring capacity " + std::to_string(capacity) + " exceeds " +
                         std::to_string(kShmRingMaxCapacity));
    std::size_t cap = 2;
    while (cap < capacity) cap <<= 1;
    const std::uint64_t generation = retire_previous();
    fd_ = shm_detail::Fd(::shm_open(path_.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, mode));
    if (!fd_) {
      if (errno == EEXIST)
        throw ShmRingError("shm ring '" + path_ + "' was created by another producer meanwhile");
      throw std::system_error(errno, std::generic_category(), "shm_open " + path_);
    }
    // The lock first: a consumer that sees the magic then always finds the producer alive.
    if (!shm_detail::try_lock_byte(fd_.get(), shm_detail::kProducerLockByte))
      throw std::system_error(errno, std::generic_category(), "lock shm ring " + path_);
    const std::size_t size = shm_detail::segment_size(cap);
    if (::fchmod(fd_.get(), mode) != 0 || ::ftruncate(fd_.get(), static_cast<off_t>(size)) != 0) {
      const int err = errno;
      ::shm_unlink(path_.c_str());
      throw std::system_error(err, std::generic_category(), "size shm ring " + path_);
    }
    mapping_ = shm_detail::Mapping(fd_.get(), size);
    auto* h = new (mapping_.get()) ShmRingHeader{};
    h->layout_version = kShmRingLayoutVersion;
    h->header_size = sizeof(ShmRingHeader);
    h->record_size = sizeof(TokenRecord);
    h->producer_pid = static_cast<std::int32_t>(::getpid());
    h->capacity = cap;
    h->generation = generation;
    h->created_ns = now_ns();
    h->heartbeat_ns.store(h->created_ns, std::memory_order_relaxed);
    std::uninitialized_default_construct_n(shm_detail::slots_at(mapping_.get()), cap);
    h->magic.store(kShmRingMagic, std::memory_order_release);  // published: consumers may attach
    view_.emplace(h, shm_detail::slots_at(mapping_.get()));
  }

  ShmRingProducer(const ShmRingProducer&) = delete;
  ShmRingProducer& operator=(const ShmRingProducer&) = delete;
  ~ShmRingProducer() { close(); }

  const std::string& name() const noexcept { return path_; }
  std::uint64_t generation() const noexcept { return view_->header().generation; }
  std::size_t capacity() const noexcept { return view_->capacity(); }
  bool closed() const noexcept { return closed_; }

  // Pushes one record (a token or an end record) and wakes the consumer if it waits. False
  // when the ring is full (counted in statistics().rejected) or the producer is closed.
  // A record owed from an earlier answer (owe_end) goes first.
  [[nodiscard]] bool try_push(const TokenRecord& record) noexcept {
    if (closed_) return false;
    if (owed_end_) {
      if (!view_->try_push(*owed_end_)) return false;
      owed_end_.reset();
    }
    if (!view_->try_push(record)) return false;
    view_->header().heartbeat_ns.store(now_ns(), std::memory_order_relaxed);
    return true;
  }

  // The next record is expected at `at_ns`: a waiting consumer wakes now and spins for it.
  void announce_push(std::int64_t at_ns) noexcept {
    if (!closed_) view_->announce_push(at_ns);
  }

  // An end record that did not fit: pushed before the next record, so every answer in the
  // ring is ended even when its writer had to stop while the ring was full.
  void owe_end(const TokenRecord& end) noexcept { owed_end_ = end; }
  bool owes_end() const noexcept { return owed_end_.has_value(); }

  // One writer at a time: a ShmForwarder claims the producer for its answer and releases it
  // after; the claim's acquire/release hands the writer's state (cached index, owed end) to
  // the next writer, on whatever thread it runs.
  [[nodiscard]] bool claim_writer() noexcept {
    return !writer_claimed_.exchange(true, std::memory_order_acquire);
  }
  void release_writer() noexcept { writer_claimed_.store(false, std::memory_order_release); }
  bool writer_claimed() const noexcept { return writer_claimed_.load(std::memory_order_acquire); }

  void heartbeat() noexcept { view_->header().heartbeat_ns.store(now_ns(), std::memory_order_relaxed); }

  // Whether a consumer holds the ring now.
  bool consumer_attached() const noexcept {
    return fd_ && shm_detail::byte_locked_elsewhere(fd_.get(), shm_detail::kConsumerLockByte);
  }

  // Marks the ring closed, wakes the consumer (it reads what is left, then learns the producer
  // is gone) and drops the liveness lock. The name stays, so the next producer's generation
  // follows on; unlink() removes it.
  void close() noexcept {
    if (closed_ || !view_) return;
    closed_ = true;
    view_->header().closed.store(1, std::memory_order_release);
    view_->wake_consumer();
    fd_.reset();
  }

  RingStatistics statistics() const noexcept { return view_->statistics(); }

  // For tests and in-process tools: the header and slots this producer writes.
  ShmRingHeader* header() const noexcept { return &view_->header(); }
  TokenRecord* slots() const noexcept { return shm_detail::slots_at(mapping_.get()); }

  // Removes the name (an attached consumer keeps its mapping). False when there was none.
  static bool unlink(std::string_view name) {
    return ::shm_unlink(shm_detail::shm_path(name).c_str()) == 0;
  }

 private:
  // Looks at a segment left under the name: refuses it if its producer lives, else removes
  // it. Returns the new generation.
  std::uint64_t retire_previous() {
    shm_detail::Fd old(::shm_open(path_.c_str(), O_RDWR | O_CLOEXEC, 0));
    if (!old) return 1;
    std::uint64_t generation = 1;
    struct stat st{};
    if (::fstat(old.get(), &st) == 0 && static_cast<std::size_t>(st.st_size) >= sizeof(ShmRingHeader)) {
      shm_detail::Mapping m(old.get(), sizeof(ShmRingHeader));
      const ShmRingHeader& h = *shm_detail::header_at(m.get());
      if (h.magic.load(std::memory_order_acquire) == kShmRingMagic)
        generation = h.generation + 1;
      if (shm_detail::byte_locked_elsewhere(old.get(), shm_detail::kProducerLockByte))
        throw ShmRingError("shm ring '" + path_ + "' is in use by a live producer (pid " +
                           std::to_string(h.producer_pid) + ")");
    } else if (shm_detail::byte_locked_elsewhere(old.get(), shm_detail::kProducerLockByte)) {
      throw ShmRingError("shm ring '" + path_ + "' is being created by another producer");
    }
    ::shm_unlink(path_.c_str());
    return generation;
  }

  std::string path_;
  shm_detail::Fd fd_;
  shm_detail::Mapping mapping_;
  std::optional<ShmRingView> view_;
  std::optional<TokenRecord> owed_end_;
  bool closed_ = false;
  std::atomic<bool> writer_claimed_{false};
};

enum class ShmAttach : std::uint8_t {
  kAttached = 0,
  kNoRing,       // nothing under that name (yet)
  kNotReady,     // a producer is creating it right now
  kNoProducer,   // a segment whose producer has gone: wait for the next one
  kRefused,      // another layout version, not a pydisco ring, or it already has a consumer
};

enum class ShmRead : std::uint8_t {
  kRecord = 0,    // `out` holds the next record (a token or an end record)
  kEmpty,         // nothing now; the producer is alive
  kProducerGone,  // the producer died or closed, and everything it published has been read
};

// One consumer's attachment to one producer's segment.
class ShmRingConsumer {
 public:
  // Attaches, or says why not in `why` (kRefused: a message naming the problem).
  static ShmAttach try_attach(std::string_view name, std::unique_ptr<ShmRingConsumer>& out,
                              std::string& why,
                              std::int64_t liveness_interval_ns = kShmDefaultLivenessIntervalNs) {
    const std::string path = shm_detail::shm_path(name);
    shm_detail::Fd fd(::shm_open(path.c_str(), O_RDWR | O_CLOEXEC, 0));
    if (!fd) {
      if (errno == ENOENT) return ShmAttach::kNoRing;
      why = "shm_open " + path + ": " + std::strerror(errno);
      return ShmAttach::kRefused;
    }
    struct stat st{};
    if (::fstat(fd.get(), &st) != 0 || static_cast<std::size_t>(st.st_size) < sizeof(ShmRingHeader))
      return ShmAttach::kNotReady;  // created, not yet sized
    const auto file_size = static_cast<std::size_t>(st.st_size);
    shm_detail::Mapping mapping(fd.get(), file_size);
    ShmRingHeader& h = *shm_detail::header_at(mapping.get());
    if (h.magic.load(std::memory_order_acquire) == 0) {
      // Zero magic: being initialised — unless its creator is gone (then it never will be).
      return shm_detail::byte_locked_elsewhere(fd.get(), shm_detail::kProducerLockByte)
                 ? ShmAttach::kNotReady
                 : ShmAttach::kNoProducer;
    }
    if (std::string problem = shm_detail::incompatibility(h, path, file_size); !problem.empty()) {
      why = std::move(problem);
      return ShmAttach::kRefused;
    }
    if (!shm_detail::byte_locked_elsewhere(fd.get(), shm_detail::kProducerLockByte))
      return ShmAttach::kNoProducer;
    if (!shm_detail::try_lock_byte(fd.get(), shm_detail::kConsumerLockByte)) {
      why = "shm ring '" + path + "' already has a consumer (pid " +
            std::to_string(h.consumer_pid.load(std::memory_order_relaxed)) + ")";
      return ShmAttach::kRefused;
    }
    h.consumer_pid.store(static_cast<std::int32_t>(::getpid()), std::memory_order_relaxed);
    h.consumer_waiting.store(0, std::memory_order_relaxed);  // a dead consumer may have left 1
    out.reset(new ShmRingConsumer(path, std::move(fd), std::move(mapping), liveness_interval_ns));
    return ShmAttach::kAttached;
  }

  // Attaches or throws ShmRingError saying why not.
  static std::unique_ptr<ShmRingConsumer> attach(
      std::string_view name, std::int64_t liveness_interval_ns = kShmDefaultLivenessIntervalNs) {
    std::unique_ptr<ShmRingConsumer> out;
    std::string why;
    const std::string path = shm_detail::shm_path(name);
    switch (try_attach(name, out, why, liveness_interval_ns)) {
      case ShmAttach::kAttached: return out;
      case ShmAttach::kNoRing: throw ShmRingError("no shm ring '" + path + "'");
      case ShmAttach::kNotReady: throw ShmRingError("shm ring '" + path + "' is being created");
      case ShmAttach::kNoProducer: throw ShmRingError("shm ring '" + path + "' has no live producer");
      case ShmAttach::kRefused: break;
    }
    throw ShmRingError(why);
  }

  ShmRingConsumer(const ShmRingConsumer&) = delete;
  ShmRingConsumer& operator=(const ShmRingConsumer&) = delete;

  const std::string& name() const noexcept { return path_; }
  std::uint64_t generation() const noexcept { return view_.header().generation; }
  std::int32_t producer_pid() const noexcept { return view_.header().producer_pid; }
  std::size_t capacity() const noexcept { return view_.capacity(); }
  std::int64_t producer_heartbeat_ns() const noexcept {
    return view_.header().heartbeat_ns.load(std::memory_order_relaxed);
  }
  RingStatistics statistics() const noexcept { return view_.statistics(); }

  // Never blocks. On an empty ring it checks the producer's liveness (at most once per
  // liveness interval; a clean close is seen at once).
  ShmRead try_pop(TokenRecord& out) noexcept {
    if (view_.try_pop(out)) return ShmRead::kRecord;
    if (!gone_) {
      if (view_.header().closed.load(std::memory_order_acquire) != 0) {
        gone_ = true;
      } else {
        const std::int64_t now = now_ns();
        if (now - last_liveness_check_ns_ >= liveness_interval_ns_) {
          last_liveness_check_ns_ = now;
          gone_ = !shm_detail::byte_locked_elsewhere(fd_.get(), shm_detail::kProducerLockByte);
        }
      }
      if (!gone_) return ShmRead::kEmpty;
    }
    // Gone: whatever it published before dying is still to be read, in order.
    return view_.try_pop(out) ? ShmRead::kRecord : ShmRead::kProducerGone;
  }

  // Blocks until a record, the producer's end (seen within one liveness interval) or the
  // deadline (deadline_ns < 0: none; kEmpty then).
  ShmRead pop_wait(TokenRecord& out, std::int64_t deadline_ns) noexcept {
    for (;;) {
      const ShmRead r = try_pop(out);
      if (r != ShmRead::kEmpty) return r;
      const std::int64_t now = now_ns();
      if (deadline_ns >= 0 && now >= deadline_ns) return ShmRead::kEmpty;
      wait_readable(deadline_ns);
    }
  }

  // Sleeps until something may have changed: a push, a close, or one liveness interval (or the
  // deadline, if sooner). Callers then try_pop.
  void wait_readable(std::int64_t deadline_ns) noexcept {
    std::int64_t slice_end = now_ns() + liveness_interval_ns_;
    if (deadline_ns >= 0) slice_end = std::min(slice_end, deadline_ns);
    (void)view_.wait_nonempty(slice_end);
  }

  // Asks the kernel now (a syscall): whether the producer still holds its lock and is open.
  bool producer_alive() const noexcept {
    return view_.header().closed.load(std::memory_order_acquire) == 0 &&
           shm_detail::byte_locked_elsewhere(fd_.get(), shm_detail::kProducerLockByte);
  }

  // Whether the producer ended with close() rather than dying.
  bool producer_closed() const noexcept {
    return view_.header().closed.load(std::memory_order_acquire) != 0;
  }

 private:
  ShmRingConsumer(std::string path, shm_detail::Fd fd, shm_detail::Mapping mapping,
                  std::int64_t liveness_interval_ns)
      : path_(std::move(path)), fd_(std::move(fd)), mapping_(std::move(mapping)),
        view_(shm_detail::header_at(mapping_.get()), shm_detail::slots_at(mapping_.get())),
        liveness_interval_ns_(std::max<std::int64_t>(liveness_interval_ns, 100'000)),
        last_liveness_check_ns_(now_ns()) {}

  std::string path_;
  shm_detail::Fd fd_;
  shm_detail::Mapping mapping_;
  ShmRingView view_;
  std::int64_t liveness_interval_ns_;
  std::int64_t last_liveness_check_ns_;
  bool gone_ = false;
};

enum class ShmEvent : std::uint8_t {
  kNone = 0,      // nothing now (not attached yet, or the ring is empty)
  kRecord,        // `out` holds a record: a token, or an answer's end record
  kAttached,      // attached to a producer (the first, or a restarted one: see generation())
  kProducerLost,  // the producer died or closed; every record it published was delivered
  kRefused,       // a ring is there but cannot be read: see error() (reported once per cause)
};

struct ShmReaderOptions {
  std::int64_t reattach_interval_ns = 10'000'000;  // how often to look for a producer
  std::int64_t liveness_interval_ns = kShmDefaultLivenessIntervalNs;
};

// The control loop's object: a consumer that attaches by name, re-attaches to a restarted
// producer, and reports what happened as events. poll() never blocks (it makes a few system
// calls at most once per interval while detached, one per liveness interval while idle).
class ShmRingReader {
 public:
  explicit ShmRingReader(std::string_view name, ShmReaderOptions options = {})
      : path_(shm_detail::shm_path(name)), options_(options) {}

  ShmEvent poll(TokenRecord& out) {
    if (consumer_) {
      switch (consumer_->try_pop(out)) {
        case ShmRead::kRecord: return ShmEvent::kRecord;
        case ShmRead::kEmpty: return ShmEvent::kNone;
        case ShmRead::kProducerGone:
          consumer_.reset();
          next_attempt_ns_ = now_ns();  // a restarted producer may be there already
          return ShmEvent::kProducerLost;
      }
    }
    const std::int64_t now = now_ns();
    if (now < next_attempt_ns_) return ShmEvent::kNone;
    next_attempt_ns_ = now + options_.reattach_interval_ns;
    std::string why;
    switch (ShmRingConsumer::try_attach(path_, consumer_, why, options_.liveness_interval_ns)) {
      case ShmAttach::kAttached:
        generation_ = consumer_->generation();
        producer_pid_ = consumer_->producer_pid();
        error_.clear();
        return ShmEvent::kAttached;
      case ShmAttach::kRefused:
        if (why == error_) return ShmEvent::kNone;
        error_ = std::move(why);
        return ShmEvent::kRefused;
      case ShmAttach::kNoRing:
      case ShmAttach::kNotReady:
      case ShmAttach::kNoProducer:
        return ShmEvent::kNone;
    }
    return ShmEvent::kNone;
  }

  // Blocks until an event or the deadline (deadline_ns < 0: none; kNone then).
  ShmEvent wait(TokenRecord& out, std::int64_t deadline_ns) {
    for (;;) {
      const ShmEvent e = poll(out);
      if (e != ShmEvent::kNone) return e;
      const std::int64_t now = now_ns();
      if (deadline_ns >= 0 && now >= deadline_ns) return ShmEvent::kNone;
      if (consumer_) {
        consumer_->wait_readable(deadline_ns);
      } else {
        std::int64_t until = next_attempt_ns_;
        if (deadline_ns >= 0) until = std::min(until, deadline_ns);
        const timespec ts = to_timespec(until);
        ::clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, nullptr);
      }
    }
  }

  const std::string& name() const noexcept { return path_; }
  bool attached() const noexcept { return consumer_ != nullptr; }
  // The generation of the producer attached last (0: never attached).
  std::uint64_t generation() const noexcept { return generation_; }
  std::int32_t producer_pid() const noexcept { return producer_pid_; }
  // Why the ring was refused, the last time it was (empty once attached).
  const std::string& error() const noexcept { return error_; }
  ShmRingConsumer* consumer() const noexcept { return consumer_.get(); }

  // Lets go of the ring (a new reader can then attach).
  void detach() noexcept { consumer_.reset(); }

 private:
  std::string path_;
  ShmReaderOptions options_;
  std::unique_ptr<ShmRingConsumer> consumer_;
  std::int64_t next_attempt_ns_ = 0;
  std::uint64_t generation_ = 0;
  std::int32_t producer_pid_ = 0;
  std::string error_;
};

}  // namespace pydisco
