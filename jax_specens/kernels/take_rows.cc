// out[i, :] = table[ids[i], :] for a table of 16-bit values (bfloat16 or float16, copied as bits):
// the embedding lookup of a decode step. XLA's CPU backend gathers 16-bit floats from a float32
// copy of the whole table (its float normalization), which it then hoists out of the decode loop:
// a copy of every embedding on every `decode` call. A custom call is left alone.
// As jnp.take (mode "fill"): a negative id counts from the end; an id still outside the table
// gives a row of 0xFFFF, a NaN in both formats.
#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error TakeRowsImpl(ffi::AnyBuffer table, ffi::Buffer<ffi::S32> ids,
                        ffi::Result<ffi::AnyBuffer> out) {
  const auto td = table.dimensions();
  if (td.size() != 2 || ffi::ByteWidth(table.element_type()) != 2)
    return ffi::Error::InvalidArgument("table must be a 2-D array of 16-bit values");
  const int64_t V = td[0], D = td[1], n = ids.element_count();
  if (out->element_count() != n * D) return ffi::Error::InvalidArgument("out must be ids x D");
  const auto* t = static_cast<const uint16_t*>(table.untyped_data());
  auto* o = static_cast<uint16_t*>(out->untyped_data());
  const int32_t* id = ids.typed_data();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = id[i] < 0 ? id[i] + V : id[i];
    if (r >= 0 && r < V) {
      std::memcpy(o + i * D, t + r * D, D * sizeof(uint16_t));
    } else {
      std::memset(o + i * D, 0xFF, D * sizeof(uint16_t));
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxSpecensTakeRows, TakeRowsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>());
