// One token of an answer as it travels from the migration machine through the pacer to the
// application. Fixed size (two cache lines) so the ring never allocates on the token path.
//
// The same record also carries the end of an answer (kind kEnd, see end_of_answer), so a
// reader blocked on a ring learns that the answer is over, and why, from the ring itself.
#pragma once

#include <array>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <string_view>

#include "spsc_ring.hpp"

namespace pydisco {

using EndpointId = std::uint16_t;

enum class RecordKind : std::uint8_t { kToken = 0, kEnd = 1 };

// Why an answer ended. kNone: it has not (or, on a record, the record is a token).
enum class FinishReason : std::uint8_t {
  kNone = 0,
  kStop = 1,       // the committing endpoint ended it (end of text, stop string)
  kLength = 2,     // max_tokens reached
  kFailed = 3,     // no endpoint could continue
  kCancelled = 4,
};
inline constexpr std::size_t kFinishReasonCount = 5;

inline constexpr std::string_view to_string(FinishReason r) noexcept {
  constexpr std::array<std::string_view, kFinishReasonCount> names{"none", "stop", "length",
                                                                  "failed", "cancelled"};
  return names[static_cast<std::size_t>(r)];
}

struct alignas(64) TokenRecord {
  // Longest UTF-8 text piece one record carries. Single tokens of current vocabularies are
  // far shorter; a longer piece is refused by set_text, never truncated.
  static constexpr std::size_t kTextCapacity = 88;

  std::uint64_t position = 0;     // 0-based index in the answer (end record: the token count)
  std::int64_t produced_ns = 0;   // when the endpoint produced it (its own report, our clock)
  std::int64_t arrived_ns = 0;    // when it was committed to the ring
  std::int64_t released_ns = 0;   // when the pacer released it to the application (0: not yet)
  std::int32_t token_id = -1;     // -1 when the endpoint gave no id (text-only upstream)
  EndpointId source = 0;          // which endpoint produced it
  std::uint8_t text_len = 0;
  RecordKind kind = RecordKind::kToken;  // one byte: the record's spare one
  char text[kTextCapacity] = {};

  // The end of an answer: `count` tokens in all, ended for `reason` by endpoint `source`
  // (0 when no endpoint ended it: failure, cancellation) at `at_ns`. The reason travels in
  // token_id; the text is empty.
  static TokenRecord end_of_answer(std::uint64_t count, FinishReason reason, EndpointId source,
                                   std::int64_t at_ns) noexcept {
    TokenRecord r;
    r.kind = RecordKind::kEnd;
    r.position = count;
    r.token_id = static_cast<std::int32_t>(reason);
    r.source = source;
    r.arrived_ns = at_ns;
    return r;
  }

  bool is_end() const noexcept { return kind == RecordKind::kEnd; }

  FinishReason finish_reason() const noexcept {
    return is_end() ? static_cast<FinishReason>(token_id) : FinishReason::kNone;
  }

  // Refuses a piece longer than kTextCapacity with std::length_error (Python: ValueError).
  static void check_text(std::string_view piece) {
    if (piece.size() > kTextCapacity)
      throw std::length_error("token text of " + std::to_string(piece.size()) +
                              " bytes exceeds the record capacity of " +
                              std::to_string(kTextCapacity));
  }

  [[nodiscard]] bool set_text(std::string_view piece) noexcept {
    if (piece.size() > kTextCapacity) return false;
    std::memcpy(text, piece.data(), piece.size());
    text_len = static_cast<std::uint8_t>(piece.size());
    return true;
  }

  std::string_view text_view() const noexcept { return {text, text_len}; }
};

static_assert(sizeof(TokenRecord) == 128, "TokenRecord should stay two cache lines");

using TokenRing = SpscRing<TokenRecord>;

}  // namespace pydisco
