"""Optional compiled CPU kernels, called from jitted JAX code through the XLA FFI.

`build.py` compiles a C++ source on first use (system compiler, `-march=native`) into an on-disk cache; `amx.py`
runs bf16 matrix multiplies, the gated MLP and grouped-query attention on Intel AMX tiles, which the model uses on
CPUs that have them; `decode.py` runs f32 attention for a few query tokens over a KV cache (decoding) without
copying the cache; `wrappers.py` gives every kernel the gradient of the XLA function it equals. Everything here
is optional: when a kernel cannot be built or the CPU lacks the instructions, the XLA op is used.
"""
