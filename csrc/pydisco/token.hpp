// One token of an answer as it travels from the migration machine through the pacer to the
// application. Fixed size (two cache lines) so the ring never allocates on the token path.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <string_view>

#include "spsc_ring.hpp"

namespace pydisco {

using EndpointId = std::uint16_t;

struct alignas(64) TokenRecord {
  // Longest UTF-8 text piece one record carries. Single tokens of current vocabularies are
  // far shorter; a longer piece is refused by set_text, never truncated.
  static constexpr std::size_t kTextCapacity = 88;

  std::uint64_t position = 0;     // 0-based index in the answer
  std::int64_t produced_ns = 0;   // when the endpoint produced it (its own report, our clock)
  std::int64_t arrived_ns = 0;    // when it was committed to the ring
  std::int64_t released_ns = 0;   // when the pacer released it to the application (0: not yet)
  std::int32_t token_id = -1;     // -1 when the endpoint gave no id (text-only upstream)
  EndpointId source = 0;          // which endpoint produced it
  std::uint8_t text_len = 0;
  char text[kTextCapacity] = {};

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
