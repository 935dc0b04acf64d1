// A plain assertion that survives NDEBUG and says where it failed.
#pragma once

#include <cstdio>
#include <cstdlib>

#define CHECK(cond)                                                              \
  do {                                                                           \
    if (!(cond)) {                                                               \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                              \
    }                                                                            \
  } while (0)

#define CHECK_THROWS(expr, Exception)                  \
  do {                                                 \
    bool thrown_ = false;                              \
    try {                                              \
      (void)(expr);                                    \
    } catch (const Exception&) {                       \
      thrown_ = true;                                  \
    }                                                  \
    CHECK(thrown_ && "expected " #Exception);          \
  } while (0)
